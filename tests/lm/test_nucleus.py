"""notelab.lm.nucleus: the top-k / top-p threshold by a pivot search and the split argmax / Gumbel draw, against the
torch functions (the sort, bisection, ``gumbel_argmax``), on CPU through Triton's interpreter (``triton_interpreter``:
a child process where another module imported triton first); the ``gpu`` tests run the compiled kernels, also
inside the engine's compiled, captured step."""

import pytest
import torch
from triton_interpreter import GPU, engine_tokens, import_interpreted, run_file_in_child, use_interpreter
from triton_interpreter import small_llama as model_of

from notelab.lm import generate
from notelab.lm.sampling import bisect_threshold, filter_threshold, gumbel_argmax

nucleus, IN_PROCESS = import_interpreted("notelab.lm.nucleus")


@pytest.fixture
def interp(monkeypatch):
    use_interpreter(IN_PROCESS, monkeypatch)


def case(V: int, dev: str = "cpu") -> tuple[torch.Tensor, ...]:
    """Logits of six rows (peaked, nearly flat, a masked token), their temperatures (a greedy row among them)
    and top-k / top-p settings (top-p alone, top-k alone, both, neither)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, V, generator=g) * 3.0
    x[1] *= 0.01  # nearly flat: the nucleus holds most of the row
    x[2, :5] += 30.0  # peaked: a nucleus of a few tokens
    x[3, 7] = float("-inf")  # a token masked before (a penalty or a filter)
    temperature = torch.tensor([[0.8], [1.0], [1.3], [0.0], [0.5], [2.0]])
    top_k = torch.tensor([[V], [V], [3], [50], [V], [1]])
    top_p = torch.tensor([[0.9], [0.5], [0.95], [1.0], [1.0], [0.3]])
    return tuple(t.to(dev) for t in (x, temperature, top_k, top_p))


def kept(logits: torch.Tensor, temperature: torch.Tensor, thr: torch.Tensor) -> torch.Tensor:
    return (logits / torch.where(temperature > 0, temperature, 1.0)) >= thr


def check_thresholds(V: int, dev: str, split_bits: int = nucleus.SPLIT_BITS, **sizes) -> None:
    x, temperature, top_k, top_p = case(V, dev)
    for t in (temperature, None):
        tt = torch.ones_like(temperature) if t is None else t
        got = nucleus.pivot_threshold(x, top_k, top_p, True, t, split_bits, **sizes)
        assert torch.equal(kept(x, tt, got), kept(x, tt, filter_threshold(x, top_k, top_p, temperature=t)))
        assert torch.equal(kept(x, tt, got), kept(x, tt, bisect_threshold(x, top_k, top_p, temperature=t)))
    no_k = torch.full_like(top_k, V)
    got = nucleus.pivot_threshold(x.bfloat16(), no_k, top_p, False, temperature, split_bits, **sizes)  # bf16 read
    want = filter_threshold(x.bfloat16(), no_k, top_p, temperature=temperature)
    assert torch.equal(kept(x.bfloat16().float(), temperature, got), kept(x.bfloat16().float(), temperature, want))


def check_draws(V: int, dev: str) -> None:
    x, temperature, top_k, top_p = case(V, dev)
    x[3, [7, 70 % V]] = 50.0  # tied maxima of a greedy row: the first
    seed = torch.arange(6, device=dev) * 977
    counter = torch.tensor([0, 5, 6, 7, 8, 9], device=dev)
    thr = nucleus.pivot_threshold(x, top_k, top_p, True, temperature)
    for t, th in ((temperature, thr), (temperature, None), (None, None)):
        got = nucleus.draw_tokens(x, t, th, seed, counter)
        assert torch.equal(got, gumbel_argmax(x, t, th, seed, counter)), (t is None, th is None)
    assert nucleus.draw_tokens(x, None, None, seed, counter)[3] == 7
    draws = {int(nucleus.draw_tokens(x, temperature, None, seed, counter + i)[1]) for i in range(6)}
    assert len(draws) > 1  # the noise moves with the counter


SETTINGS = (dict(temperature=0.9, top_p=0.8), dict(temperature=0.9, top_k=5, top_p=0.9), {})


def check_engine(dev: str, **parts) -> None:
    """The engine's sampled (top-p; top-k and top-p) and greedy tokens equal the reference loop's (float32)."""
    model = model_of(device=dev)
    prompts = [[5, 6, 7], list(range(1, 12)), [9, 9, 4]]
    for kw in SETTINGS:
        want = [generate(model, [p], 10, path="reference", seed=3 + b, **kw)[0] for b, p in enumerate(prompts)]
        assert engine_tokens(model, prompts, kw, **parts) == want, kw


@pytest.mark.parametrize("split_bits", [1, 2, 3, 4])
@pytest.mark.parametrize("V", [101, 3000])
def test_pivot_threshold_keeps_the_sorts_set(interp, split_bits, V):
    """Top-p alone, top-k alone, both and neither, greedy and scaled rows, float32 and bf16 logits: the kept set
    of the sort (``filter_threshold``) and of bisection."""
    check_thresholds(V, "cpu", split_bits)


@pytest.mark.parametrize("split_bits", [2, 4])
def test_pivot_threshold_in_long_loops(interp, split_bits):
    """One program a row (``programs`` 4 for 6 rows), loading 256 logits at once (64 at s = 4): each pass loops
    over a row's 12 blocks (47 at s = 4) after its first."""
    check_thresholds(3000, "cpu", split_bits, programs=4, block=256)


