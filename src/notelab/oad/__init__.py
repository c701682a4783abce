"""Online action detection: OadTR (Wang et al. 2021) against TRN (Xu et al. 2019), LSTM / GRU and a
causal Transformer; streaming inference; training and evaluation on action streams."""

from notelab.oad.config import CausalTransformerConfig, OadTRConfig, RNNDetectorConfig, TRNConfig
from notelab.oad.factory import MODELS, build_model, load_detector, model_config
from notelab.oad.loss import ignore_ambiguous_cross_entropy, oad_loss
from notelab.oad.oadtr import CausalTransformer, OADOutput, OadTR
from notelab.oad.streaming import OnlineDetector, padded_windows, stream_speed, window_outputs
from notelab.oad.training import evaluate_detector, train_detector
from notelab.oad.trn import TRN, RNNDetector

__all__ = [
    "MODELS",
    "TRN",
    "CausalTransformer",
    "CausalTransformerConfig",
    "OADOutput",
    "OadTR",
    "OadTRConfig",
    "OnlineDetector",
    "RNNDetector",
    "RNNDetectorConfig",
    "TRNConfig",
    "build_model",
    "evaluate_detector",
    "ignore_ambiguous_cross_entropy",
    "load_detector",
    "model_config",
    "oad_loss",
    "padded_windows",
    "stream_speed",
    "train_detector",
    "window_outputs",
]
