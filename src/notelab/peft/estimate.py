"""Peak memory of a fine-tuning run of a Llama-shaped decoder through ``notelab.train.fit``, per GPU.

What is held, with ``w`` the bytes of the compute ``dtype`` (2 for bf16 autocast, 4 for fp32) and
``s`` the optimizer's bytes per trained parameter (8 for AdamW's two fp32 moments)::

    weights    = N_frozen * w + N_train * 4     trained parameters stay float32 (fit's mixed precision:
                                                autocast computes in w, AdamW updates the fp32 values;
                                                4 + 4 + 8 = 16 bytes per trained parameter, as ZeRO's
                                                mixed-precision Adam: Rajbhandari et al. 2020, sec. 3.1)
    gradients  = N_train * 4
    optimizer  = N_train * s

Activations are those the DEFAULT path keeps on CUDA: the model compiled (``torch.compile``: AOTAutograd's
min-cut partitioner recomputes element-wise ops in backward and keeps matmul and attention results),
flash attention (no T x T scores), and the loss ``notelab.lm.train.next_token_loss`` (cross-entropy fused
with the output layer, ``loss_chunk`` tokens at a time: ``notelab.lm.loss``). Per token and layer, bytes::

    2 d * a_res                        the residual stream entering the block and after attention (the
                                       first block's input only when the embedding gets a gradient)
    w (2 d + 2 q + 2 kv + 3 h)         both norms' outputs; q, k, v after RoPE and the attention output;
                                       SwiGLU's gate, up and their product (full fine-tuning; with LoRA,
                                       what an A reads: ``layer_bytes_per_token``)
    4 (2 + H)                          two RMSNorm statistics, attention's log-sum-exp per head
    w r (per LoRA linear)              LoRA's A x

``a_res`` is the residual stream's bytes: 4 when the embedding is float32 (full fine-tuning), else ``w``.
Under autocast the compiled graph also keeps the ``w``-byte copy of every trained block matrix for the
backward (``w * N_train_matrix``). Once per step: the final norm's input and output (``2 N d a_res``),
RoPE's angles (``4 T D``). With activation checkpointing (``fit``'s ``activation_checkpointing=True``) a
block keeps only its input (``d a_res``), the final norm its output, and one block is recomputed at a time
in backward.

The peak is the largest of three moments (``fit`` frees the gradients after each step:
``zero_grad(set_to_none=True)``, so they do not exist during the forward)::

    loss       weights + optimizer + activations + the loss's working set
    backward   weights + optimizer + activations + the last block's backward (3 N h w: SwiGLU's three
               gradients, and the gradient reaching it, N d a_res) + the head's gradient (4 V d, trained)
    end        weights + optimizer + gradients (+ a second V x d float32 gradient when a tied embedding
               is trained: its two gradients are added)

With checkpointing, the late moment is the first block's recompute and backward: weights + optimizer +
gradients + one block's activations and weight copies + its backward.

The chunked loss's working set (``notelab.lm.loss``, c = ``loss_chunk`` tokens of the N = B T): the chunk's
logits and its dL/dz, with the previous chunk's dL/dz still referenced while the next is made (3 c V w
when there are several chunks, 2 c V w for one), dL/dh (N d a_res), and when the head is trained its
float32 gradient (4 V d) and its ``w``-byte copy (V d w, when stored in float32). ``loss_chunk=None``
models a plain cross-entropy over the (N, V) logits: the logits (w), their float32 copy and its gradient.

Sharded (FSDP, ``world_size`` = G GPUs, as ``notelab.train.parallel`` runs it: FSDP2 with the compute
dtype as its ``param_dtype``): weights, gradients and optimizer states are divided by G; the activations
are not (each GPU runs its own micro-batch of ``batch`` sequences); autocast keeps no weight copies (the
gathered weights are already in the compute dtype and are freed after each unit); what is gathered whole
at a time is the root unit (embeddings, head, final norm) and two blocks (the one running and the next,
prefetched), ``w`` bytes per parameter.

What is not counted: the CUDA context, the allocator's fragmentation (``max_memory_allocated`` is what is
predicted, not ``nvidia-smi``), the compile's own work buffers. Checked on the CPU against the tensors
the compiled graph saves (``tests/peft/test_estimate.py``) and on an H200 against
``torch.cuda.max_memory_allocated`` (``benchmarks/peft_memory.py``). The eager path (``compile=False``)
keeps more (element-wise intermediates and autocast's casts): it is not what this models.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from notelab.core.errors import ConfigError, unknown_name

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
OPTIMIZER_BYTES = {"adamw": 8, "sgd-momentum": 4, "sgd": 0}
ESTIMATE_METHODS = ("full", "lora", "prefix", "adapter", "prompt", "ia3")
FP32 = 4


@dataclass(frozen=True)
class ModelShape:
    """The sizes that decide a Llama-style decoder's memory (names as in Hugging Face configs in comments)."""

    vocab_size: int  # vocab_size
    dim: int  # hidden_size
    n_layers: int  # num_hidden_layers
    n_heads: int  # num_attention_heads
    n_kv_heads: int  # num_key_value_heads
    hidden_dim: int  # intermediate_size
    tie_embeddings: bool = False  # tie_word_embeddings
    qkv_bias: bool = False  # Qwen1.5 / Qwen2: biases on q, k, v

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def linears(self) -> dict[str, tuple[int, int]]:
        """Per layer: name -> (in_features, out_features)."""
        d, q, kv, h = self.dim, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.hidden_dim
        return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
                "gate_proj": (d, h), "up_proj": (d, h), "down_proj": (h, d)}  # fmt: skip

    def block_matrix_params(self) -> int:
        """Parameters of one block's linears (weights and biases): what autocast casts to the compute dtype."""
        n = sum(i * o for i, o in self.linears().values())
        return n + ((self.n_heads + 2 * self.n_kv_heads) * self.head_dim if self.qkv_bias else 0)

    def n_params(self) -> int:
        per_layer = self.block_matrix_params() + 2 * self.dim
        embeddings = self.vocab_size * self.dim * (1 if self.tie_embeddings else 2)
        return embeddings + self.n_layers * per_layer + self.dim


