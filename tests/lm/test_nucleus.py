"""notelab.lm.nucleus: the top-k / top-p threshold by a pivot search, against the sort and bisection, on CPU through
Triton's interpreter (``triton_interpreter``: a child process where another module imported triton first); on a
GPU the compiled kernels, also inside the engine's compiled, captured step."""

import warnings

import pytest
import torch
from triton_interpreter import GPU, import_interpreted, run_file_in_child
from triton_interpreter import small_llama as model_of

from notelab.lm import generate
from notelab.lm.engine import Engine, SamplingParams
from notelab.lm.sampling import bisect_threshold, filter_threshold, gumbel_argmax

nucleus, IN_PROCESS = import_interpreted("notelab.lm.nucleus")
DEV = "cuda" if GPU else "cpu"


@pytest.fixture
def interp(monkeypatch):
    pytest.importorskip("triton")
    if not (IN_PROCESS or GPU):
        pytest.skip("triton was imported without TRITON_INTERPRET=1 first: test_nucleus_tests_in_a_fresh_process")
    if not GPU:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def rows(B: int, V: int, seed: int, spread: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, V, generator=g) * spread).to(DEV)


def kept(scaled: torch.Tensor, thr: torch.Tensor) -> torch.Tensor:
    return scaled >= thr


@pytest.mark.parametrize("split_bits", [1, 3, 4])
@pytest.mark.parametrize("V", [101, 3000])
def test_pivot_threshold_keeps_the_sorts_set(interp, split_bits, V):
    """Top-p alone, top-k alone, both, and neither (per row), over peaked and flat rows: the same kept set as the
    sort (``filter_threshold``) and as bisection."""
    B = 6
    x = rows(B, V, 0)
    x[1] *= 0.01  # nearly flat: the nucleus holds most of the row
    x[2, :5] += 30.0  # peaked: a nucleus of a few tokens
    x[3, 7] = float("-inf")  # a token masked before (a penalty or a filter)
    top_k = torch.tensor([[V], [V], [3], [50], [V], [1]], device=DEV)
    top_p = torch.tensor([[0.9], [0.5], [0.95], [1.0], [1.0], [0.3]], device=DEV)
    got = nucleus.pivot_threshold(x, top_k, top_p, True, split_bits)
    want = filter_threshold(x, top_k, top_p)
    assert torch.equal(kept(x, got), kept(x, want))
    assert torch.equal(kept(x, got), kept(x, bisect_threshold(x, top_k, top_p)))
    no_k = torch.full_like(top_k, V)
    got = nucleus.pivot_threshold(x, no_k, top_p, False, split_bits)
    assert torch.equal(kept(x, got), kept(x, filter_threshold(x, no_k, top_p)))


def test_pivot_threshold_ties_and_tiny_nuclei(interp):
    """Ties at the threshold are kept (top-k 2 over three equal maxima keeps three); top-p 1e-6 keeps the maximum
    only; one row of equal values keeps them all."""
    x = torch.zeros(3, 64, device=DEV)
    x[0, [3, 9, 20]] = 5.0
    x[1] = torch.linspace(-4, 4, 64, device=DEV)
    top_k = torch.tensor([[2], [64], [64]], device=DEV)
    top_p = torch.tensor([[1.0], [1e-6], [0.5]], device=DEV)
    got = kept(x, nucleus.pivot_threshold(x, top_k, top_p))
    assert got[0].sum() == 3 and got[0, [3, 9, 20]].all()
    assert got[1].sum() == 1 and got[1, -1]
    assert got[2].all()


@pytest.mark.parametrize("V", [101, 5000])
def test_draw_tokens_equals_gumbel_argmax(interp, V):
    """Greedy rows, sampled rows, with a threshold and without, and all rows greedy: the torch draw's tokens, from
    the same counter-based noise; a tie takes the first index, as argmax does."""
    B = 5
    x = rows(B, V, 1)
    x[4, [7, 70]] = 50.0  # tied maxima of a greedy row: the first
    sampled = torch.tensor([[True], [False], [True], [True], [False]], device=DEV)
    seed = torch.tensor([0, 1, 2, 3, 4], device=DEV) * 977
    counter = torch.tensor([0, 5, 6, 7, 8], device=DEV)
    thr = nucleus.pivot_threshold(x, torch.full((B, 1), V, device=DEV), torch.full((B, 1), 0.6, device=DEV))
    for s, t in ((sampled, thr), (sampled, None), (None, None)):
        got = nucleus.draw_tokens(x, s, t, seed, counter)
        assert torch.equal(got, gumbel_argmax(x, s, t, seed, counter)), (s is None, t is None)
    assert nucleus.draw_tokens(x, None, None, seed, counter)[4] == 7
    draws = [nucleus.draw_tokens(x, sampled, None, seed, counter + i)[0] for i in range(4)]
    assert len(set(draws)) > 1  # the noise moves with the counter


def test_engine_with_the_kernels_samples_the_reference_tokens(interp):
    """The engine with the pivot search and the kernel draw gives the reference loop's tokens (float32; sampled with
    top-p, with top-k and top-p, and greedy)."""
    model = model_of(device=DEV)
    prompts = [[5, 6, 7], list(range(1, 12)), [9, 9, 4]]
    for kw in (dict(temperature=0.9, top_p=0.8), dict(temperature=0.9, top_k=5, top_p=0.9), {}):
        engine = Engine(model, max_batch=3, stacked=True, threshold=nucleus.pivot_threshold, draw=nucleus.draw_tokens)
        ids = {engine.add(p, SamplingParams(10, seed=3 + b, **kw)): b for b, p in enumerate(prompts)}
        got = [[] for _ in prompts]
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # on a GPU: a compile failure (eager fallback) fails
            while engine.has_work():
                for e in engine.step():
                    if e.token is not None:
                        got[ids[e.request_id]].append(e.token)
        want = [generate(model, [p], 10, path="reference", seed=3 + b, **kw)[0] for b, p in
                enumerate(prompts)]  # fmt: skip
        assert got == want, kw


def test_pivot_threshold_says_why_it_cannot_run():
    if nucleus.triton is None:
        assert nucleus.pivot_unsupported(torch.zeros(1, 4)) == "triton is not installed"
    elif not (GPU or nucleus._INTERPRET):
        assert "CUDA" in nucleus.pivot_unsupported(torch.zeros(1, 4))
        with pytest.raises(RuntimeError, match="pivot_threshold: .*CUDA"):
            nucleus.pivot_threshold(torch.zeros(1, 4), torch.ones(1, 1, dtype=torch.long), torch.ones(1, 1))


def test_nucleus_tests_in_a_fresh_process():
    run_file_in_child(__file__, IN_PROCESS, skipped=1)  # this test
