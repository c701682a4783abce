"""The adapter layers: LoRA (Linear, Embedding), IA3, BitFit, bottleneck adapters, soft prompts, KV prefixes.

LoRA (Hu et al. 2021, eq. 3), for a frozen ``W`` (out, in)::

    h = W x + s B A x,     A (r, in), B (out, r),  s = alpha / r   (rsLoRA, Kalajdzievski 2023: alpha / sqrt(r))

``B = 0`` at init, so ``h = W x``; ``merge`` replaces ``W`` by ``W + s B A`` (no extra latency). For an
embedding ``E`` (num, dim) the update is ``E + s (B A)^T`` with ``A`` (r, num), ``B`` (dim, r) (PEFT's
``lora_embedding_A`` / ``lora_embedding_B``, ``A = 0`` at init).

IA3 (Liu et al. 2022, sec. 3.3): ``h = l * (W x)`` for keys / values, ``h = W (l * x)`` for the
feed-forward's second matrix; ``l = 1`` at init; merging scales the rows (columns) of ``W``.

Bottleneck adapter (Houlsby et al. 2019, fig. 2): ``y + W_up ReLU(W_down y)`` on a sub-module's output
``y``, ``W_up = 0`` at init. Not linear in ``W``: it stays a separate product.

Soft prompt (Lester et al. 2021): the first ``n`` positions' embeddings are replaced by learned
vectors (the caller puts ``n`` placeholder tokens there, see :class:`notelab.peft.PeftModel`).

KV prefix (Li & Liang 2021): per attention layer, learned keys/values ``P_k, P_v`` (Hkv, n, D) that every
query attends to, produced by a shared :class:`PrefixEncoder`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from notelab.core.errors import ConfigError
from notelab.peft.config import (
    BitFitConfig,
    BottleneckConfig,
    IA3Config,
    LoraConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
)
from notelab.peft.tuners import AdapterModule, TunerLayer, base_of


def lora_scaling(config: LoraConfig) -> float:
    """``s = alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA (rank-stabilised: the update's scale no longer
    shrinks as r grows)."""
    return config.scaling


def _init_lora_A(weight: torch.Tensor, how: str | bool, r: int) -> None:
    if how == "gaussian":
        nn.init.normal_(weight, std=1.0 / r)
    else:  # nn.Linear's own init (kaiming-uniform, a = sqrt(5)), as PEFT's default
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))


class LoraLinear(TunerLayer):
    """``W x + s B A dropout(x)`` per running adapter (module docstring)."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_A, self.lora_B, self.lora_dropout = nn.ModuleDict(), nn.ModuleDict(), nn.ModuleDict()
        self.scaling: dict[str, float] = {}

    @property
    def adapter_names(self) -> list[str]:
        return list(self.lora_A)

    def add(self, name: str, config: LoraConfig) -> None:
        base = base_of(self)
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A[name] = nn.Linear(base.in_features, config.r, bias=False, **kw)
        self.lora_B[name] = nn.Linear(config.r, base.out_features, bias=False, **kw)
        _init_lora_A(self.lora_A[name].weight, config.init_lora_weights, config.r)
        nn.init.zeros_(self.lora_B[name].weight)
        self.lora_dropout[name] = nn.Dropout(config.lora_dropout) if config.lora_dropout else nn.Identity()
        self.scaling[name] = lora_scaling(config)

    def delta_weight(self, name: str) -> torch.Tensor:
        """``s B A`` (out, in)."""
        return self.scaling[name] * (self.lora_B[name].weight @ self.lora_A[name].weight)

    def merge_one(self, name: str, sign: int) -> None:
        w = base_of(self).weight
        with torch.no_grad():
            w.add_(sign * self.delta_weight(name).to(w.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        for a in self.running():
            A, B = self.lora_A[a], self.lora_B[a]
            y = y + B(A(self.lora_dropout[a](x.to(A.weight.dtype)))).to(y.dtype) * self.scaling[a]
        return y


class LoraEmbedding(TunerLayer):
    """``E[x] + s (A^T[x]) B^T`` per running adapter: a low-rank update of the embedding table."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_embedding_A, self.lora_embedding_B = nn.ParameterDict(), nn.ParameterDict()
        self.scaling: dict[str, float] = {}

    @property
    def adapter_names(self) -> list[str]:
        return list(self.lora_embedding_A)

    def add(self, name: str, config: LoraConfig) -> None:
        base = base_of(self)
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        # PEFT's choice for embeddings: A = 0 and B random (the product is zero either way).
        self.lora_embedding_A[name] = nn.Parameter(torch.zeros(config.r, base.num_embeddings, **kw))
        self.lora_embedding_B[name] = nn.Parameter(torch.empty(base.embedding_dim, config.r, **kw))
        nn.init.normal_(self.lora_embedding_B[name])
        self.scaling[name] = lora_scaling(config)

    def delta_weight(self, name: str) -> torch.Tensor:
        """``s (B A)^T`` (num, dim)."""
        return self.scaling[name] * (self.lora_embedding_B[name] @ self.lora_embedding_A[name]).T

    def merge_one(self, name: str, sign: int) -> None:
        w = base_of(self).weight
        with torch.no_grad():
            w.add_(sign * self.delta_weight(name).to(w.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        base = base_of(self)
        for a in self.running():
            after_a = F.embedding(x, self.lora_embedding_A[a].T, padding_idx=base.padding_idx)
            y = y + (after_a @ self.lora_embedding_B[a].T).to(y.dtype) * self.scaling[a]
        return y


class IA3Linear(TunerLayer):
    """``l * (W x + b)`` (output scaling) or ``W (l * x) + b`` (``feedforward``: input scaling)."""

    def __init__(self, base_layer: nn.Module, feedforward: bool) -> None:
        super().__init__(base_layer)
        self.feedforward = feedforward
        self.ia3_l = nn.ParameterDict()

    @property
    def adapter_names(self) -> list[str]:
        return list(self.ia3_l)

    def add(self, name: str, config: IA3Config) -> None:
        base = base_of(self)
        shape = (1, base.in_features) if self.feedforward else (base.out_features, 1)  # PEFT's layout
        self.ia3_l[name] = nn.Parameter(torch.ones(shape, device=base.weight.device, dtype=base.weight.dtype))

    def merge_one(self, name: str, sign: int) -> None:
        base, l = base_of(self), self.ia3_l[name].data  # noqa: E741
        factor = l if sign > 0 else 1.0 / l  # an l of exactly 0 cannot be unmerged; IA3 starts at 1
        with torch.no_grad():
            base.weight.mul_(factor.to(base.weight.dtype))
            if not self.feedforward and base.bias is not None:
                base.bias.mul_(factor.flatten().to(base.bias.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        running = self.running()
        if not running:
            return self.base_layer(x)
        scale = torch.stack([self.ia3_l[a].flatten() for a in running]).prod(0)
        if self.feedforward:
            return self.base_layer(x * scale.to(x.dtype))
        y = self.base_layer(x)
        return y * scale.to(y.dtype)


class BiasTune(TunerLayer):
    """BitFit: ``W x + b + delta_b`` per running adapter, ``delta_b`` (out,) zero at init."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.bitfit_bias = nn.ParameterDict()

    @property
    def adapter_names(self) -> list[str]:
        return list(self.bitfit_bias)

    def add(self, name: str, config: BitFitConfig) -> None:
        w = base_of(self).weight
        self.bitfit_bias[name] = nn.Parameter(torch.zeros(w.shape[0], device=w.device, dtype=w.dtype))

    def merge_one(self, name: str, sign: int) -> None:
        base = base_of(self)
        if base.bias is None:  # a bias-free layer gets a (zero) bias to merge into
            base.bias = nn.Parameter(torch.zeros_like(self.bitfit_bias[name]), requires_grad=False)
        with torch.no_grad():
            base.bias.add_(sign * self.bitfit_bias[name].to(base.bias.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        for a in self.running():
            y = y + self.bitfit_bias[a].to(y.dtype)
        return y


class Bottleneck(TunerLayer):
    """``y + W_up ReLU(W_down y)`` on the output ``y`` of ``base_layer`` (the first element of a tuple output)."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.adapter_down, self.adapter_up = nn.ModuleDict(), nn.ModuleDict()

    @property
    def adapter_names(self) -> list[str]:
        return list(self.adapter_down)

    @property
    def weight(self) -> torch.Tensor:
        raise AttributeError("a bottleneck adapter wraps a block, which has no single weight")

    @property
    def bias(self) -> torch.Tensor | None:
        raise AttributeError("a bottleneck adapter wraps a block, which has no single bias")

    def add(self, name: str, config: BottleneckConfig) -> None:
        dim = config.dim or output_width(self.base_layer)
        p = next(self.base_layer.parameters())
        self.adapter_down[name] = nn.Linear(dim, config.bottleneck, device=p.device, dtype=p.dtype)
        self.adapter_up[name] = nn.Linear(config.bottleneck, dim, device=p.device, dtype=p.dtype)
        nn.init.zeros_(self.adapter_up[name].weight)  # the adapter starts as the identity (Houlsby, sec. 2.1)
        nn.init.zeros_(self.adapter_up[name].bias)

    def forward(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201 - the wrapped block's signature
        out = self.base_layer(*args, **kwargs)
        y = out[0] if isinstance(out, tuple) else out
        for a in self.running():
            down, up = self.adapter_down[a], self.adapter_up[a]
            y = y + up(F.relu(down(y.to(down.weight.dtype)))).to(y.dtype)
        return (y, *out[1:]) if isinstance(out, tuple) else y


def output_width(module: nn.Module) -> int:
    """The output width of a block: its last registered Linear's ``out_features``."""
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError(
            f"BottleneckConfig.dim: {type(module).__name__} has no Linear to read its width from; set dim"
        )
    return linears[-1].out_features


class SoftPrompt(TunerLayer):
    """An input embedding whose first ``armed`` positions are replaced by the running adapter's prompt."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.prompt_embeddings = nn.ParameterDict()
        self.armed = 0  # set by PeftModel.forward around a call whose first positions are placeholders

    @property
    def adapter_names(self) -> list[str]:
        return list(self.prompt_embeddings)

    def add(self, name: str, config: PromptTuningConfig) -> None:
        base = base_of(self)
        # Lester et al. (sec. 3.2): initialising from sampled vocabulary embeddings beats random vectors.
        rows = torch.randint(0, base.num_embeddings, (config.num_virtual_tokens,), device=base.weight.device)
        self.prompt_embeddings[name] = nn.Parameter(base.weight.detach()[rows].clone())

    def prompt_length(self) -> int:
        running = self.running()
        return self.prompt_embeddings[running[0]].shape[0] if running else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        running = self.running()
        if not running:
            return y
        if not self.armed:  # called past PeftModel.forward (e.g. a decode loop): the prompt would be silently lost
            raise ConfigError(
                "prompt tuning: the soft prompt goes before the tokens; call the PeftModel with whole sequences "
                "(decode paths that call the base model are not supported), or disable the adapter"
            )
        prompt = self.prompt_embeddings[running[0]].to(y.dtype)
        return torch.cat([prompt.expand(y.shape[0], -1, -1), y[:, self.armed :]], dim=1)


class PrefixEncoder(nn.Module):
    """``P = MLP(P')`` (Li & Liang 2021, sec. 4.3) or ``P`` itself: a table (n, n_layers * 2 * kv_dim).

    Row block ``2 i`` of the last axis holds layer i's keys, ``2 i + 1`` its values, each (Hkv, D) per
    virtual token: PEFT's ``past_key_values`` layout. :meth:`drop_projection` replaces the MLP by its output.
    """

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, config: PrefixTuningConfig, token_dim: int):
        super().__init__()
        self.n_layers, self.n_kv_heads, self.head_dim = n_layers, n_kv_heads, head_dim
        out = n_layers * 2 * n_kv_heads * head_dim
        n = config.num_virtual_tokens
        if config.prefix_projection:
            self.embedding = nn.Parameter(torch.randn(n, token_dim))
            self.mlp = nn.Sequential(nn.Linear(token_dim, config.encoder_hidden_size), nn.Tanh(),
                                     nn.Linear(config.encoder_hidden_size, out))  # fmt: skip
        else:
            self.embedding = nn.Parameter(torch.randn(n, out))
            self.mlp = None

    def table(self) -> torch.Tensor:
        return self.embedding if self.mlp is None else self.mlp(self.embedding)

    def layer_kv(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``i``'s prefix keys and values (Hkv, n, D): only its rows of the MLP's output are computed."""
        kv = self.n_kv_heads * self.head_dim
        rows = slice(2 * i * kv, (2 * i + 2) * kv)
        if self.mlp is None:
            t = self.embedding[:, rows]
        else:
            hidden = self.mlp[1](self.mlp[0](self.embedding))
            t = F.linear(hidden, self.mlp[2].weight[rows], self.mlp[2].bias[rows])
        n = t.shape[0]
        k, v = t.view(n, 2, self.n_kv_heads, self.head_dim).permute(1, 2, 0, 3)  # each (Hkv, n, D)
        return k, v

    @torch.no_grad()
    def drop_projection(self) -> None:
        """Keep ``P = MLP(P')`` and drop the MLP (after training: the reparameterisation only helps optimisation)."""
        if self.mlp is not None:
            self.embedding = nn.Parameter(self.table().detach().clone())
            self.mlp = None


class KVPrefix(AdapterModule):
    """The hook an attention module calls after its cache: ``(k, v, mask) -> (k, v, mask)`` with the prefix first.

    Keys/values (B, Hkv, Tk, D) become (B, Hkv, n + Tk, D); a boolean mask (..., Tq, Tk) gains ``n``
    visible columns in front. Without a mask, the bottom-right causal alignment of
    ``notelab.core.attention`` already lets every query see the ``n`` prefix keys.
    """

    def __init__(self, layer: int) -> None:
        super().__init__()
        self.layer = layer
        # The encoders are owned (registered) by the PeftModel; held here without registering them twice.
        self.__dict__["encoders"] = {}

    @property
    def adapter_names(self) -> list[str]:
        return list(self.encoders)

    def add(self, name: str, encoder: PrefixEncoder) -> None:
        self.encoders[name] = encoder

    def delete_adapter(self, name: str) -> None:
        self.encoders.pop(name, None)
        super().delete_adapter(name)

    def forward(
        self, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        for a in self.running():
            pk, pv = self.encoders[a].layer_kv(self.layer)
            n, b = pk.shape[1], k.shape[0]
            k = torch.cat([pk.to(k.dtype).expand(b, -1, -1, -1), k], dim=2)
            v = torch.cat([pv.to(v.dtype).expand(b, -1, -1, -1), v], dim=2)
            if mask is not None:
                mask = torch.cat([mask.new_ones(*mask.shape[:-1], n), mask], dim=-1)
        return k, v, mask