# Published shapes (config.json of each checkpoint).
PRESETS: dict[str, ModelShape] = {
    "qwen1.5-7b": ModelShape(151936, 4096, 32, 32, 32, 11008, qkv_bias=True),
    "qwen1.5-72b": ModelShape(152064, 8192, 80, 64, 64, 24576, qkv_bias=True),
    "llama-7b": ModelShape(32000, 4096, 32, 32, 32, 11008),
    "llama3-8b": ModelShape(128256, 4096, 32, 32, 8, 14336),
    "llama3-70b": ModelShape(128256, 8192, 80, 64, 8, 28672),
    "llama3.2-1b": ModelShape(128256, 2048, 16, 32, 8, 8192, tie_embeddings=True),
}


def shape_from_hf(cfg: dict[str, Any], where: str = "config.json") -> ModelShape:
    """A :class:`ModelShape` from a Hugging Face ``config.json`` (Llama / Qwen2 / Mistral layout)."""
    keys = {"vocab_size": "vocab_size", "dim": "hidden_size", "n_layers": "num_hidden_layers",
            "n_heads": "num_attention_heads", "hidden_dim": "intermediate_size"}  # fmt: skip
    values: dict[str, Any] = {}
    for ours, theirs in keys.items():
        v = cfg.get(theirs)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"{where}: {theirs}: expected an integer >= 1, got {v!r}")
        values[ours] = v
    values["n_kv_heads"] = cfg.get("num_key_value_heads") or values["n_heads"]
    values["tie_embeddings"] = bool(cfg.get("tie_word_embeddings", False))
    values["qkv_bias"] = bool(cfg.get("attention_bias", cfg.get("model_type") == "qwen2"))
    return ModelShape(**values)


@dataclass(frozen=True)
class MethodSpec:
    """What is trained: the method and its size knobs (LoRA rank on every linear, virtual tokens, bottleneck)."""

    method: str = "full"
    r: int = 8
    num_virtual_tokens: int = 20
    encoder_hidden_size: int = 512
    bottleneck: int = 64
    lora_targets: tuple[str, ...] = ()  # LoRA on these per-layer linears (q_proj, ..., down_proj); () = all

    def __post_init__(self) -> None:
        if self.method not in ESTIMATE_METHODS:
            raise unknown_name("PEFT method", self.method, ESTIMATE_METHODS)
        known = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
        for t in self.lora_targets:
            if t not in known:
                raise unknown_name("LoRA target", t, known)
        for f in ("r", "num_virtual_tokens", "encoder_hidden_size", "bottleneck"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"MethodSpec.{f}: expected an integer >= 1, got {v!r}")


