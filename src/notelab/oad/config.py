"""Configs of the online action detectors, with the published settings as presets.

Every detector reads a window of ``window`` frame features ``(B, T, d_in)`` whose last frame is the
current one, and returns the current frame's logits over ``n_classes`` (background 0, the
actions, and the ``ambiguous`` class when the data set has one), plus ``n_future`` anticipated
steps for the models that anticipate (OadTR's decoder, TRN's temporal decoder).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from notelab.core.errors import ConfigError, unknown_name


def _check_ints(config: Any, names: tuple[str, ...], minimum: int = 1) -> None:
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ConfigError(f"{type(config).__name__}.{name}: expected an integer >= {minimum}, got {value!r}")


def _check_common(config: Any) -> None:
    _check_ints(config, ("d_in", "window"))
    _check_ints(config, ("n_classes",), minimum=2)
    _check_ints(config, ("n_future",), minimum=0)
    if config.ambiguous is not None and not (
        isinstance(config.ambiguous, int) and 0 < config.ambiguous < config.n_classes
    ):
        raise ConfigError(
            f"{type(config).__name__}.ambiguous: expected a class in 1..{config.n_classes - 1} or None, "
            f"got {config.ambiguous!r}"
        )
    if not 0.0 <= config.dropout < 1.0:
        raise ConfigError(f"{type(config).__name__}.dropout: expected a number in [0, 1), got {config.dropout!r}")


@dataclass
class OadTRConfig:
    """OadTR (Wang et al. 2021, ICCV), defaults = the official repository's ``config.py``."""

    d_in: int = 3072  # frame feature size (TSN rgb 2048 + flow 1024)
    n_classes: int = 22  # THUMOS'14: background, 20 actions, ambiguous
    ambiguous: int | None = 21  # class ignored by the loss and the scores
    window: int = 64  # T past frames, the current one last (``enc_layers``)
    d_model: int = 1024  # ``embedding_dim``, also the decoder's width
    n_heads: int = 8
    n_layers: int = 3  # encoder layers (``num_layers``)
    d_ff: int = 1024  # encoder FFN hidden (``hidden_dim``)
    n_dec_layers: int = 5  # decoder layers; 0 = no decoder (ablation)
    n_dec_heads: int = 4  # ``decoder_num_heads``
    d_ff_dec: int = 1024  # ``decoder_embedding_dim_out``
    n_future: int = 8  # future queries (``query_num``); must be 0 without a decoder
    task_token: bool = True  # False (ablation): the classifier reads the current frame's output
    dropout: float = 0.1  # embeddings, residual branches, FFN, decoder output
    attn_dropout: float = 0.1  # attention weights

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> OadTRConfig:
        """``official`` (74.7M parameters at 3072-d inputs and 22 classes), ``small``, ``tiny``."""
        if name not in OADTR_PRESETS:
            raise unknown_name("OadTR preset", name, OADTR_PRESETS)
        return cls(**{**OADTR_PRESETS[name], **overrides})

    def __post_init__(self) -> None:
        _check_common(self)
        _check_ints(self, ("d_model", "n_heads", "n_layers", "d_ff", "n_dec_heads", "d_ff_dec"))
        _check_ints(self, ("n_dec_layers",), minimum=0)
        if self.d_model % self.n_heads or self.d_model % self.n_dec_heads:
            raise ConfigError(
                f"OadTRConfig: d_model {self.d_model} must be divisible by n_heads {self.n_heads} and n_dec_heads "
                f"{self.n_dec_heads}"
            )
        if (self.n_dec_layers == 0) != (self.n_future == 0):
            raise ConfigError(
                f"OadTRConfig: n_future is the number of decoder queries, expected 0 exactly when n_dec_layers is 0, "
                f"got n_future {self.n_future} and n_dec_layers {self.n_dec_layers}"
            )
        if not 0.0 <= self.attn_dropout < 1.0:
            raise ConfigError(f"OadTRConfig.attn_dropout: expected a number in [0, 1), got {self.attn_dropout!r}")