def test_pivot_threshold_ties_and_tiny_nuclei(interp):
    """Ties at the threshold are kept (top-k 2 over three equal maxima keeps three); top-p 1e-6 keeps the maximum
    only; a row of equal values keeps them all."""
    x = torch.zeros(3, 64)
    x[0, [3, 9, 20]] = 5.0
    x[1] = torch.linspace(-4, 4, 64)
    top_k = torch.tensor([[2], [64], [64]])
    top_p = torch.tensor([[1.0], [1e-6], [0.5]])
    got = x >= nucleus.pivot_threshold(x, top_k, top_p)
    assert got[0].sum() == 3 and got[0, [3, 9, 20]].all()
    assert got[1].sum() == 1 and got[1, -1]
    assert got[2].all()


@pytest.mark.parametrize("V", [101, 5000])
def test_draw_tokens_equals_gumbel_argmax(interp, V):
    """Greedy rows, sampled rows, with a threshold and without, and all rows greedy: the torch draw's tokens, from
    the same counter-based noise; a tie takes the first index, as argmax does."""
    check_draws(V, "cpu")


def test_engine_with_the_kernels_gives_the_reference_tokens(interp):
    from notelab.lm.attend import rope_attention

    check_engine("cpu", threshold=nucleus.pivot_threshold, draw=nucleus.draw_tokens, attention=rope_attention)


def test_the_kernels_say_why_they_cannot_run():
    if nucleus.triton is None:
        assert nucleus.pivot_unsupported(torch.zeros(1, 4)) == "triton is not installed"
    elif not nucleus._INTERPRET:
        assert "CUDA" in nucleus.pivot_unsupported(torch.zeros(1, 4))
        with pytest.raises(RuntimeError, match="pivot_threshold: .*CUDA"):
            nucleus.pivot_threshold(torch.zeros(1, 4), torch.ones(1, 1, dtype=torch.long), torch.ones(1, 1))
        with pytest.raises(RuntimeError, match="draw_tokens: .*CUDA"):
            nucleus.draw_tokens(torch.zeros(1, 4), None, None, torch.zeros(1), torch.zeros(1))


def test_nucleus_tests_in_a_fresh_process():
    run_file_in_child(__file__, IN_PROCESS, skipped=2)  # this test and the GPU test


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs CUDA (the compiled kernels)")
def test_the_kernels_on_cuda():
    """Compiled kernels: the sort's kept sets and the torch draw's tokens; the engine's default on CUDA (these
    kernels and ``notelab.lm.attend``, compiled and captured, no fallback) gives the reference tokens."""
    check_thresholds(3000, "cuda")
    check_draws(5000, "cuda")
    check_engine("cuda")
