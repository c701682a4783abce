"""The memory estimator: parameter counts against real models, fit's 16 bytes per trained parameter, every
term worked by hand on a tiny shape (one GPU and sharded), activations against what the compiled graph keeps."""

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._functorch.aot_autograd import aot_module_simplified
from torch._functorch.partitioners import min_cut_rematerialization_partition

from notelab.core.errors import ConfigError
from notelab.lm import Llama, LlamaConfig
from notelab.lm.loss import CHUNK_ELEMENTS, default_chunk
from notelab.peft import LoraConfig, count_parameters, get_peft_model
from notelab.peft.estimate import PRESETS, MethodSpec, ModelShape, activation_bytes, estimate, shape_from_hf

# published parameter counts (the same figures notelab.lm's presets are checked against)
PUBLISHED = {"llama-7b": 6_738_415_616, "llama3-8b": 8_030_261_248, "llama3-70b": 70_553_706_496,
             "llama3.2-1b": 1_235_814_400}  # fmt: skip
CFG = LlamaConfig(vocab_size=512, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, multiple_of=32, max_seq_len=512)
SHAPE = ModelShape(512, 64, 4, 4, 2, CFG.hidden_dim)


def test_parameter_counts():
    for name, n in PUBLISHED.items():
        assert PRESETS[name].n_params() == n, name
    assert 7.7e9 < PRESETS["qwen1.5-7b"].n_params() < 7.8e9 and 72e9 < PRESETS["qwen1.5-72b"].n_params() < 73e9
    assert SHAPE.n_params() == sum(p.numel() for p in Llama(CFG).parameters())
    hf = {"vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
          "num_key_value_heads": 2, "intermediate_size": CFG.hidden_dim}  # fmt: skip
    assert shape_from_hf(hf) == SHAPE
    with pytest.raises(ConfigError, match="hidden_size: expected an integer >= 1, got None"):
        shape_from_hf({**hf, "hidden_size": None})