OADTR_PRESETS: dict[str, dict[str, Any]] = {
    "official": {},
    "small": dict(
        window=16, d_model=64, n_heads=4, n_layers=2, d_ff=128, n_dec_layers=2, n_dec_heads=4, d_ff_dec=128, n_future=4
    ),
    "tiny": dict(
        window=8, d_model=16, n_heads=2, n_layers=1, d_ff=32, n_dec_layers=1, n_dec_heads=2, d_ff_dec=32, n_future=2
    ),
}


@dataclass
class CausalTransformerConfig(OadTRConfig):
    """The causal-Transformer baseline: OadTR's encoder with a causal mask, no task token, no decoder."""

    n_dec_layers: int = 0
    n_future: int = 0
    task_token: bool = False

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> CausalTransformerConfig:
        if name not in OADTR_PRESETS:
            raise unknown_name("causal Transformer preset", name, OADTR_PRESETS)
        base = {k: v for k, v in OADTR_PRESETS[name].items() if k not in ("n_dec_layers", "n_future")}
        return cls(**{**base, **overrides})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_dec_layers or self.task_token:
            raise ConfigError(
                "CausalTransformerConfig: expected n_dec_layers 0 and task_token False (no decoder, no token)"
            )


@dataclass
class TRNConfig:
    """TRN (Xu et al. 2019, ICCV), defaults = its THUMOS'14 setting (4096 hidden units, 64 steps, 8 anticipated)."""

    d_in: int = 3072
    n_classes: int = 22
    ambiguous: int | None = 21
    window: int = 64  # encoder steps
    n_future: int = 8  # decoder steps anticipated at every encoder step (>= 1)
    d_hidden: int = 4096  # LSTM cells of encoder and decoder
    d_fusion: int = 3072  # the frame feature after the fusion layer, also the size of the anticipated future
    dropout: float = 0.1

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> TRNConfig:
        if name not in TRN_PRESETS:
            raise unknown_name("TRN preset", name, TRN_PRESETS)
        return cls(**{**TRN_PRESETS[name], **overrides})

    def __post_init__(self) -> None:
        _check_common(self)
        _check_ints(self, ("d_hidden", "d_fusion", "n_future"))


TRN_PRESETS: dict[str, dict[str, Any]] = {
    "official": {},
    "small": dict(window=16, n_future=4, d_hidden=64, d_fusion=64),
    "tiny": dict(window=8, n_future=2, d_hidden=16, d_fusion=16),
}


@dataclass
class RNNDetectorConfig:
    """An LSTM or GRU over the window, classifying the current frame from the last hidden state."""

    d_in: int = 3072
    n_classes: int = 22
    ambiguous: int | None = 21
    window: int = 64
    cell: str = "lstm"  # lstm | gru
    d_hidden: int = 1024
    n_layers: int = 1
    dropout: float = 0.1
    n_future: int = 0  # no anticipation

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> RNNDetectorConfig:
        if name not in RNN_PRESETS:
            raise unknown_name("RNN preset", name, RNN_PRESETS)
        return cls(**{**RNN_PRESETS[name], **overrides})

    def __post_init__(self) -> None:
        _check_common(self)
        _check_ints(self, ("d_hidden", "n_layers"))
        if self.cell not in RNN_CELLS:
            raise unknown_name("RNN cell", self.cell, RNN_CELLS)
        if self.n_future:
            raise ConfigError(
                f"RNNDetectorConfig.n_future: the RNN baselines do not anticipate, expected 0, got {self.n_future}"
            )


RNN_CELLS = ("lstm", "gru")
RNN_PRESETS: dict[str, dict[str, Any]] = {
    "official": {},
    "small": dict(window=16, d_hidden=64),
    "tiny": dict(window=8, d_hidden=16),
}
