"""Adapter configurations: one small dataclass per method, with Hugging Face PEFT's field names.

Every config names the modules it adapts (``target_modules``: a list of names, a regex, or
``"all-linear"``; ``exclude_modules`` the same) and is checked field by field on construction, so a
bad value is one :class:`ConfigError` line before anything is wrapped or allocated.
``peft_type`` is the string PEFT writes into ``adapter_config.json``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from notelab.core.errors import ConfigError, unknown_name

Targets = list[str] | str | None


def _check_targets(name: str, value: Any, allow_none: bool) -> Targets:
    if value is None and allow_none:
        return None
    if isinstance(value, str) and value:
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) and v for v in value):
        return list(value)
    want = "None, " if allow_none else ""
    raise ConfigError(f"{name}: expected {want}a module name list, a regex or 'all-linear', got {value!r}")


def _check_int(name: str, value: Any, low: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ConfigError(f"{name}: expected an integer >= {low}, got {value!r}")


def _check_float(name: str, value: Any, low: float, high: float | None = None, closed_low: bool = True) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= low if closed_low else value > low) and (high is None or value < high)
    if not ok:
        rng = f"{'[' if closed_low else '('}{low}, {high if high is not None else 'inf'})"
        raise ConfigError(f"{name}: expected a number in {rng}, got {value!r}")


@dataclass
class LoraConfig:
    """LoRA (Hu et al. 2021): ``h = W x + (alpha / r) B A x``; rsLoRA (Kalajdzievski 2023) uses ``alpha / sqrt(r)``."""

    peft_type: ClassVar[str] = "LORA"
    r: int = 8  # rank of the update
    lora_alpha: float = 8.0  # the update is scaled by lora_alpha / r (or / sqrt(r) with use_rslora)
    lora_dropout: float = 0.0  # dropout on the adapter's input only
    target_modules: Targets = "all-linear"
    exclude_modules: Targets = None
    use_rslora: bool = False
    init_lora_weights: str | bool = True  # True / "kaiming": A kaiming-uniform; "gaussian": A ~ N(0, 1/r); B = 0

    def __post_init__(self) -> None:
        _check_int("LoraConfig.r", self.r)
        _check_float("LoraConfig.lora_alpha", self.lora_alpha, 0.0, closed_low=False)
        _check_float("LoraConfig.lora_dropout", self.lora_dropout, 0.0, 1.0)
        self.target_modules = _check_targets("LoraConfig.target_modules", self.target_modules, False)
        self.exclude_modules = _check_targets("LoraConfig.exclude_modules", self.exclude_modules, True)
        if not isinstance(self.use_rslora, bool):
            raise ConfigError(f"LoraConfig.use_rslora: expected true or false, got {self.use_rslora!r}")
        if self.init_lora_weights not in (True, "kaiming", "gaussian"):
            raise ConfigError(
                f"LoraConfig.init_lora_weights: expected true, 'kaiming' or 'gaussian', got {self.init_lora_weights!r}"
            )

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


@dataclass
class IA3Config:
    """(IA)^3 (Liu et al. 2022): learned vectors rescale activations, ``l * (W x)`` or ``W (l * x)``.

    ``feedforward_modules`` (a subset of the targets) are scaled at their input, the others at their output.
    """

    peft_type: ClassVar[str] = "IA3"
    target_modules: Targets = field(default_factory=lambda: ["k_proj", "v_proj", "down_proj"])
    feedforward_modules: Targets = field(default_factory=lambda: ["down_proj"])
    exclude_modules: Targets = None

    def __post_init__(self) -> None:
        self.target_modules = _check_targets("IA3Config.target_modules", self.target_modules, False)
        self.feedforward_modules = _check_targets("IA3Config.feedforward_modules", self.feedforward_modules, True)
        self.exclude_modules = _check_targets("IA3Config.exclude_modules", self.exclude_modules, True)


@dataclass
class BottleneckConfig:
    """Bottleneck adapters (Houlsby et al. 2019): ``y + W_up f(W_down y)`` after each named sub-module.

    ``W_up`` starts at zero, so the adapted model starts as the base model. Houlsby places one after
    attention and one after the feed-forward; Pfeiffer et al. (2020) only after the feed-forward
    (:func:`houlsby`, :func:`pfeiffer`).
    """

    peft_type: ClassVar[str] = "BOTTLENECK"
    bottleneck: int = 16  # width of the down-projection
    target_modules: Targets = field(default_factory=lambda: ["mlp"])
    exclude_modules: Targets = None
    dim: int | None = None  # width of the followed module's output; None: its last Linear's out_features

    def __post_init__(self) -> None:
        _check_int("BottleneckConfig.bottleneck", self.bottleneck)
        if self.dim is not None:
            _check_int("BottleneckConfig.dim", self.dim)
        self.target_modules = _check_targets("BottleneckConfig.target_modules", self.target_modules, False)
        self.exclude_modules = _check_targets("BottleneckConfig.exclude_modules", self.exclude_modules, True)


def houlsby(bottleneck: int = 16, attention: str = "self_attn", mlp: str = "mlp") -> BottleneckConfig:
    """Houlsby et al. (2019): an adapter after the attention block and after the feed-forward block."""
    return BottleneckConfig(bottleneck=bottleneck, target_modules=[attention, mlp])


def pfeiffer(bottleneck: int = 16, mlp: str = "mlp") -> BottleneckConfig:
    """Pfeiffer et al. (2020, AdapterFusion): one adapter after the feed-forward block only."""
    return BottleneckConfig(bottleneck=bottleneck, target_modules=[mlp])


@dataclass
class PromptTuningConfig:
    """Prompt tuning (Lester et al. 2021): ``num_virtual_tokens`` learned embeddings before the input's."""

    peft_type: ClassVar[str] = "PROMPT_TUNING"
    num_virtual_tokens: int = 8
    target_modules: Targets = field(default_factory=lambda: ["embed_tokens"])  # the input embedding
    exclude_modules: Targets = None

    def __post_init__(self) -> None:
        _check_int("PromptTuningConfig.num_virtual_tokens", self.num_virtual_tokens)
        self.target_modules = _check_targets("PromptTuningConfig.target_modules", self.target_modules, False)
        self.exclude_modules = _check_targets("PromptTuningConfig.exclude_modules", self.exclude_modules, True)