def lora_linears(shape: ModelShape, spec: MethodSpec) -> dict[str, tuple[int, int]]:
    return {n: io for n, io in shape.linears().items() if not spec.lora_targets or n in spec.lora_targets}


def trainable_params(shape: ModelShape, spec: MethodSpec) -> int:
    """Parameters the method trains (LoRA on every linear of every layer; Houlsby adapters, two per layer)."""
    L, d, kv = shape.n_layers, shape.dim, shape.n_kv_heads * shape.head_dim
    n = spec.num_virtual_tokens
    if spec.method == "full":
        return shape.n_params()
    if spec.method == "lora":
        return L * sum(spec.r * (i + o) for i, o in lora_linears(shape, spec).values())
    if spec.method == "prefix":  # P' and the reparameterising MLP, trained together
        out, hid = L * 2 * kv, spec.encoder_hidden_size
        return n * d + d * hid + hid + hid * out + out
    if spec.method == "adapter":
        return L * 2 * (2 * d * spec.bottleneck + spec.bottleneck + d)
    if spec.method == "prompt":
        return n * d
    return L * (2 * kv + shape.hidden_dim)  # ia3: keys, values, the feed-forward's input


def _positive(name: str, v: Any) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ConfigError(f"estimate: {name}: expected an integer >= 1, got {v!r}")


def residual_bytes(spec: MethodSpec, w: int) -> int:
    """The residual stream's bytes: float32 when the embedding is trained (full fine-tuning), else the compute dtype."""
    return FP32 if spec.method == "full" else w


def layer_bytes_per_token(shape: ModelShape, spec: MethodSpec, w: int) -> int:
    """What one block keeps for backward per token on the compiled path (module docstring).

    A norm's output is kept only for a trained weight after it (full) or a LoRA ``A`` reading it; SwiGLU's
    product only for ``down_proj``'s. LoRA's ``A`` reads its own cast of its input, so on ``o_proj`` that
    cast is kept beside the attention output attention's backward keeps (one more ``q`` per token). The
    first block keeps nothing before its first trained module; counted like the others (less its input),
    it is over-estimated when the first trained module comes late in the block (Houlsby's adapter after
    attention; LoRA on ``o_proj`` or the feed-forward only): by at most one block.
    """
    d, q, kv, h = shape.dim, shape.n_heads * shape.head_dim, shape.n_kv_heads * shape.head_dim, shape.hidden_dim
    full, lora = spec.method == "full", set(lora_linears(shape, spec)) if spec.method == "lora" else set()
    elements = 2 * q + 2 * kv + 2 * h  # q, k, v after RoPE, the attention output; SwiGLU's gate and up
    elements += d * (full or bool(lora & {"q_proj", "k_proj", "v_proj"}))  # the attention norm's output
    elements += d * (full or bool(lora & {"gate_proj", "up_proj"}))  # the feed-forward norm's output
    elements += h * (full or "down_proj" in lora) + q * ("o_proj" in lora)
    elements += spec.r * len(lora)  # A x
    if spec.method == "adapter":  # Houlsby: two per block, each keeps its input's cast and its ReLU's output
        elements += 2 * (d + spec.bottleneck)
    elif spec.method == "ia3":  # the unscaled keys and values (the scaled feed-forward input is recomputed)
        elements += 2 * kv
    return 2 * d * residual_bytes(spec, w) + w * elements + FP32 * (2 + shape.n_heads)


def gradient_reaches_embedding(spec: MethodSpec) -> bool:
    """Whether backward runs down to the embedding (a trained table or soft prompt): else the first block's input
    is not kept."""
    return spec.method in ("full", "prompt")


def tokens_per_sequence(spec: MethodSpec, seq: int) -> int:
    return seq + (spec.num_virtual_tokens if spec.method == "prompt" else 0)


