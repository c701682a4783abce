"""notelab.lm.chain_rows: the batched decode step as Triton kernels, against the torch model, through Triton's
interpreter on CPU (``triton_interpreter`` explains the child process); the GPU test runs the compiled kernels."""

import pytest
import torch
from triton_interpreter import GPU as _GPU
from triton_interpreter import import_interpreted, run_file_in_child
from triton_interpreter import small_llama as model_of

from notelab.core.errors import ConfigError
from notelab.lm import Llama, generate
from notelab.lm.engine import Engine, SamplingParams

rows, IN_PROCESS = import_interpreted("notelab.lm.chain_rows")


@pytest.fixture
def interp(monkeypatch):
    pytest.importorskip("triton")
    if not IN_PROCESS:
        pytest.skip("triton was imported without TRITON_INTERPRET=1 first: test_rows_tests_in_a_fresh_process")
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def prefilled(model: Llama, prompts: list[torch.Tensor], total: int) -> tuple:
    """A (B, ...) cache with row b holding prompt b (each prefilled alone by the torch model), the prompts' next
    tokens (B, 1) and their lengths (B,) as slots; and one batch-1 reference cache per row."""
    dtype = model.embed_tokens.weight.dtype
    dev = model.embed_tokens.weight.device
    cache = model.make_cache(len(prompts), total, dtype=dtype)
    refs, toks = [], []
    for b, p in enumerate(prompts):
        ref = model.make_cache(1, total, dtype=dtype)
        toks.append(model._forward(p[None], 0, None, None, ref, 1)[0, -1].argmax())
        for big, small in zip(cache, ref):
            big.k[b], big.v[b] = small.k[0], small.v[0]
        refs.append(ref)
    tok = torch.stack(toks)[:, None]
    pos = torch.tensor([len(p) for p in prompts], device=dev)
    return cache, tok, pos, refs


def check_rows(model: Llama, lengths: list[int], steps: int, tol: float, **kw) -> None:
    """``steps`` batched steps: each row's logits and new cache entries equal the torch model's for that row alone."""
    dev = model.embed_tokens.weight.device
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=g).to(dev) for n in lengths]
    total = max(lengths) + steps + 1
    cache, tok, pos, refs = prefilled(model, prompts, total)
    step = rows.DecodeRows(model, model.fused_decode_weights(), cache, tok, pos, **kw)
    for i in range(steps):
        want = [
            model._forward(tok[b : b + 1], int(pos[b]), None, None, refs[b], 1)[0, -1].float()
            for b in range(len(prompts))
        ]
        step.step()
        for b in range(len(prompts)):
            torch.testing.assert_close(step.logits[b], want[b], rtol=tol, atol=tol, msg=f"step {i}, row {b}")
            s = int(pos[b])
            for got, ref in zip(cache, refs[b]):
                torch.testing.assert_close(
                    got.k[b, :, : s + 1].float(), ref.k[0, :, : s + 1].float(), rtol=tol, atol=tol
                )
                torch.testing.assert_close(
                    got.v[b, :, : s + 1].float(), ref.v[0, :, : s + 1].float(), rtol=tol, atol=tol
                )
        tok.copy_(step.logits.argmax(-1, keepdim=True))
        pos.add_(1)


# small tiles: several product programs, K in several chunks (a partial one of the FFN width 176) dealt unevenly
# over 3 programs a tile, split attention
SMALL = dict(bn=16, bk=32, pairs=8, split=3, attn_block=4, split_keys=4, max_splits=4)


@pytest.mark.parametrize("heads", [(4, 2), (4, 4), (4, 1)])
@pytest.mark.parametrize("options", [{}, SMALL, dict(split=1)], ids=["default", "small-tiles", "whole-K"])
def test_rows_step_matches_the_model_row_by_row(interp, heads, options):
    """Rows at different slots (prompts of 3, 9 and 5 tokens), GQA / MHA / MQA: float32 logits and caches."""
    model = model_of(n_heads=heads[0], n_kv_heads=heads[1])
    check_rows(model, [3, 9, 5], 3, tol=1e-4, options=rows.RowsOptions(**options))


def test_rows_step_in_bf16_is_within_rounding_of_the_model(interp):
    """bf16: the kernels round where the torch step rounds, but attention is float32 throughout (torch rounds
    its scores to bf16): logits within a few bf16 steps of the model's, here on logits of size ~1."""
    model = model_of(dtype=torch.bfloat16)
    check_rows(model, [3, 9, 5], 2, tol=5e-2)


def test_engine_with_the_rows_forward_gives_the_reference_tokens(interp):
    """The rows step injected into the engine (``forward=DecodeRows``): requests of different lengths, one joining
    mid-way into a free row, greedy and sampled, each get the reference path's tokens (float32)."""
    model = model_of()
    engine = Engine(model, max_batch=3, stacked=True, forward=rows.DecodeRows)
    prompts = [[5, 6, 7], list(range(1, 12)), [9, 9, 4, 2, 8]]
    sampled = dict(temperature=0.9, top_p=0.9)
    events: dict[int, list] = {}

    def drain(steps: int | None = None) -> None:
        n = 0
        while engine.has_work() and (steps is None or n < steps):
            for e in engine.step():
                if e.token is not None:
                    events.setdefault(e.request_id, []).append(e.token)
            n += 1

    ids = [engine.add(prompts[0], SamplingParams(max_new_tokens=8)), engine.add(prompts[1], SamplingParams(8))]
    drain(steps=3)
    ids.append(engine.add(prompts[2], SamplingParams(max_new_tokens=8, seed=5, **sampled)))
    drain()
    assert events[ids[0]] == generate(model, [prompts[0]], 8, path="reference")[0]
    assert events[ids[1]] == generate(model, [prompts[1]], 8, path="reference")[0]
    assert events[ids[2]] == generate(model, [prompts[2]], 8, path="reference", seed=5, **sampled)[0]
    with pytest.raises(ConfigError, match="stacked"):
        Engine(model, max_batch=2, stacked=False, forward=rows.DecodeRows)


def test_rows_unsupported_says_why():
    model = model_of(dim=128)  # head_dim 32
    assert "2 to 32 rows" in rows.rows_unsupported(model, 1, torch.float32)
    assert "2 to 32 rows" in rows.rows_unsupported(model, 33, torch.float32)
    why = rows.rows_unsupported(model, 4, torch.float16)
    assert "dtype" in why or "CUDA" in why  # off a GPU and outside the interpreter: not on CUDA
    if not rows._INTERPRET:
        assert "head_dim >= 32" in rows.rows_unsupported(model_of(), 4, torch.float32)


def test_rows_tests_in_a_fresh_process():
    run_file_in_child(__file__, IN_PROCESS, skipped=1 + 1)  # this test and the GPU one


@pytest.mark.gpu
@pytest.mark.skipif(not _GPU, reason="needs CUDA (the compiled kernels)")
def test_rows_on_cuda_match_the_model():
    model = model_of(device="cuda", dim=128)  # head_dim 32: tensor-core tiles of 16 RoPE pairs
    assert rows.rows_unsupported(model, 4, torch.float32) == ""
    check_rows(model, [3, 9, 5, 12], 3, tol=1e-4)  # float32: exact products (input_precision="ieee")
