"""Invariants of every method: init == base, merged == unmerged, disabled == base, only adapters get
gradients, save -> load round trip; injection by name and its errors; prefix tuning with the KV cache."""

import copy

import pytest
import torch

from notelab.core.errors import CheckpointError, ConfigError
from notelab.lm import Llama, LlamaConfig
from notelab.peft import (
    BitFitConfig,
    IA3Config,
    LoraConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptTuningConfig,
    config_for,
    find_targets,
    get_peft_model,
    houlsby,
    load_adapter,
    pfeiffer,
    save_adapter,
)

CFG = dict(vocab_size=61, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16, max_seq_len=64)
X = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(0))


def base(seed: int = 0, **kw) -> Llama:
    torch.manual_seed(seed)
    return Llama(LlamaConfig(**{**CFG, **kw})).eval()


METHODS = {
    "lora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
    "lora-embed-rs": lambda: LoraConfig(
        r=2,
        lora_alpha=4,
        use_rslora=True,
        init_lora_weights="gaussian",
        target_modules=["embed_tokens", "q_proj", "down_proj"],
    ),  # fmt: skip
    "ia3": lambda: IA3Config(),
    "houlsby": lambda: houlsby(8),
    "pfeiffer": lambda: pfeiffer(8),
    "prompt": lambda: PromptTuningConfig(num_virtual_tokens=3),
    "prefix": lambda: PrefixTuningConfig(num_virtual_tokens=3, encoder_hidden_size=16),
    "bitfit": lambda: BitFitConfig(target_modules=["o_proj", "down_proj"]),
}
AT_INIT_EQUALS_BASE = ("lora", "lora-embed-rs", "ia3", "houlsby", "pfeiffer", "bitfit")
MERGEABLE = ("lora", "lora-embed-rs", "ia3", "bitfit")