def activation_bytes(
    shape: ModelShape,
    spec: MethodSpec,
    batch: int,
    seq: int,
    w: int,
    *,
    checkpointing: bool = False,
    weight_copies: bool = True,
) -> int:
    """Bytes kept for backward after the forward (module docstring); ``weight_copies``: with autocast's copies of
    the trained block matrices (on one GPU; FSDP gathers its units in the compute dtype and frees them)."""
    n = batch * tokens_per_sequence(spec, seq)
    res = residual_bytes(spec, w)
    # the final norm's input, its output (the loss's input), its statistic; RoPE's angles (T, D) in float32
    once = 2 * n * shape.dim * res + FP32 * n + FP32 * tokens_per_sequence(spec, seq) * shape.head_dim
    if checkpointing:  # the final norm's input is recomputed with the last block
        return shape.n_layers * n * shape.dim * res + once - n * shape.dim * res
    per_layer = n * layer_bytes_per_token(shape, spec, w)
    if spec.method == "prefix":  # the prefix's keys and values join every layer's attention inputs
        per_layer += batch * spec.num_virtual_tokens * 2 * shape.n_kv_heads * shape.head_dim * w
    first_input = 0 if gradient_reaches_embedding(spec) else n * shape.dim * res
    copies = weight_copy_bytes(shape, spec, w) if weight_copies else 0
    return shape.n_layers * per_layer - first_input + once + copies


def weight_copy_bytes(shape: ModelShape, spec: MethodSpec, w: int) -> int:
    """The compute-dtype copies of trained float32 block matrices the compiled graph keeps (0 without autocast)."""
    if w >= FP32:
        return 0
    if spec.method == "full":
        return w * shape.n_layers * shape.block_matrix_params()
    return w * trainable_params(shape, spec)


def loss_working_bytes(
    shape: ModelShape, spec: MethodSpec, batch: int, seq: int, w: int, loss_chunk: int | None
) -> int:
    """The loss's transient bytes beyond the activations (module docstring)."""
    n, V, d = batch * tokens_per_sequence(spec, seq), shape.vocab_size, shape.dim
    res = residual_bytes(spec, w)
    if loss_chunk is None:  # logits (w), their float32 copy (log-softmax) and its gradient
        return n * V * (w + (FP32 if w < FP32 else 0) + FP32)
    c = min(loss_chunk, n)
    chunks = 3 if n > c else 2
    total = chunks * c * V * w + n * d * res  # logits / dL/dz of a chunk or two; dL/dh
    if res != w:
        total += n * d * w  # the hidden states cast to the matmul dtype
    if spec.method == "full":
        total += FP32 * V * d + (V * d * w if w < FP32 else 0)  # the head's float32 gradient, its w copy
    return total


def backward_working_bytes(shape: ModelShape, spec: MethodSpec, batch: int, seq: int, w: int) -> int:
    """A block's backward: the gradient reaching it (N d a_res) and SwiGLU's three (N, h) gradients."""
    n = batch * tokens_per_sequence(spec, seq)
    return n * shape.dim * residual_bytes(spec, w) + 3 * n * shape.hidden_dim * w


@dataclass(frozen=True)
class Estimate:
    """Bytes per GPU of one configuration; ``total`` is the predicted peak (``torch.cuda.max_memory_allocated``)."""

    total_params: int
    trainable_params: int
    weights: int  # bytes per GPU (divided by world_size)
    gradients: int
    optimizer: int
    activations: int  # kept for backward after the forward, default path (weight copies included)
    activations_checkpointed: int  # the same with activation checkpointing
    loss_working: int  # the loss's transient bytes
    backward_working: int  # a block's backward
    head_gradient: int  # the trained head's float32 gradient, made by the loss before backward starts
    recompute: int  # checkpointing: one block's activations and weight copies while recomputed
    end_working: int  # end of backward: a tied trained embedding's second gradient
    gathered: int  # FSDP: the root unit's and two blocks' weights gathered whole (0 on one GPU)
    world_size: int = 1

    @property
    def states(self) -> int:
        return self.weights + self.gradients + self.optimizer

    def _peak(self, activations: int, working: int) -> int:
        held = self.weights + self.optimizer + self.gathered
        return max(held + activations + working, held + self.gradients + self.end_working)

    @property
    def total(self) -> int:
        """Peak bytes of the default path (no activation checkpointing)."""
        return self._peak(self.activations, max(self.loss_working, self.head_gradient + self.backward_working))

    @property
    def total_checkpointed(self) -> int:
        """Peak bytes with activation checkpointing: the loss, or the last block's recompute and backward."""
        loss = self._peak(self.activations_checkpointed, self.loss_working)
        late = self.weights + self.optimizer + self.gathered + self.gradients + self.recompute + self.backward_working
        return max(loss, late)


