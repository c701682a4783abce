"""notelab.lm.skinny: products of a few rows by a wide weight (plain, accumulating into the residual, gated SiLU)
against torch, on CPU through Triton's interpreter (``triton_interpreter``: a child process where another module
imported triton first); the ``gpu`` tests run the compiled kernel and the folded engine with it."""

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from triton_interpreter import GPU, engine_tokens, import_interpreted, run_file_in_child, use_interpreter, with_gains
from triton_interpreter import small_llama as model_of

from notelab.lm import generate
from notelab.lm.attend import rope_attention
from notelab.lm.engine import StackedLayers
from notelab.lm.folded import folded_unsupported, folded_weights, gated_silu_torch

skinny, IN_PROCESS = import_interpreted("notelab.lm.skinny")
folded, _ = import_interpreted("notelab.lm.folded")


@pytest.fixture
def interp(monkeypatch):
    use_interpreter(IN_PROCESS, monkeypatch)


def check(dev: str, B: int, N: int, K: int, tiles, dtype=torch.float32, pdl: bool = False) -> None:  # noqa: ANN001
    """Each epilogue against float32 torch: to 1e-5 in float32, within a few bf16 roundings in bf16 (``pdl``: the
    kernels launched with programmatic dependent launch where it can run). The three products one after another
    share the split programs' held arrival counts: each must leave them zero for the next."""
    g = torch.Generator().manual_seed(B * 1000 + N)
    x = (torch.randn(B, K, generator=g) * 2.0).to(dev, dtype)
    w = (torch.randn(2 * N, K, generator=g) / K**0.5).to(dev, dtype)
    y = torch.randn(B, N, generator=g).to(dev, dtype)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=0.03, atol=0.03)
    xf, wf = x.float(), w.float()
    torch.testing.assert_close(skinny.skinny_linear(x, w[:N], tiles, pdl).float(), F.linear(xf, wf[:N]), **tol)
    acc = y.clone()
    skinny.skinny_add_(acc, x, w[:N], tiles, pdl)
    torch.testing.assert_close(acc.float(), y.float() + F.linear(xf, wf[:N]), **tol)
    got = skinny.skinny_gated(x, w, 1e-5, tiles, pdl).float()
    torch.testing.assert_close(got, gated_silu_torch(F.linear(xf, wf), xf, 1e-5), **tol)


@pytest.mark.parametrize(
    ("B", "N", "K", "tiles"),
    [
        (1, 40, 64, (16, 32, 1, 4)),
        (5, 64, 96, (32, 64, 2, 4)),
        (17, 48, 200, (16, 64, 1, 2)),
        (33, 16, 32, (16, 32, 1, 4)),
        (5, 40, 200, (16, 32, 2, 4, 3)),  # K in three parts: 96, 96 and the masked 8
        (17, 64, 64, (32, 32, 1, 4, 4)),  # more parts than blocks: the last two add zeros
    ],
)
def test_skinny_products_equal_torch(interp, B, N, K, tiles):
    """One row to 33 (rows padded to 16 / 64 by masks), outputs and K not multiples of the tiles (masked), K split
    over programs whose partial sums the last adds, float32."""
    check("cpu", B, N, K, skinny.Tiles(*tiles))


def test_skinny_products_in_bf16(interp):
    check("cpu", 6, 40, 96, skinny.Tiles(16, 32, 1, 4), torch.bfloat16)


def test_skinny_products_asked_for_pdl_where_it_cannot_run(interp):
    """Through the interpreter (no programmatic dependent launch) the kernel launches as usual."""
    check("cpu", 5, 40, 200, skinny.Tiles(16, 32, 2, 4, 3), pdl=True)


def test_skinny_says_why_it_cannot_run():
    x, w = torch.zeros(3, 8), torch.zeros(5, 8)
    if skinny.triton is None:
        assert skinny.skinny_unsupported(x, w) == "triton is not installed"
        return
    if not skinny._INTERPRET:
        assert "CUDA" in skinny.skinny_unsupported(x, w)
        with pytest.raises(RuntimeError, match="skinny_linear: .*CUDA"):
            skinny.skinny_linear(x, w)
        return
    assert "expected x (B, K) and w (N, K), got (3, 8) and (5, 7)" in skinny.skinny_unsupported(x, torch.zeros(5, 7))
    assert "at most 64 rows" in skinny.skinny_unsupported(torch.zeros(65, 8), w)
    assert "share a dtype" in skinny.skinny_unsupported(x, w.double())
    with pytest.raises(RuntimeError, match="skinny_add_: expected y \\(3, 5\\)"):
        skinny.skinny_add_(torch.zeros(3, 4), x, w)
    with pytest.raises(RuntimeError, match="an even number of weight rows"):
        skinny.skinny_gated(x, w, 1e-5)


def skinny_layers(pdl: bool = False) -> StackedLayers:
    """The folded layers with every product by the kernel (the default takes it for some: ``folded.SKINNY``), down
    split over K."""
    s = skinny
    down = s.Tiles(64, 128, 4, 4, 4)
    add_ = lambda y, x, w: s.skinny_add_(y, x, w, down if w.shape[1] > 64 else s.ADD_TILES, pdl)  # noqa: E731
    every = folded.Products(partial(s.skinny_linear, pdl=pdl), add_, partial(s.skinny_gated, pdl=pdl),
                            partial(s.skinny_linear, pdl=pdl))  # fmt: skip
    return StackedLayers(folded_weights, partial(folded.folded_forward, products=every), folded_unsupported)


def check_engine(dev: str, pdl: bool = False) -> None:
    """The folded engine with these products: the reference loop's greedy and sampled tokens (float32)."""
    model = with_gains(model_of(device=dev))
    prompts = [[5, 6, 7], list(range(1, 12)), [9, 9, 4]]
    parts = dict(attention=partial(rope_attention, pdl=True)) if pdl else {}
    for kw in (dict(temperature=0.9, top_p=0.8), {}):
        want = [generate(model, [p], 10, path="reference", seed=3 + b, **kw)[0] for b, p in enumerate(prompts)]
        assert engine_tokens(model, prompts, kw, layers=skinny_layers(pdl), **parts) == want, kw


def test_engine_with_skinny_products(interp):
    check_engine("cpu")


def test_skinny_tests_in_a_fresh_process():
    run_file_in_child(__file__, IN_PROCESS, skipped=3)  # this test and the GPU tests


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs CUDA (the compiled kernel)")
def test_skinny_products_on_cuda():
    """Each epilogue compiled, with and without K split; split products give the same bits every call (the partial
    sums are added in a fixed order, whichever program arrives last)."""
    split = skinny.Tiles(64, 128, 4, 4, 4)
    for B in (1, 8, 32):
        for tiles in (skinny.ADD_TILES, skinny.GATED_TILES, split):
            for pdl in (False, True):
                check("cuda", B, 2048, 2048, tiles, pdl=pdl)
                check("cuda", B, 2048, 2048, tiles, torch.bfloat16, pdl)
    x = torch.randn(32, 8192, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(2048, 8192, device="cuda", dtype=torch.bfloat16) / 90
    first = skinny.skinny_linear(x, w, split)
    for _ in range(20):
        assert torch.equal(skinny.skinny_linear(x, w, split), first)


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs CUDA (the compiled kernels)")
def test_skinny_engine_on_cuda():
    """Compiled and captured with these products (no fallback), with and without programmatic dependent launch
    (theirs and the attention's): the reference tokens (float32)."""
    check_engine("cuda")
    check_engine("cuda", pdl=True)
