"""The memory estimator: parameter counts against real models, 16 bytes per parameter for mixed-precision
AdamW, LoRA's trainable count against an injected model, activations against what autograd saves."""

import pytest
import torch

from notelab.core.errors import ConfigError
from notelab.lm import Llama, LlamaConfig
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
    assert (full.weights, full.gradients, full.master, full.optimizer) == (2 * n, 2 * n, 4 * n, 8 * n)  # ZeRO's 16 B
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


def test_activations_against_saved_tensors():
    torch.manual_seed(0)
    model = Llama(CFG)
    params = {p.data_ptr() for p in model.parameters()}
    B, T = 2, 128
    x = torch.randint(0, 512, (B, T))
    for recompute in (False, True):
        saved: dict[int, int] = {}

        def pack(t, saved=saved):
            if t.data_ptr() not in params:
                saved[t.data_ptr()] = t.untyped_storage().nbytes()
            return t

        model.activation_checkpointing = recompute
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            torch.nn.functional.cross_entropy(model(x).view(-1, 512), x.view(-1))
        est = activation_bytes(SHAPE, MethodSpec("full"), B, T, 4, recompute)
        if recompute:  # the estimate adds the one block recomputed during backward: an upper bound here
            assert sum(saved.values()) <= est
        else:
            assert abs(est / sum(saved.values()) - 1) < 0.15, (est, sum(saved.values()))
