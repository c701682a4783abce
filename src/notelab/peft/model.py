"""``PeftModel``: named adapters on any ``nn.Module``, switched, disabled, merged and unloaded.

    peft = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    peft.add_adapter("other", IA3Config());  peft.set_adapter("other")
    with peft.disable_adapter(): base_out = peft(x)
    merged = peft.merge_and_unload()           # the base model with W + s B A, no wrappers left

Only adapter parameters require gradients (:func:`mark_only_adapters_trainable`), and
``state_dict()`` holds only adapter tensors, so ``notelab.train.fit``'s checkpoints of a
``PeftModel`` are adapter-only (an 8B base is never rewritten); ``full_state_dict()`` has everything.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from notelab.core.errors import CheckpointError, ConfigError
from notelab.peft.config import (
    AdapterConfig,
    BitFitConfig,
    BottleneckConfig,
    IA3Config,
    LoraConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
)
from notelab.peft.layers import (
    BiasTune,
    Bottleneck,
    IA3Linear,
    KVPrefix,
    LoraEmbedding,
    LoraLinear,
    PrefixEncoder,
    SoftPrompt,
)
from notelab.peft.tuners import (
    AdapterModule,
    TunerLayer,
    _matches,
    adapter_modules,
    base_of,
    find_targets,
    is_adapter_name,
    mark_only_adapters_trainable,
    replace_module,
)


def _wrap(model: nn.Module, name: str, layer_type: type, make: Any) -> Any:
    """The ``layer_type`` adapter layer at ``name``: the existing one, or ``make(module)`` put in its place."""
    m = model.get_submodule(name)
    if isinstance(m, layer_type):
        return m
    layer = make(m)
    replace_module(model, name, layer)
    return layer


def inject(model: nn.Module, config: AdapterConfig, name: str, prefix_owner: nn.ModuleDict | None = None) -> list[str]:
    """Add adapter ``name`` of ``config`` to the matching modules of ``model``; the module names adapted.

    Every name is checked before the first module is wrapped. Prefix tuning needs ``prefix_owner`` (where
    the shared :class:`PrefixEncoder` is registered).
    """
    if isinstance(config, LoraConfig):

        def linear_or_embedding(m: nn.Module) -> bool:
            return isinstance(base_of(m), (nn.Linear, nn.Embedding))

        names = find_targets(
            model, config.target_modules, config.exclude_modules, linear_or_embedding, "Linear / Embedding"
        )
        for n in names:
            lora = LoraEmbedding if isinstance(base_of(model.get_submodule(n)), nn.Embedding) else LoraLinear
            _wrap(model, n, lora, lora).add(name, config)
    elif isinstance(config, IA3Config):
        names = find_targets(model, config.target_modules, config.exclude_modules,
                             lambda m: isinstance(base_of(m), nn.Linear), "Linear")  # fmt: skip
        ff = config.feedforward_modules
        if ff is not None and ff != "all-linear":  # PEFT's rule: the feed-forward modules are among the targets
            ff_names = find_targets(model, ff, None, lambda m: isinstance(base_of(m), nn.Linear), "Linear")
            outside = [n for n in ff_names if n not in names]
            if outside:
                raise ConfigError(f"IA3Config.feedforward_modules {ff!r}: expected a subset of the targets, "
                                  f"{outside[0]} is not one (target_modules {config.target_modules!r})")  # fmt: skip
        for n in names:
            is_ff = ff is not None and (ff == "all-linear" or _matches(n, ff))
            _wrap(model, n, IA3Linear, lambda m, f=is_ff: IA3Linear(m, f)).add(name, config)
    elif isinstance(config, BitFitConfig):
        names = find_targets(model, config.target_modules, config.exclude_modules,
                             lambda m: isinstance(base_of(m), nn.Linear), "Linear")  # fmt: skip
        for n in names:
            _wrap(model, n, BiasTune, BiasTune).add(name, config)
    elif isinstance(config, BottleneckConfig):
        names = find_targets(model, config.target_modules, config.exclude_modules,
                             lambda m: any(True for _ in m.parameters()), "parametrised")  # fmt: skip
        for n in names:
            _wrap(model, n, Bottleneck, Bottleneck).add(name, config)
    elif isinstance(config, PromptTuningConfig):
        names = find_targets(model, config.target_modules, config.exclude_modules,
                             lambda m: isinstance(base_of(m), nn.Embedding), "Embedding")  # fmt: skip
        if len(names) != 1:
            raise ConfigError(f"PromptTuningConfig.target_modules: expected one input embedding, matched {names}")
        _wrap(model, names[0], SoftPrompt, SoftPrompt).add(name, config)
    elif isinstance(config, PrefixTuningConfig):
        names = _inject_prefix(model, config, name, prefix_owner)
    else:
        raise ConfigError(f"config: expected a notelab.peft config, got {type(config).__name__}")
    return names


def _inject_prefix(model: nn.Module, config: PrefixTuningConfig, name: str, owner: nn.ModuleDict | None) -> list[str]:
    def is_attention(m: nn.Module) -> bool:
        return all(hasattr(m, a) for a in ("kv_prefix", "n_kv_heads", "head_dim"))

    names = find_targets(model, config.target_modules, config.exclude_modules, is_attention,
                         "attention (with a kv_prefix hook, n_kv_heads, head_dim)")  # fmt: skip
    if owner is None:
        raise ConfigError("PrefixTuningConfig: prefix tuning needs a PeftModel (it owns the prefix encoder)")
    mods = [model.get_submodule(n) for n in names]
    shapes = {(m.n_kv_heads, m.head_dim) for m in mods}
    if len(shapes) != 1:
        raise ConfigError(
            f"PrefixTuningConfig: expected one (n_kv_heads, head_dim) in every layer, got {sorted(shapes)}"
        )
    hkv, d = shapes.pop()
    p = next(model.parameters())
    token_dim = getattr(mods[0], "n_heads", hkv) * d
    owner[name] = PrefixEncoder(len(mods), hkv, d, config, token_dim).to(device=p.device, dtype=p.dtype)
    for i, m in enumerate(mods):
        if m.kv_prefix is None:
            m.kv_prefix = KVPrefix(i)
        m.kv_prefix.add(name, owner[name])
    return names


class PeftModel(nn.Module):
    """A base model with named adapters (module docstring). Attributes it lacks are read from the base model."""

    def __init__(self, base_model: nn.Module, config: AdapterConfig, adapter_name: str = "default") -> None:
        super().__init__()
        self.base_model = base_model
        self.prefix_encoders = nn.ModuleDict()
        self.peft_config: dict[str, AdapterConfig] = {}
        self.active_adapter = adapter_name
        self.base_identity: dict[str, str] = {}  # e.g. {"path": ..., "sha256": ...} of the frozen base, for runs
        self.add_adapter(adapter_name, config)
        self.set_adapter(adapter_name)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_model", "prefix_encoders"):
                raise
            return getattr(self.base_model, name)

    @property
    def activation_checkpointing(self) -> bool:
        return self.base_model.activation_checkpointing

    @activation_checkpointing.setter
    def activation_checkpointing(self, value: bool) -> None:
        self.base_model.activation_checkpointing = value

    # -- adapters -----------------------------------------------------------------------------------

    def add_adapter(self, name: str, config: AdapterConfig) -> None:
        """Inject adapter ``name`` (frozen base, trainable adapters); it becomes active only by :meth:`set_adapter`."""
        if not isinstance(name, str) or not name.isidentifier():
            raise ConfigError(f"adapter name: expected an identifier, got {name!r}")
        if name in self.peft_config:
            raise ConfigError(f"adapter {name!r} exists already; known: {', '.join(self.peft_config)}")
        inject(self.base_model, config, name, self.prefix_encoders)
        self.peft_config[name] = config
        mark_only_adapters_trainable(self)
        self.set_adapter(self.active_adapter if self.active_adapter in self.peft_config else name)

    def set_adapter(self, name: str) -> None:
        """Make ``name`` the one running adapter (others stay in place, inactive)."""
        if name not in self.peft_config:
            raise ConfigError(f"unknown adapter {name!r}; known: {', '.join(sorted(self.peft_config))}")
        for m in adapter_modules(self):
            if m.merged_adapters and name not in m.merged_adapters:
                m.unmerge()
            m.set_adapter([name])
        self.active_adapter = name

    def adapter_layers(self) -> list[AdapterModule]:
        return adapter_modules(self)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model: merged adapters are unmerged first (restored merged state is not re-applied)."""
        layers = self.adapter_layers()
        for m in layers:
            m.unmerge()
            m.disabled = True
        try:
            yield
        finally:
            for m in layers:
                m.disabled = False

    def merge_adapter(self) -> None:
        """Fold the active adapter into the base weights (LoRA, IA3, BitFit); other methods refuse with a reason."""
        for m in self.adapter_layers():
            if self.active_adapter in m.adapter_names:
                m.merge()

    def unmerge_adapter(self) -> None:
        for m in self.adapter_layers():
            m.unmerge()

    def _check_mergeable(self, what: str) -> None:
        kinds = {type(c).__name__ for c in self.peft_config.values()} - {"LoraConfig", "IA3Config", "BitFitConfig"}
        if kinds:
            raise ConfigError(f"{what}: only LoRA / IA3 / BitFit merge into weights; this model has {sorted(kinds)}")

    def _unwrap(self) -> list[tuple[str, TunerLayer]]:
        """Replace every outermost adapter layer by the module it wraps; the (name, layer) pairs replaced."""
        outer = [
            (n, m)
            for n, m in self.base_model.named_modules()
            if isinstance(m, TunerLayer) and "base_layer" not in n.split(".")
        ]
        for name, m in outer:
            replace_module(self.base_model, name, base_of(m))
        return outer

    def merge_and_unload(self) -> nn.Module:
        """The base model with the active adapter merged and every adapter layer replaced by its base layer."""
        self._check_mergeable("merge_and_unload")
        self.merge_adapter()
        self._unwrap()
        for p in self.base_model.parameters():
            p.requires_grad_(True)
        return self.base_model

    @contextlib.contextmanager
    def merged(self) -> Iterator[nn.Module]:
        """The base model with the active adapter merged in and no adapter layers, until the block ends (then
        the layers come back and the merge is undone): decode paths that read weights directly run it exactly."""
        self._check_mergeable("merged")
        self.merge_adapter()
        swapped = self._unwrap()
        try:
            yield self.base_model
        finally:
            for name, m in swapped:
                replace_module(self.base_model, name, m)
            self.unmerge_adapter()

    def drop_prefix_projection(self) -> None:
        """Prefix tuning after training: keep ``P = MLP(P')``, drop the MLP (Li & Liang 2021, sec. 4.3)."""
        for enc in self.prefix_encoders.values():
            enc.drop_projection()
        mark_only_adapters_trainable(self)

    # -- forward ------------------------------------------------------------------------------------

    def _soft_prompt(self) -> SoftPrompt | None:
        found = [m for m in self.base_model.modules() if isinstance(m, SoftPrompt) and m.prompt_length()]
        return found[0] if found else None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The base model's forward; with a running soft prompt, ``n`` placeholder ids go before the tokens
        (first argument or ``input_ids``), an ``attention_mask`` gains ``n`` ones, and the output's first
        ``n`` positions (logits) are dropped, so outputs align with the given tokens."""
        sp = self._soft_prompt()
        if sp is None:
            return self.base_model(*args, **kwargs)
        n = sp.prompt_length()
        key = "input_ids" if "input_ids" in kwargs else None
        tokens = kwargs[key] if key else args[0]
        if kwargs.get("cache") is not None or kwargs.get("start_pos", 0) != 0 or (len(args) > 1):
            raise ConfigError("prompt tuning: expected whole sequences (no cache / start_pos): the prompt goes first")
        tokens = torch.cat([tokens.new_zeros(tokens.shape[0], n), tokens], dim=1)
        if kwargs.get("attention_mask") is not None:
            am = kwargs["attention_mask"]
            kwargs["attention_mask"] = torch.cat([am.new_ones(am.shape[0], n), am], dim=1)
        if key:
            kwargs[key] = tokens
        else:
            args = (tokens,)
        sp.armed = n
        try:
            out = self.base_model(*args, **kwargs)
        finally:
            sp.armed = 0
        if isinstance(out, torch.Tensor):
            return out[:, n:]
        out.logits = out.logits[:, n:]
        return out

    # -- state --------------------------------------------------------------------------------------

    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> Any:
        """Adapter tensors only (what a training checkpoint of a PeftModel holds); nested calls are unfiltered."""
        full = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        if destination is not None or args:
            return full
        return OrderedDict((k, v) for k, v in full.items() if is_adapter_name(k))

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """Load adapter tensors (what :meth:`state_dict` gives); ``strict`` checks the adapter keys only, the
        frozen base's tensors may be absent (or present, from :meth:`full_state_dict`)."""
        everything = set(super().state_dict())
        missing = sorted(set(self.state_dict()) - set(state_dict))
        unexpected = sorted(set(state_dict) - everything)
        if strict and (missing or unexpected):
            raise CheckpointError(f"PeftModel.load_state_dict: missing adapter tensors {missing[:3]}, "
                                  f"unexpected {unexpected[:3]}")  # fmt: skip
        super().load_state_dict(state_dict, strict=False, assign=assign)
        return nn.modules.module._IncompatibleKeys(missing, unexpected)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return super().state_dict()


def get_peft_model(model: nn.Module, config: AdapterConfig, adapter_name: str = "default") -> PeftModel:
    """``model`` with adapter ``adapter_name`` injected and active; only adapter parameters train."""
    return PeftModel(model, config, adapter_name)