def perturb(model: PeftModel, seed: int = 1) -> None:
    """Random values in every adapter tensor (an adapter at init is often the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("method", METHODS)
def test_invariants(method, tmp_path):
    ref = base()
    with torch.no_grad():
        y_base = ref(X)
    peft = get_peft_model(copy.deepcopy(ref), METHODS[method]())
    with torch.no_grad():
        if method in AT_INIT_EQUALS_BASE:
            torch.testing.assert_close(peft(X), y_base, atol=1e-6, rtol=0)
        perturb(peft)
        y = peft(X)
        assert not torch.allclose(y, y_base, atol=1e-3), "the adapter changes nothing"
        with peft.disable_adapter():
            torch.testing.assert_close(peft(X), y_base, atol=1e-6, rtol=0)
        torch.testing.assert_close(peft(X), y, atol=0, rtol=0)
    # only adapter parameters get gradients
    peft.train()
    peft(X).square().mean().backward()
    for name, p in peft.named_parameters():
        keys = ("lora_", "ia3_l", "adapter_", "prompt_embeddings", "prefix_encoders", "bitfit_bias")
        adapter = any(k in name for k in keys)
        assert p.requires_grad == adapter, name
        assert (p.grad is not None and p.grad.abs().sum() > 0) == adapter, name
    frozen = [p for p in ref.parameters()]
    assert all(p.grad is None for p in frozen)
    peft.eval()
    # save -> load round trip (a fresh base, same weights)
    save_adapter(peft, tmp_path / "a", names="hf-causal-lm")
    with torch.no_grad():
        loaded = load_adapter(base(), tmp_path / "a")
        torch.testing.assert_close(loaded(X), y, atol=1e-6, rtol=0)
    if method in MERGEABLE:
        with torch.no_grad():
            peft.merge_adapter()
            torch.testing.assert_close(peft(X), y, atol=1e-5, rtol=0)
            peft.unmerge_adapter()
            torch.testing.assert_close(peft(X), y, atol=1e-5, rtol=0)
            merged = copy.deepcopy(peft).merge_and_unload()
            assert type(merged.layers[0].self_attn.k_proj) is torch.nn.Linear
            torch.testing.assert_close(merged(X), y, atol=1e-5, rtol=0)
    else:
        with pytest.raises(ConfigError, match="merge"):
            peft.merge_and_unload()


def test_nested_adapters_merge_and_unload():
    peft = get_peft_model(base(), LoraConfig(r=2, target_modules=["k_proj"]))
    peft.add_adapter("scale", IA3Config(target_modules=["k_proj"], feedforward_modules=None))
    peft.set_adapter("scale")
    perturb(peft)
    with torch.no_grad():
        y = peft(X)
        merged = copy.deepcopy(peft).merge_and_unload()
        assert type(merged.layers[0].self_attn.k_proj) is torch.nn.Linear
        torch.testing.assert_close(merged(X), y, atol=1e-5, rtol=0)


def test_lora_scaling_and_delta():
    peft = get_peft_model(base(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    rs = get_peft_model(base(), LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj"]))
    q = peft.base_model.layers[0].self_attn.q_proj
    assert q.scaling["default"] == 2.0 and rs.base_model.layers[0].self_attn.q_proj.scaling["default"] == 4.0
    perturb(peft)
    x = torch.randn(3, 32)
    with torch.no_grad():
        w = q.base_layer.weight + 2.0 * q.lora_B["default"].weight @ q.lora_A["default"].weight
        torch.testing.assert_close(q(x), x @ w.T, atol=1e-6, rtol=0)


def test_named_adapters_and_set_adapter():
    peft = get_peft_model(base(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    peft.add_adapter("other", IA3Config())
    perturb(peft)
    with torch.no_grad():
        y_default = peft(X)
        peft.set_adapter("other")
        y_other = peft(X)
        with peft.disable_adapter():
            y_base = peft(X)
    assert not torch.allclose(y_default, y_other) and not torch.allclose(y_other, y_base)
    ref = copy.deepcopy(peft)
    ref.set_adapter("default")
    with torch.no_grad():
        torch.testing.assert_close(ref(X), y_default, atol=0, rtol=0)
    # a second LoRA on the same layers: each alone equals the model with only that one injected
    peft.add_adapter("second", LoraConfig(r=3, target_modules=["q_proj"]))
    perturb(peft, seed=5)
    alone = get_peft_model(base(), LoraConfig(r=3, target_modules=["q_proj"]), "second")
    alone.load_state_dict({k: v for k, v in peft.state_dict().items() if ".second" in k})  # strict: adapter keys
    peft.set_adapter("second")
    with torch.no_grad():
        torch.testing.assert_close(peft(X), alone(X), atol=1e-6, rtol=0)
    with pytest.raises(CheckpointError, match="missing adapter tensors"):
        alone.load_state_dict({})
    with pytest.raises(ConfigError, match="unknown adapter 'nope'"):
        peft.set_adapter("nope")
    with pytest.raises(ConfigError, match="exists already"):
        peft.add_adapter("other", IA3Config())


def test_matching_rules():
    m = base()
    assert find_targets(m, ["q_proj"], None, lambda _: True, "x") == ["layers.0.self_attn.q_proj",
                                                                        "layers.1.self_attn.q_proj"]  # fmt: skip
    assert find_targets(m, r"layers\.1\..*_proj", ["o_proj", "up_proj"], lambda _: True, "x") == [
        "layers.1.self_attn.q_proj", "layers.1.self_attn.k_proj", "layers.1.self_attn.v_proj",
        "layers.1.mlp.gate_proj", "layers.1.mlp.down_proj"]  # fmt: skip
    all_linear = find_targets(m, "all-linear", None, lambda _: True, "x")
    assert len(all_linear) == 14 and "lm_head" not in all_linear
    tied = find_targets(base(tie_embeddings=True), "all-linear", None, lambda _: True, "x")
    assert "lm_head" not in tied


def test_bad_input_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"matched no Linear / Embedding module; available: down_proj, embed_tokens"):
        get_peft_model(base(), LoraConfig(target_modules=["qkv"]))
    with pytest.raises(ConfigError, match="LoraConfig.r: expected an integer >= 1, got 0"):
        LoraConfig(r=0)
    with pytest.raises(
        ConfigError, match="unknown PEFT method 'dora'; known: adapter, bitfit, ia3, lora, prefix, prompt"
    ):
        config_for("dora")
    with pytest.raises(ConfigError, match="expected Linear modules, layers.0.mlp is SwiGLU"):
        get_peft_model(base(), IA3Config(target_modules=["mlp"], feedforward_modules=None))
    with pytest.raises(ConfigError, match=r"feedforward_modules \['down_proj'\]: expected a subset of the targets"):
        get_peft_model(base(), IA3Config(target_modules=["k_proj"], feedforward_modules=["down_proj"]))
    prefix = get_peft_model(base(), PrefixTuningConfig(num_virtual_tokens=3, encoder_hidden_size=16))
    save_adapter(prefix, tmp_path / "prefix")
    with pytest.raises(CheckpointError, match=r"expects shape \(3, 96\) \(virtual tokens, layers 3 x 2 x kv heads 2"):
        load_adapter(base(n_layers=3), tmp_path / "prefix")
    small = get_peft_model(base(), LoraConfig(r=2, target_modules=["q_proj"]))
    save_adapter(small, tmp_path / "small")
    with pytest.raises(CheckpointError, match=r"the model expects shape \(2, 48\), the file has \(2, 32\)"):
        load_adapter(base(dim=48, n_heads=4), tmp_path / "small")


def test_prefix_with_kv_cache_and_generation():
    from notelab.lm import generate

    peft = get_peft_model(base(), PrefixTuningConfig(num_virtual_tokens=4, encoder_hidden_size=16))
    perturb(peft)
    m = peft.base_model
    with torch.no_grad():
        full = m(X)
        cache = m.make_cache(2, 32)
        step = torch.cat([m(X[:, :5], 0, cache=cache), m(X[:, 5:7], 5, cache=cache)]
                         + [m(X[:, t : t + 1], t, cache=cache) for t in (7, 8)], dim=1)  # fmt: skip
        torch.testing.assert_close(step, full, atol=1e-5, rtol=0)
        # the reparameterising MLP dropped after training: the same outputs from the stored prefix
        peft.drop_prefix_projection()
        assert peft.prefix_encoders["default"].mlp is None
        torch.testing.assert_close(m(X), full, atol=1e-5, rtol=0)
    toks = generate(m, X[:1].tolist(), 6, path="reference")
    ref, ids = [], X[:1]
    with torch.no_grad():  # greedy by hand through full recomputation
        for _ in range(6):
            nxt = m(ids)[:, -1].argmax(-1, keepdim=True)
            ref.append(int(nxt))
            ids = torch.cat([ids, nxt], 1)
    assert toks == [ref]
