"""Parity with Hugging Face ``peft`` on a tiny transformers LlamaForCausalLM, through files both ways.

LoRA: peft's files loaded by notelab (on the transformers model and on notelab's Llama converted from it)
give peft's logits, and notelab's files loaded by peft give notelab's. Prompt tuning and IA3: the same
parameters give the same logits.
"""

import copy

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from notelab.lm import from_hf  # noqa: E402
from notelab.peft import IA3Config, LoraConfig, get_peft_model, load_adapter, save_adapter  # noqa: E402

VOCAB = 53
X = torch.randint(1, VOCAB, (2, 11), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, attn_implementation="eager",
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("hf")
    model.save_pretrained(path)
    return path


def hf(hf_dir):
    return transformers.LlamaForCausalLM.from_pretrained(hf_dir).eval()


def randomize(model, seed=1, keys=("lora_", "ia3_l", "prompt_")):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in keys):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if "ia3_l" in name else 0.0))


def test_peft_lora_files_load_in_notelab(hf_dir, tmp_path):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
                          task_type="CAUSAL_LM")  # fmt: skip
    theirs = peft.get_peft_model(hf(hf_dir), cfg)
    randomize(theirs)
    theirs.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        want = theirs(X).logits
        on_hf = load_adapter(hf(hf_dir), tmp_path / "peft")  # identity names
        torch.testing.assert_close(on_hf(X).logits, want, atol=1e-5, rtol=0)
        on_ours = load_adapter(from_hf(hf_dir).eval(), tmp_path / "peft")  # hf-causal-lm names
        torch.testing.assert_close(on_ours(X), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("rslora", [False, True])
def test_notelab_lora_files_load_in_peft(hf_dir, tmp_path, rslora):
    ours = get_peft_model(from_hf(hf_dir).eval(), LoraConfig(r=4, lora_alpha=8, use_rslora=rslora))
    randomize(ours)
    save_adapter(ours, tmp_path / "ours", names="hf-causal-lm")
    theirs = peft.PeftModel.from_pretrained(hf(hf_dir), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(X).logits, ours(X), atol=1e-5, rtol=0)


def test_prompt_tuning_equals_peft(hf_dir, tmp_path):
    cfg = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    theirs = peft.get_peft_model(hf(hf_dir), cfg)
    randomize(theirs)
    theirs.save_pretrained(tmp_path / "pt")
    with torch.no_grad():
        want = theirs(X).logits[:, 3:]
        torch.testing.assert_close(load_adapter(from_hf(hf_dir).eval(), tmp_path / "pt")(X), want, atol=1e-5, rtol=0)
        torch.testing.assert_close(load_adapter(hf(hf_dir), tmp_path / "pt")(X).logits, want, atol=1e-5, rtol=0)
    assert not torch.allclose(want, hf(hf_dir)(X).logits, atol=1e-3)


def test_ia3_equals_peft_both_ways(hf_dir, tmp_path):
    cfg = peft.IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "down_proj"],
                         feedforward_modules=["down_proj"])  # fmt: skip
    theirs = peft.get_peft_model(hf(hf_dir), cfg)
    randomize(theirs)
    theirs.save_pretrained(tmp_path / "ia3")
    with torch.no_grad():
        want = theirs(X).logits
        torch.testing.assert_close(load_adapter(from_hf(hf_dir).eval(), tmp_path / "ia3")(X), want, atol=1e-5, rtol=0)
    ours = get_peft_model(from_hf(hf_dir).eval(), IA3Config())
    randomize(ours, seed=2)
    save_adapter(ours, tmp_path / "ours", names="hf-causal-lm")
    back = peft.PeftModel.from_pretrained(hf(hf_dir), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(X).logits, ours(X), atol=1e-5, rtol=0)
        merged = copy.deepcopy(ours).merge_and_unload()
        torch.testing.assert_close(merged(X), ours(X), atol=1e-5, rtol=0)


@pytest.mark.parametrize("projection", [False, True])
def test_prefix_tuning_files_both_ways(hf_dir, tmp_path, projection):
    """peft's PREFIX_TUNING files (its MLP's output table when trained with the projection) give peft's logits in
    notelab, and notelab's files give notelab's logits in peft: the table's keys are re-rotated for the prompt's
    positions (peft runs the prompt after the prefix, at n..n+T-1; notelab at 0..T-1)."""
    from notelab.peft import PrefixTuningConfig

    cfg = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, prefix_projection=projection,
                                  encoder_hidden_size=16)  # fmt: skip
    theirs = peft.get_peft_model(hf(hf_dir), cfg).eval()
    randomize(theirs, keys=("prompt_encoder",))
    theirs.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        want = theirs(X).logits
        got = load_adapter(from_hf(hf_dir).eval(), tmp_path / "peft")(X)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert not torch.allclose(want, hf(hf_dir)(X).logits, atol=1e-3)  # the prefix changes the output

    ours = get_peft_model(from_hf(hf_dir).eval(), PrefixTuningConfig(num_virtual_tokens=4, encoder_hidden_size=16,
                                                                     prefix_projection=projection))  # fmt: skip
    randomize(ours, seed=2, keys=("prefix_encoders",))
    save_adapter(ours, tmp_path / "ours", names="hf-causal-lm")
    back = peft.PeftModel.from_pretrained(hf(hf_dir), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(X).logits, ours.eval()(X), atol=1e-5, rtol=0)
        # and notelab reads its own file back to the same outputs
        again = load_adapter(from_hf(hf_dir).eval(), tmp_path / "ours")(X)
        torch.testing.assert_close(again, ours(X), atol=1e-5, rtol=0)
