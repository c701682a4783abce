"""Generation with adapters: every decode path of notelab.lm runs the adapted model exactly or refuses with a
reason and takes the general path, so the adapted tokens are equal on every path."""

import copy
import warnings

import pytest
import torch

from notelab.core.errors import ConfigError
from notelab.lm import Llama, LlamaConfig, generate
from notelab.lm.chain import chain_unsupported
from notelab.lm.engine import Engine, SamplingParams
from notelab.peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model, houlsby

PROMPTS = [[5, 6, 7], list(range(1, 12))]
CONFIGS = {
    "lora": LoraConfig(r=4, target_modules="all-linear"),
    "lora-embed": LoraConfig(r=2, target_modules=["embed_tokens", "lm_head"]),
    "ia3": IA3Config(),
    "houlsby": houlsby(8),
    "prefix": PrefixTuningConfig(num_virtual_tokens=3, encoder_hidden_size=16),
}


def adapted(method: str):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=101, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16, max_seq_len=64)
    base = Llama(cfg).eval()
    peft = get_peft_model(base, CONFIGS[method])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in peft.parameters():
            if p.requires_grad:
                p.add_(0.5 * torch.randn(p.shape, generator=g))
    return base, peft


def engine_tokens(model: Llama, stacked: bool) -> list[list[int]]:
    engine = Engine(model, max_batch=2, stacked=stacked)
    ids = [engine.add(p, SamplingParams(max_new_tokens=8)) for p in PROMPTS]
    out: dict[int, list[int]] = {i: [] for i in ids}
    while engine.has_work():
        for e in engine.step():
            if e.token is not None:
                out[e.request_id].append(e.token)
    return [out[i] for i in ids]


@pytest.mark.parametrize("method", CONFIGS)
def test_adapted_tokens_equal_on_every_path(method):
    base, peft = adapted(method)
    ref = generate(base, PROMPTS, 8, path="reference")
    with peft.disable_adapter():
        assert generate(base, PROMPTS, 8, path="reference") != ref, "the adapter changes no token"
    reason = chain_unsupported(base, 1, False, torch.float32)
    assert "adapter" in reason or "prefix" in reason, reason
    with pytest.warns(RuntimeWarning, match="stacked projections off"):
        assert engine_tokens(base, stacked=True) == ref
    assert generate(base, PROMPTS, 8, path="engine") == ref
    with pytest.warns(RuntimeWarning, match="chain path cannot run"):
        assert generate(base, PROMPTS[:1], 8, path="chain") == ref[:1]
    if method in ("lora", "lora-embed", "ia3"):  # merged for decoding: the fast stacked weights run, no warning
        merged = copy.deepcopy(peft).merge_and_unload().eval()
        assert merged.unplain_reason() == ""
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert engine_tokens(merged, stacked=True) == ref
            with peft.merged() as plain:  # merged in place for decoding, then unmerged
                assert plain is base and base.unplain_reason() == ""
                assert engine_tokens(base, stacked=True) == ref
        assert base.unplain_reason() != "" and generate(base, PROMPTS, 8, path="reference") == ref


def test_prompt_tuning_refuses_decode_paths_that_call_the_base():
    base, _ = adapted("lora")
    peft = get_peft_model(Llama(base.config).eval(), PromptTuningConfig(num_virtual_tokens=2))
    with pytest.raises(ConfigError, match="prompt tuning: the soft prompt goes before the tokens"):
        generate(peft.base_model, PROMPTS, 4, path="reference")
