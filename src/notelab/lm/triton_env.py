"""Triton where it is installed, and whether its kernels run through its interpreter: what the kernel modules
(``notelab.lm.chain``, ``notelab.lm.nucleus``, ``notelab.lm.attend``, ``notelab.lm.folded``) share, with
:func:`l2_prefetch`, by which a kernel asks the L2 cache to fetch weights a later kernel will read.

``TRITON_INTERPRET=1`` must be set before triton is first imported (``triton.jit`` reads it then), so it is read
once, here, when the first kernel module is imported; the tests of the kernels run on CPU that way.
"""

from __future__ import annotations

import os

import torch

try:  # triton is optional: without it the kernel paths say why they cannot run and the torch functions run
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


PREFETCH_LINE = 128  # bytes of one L2 prefetch request (one line: ``prefetch.global.L2``)


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


def prefetch_lines(tensors: list[torch.Tensor], nbytes: list[int], filler: torch.Tensor) -> tuple[list, list[int]]:
    """Regions (tensor, bytes from its start) as :func:`l2_prefetch` takes them: two tensors and their counts of
    lines, padded with ``filler`` and no lines; none under the interpreter (it runs no PTX)."""
    if len(tensors) > 2 or len(nbytes) != len(tensors):
        raise ValueError(
            f"l2_prefetch: expected at most two regions and a size each, got {len(tensors)}, {len(nbytes)}"
        )
    lines = [-(-min(int(n), t.numel() * t.element_size()) // PREFETCH_LINE) for t, n in zip(tensors, nbytes)]
    if INTERPRET:
        lines = [0] * len(tensors)
    return [*tensors, filler, filler][:2], [*lines, 0, 0][:2]


if triton is not None:

    @triton.jit
    def l2_prefetch(ptr, lines, pid, nprog):  # noqa: ANN001, ANN201
        """Program ``pid`` of ``nprog`` asks L2 for its share of the first ``lines`` 128-byte lines at ``ptr``
        (contiguous shares, in order): ``prefetch.global.L2`` requests, which the program does not wait for and
        which change no value, so a kernel can start the next products' weight reads while it does its own work
        (a decode step's small kernels leave the memory bus idle). Hopper / Ampere PTX: not under the
        interpreter."""
        LANES: tl.constexpr = 128  # requests a program issues at once (one a thread of four warps)
        per = (lines + nprog - 1) // nprog
        first = pid.to(tl.int64) * per
        base = ptr.to(tl.pointer_type(tl.int8))
        for start in range(0, per, LANES):
            j = first + start + tl.arange(0, LANES)
            live = ((j < first + per) & (j < lines)).to(tl.int32)
            tl.inline_asm_elementwise(
                "{ .reg .pred p; setp.ne.s32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.u32 $0, 0; }",
                "=r,l,r", [(base + j * 128).to(tl.int64), live], dtype=tl.int32, is_pure=False, pack=1,
            )  # fmt: skip
