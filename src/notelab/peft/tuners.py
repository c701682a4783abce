"""Finding the modules to adapt by name, and the bookkeeping every adapter layer shares.

PEFT is non-invasive: a matched module ``m`` is replaced in its parent by a layer that keeps ``m`` as
``base_layer`` and adds named adapters beside it (``lora_A.default``, ``ia3_l.other`` ...). Names follow
Hugging Face PEFT's matching rules:

    target_modules = ["q_proj", "v_proj"]   a module matches when its full name is one of them or ends
                                             with "." + one of them
    target_modules = r".*\\.(q|v)_proj"       a string is a regex matched against the full name
    target_modules = "all-linear"            every nn.Linear except the output layer (lm_head, or a
                                             Linear whose weight is an embedding's)

``exclude_modules`` uses the same rules. A pattern that matches nothing is an error naming the modules
that could have matched.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import torch
from torch import nn

from notelab.core.errors import ConfigError

# A name component marking an adapter's own tensors (PEFT's names); everything else is the frozen base.
ADAPTER_KEYS = (
    "lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "ia3_l", "adapter_down", "adapter_up",
    "prompt_embeddings", "prefix_encoders", "bitfit_bias",
)  # fmt: skip


def is_adapter_name(name: str) -> bool:
    """Whether a parameter / state-dict name belongs to an adapter."""
    return any(part in ADAPTER_KEYS for part in name.split("."))


def base_of(module: nn.Module) -> nn.Module:
    """The innermost wrapped module (through nested adapter layers)."""
    while isinstance(module, TunerLayer):
        module = module.base_layer
    return module


def _matches(name: str, pattern: list[str] | str) -> bool:
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == p or name.endswith("." + p) for p in pattern)


def _output_layer_names(model: nn.Module) -> set[str]:
    """Linear layers ``all-linear`` leaves alone: ``lm_head`` and any Linear sharing an embedding's weight."""
    embeds = {id(base_of(m).weight) for _, m in model.named_modules() if isinstance(base_of(m), nn.Embedding)}
    out = set()
    for name, m in _candidates(model):
        b = base_of(m)
        if isinstance(b, nn.Linear) and (name.split(".")[-1] == "lm_head" or id(b.weight) in embeds):
            out.add(name)
    return out


def _candidates(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Named modules a pattern may match: not the root, not inside an adapter or a wrapped base layer."""
    for name, m in model.named_modules():
        parts = name.split(".")
        if name and "base_layer" not in parts and not any(p in ADAPTER_KEYS or p == "kv_prefix" for p in parts):
            yield name, m


def find_targets(
    model: nn.Module,
    target_modules: list[str] | str,
    exclude_modules: list[str] | str | None,
    accept: Callable[[nn.Module], bool],
    what: str,
) -> list[str]:
    """Names of the modules to adapt (module docstring), in ``named_modules`` order.

    ``accept(module)`` says whether the method can adapt a module (e.g. a Linear for LoRA); ``what`` names
    that kind in errors. :class:`ConfigError` when nothing is left, naming the modules available.
    """
    cands = list(_candidates(model))
    if target_modules == "all-linear":
        skip = _output_layer_names(model)
        names = [n for n, m in cands if isinstance(base_of(m), nn.Linear) and n not in skip]
    else:
        names = [n for n, m in cands if _matches(n, target_modules)]
        wrong = [n for n in names if not accept(dict(cands)[n])]
        if wrong:
            raise ConfigError(f"target_modules {target_modules!r}: expected {what} modules, {wrong[0]} is "
                              f"{type(base_of(dict(cands)[wrong[0]])).__name__}")  # fmt: skip
    if exclude_modules is not None:
        names = [n for n in names if not _matches(n, exclude_modules)]
    if not names:
        available = sorted({n.split(".")[-1] for n, m in cands if accept(m)})
        raise ConfigError(
            f"target_modules {target_modules!r} (exclude_modules {exclude_modules!r}) matched no {what} module; "
            f"available: {', '.join(available) or 'none'}"
        )
    return names


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where ``name`` is in ``model``."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


class AdapterModule(nn.Module):
    """Bookkeeping shared by every adapter: the named adapters it holds, which are active, merged, disabled."""

    def __init__(self) -> None:
        super().__init__()
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False

    @property
    def adapter_names(self) -> list[str]:
        raise NotImplementedError

    def set_adapter(self, names: list[str]) -> None:
        self.active_adapters = [n for n in names if n in self.adapter_names]

    def running(self) -> list[str]:
        """Adapters that act in this forward: active, not merged into the base, not disabled."""
        return [] if self.disabled else [a for a in self.active_adapters if a not in self.merged_adapters]

    def merge(self) -> None:
        """Fold the active adapters into the base weights (output unchanged, no extra compute)."""
        for a in self.active_adapters:
            if a not in self.merged_adapters:
                self.merge_one(a, +1)
                self.merged_adapters.append(a)

    def unmerge(self) -> None:
        """Undo :meth:`merge` (in reverse order)."""
        while self.merged_adapters:
            self.merge_one(self.merged_adapters.pop(), -1)

    def merge_one(self, name: str, sign: int) -> None:
        raise ConfigError(f"{type(self).__name__}: this adapter is not linear in the base weights and cannot be merged")

    def delete_adapter(self, name: str) -> None:
        for attr in ADAPTER_KEYS:
            holder = getattr(self, attr, None)
            if isinstance(holder, (nn.ModuleDict, nn.ParameterDict)) and name in holder:
                del holder[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]


class TunerLayer(AdapterModule):
    """An adapter layer wrapping ``base_layer`` (kept frozen, under its own name)."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight: code that reads ``module.weight`` (ties, devices, dtypes) keeps working."""
        return base_of(self).weight

    @property
    def bias(self) -> torch.Tensor | None:
        return base_of(self).bias


def adapter_modules(model: nn.Module) -> list[AdapterModule]:
    return [m for m in model.modules() if isinstance(m, AdapterModule)]


def mark_only_adapters_trainable(model: nn.Module) -> int:
    """``requires_grad`` on adapter parameters only; returns how many parameters are trainable."""
    n = 0
    for name, p in model.named_parameters():
        p.requires_grad_(is_adapter_name(name))
        n += p.numel() if p.requires_grad else 0
    return n


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, shared tensors once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