@dataclass
class PrefixTuningConfig:
    """Prefix tuning (Li & Liang 2021): learned keys/values ``P_k, P_v`` prepended in every attention layer.

    Trained through the reparameterisation ``P = MLP(P')`` (their section 4.3, ``prefix_projection``),
    ``MLP = Linear(token_dim, encoder_hidden_size) - tanh - Linear(., n_layers * 2 * kv_dim)``; after
    training the MLP is dropped and ``P`` kept. Targets are attention modules with a ``kv_prefix`` slot.
    """

    peft_type: ClassVar[str] = "PREFIX_TUNING"
    num_virtual_tokens: int = 8
    encoder_hidden_size: int = 64
    prefix_projection: bool = True
    target_modules: Targets = field(default_factory=lambda: ["self_attn"])
    exclude_modules: Targets = None

    def __post_init__(self) -> None:
        _check_int("PrefixTuningConfig.num_virtual_tokens", self.num_virtual_tokens)
        _check_int("PrefixTuningConfig.encoder_hidden_size", self.encoder_hidden_size)
        if not isinstance(self.prefix_projection, bool):
            raise ConfigError(
                f"PrefixTuningConfig.prefix_projection: expected true or false, got {self.prefix_projection!r}"
            )
        self.target_modules = _check_targets("PrefixTuningConfig.target_modules", self.target_modules, False)
        self.exclude_modules = _check_targets("PrefixTuningConfig.exclude_modules", self.exclude_modules, True)


@dataclass
class BitFitConfig:
    """BitFit (Ben Zaken et al. 2022): train only bias terms, ``h = W x + b + delta_b``, ``delta_b = 0`` at init.

    A bias-free Linear (LLaMA's) gets a trained bias of its own; merging adds ``delta_b`` to the layer's bias.
    """

    peft_type: ClassVar[str] = "BITFIT"
    target_modules: Targets = "all-linear"
    exclude_modules: Targets = None

    def __post_init__(self) -> None:
        self.target_modules = _check_targets("BitFitConfig.target_modules", self.target_modules, False)
        self.exclude_modules = _check_targets("BitFitConfig.exclude_modules", self.exclude_modules, True)


AdapterConfig = LoraConfig | IA3Config | BottleneckConfig | PromptTuningConfig | PrefixTuningConfig | BitFitConfig
CONFIGS: dict[str, type] = {
    c.peft_type: c
    for c in (LoraConfig, IA3Config, BottleneckConfig, PromptTuningConfig, PrefixTuningConfig, BitFitConfig)
}
METHODS = {"lora": LoraConfig, "ia3": IA3Config, "adapter": BottleneckConfig, "prompt": PromptTuningConfig,
           "prefix": PrefixTuningConfig, "bitfit": BitFitConfig}  # fmt: skip


def config_for(method: str, **fields: Any) -> AdapterConfig:
    """The config of ``method`` (a key of ``METHODS``) from its fields."""
    if method not in METHODS:
        raise unknown_name("PEFT method", method, METHODS)
    return METHODS[method](**fields)


def config_to_json(config: AdapterConfig) -> dict[str, Any]:
    """The fields PEFT's ``adapter_config.json`` holds for this method (plus ``peft_type``)."""
    return {"peft_type": config.peft_type, **dataclasses.asdict(config)}


def config_from_json(data: dict[str, Any], where: str) -> AdapterConfig:
    """Our config from an ``adapter_config.json`` (PEFT's or ours); fields we do not model must be defaults."""
    kind = data.get("peft_type")
    if kind not in CONFIGS:
        raise ConfigError(f"{where}: peft_type: expected one of {', '.join(sorted(CONFIGS))}, got {kind!r}")
    cls = CONFIGS[kind]
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in data.items() if k in names and (v is not None or k == "exclude_modules")}
    if kind == "LORA":
        if data.get("fan_in_fan_out"):
            raise ConfigError(f"{where}: fan_in_fan_out: expected false (nn.Linear layout), got true")
        if data.get("bias", "none") != "none":
            raise ConfigError(f"{where}: bias: expected 'none', got {data.get('bias')!r}")
        if data.get("use_dora"):
            raise ConfigError(f"{where}: use_dora: expected false (DoRA is not implemented), got true")
        if data.get("rank_pattern") or data.get("alpha_pattern"):
            raise ConfigError(f"{where}: rank_pattern / alpha_pattern: expected none, got per-module ranks")
        if kwargs.get("init_lora_weights") not in (True, "kaiming", "gaussian"):
            kwargs["init_lora_weights"] = True  # the initialisation does not matter for loaded weights
    if isinstance(kwargs.get("target_modules"), (set, tuple)):
        kwargs["target_modules"] = sorted(kwargs["target_modules"])
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from e