def test_model_states_and_lora_count():
    full = estimate(PRESETS["qwen1.5-7b"], MethodSpec("full"), dtype="bf16", optimizer="adamw")
    n = full.total_params
    assert (full.weights, full.gradients, full.optimizer) == (4 * n, 4 * n, 8 * n)  # 16 bytes, as ZeRO's
    lora = estimate(PRESETS["qwen1.5-7b"], MethodSpec("lora", r=8))
    assert lora.total < full.total / 4 and lora.trainable_params < 0.01 * n
    peft = get_peft_model(Llama(CFG), LoraConfig(r=8, target_modules="all-linear"))
    assert count_parameters(peft)[0] == estimate(SHAPE, MethodSpec("lora", r=8)).trainable_params
    qv = get_peft_model(Llama(CFG), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    spec = MethodSpec("lora", r=4, lora_targets=("q_proj", "v_proj"))
    assert count_parameters(qv)[0] == estimate(SHAPE, spec).trainable_params
    with pytest.raises(ConfigError, match="unknown LoRA target 'qkv'"):
        MethodSpec("lora", lora_targets=("qkv",))
    with pytest.raises(ConfigError, match="unknown PEFT method 'dora'"):
        MethodSpec("dora")
    with pytest.raises(ConfigError, match="world_size: expected an integer >= 1, got 0"):
        estimate(SHAPE, MethodSpec("full"), world_size=0)


def test_every_term_by_hand():
    """V=10, d=4, 2 layers, 2 query heads / 1 kv head of 2, h=8, tied; full fine-tuning, bf16, AdamW, 1 x 3 tokens,
    the loss 2 tokens at a time (two chunks)."""
    tiny = ModelShape(10, 4, 2, 2, 1, 8, tie_embeddings=True)
    assert tiny.block_matrix_params() == 16 + 8 + 8 + 16 + 32 + 32 + 32  # q, k, v, o, gate, up, down
    assert tiny.n_params() == 2 * (144 + 2 * 4) + 10 * 4 + 4  # blocks (+2 norms), tied embedding, final norm
    e = estimate(tiny, MethodSpec("full"), dtype="bf16", batch=1, seq=3, loss_chunk=2)
    assert (e.weights, e.gradients, e.optimizer) == (348 * 4, 348 * 4, 348 * 8)
    # per token and layer: residual 2 x 4 x 4 B, (2d + 2q + 2kv + 3h) = 44 bf16, 2 + 2 float32 statistics
    per_token_layer = 2 * 4 * 4 + 44 * 2 + 4 * 4
    once = 2 * 3 * 4 * 4 + 4 * 3 + 4 * 3 * 2  # final norm's input and output (float32), its statistic, RoPE angles
    copies = 2 * 2 * 144  # the bf16 copies of both blocks' matrices
    assert e.activations == 2 * 3 * per_token_layer + once + copies == 1524
    assert e.activations_checkpointed == 2 * 3 * 4 * 4 + once - 3 * 4 * 4  # the final norm's input recomputed
    # 3 chunk buffers of 2 x 10 bf16 logits, dL/dh (fp32) and h in bf16, the head's fp32 gradient and bf16 copy
    assert e.loss_working == 3 * 2 * 10 * 2 + 3 * 4 * 4 + 3 * 4 * 2 + 10 * 4 * 4 + 10 * 4 * 2 == 432
    assert e.backward_working == 3 * 4 * 4 + 3 * 3 * 8 * 2 and e.head_gradient == 160
    held = 348 * 4 + 348 * 8  # weights + optimizer states: the gradients were freed by zero_grad
    assert e.total == max(held + 1524 + 432, held + 348 * 4 + 160) == 6132
    recompute = 3 * per_token_layer + copies // 2
    assert e.total_checkpointed == max(held + e.activations_checkpointed + 432, held + 348 * 4 + recompute + 192)
    # FSDP over 2 GPUs: states halved, activations not, but no autocast copies (units are gathered in bf16 and
    # freed); gathered: two blocks and the root unit (tied embedding 10 x 4, final norm 4) in bf16
    s = estimate(tiny, MethodSpec("full"), dtype="bf16", batch=1, seq=3, loss_chunk=2, world_size=2)
    assert (s.weights, s.gradients, s.optimizer, s.gathered) == (696, 696, 1392, 2 * (2 * 144 + 40 + 4))
    assert s.activations == e.activations - copies and s.total == 696 + 1392 + 664 + (1524 - copies) + 432
    # one token a chunk: 3 buffers of 1 x 10; one chunk for the whole batch: two buffers of 3 x 10; no chunking:
    # the full logits, a float32 copy and its gradient
    assert estimate(tiny, MethodSpec("full"), batch=1, seq=3, loss_chunk=1).loss_working == 432 - 120 + 3 * 10 * 2
    assert estimate(tiny, MethodSpec("full"), batch=1, seq=3, loss_chunk=8).loss_working == 432 - 120 + 2 * 30 * 2
    assert estimate(tiny, MethodSpec("full"), batch=1, seq=3).loss_working == 3 * 10 * (2 + 4 + 4)
    # LoRA r=1: frozen bf16 base, float32 adapters; a bf16 residual stream, no head gradient
    lora = estimate(tiny, MethodSpec("lora", r=1), batch=1, seq=3, loss_chunk=2)
    adapters = 2 * (8 + 6 + 6 + 8 + 12 + 12 + 12)
    assert lora.trainable_params == adapters and lora.weights == 348 * 2 + adapters * 4
    # per token and layer: residual 2 x 4 x 2 B; 44 bf16 as above, the cast of o_proj's input its A reads (q = 4),
    # A x on 7 linears (r = 1); the first block's input is not kept (no gradient reaches the frozen embedding)
    per_token_layer = 2 * 4 * 2 + (44 + 4 + 7) * 2 + 4 * 4
    once = 2 * 3 * 4 * 2 + 4 * 3 + 4 * 3 * 2
    assert lora.activations == 2 * 3 * per_token_layer - 3 * 4 * 2 + once + 2 * adapters
    assert lora.loss_working == 3 * 2 * 10 * 2 + 3 * 4 * 2 and lora.head_gradient == 0


def test_note_table_and_chunk_constant():
    """The note's 160 GB / 1,600 GB order for Qwen1.5-7B / 72B full fine-tuning; the chunk size fit's loss uses."""
    for name, note in (("qwen1.5-7b", 160e9), ("qwen1.5-72b", 1600e9)):
        shape = PRESETS[name]
        full = estimate(shape, MethodSpec("full"), batch=1, seq=2048, loss_chunk=default_chunk(shape.vocab_size))
        assert 0.5 < full.total / note < 2
    assert default_chunk(128256) == 4096 == CHUNK_ELEMENTS // 128256 // 128 * 128


def _saved_by_compiled_forward(model: torch.nn.Module, tokens: torch.Tensor) -> int:
    """Bytes the compiled forward keeps for backward (distinct storages, parameters and inputs excluded), as
    AOTAutograd's min-cut partitioner (the one torch.compile's inductor uses) splits the graph, under bf16
    autocast; the forward's output (the loss's input) counted too."""
    found: list[int] = []

    def forward_compiler(gm: torch.fx.GraphModule, inputs: list) -> object:
        out = next(n for n in gm.graph.nodes if n.op == "output")
        storages = {}
        for node in out.args[0]:
            v = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
            # the CPU generator's state a checkpoint keeps has a symbolic size here (16 bytes on CUDA): not counted
            if (
                isinstance(v, torch.Tensor)
                and node.op != "placeholder"
                and isinstance(v.untyped_storage().nbytes(), int)
            ):
                storages[v.untyped_storage()._cdata] = v.untyped_storage().nbytes()
        found.append(sum(storages.values()))
        return make_boxed_func(gm.forward)

    def backend(gm: torch.fx.GraphModule, example: list) -> object:
        return aot_module_simplified(gm, example, fw_compiler=forward_compiler,
                                     bw_compiler=lambda g, _: make_boxed_func(g.forward),
                                     partition_fn=min_cut_rematerialization_partition)  # fmt: skip

    torch._dynamo.reset()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.compile(model, backend=backend, fullgraph=True)(tokens, return_hidden=True)
    torch._dynamo.reset()
    return sum(found)


@pytest.mark.parametrize(
    "method,checkpointing,targets", [("full", False, ()), ("lora", False, ()), ("lora", False, ("q_proj", "v_proj")),
                                     ("full", True, ())]
)  # fmt: skip
def test_activations_against_the_compiled_graph(method, checkpointing, targets):
    """Full fine-tuning (float32 weights, bf16 autocast) and LoRA (bf16 base, float32 adapters: on every linear, on
    q and v), as fit runs them; with activation checkpointing."""
    layers = 2 if method == "lora" and not targets else 1  # two: the first block keeps less than the others
    cfg = LlamaConfig(vocab_size=512, dim=128, n_layers=layers, n_heads=4, n_kv_heads=2, ffn_hidden_dim=512,
                      max_seq_len=64, tie_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    model = Llama(cfg)
    if method == "lora":
        model = get_peft_model(model.to(torch.bfloat16), LoraConfig(r=8, target_modules=list(targets) or "all-linear"))
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    model.activation_checkpointing = checkpointing
    got = _saved_by_compiled_forward(model, torch.randint(0, 512, (2, 32)))
    shape = ModelShape(512, 128, layers, 4, 2, 512, tie_embeddings=True)
    est = activation_bytes(shape, MethodSpec(method, r=8, lora_targets=targets), 2, 32, 2, checkpointing=checkpointing)
    assert abs(est / got - 1) < 0.05, (est, got)


@pytest.mark.parametrize("method", ["ia3", "adapter", "prefix", "prompt"])
def test_other_methods_against_the_compiled_graph(method):
    """IA3, Houlsby adapters, prefix and prompt tuning on a bf16 base, two blocks. The adapters' first block keeps
    nothing before its first adapter (after attention), which the estimate counts: an over-estimate there."""
    from notelab.peft import IA3Config, PrefixTuningConfig, PromptTuningConfig, houlsby

    configs = {"ia3": (IA3Config(), {}), "adapter": (houlsby(16), {"bottleneck": 16}),
               "prefix": (PrefixTuningConfig(num_virtual_tokens=8, encoder_hidden_size=64),
                          {"num_virtual_tokens": 8, "encoder_hidden_size": 64}),
               "prompt": (PromptTuningConfig(num_virtual_tokens=8), {"num_virtual_tokens": 8})}  # fmt: skip
    config, knobs = configs[method]
    cfg = LlamaConfig(vocab_size=512, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_dim=512,
                      max_seq_len=64, tie_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    model = get_peft_model(Llama(cfg).to(torch.bfloat16), config)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    got = _saved_by_compiled_forward(model, torch.randint(0, 512, (2, 24)))
    shape = ModelShape(512, 128, 2, 4, 2, 512, tie_embeddings=True)
    est = activation_bytes(shape, MethodSpec(method, **knobs), 2, 24, 2)
    assert 0.98 < est / got < (1.15 if method == "adapter" else 1.02), (est, got)