def estimate(
    shape: ModelShape,
    spec: MethodSpec,
    *,
    dtype: str = "bf16",
    optimizer: str = "adamw",
    batch: int = 1,
    seq: int = 2048,
    loss_chunk: int | None = None,
    world_size: int = 1,
) -> Estimate:
    """Peak bytes per GPU of a fine-tuning run (module docstring).

    ``dtype``: the compute dtype (``"bf16"``: fit's bf16 autocast over float32 trained weights, frozen
    weights stored in bf16; ``"fp32"``: no autocast). ``batch``: sequences per GPU per micro-batch.
    ``loss_chunk``: tokens per chunk of the fused loss (``notelab.lm.loss.default_chunk(vocab_size)``
    is what ``fit`` with ``next_token_loss`` uses); ``None``: a cross-entropy over the full logits.
    ``world_size``: GPUs sharing the model states (FSDP).
    """
    if dtype not in DTYPE_BYTES:
        raise unknown_name("dtype", dtype, DTYPE_BYTES)
    if optimizer not in OPTIMIZER_BYTES:
        raise unknown_name("optimizer", optimizer, OPTIMIZER_BYTES)
    _positive("batch", batch)
    _positive("seq", seq)
    _positive("world_size", world_size)
    if loss_chunk is not None:
        _positive("loss_chunk", loss_chunk)
    w = DTYPE_BYTES[dtype]
    n_train = trainable_params(shape, spec)
    n_total = shape.n_params() + (0 if spec.method == "full" else n_train)
    n_frozen = n_total - n_train
    shard = lambda b: math.ceil(b / world_size)  # noqa: E731
    sharded = world_size > 1
    outside_blocks = shape.n_params() - shape.n_layers * (shape.block_matrix_params() + 2 * shape.dim)
    tied_trained = spec.method == "full" and shape.tie_embeddings
    # the recomputed block's activations and its copies of its trained matrices
    recompute = batch * tokens_per_sequence(spec, seq) * layer_bytes_per_token(shape, spec, w)
    recompute += 0 if sharded else weight_copy_bytes(shape, spec, w) // shape.n_layers
    return Estimate(
        total_params=n_total,
        trainable_params=n_train,
        weights=shard(n_frozen * w + n_train * FP32),
        gradients=shard(n_train * FP32),
        optimizer=shard(n_train * OPTIMIZER_BYTES[optimizer]),
        activations=activation_bytes(shape, spec, batch, seq, w, weight_copies=not sharded),
        activations_checkpointed=activation_bytes(shape, spec, batch, seq, w, checkpointing=True),
        loss_working=loss_working_bytes(shape, spec, batch, seq, w, loss_chunk),
        backward_working=backward_working_bytes(shape, spec, batch, seq, w),
        head_gradient=FP32 * shape.vocab_size * shape.dim if spec.method == "full" else 0,
        recompute=recompute,
        end_working=FP32 * shape.vocab_size * shape.dim if tied_trained else 0,
        gathered=w * (2 * shape.block_matrix_params() + outside_blocks) if sharded else 0,
        world_size=world_size,
    )


def format_table(rows: dict[str, Estimate]) -> str:
    """A plain-text table, one row per labelled estimate, sizes in GB (1e9 bytes) per GPU."""
    cols = ["trainable", "weights", "grads", "optim", "activ", "activ(ckpt)", "peak", "peak(ckpt)"]
    lines = [f"{'run':<28}" + "".join(f"{c:>13}" for c in cols)]
    for label, e in rows.items():
        frac = f"{100 * e.trainable_params / e.total_params:.3g}%"
        vals = [e.weights, e.gradients, e.optimizer, e.activations, e.activations_checkpointed, e.total,
                e.total_checkpointed]  # fmt: skip
        lines.append(f"{label:<28}{frac:>13}" + "".join(f"{v / 1e9:>12.1f}G" for v in vals))
    return "\n".join(lines)


def shape_fields() -> list[str]:
    return [f.name for f in dataclasses.fields(ModelShape)]
