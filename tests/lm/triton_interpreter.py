"""Helpers for tests of Triton kernels on CPU through Triton's interpreter (``TRITON_INTERPRET=1``).

The interpreter must be chosen when triton itself is first imported (its library functions, ``tl.zeros``,
``tl.sum``..., are built for the interpreter then) and when a kernel module is imported (``triton.jit``
reads the variable then). ``import_interpreted`` imports a kernel module with the variable set, puts the
environment back, and says whether this process can interpret kernels: not where another test module
imported triton first (``diffusers`` does, in a full run), and never on a machine with a GPU, where an
interpreted kernel module would serve that worker's GPU tests. Where it cannot, ``run_file_in_child``
runs the test file in a child process that sets the variable from the start.
"""

import importlib
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path
from types import ModuleType

import pytest
import torch

from notelab.lm import Llama, LlamaConfig

GPU = torch.cuda.is_available()


def import_interpreted(name: str) -> tuple[ModuleType, bool]:
    """Import module ``name`` (with TRITON_INTERPRET=1 on a CPU-only machine); returns it and whether its kernels
    run through the interpreter in this process."""
    saved = os.environ.get("TRITON_INTERPRET")
    if not GPU:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        module = importlib.import_module(name)
        try:
            import triton.language as tl
            from triton.runtime.interpreter import InterpretedFunction

            in_process = not GPU and module._INTERPRET and isinstance(tl.zeros, InterpretedFunction)
        except ImportError:
            in_process = False
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved
    return module, in_process


def use_interpreter(in_process: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """For a kernel test on CPU: skip where this process cannot interpret (``run_file_in_child`` runs the file
    then), else keep TRITON_INTERPRET=1 set for the test."""
    pytest.importorskip("triton")
    if not in_process:
        pytest.skip("triton was imported without TRITON_INTERPRET=1 first: the file runs in a fresh process")
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def run_file_in_child(test_file: str, in_process: bool, skipped: int) -> None:
    """Run ``test_file`` under the interpreter in a child process (CPU-only machines where this process cannot
    interpret); the child must pass with exactly ``skipped`` skips (this test and the GPU ones)."""
    pytest.importorskip("triton")
    if in_process or GPU:
        pytest.skip("the kernel tests run in this process" if in_process else "on a GPU the compiled kernels run")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env["TRITON_INTERPRET"], env["CUDA_VISIBLE_DEVICES"] = "1", ""
    path = Path(test_file).resolve()
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(path)]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=path.parents[2], timeout=900)
    tail = run.stdout[-4000:] + run.stderr[-2000:]
    assert run.returncode == 0, tail
    done = re.search(r"\b\d+ passed, (\d+) skipped\b", run.stdout)  # another skip: the child could not interpret
    assert done and int(done.group(1)) == skipped, tail


def small_llama(dtype: torch.dtype = torch.float32, device: str = "cpu", **kw) -> Llama:
    """A Llama for kernel tests, weights N(0, 0.2) (logits far from ties). Odd sizes on purpose: vocabulary 101
    and FFN width 176 are not powers of two (masked tiles)."""
    base = dict(vocab_size=101, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16, max_seq_len=96)
    base.update(rope_theta=500000.0, rope_scaling=dict(factor=8.0, original_max_position_embeddings=32))
    torch.manual_seed(0)
    model = Llama(LlamaConfig(**{**base, **kw})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.to(device=device, dtype=dtype)


def with_gains(model):  # noqa: ANN001, ANN201
    """The model with RMSNorm gains away from 1 (a fold of all-ones gains would test nothing)."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in model.layers:
            for n in (layer.input_layernorm, layer.post_attention_layernorm):
                n.weight.copy_(0.5 + torch.rand(n.weight.shape, generator=g).to(n.weight))
    return model


def engine_tokens(model: Llama, prompts: list[list[int]], kw: dict, **parts) -> list[list[int]]:
    """10 new tokens a prompt from an engine built with ``parts`` (row b seeded 3 + b, sampling settings ``kw``); a
    RuntimeWarning (on a GPU: a compile failure and the eager fallback) fails the test."""
    from notelab.lm.engine import Engine, SamplingParams

    engine = Engine(model, max_batch=len(prompts), stacked=True, **parts)
    ids = {engine.add(p, SamplingParams(10, seed=3 + b, **kw)): b for b, p in enumerate(prompts)}
    got: list[list[int]] = [[] for _ in prompts]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        while engine.has_work():
            for e in engine.step():
                if e.token is not None:
                    got[ids[e.request_id]].append(e.token)
    return got
