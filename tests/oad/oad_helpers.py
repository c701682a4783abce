"""Tiny detectors shared by the oad tests."""

from notelab.oad import (
    TRN,
    CausalTransformer,
    CausalTransformerConfig,
    OadTR,
    OadTRConfig,
    RNNDetector,
    RNNDetectorConfig,
    TRNConfig,
)

D, C, AMB = 6, 5, 4


def tiny_models():
    common = dict(d_in=D, n_classes=C, ambiguous=AMB)
    return [
        OadTR(OadTRConfig.from_name("tiny", dropout=0.0, attn_dropout=0.0, **common)),
        CausalTransformer(CausalTransformerConfig.from_name("tiny", dropout=0.0, **common)),
        TRN(TRNConfig.from_name("tiny", dropout=0.0, **common)),
        RNNDetector(RNNDetectorConfig.from_name("tiny", cell="lstm", **common)),
        RNNDetector(RNNDetectorConfig.from_name("tiny", cell="gru", **common)),
    ]
