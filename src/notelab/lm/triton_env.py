"""Triton where it is installed, and whether its kernels run through its interpreter: what the kernel modules
(``notelab.lm.chain``, ``notelab.lm.nucleus``, ``notelab.lm.attend``, ``notelab.lm.folded``,
``notelab.lm.skinny``) share.

``TRITON_INTERPRET=1`` must be set before triton is first imported (``triton.jit`` reads it then), so it is read
once, here, when the first kernel module is imported; the tests of the kernels run on CPU that way. Also here:
the grid-dependency instructions of programmatic dependent launch and when the decode step's kernels use it.
"""

from __future__ import annotations

import functools
import os

import torch

try:  # triton is optional: without it the kernel paths say why they cannot run and the torch functions run
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def pow2(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for ``n <= 1``)."""
    return 1 << max(0, (int(n) - 1).bit_length())


def kernels_unsupported(t: torch.Tensor) -> str:
    """Why Triton kernels cannot run on tensor ``t`` ("" when they can): triton missing, or ``t`` not on a CUDA
    device and the interpreter off."""
    if triton is None:
        return "triton is not installed"
    if not (t.is_cuda or INTERPRET):
        return "the tensors are not on a CUDA device (and TRITON_INTERPRET is not set)"
    return ""


# Programmatic dependent launch for the attention's kernels (notelab.lm.attend) at up to this many rows: with it
# for the products and the attention, 8 rows measured 58.4% of the roofline against 55.2% without; at 32 rows it
# for the attention too measured 46.9% against 50.7% for the products alone (benchmarks/RESULTS.md, twelfth
# session). The products (notelab.lm.skinny) take it at any batch.
PDL_MAX_ROWS = 8


@functools.cache
def _sm90(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device)[0] >= 9


def pdl_usable(pdl: bool, t: torch.Tensor) -> bool:
    """Whether kernels asked to launch with programmatic dependent launch (``pdl``) on ``t``'s device can: CUDA,
    sm_90+ (not through the interpreter)."""
    return pdl and t.is_cuda and _sm90(t.device)


def launch_options(pdl: bool) -> dict:
    """A kernel launch's keywords for :func:`dependent_launch`: its ``PDL`` (given even when False: the kernels take
    no defaulted parameter, which inductor's positional launch of a ``triton_op``'s kernels cannot fill,
    tests/lm/test_triton_signatures.py) and the launch option that lets the kernel start early."""
    return {"PDL": True, "launch_pdl": True} if pdl else {"PDL": False}


if triton is not None:

    @triton.jit
    def dependent_launch(PDL: tl.constexpr):  # noqa: ANN201
        """First in a kernel launched with programmatic dependent launch (``PDL``), which may start before the kernel
        ahead of it ends: wait for that one (its writes visible after), then let the next kernel launch."""
        if PDL:
            gdc_wait()
            gdc_launch_dependents()
