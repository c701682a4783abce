"""Choosing the next tokens of a batch in a few Triton kernels: the top-k / top-p threshold by a search by pivots,
and the argmax (greedy) or Gumbel-max draw (sampled) split over chunks of the vocabulary.

Threshold.

``notelab.lm.sampling.bisect_threshold`` halves a bracket around the threshold 31 times, each halving one
pass over the rows (two kernels in the compiled decode step). Here each pass splits the bracket into
``2^s`` parts at once: its programs sum their chunk of a row at ``2^s - 1`` pivots in one go. The search
runs over keys of the logits as given, ``z`` (temperature scaling is monotone, so it keeps their order):
bf16 / fp16 logits take only 2^16 values, so ``ceil(16 / s)`` passes end it (8 at s = 2, against 16 over
float32 keys: measured 49.0% against 44.4% of the batch-8 roofline, benchmarks/RESULTS.md). With ``x = z / T``
the scaled logits of a row and ``m`` their maximum:

    key(z)  an int ordered as z is (z >= 0: its bits; z < 0: its bits with the low ones flipped); a 16-bit
            key for bf16 / fp16, else a 32-bit key of the float32 x; the bracket is an interval of integers
    stats   per chunk of a row, the maximum and minimum of z                         one launch
    top-k   t_k = the largest t with #{i: key_i >= t} >= k                           ceil(bits / s) launches
    top-p   t_p = the largest t >= t_k with  sum_{key_i >= t} e^(x_i - m)  >=  p sum_{key_i >= t_k} e^(x_i - m)
            (the kept mass reaches p of the mass top-k kept; top-p < 1 rows only)   ceil(bits / s) launches
    final   the threshold as a float32 ``thr`` over x: x_i >= thr exactly when key_i >= t     one launch

A pass's programs first read the previous pass's per-chunk sums and narrow the bracket (every program of a
row adds the same numbers in the same order, so they agree), then sum their chunk at the new pivots. A sum
of non-negative float32 terms only grows when a term is added, so the test at the pivots is monotone and
the search is exact for the sums it computes: the kept set is the sort's (``filter_threshold``) up to a
token whose mass sits exactly at the edge of the nucleus, as for bisection.

Draw. ``notelab.lm.sampling.gumbel_argmax`` in two launches: programs over (chunk, row) take the largest
``x_i`` (greedy rows) or ``x_i + g_i`` over ``x_i >= thr`` (sampled rows; ``g_i`` the same counter-based Gumbel
noise, ``notelab.lm.sampling.uniform_noise``, hashed in uint32) and its first index, then one program a row
keeps the best chunk's (the first on ties): the first index of the row's maximum, as ``argmax``.

Without a GPU the kernels run through Triton's interpreter (``TRITON_INTERPRET=1``, read by
``notelab.lm.triton_env``), which is how the tests check them against the sort on CPU.
"""

from __future__ import annotations

import torch

from notelab.lm.triton_env import INTERPRET as _INTERPRET  # noqa: F401 - the tests read it here
from notelab.lm.triton_env import kernels_unsupported, tl, triton
from notelab.lm.triton_env import pow2 as _pow2

SPLIT_BITS = 2  # s (1 to 4): each pass splits the bracket into 2^s parts
PROGRAMS = 512  # programs a pass aims at, all rows together
BLOCK = 1024  # elements a program loads at once (at s = 2: fewer at s = 3, 4, whose sums take more registers)
STATS_BLOCK = 4096  # elements the statistics' programs load at once (a maximum and a minimum each)
MAX_CHUNKS = 64  # chunks of a row at most (each program reads every chunk's sums of the previous pass)


def pivot_unsupported(x: torch.Tensor) -> str:
    """Why :func:`pivot_threshold` and :func:`draw_tokens` cannot run on ``x`` ("" when it can)."""
    return kernels_unsupported(x)


def _chunks(
    B: int, V: int, programs: int = PROGRAMS, max_chunks: int = MAX_CHUNKS, block: int = BLOCK
) -> tuple[int, int]:
    """Elements a program covers and chunks a row: about ``programs`` programs, at most ``max_chunks`` a row, at
    least ``block`` elements a program."""
    chunk = max(_pow2(-(-V * B // programs)), _pow2(-(-V // max_chunks)), block)
    return chunk, -(-V // chunk)


if triton is not None:

    @triton.jit
    def _key(x):  # noqa: ANN001, ANN202
        bits = x.to(tl.int32, bitcast=True)
        return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)

    @triton.jit
    def _scaled(row, offs, inside, t, SCALE: tl.constexpr):  # noqa: ANN001, ANN202
        """Float32 logits / t (correctly rounded, as torch divides) at ``offs``; -inf outside the row."""
        v = tl.load(row + offs, mask=inside, other=float("-inf")).to(tl.float32)
        if SCALE:
            v = tl.math.div_rn(v, t)
        return v

    @triton.jit
    def _temperature(temp_ptr, b, SCALE: tl.constexpr):  # noqa: ANN001, ANN202
        """Row b's divisor: its temperature, 1 where it is <= 0 (greedy)."""
        if SCALE:
            t = tl.load(temp_ptr + b)
            return tl.where(t > 0.0, t, 1.0)
        return 1.0

    @triton.jit
    def _key16(r):  # noqa: ANN001, ANN202
        """The 16-bit float ``r`` (bf16 or fp16) as an int32 ordered as its values are."""
        bits = r.to(tl.int16, bitcast=True).to(tl.int32)
        return tl.where(bits >= 0, bits, bits ^ 0x7FFF)

    @triton.jit
    def _stats_kernel(  # noqa: ANN202
        x_ptr, stride, V, mx_ptr, mn_ptr, C, CHUNK: tl.constexpr, BLOCK: tl.constexpr,  # noqa: ANN001
    ):  # fmt: skip
        """Per chunk, the max and min of the logits as read (float32: exact for bf16 and fp16)."""
        c, b = tl.program_id(0), tl.program_id(1)
        row = x_ptr + b.to(tl.int64) * stride
        hi = tl.full([BLOCK], float("-inf"), tl.float32)
        lo = tl.full([BLOCK], float("inf"), tl.float32)
        for start in range(0, CHUNK, BLOCK):
            offs = c * CHUNK + start + tl.arange(0, BLOCK)
            inside = offs < V
            v = tl.load(row + offs, mask=inside, other=float("-inf")).to(tl.float32)
            hi = tl.maximum(hi, v)
            lo = tl.minimum(lo, tl.where(inside, v, float("inf")))
        tl.store(mx_ptr + b * C + c, tl.max(hi, 0))
        tl.store(mn_ptr + b * C + c, tl.min(lo, 0))

    @triton.jit
    def _accumulate(acc, raw, inside, piv, mraw, c2, t, MODE: tl.constexpr, SCALE: tl.constexpr, KEY16: tl.constexpr):  # noqa: ANN001, ANN202
        """``acc`` ``(2^s, BLOCK)`` plus, per pivot j, the block's weights (1: count; 2: mass e^(x - m)) where the
        key reaches ``piv[j]`` (j = 0: the bracket's low end)."""
        if MODE == 1:
            w = tl.where(inside, 1.0, 0.0)
        else:
            w = tl.exp2((raw.to(tl.float32) - mraw) * c2)  # 0 outside the row (-inf)
        if KEY16:
            key = _key16(raw)
        else:
            v = raw.to(tl.float32)
            if SCALE:
                v = tl.math.div_rn(v, t)
            key = _key(v)
        return acc + tl.where(key[None, :] >= piv[:, None], w[None, :], 0.0)

    @triton.jit
    def _bound_key(v, x_ptr, t, SCALE: tl.constexpr, KEY16: tl.constexpr):  # noqa: ANN001, ANN202
        """The key of a float32 bound ``v`` of the logits as read (16-bit keys: of the value itself; 32-bit keys:
        of the value scaled)."""
        if KEY16:
            return _key16(v.to(x_ptr.dtype.element_ty))
        if SCALE:
            v = tl.math.div_rn(v, t)
        return _key(v)

    @triton.jit
    def _pass_kernel(  # noqa: ANN202
        x_ptr, stride, V, temp_ptr, mx_ptr, mn_ptr, br_ptr, part_ptr, k_ptr, p_ptr, thr_ptr, B, C, r, first_p,  # noqa: ANN001
        PREV: tl.constexpr,  # 0: first pass; 1: the previous pass counted (top-k); 2: it summed masses (top-p)
        MODE: tl.constexpr,  # 1: count; 2: sum masses
        FINAL: tl.constexpr,  # only narrow the bracket and write the threshold
        SCALE: tl.constexpr, KEY16: tl.constexpr, S: tl.constexpr, CP2: tl.constexpr, CHUNK: tl.constexpr,
        BLOCK: tl.constexpr,
    ):  # fmt: skip
        KP: tl.constexpr = 1 << S  # columns: the bracket's low end, then 2^S - 1 pivots
        c, b = tl.program_id(0), tl.program_id(1)
        cs = tl.arange(0, CP2)
        have = cs < C
        js = tl.arange(0, KP)
        row = x_ptr + b.to(tl.int64) * stride
        # Every load first: the first block of logits and the previous pass's results do not depend on each other
        # (a reduction's barrier would otherwise hold the next loads back).
        if not FINAL:
            offs = c * CHUNK + tl.arange(0, BLOCK)
            inside = offs < V
            raw = tl.load(row + offs, mask=inside, other=float("-inf"))
        t = _temperature(temp_ptr, b, SCALE)
        mxs = tl.load(mx_ptr + b * C + cs, mask=have, other=float("-inf"))
        if PREV == 0:
            mns = tl.load(mn_ptr + b * C + cs, mask=have, other=float("inf"))
        else:
            lo = tl.load(br_ptr + ((r - 1) * B + b) * 2)
            hi = tl.load(br_ptr + ((r - 1) * B + b) * 2 + 1)
            prev = part_ptr + ((r - 1) * B + b) * C * KP
            sums = tl.load(prev + cs[:, None] * KP + js[None, :], mask=have[:, None], other=0.0)
            if PREV == 1:
                need = tl.load(k_ptr + b).to(tl.float32)
            else:  # p of the mass at the low end of the first top-p pass (t_k)
                first = part_ptr + (first_p * B + b) * C * KP
                base = tl.load(first + cs * KP, mask=have, other=0.0)
                pb = tl.load(p_ptr + b)
        if FINAL:
            t_k = tl.load(br_ptr + (first_p * B + b) * 2)
            p_row = tl.load(p_ptr + b)
        mraw = tl.max(mxs, 0)
        c2 = 1.4426950408889634 / t  # e^((x - max) / t) = 2^((x - max) c2)
        top = _bound_key(mraw, x_ptr, t, SCALE, KEY16).to(tl.int64) + 1  # above every key of the row
        if PREV == 0:
            lo = _bound_key(tl.min(mns, 0), x_ptr, t, SCALE, KEY16).to(tl.int64)
            hi = top
        else:
            tot = tl.sum(sums, 0)
            if PREV == 2:
                need = pb * tl.sum(base, 0)
            n = tl.sum(((tot >= need) & (js > 0)).to(tl.int64), 0)  # pivots that still keep enough
            width = hi - lo
            lo, hi = lo + ((width * n) >> S), lo + ((width * (n + 1)) >> S)
            if PREV == 1 and MODE == 2:  # t_k found: top-p searches above it
                hi = top
        if c == 0:
            tl.store(br_ptr + (r * B + b) * 2, lo)
            tl.store(br_ptr + (r * B + b) * 2 + 1, hi)
        if FINAL:
            kt = tl.where(p_row < 1.0, lo, t_k).to(tl.int32)
            if KEY16:  # the 16-bit value of the key, scaled as the logits are
                bits = tl.where(kt >= 0, kt, kt ^ 0x7FFF).to(tl.int16)
                thr = bits.to(x_ptr.dtype.element_ty, bitcast=True).to(tl.float32)
                if SCALE:
                    thr = tl.math.div_rn(thr, t)
            else:
                thr = tl.where(kt >= 0, kt, kt ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)
            tl.store(thr_ptr + b, thr)
        else:  # a float32 sum a lane per pivot, added over the lanes once at the end
            piv = (lo + (((hi - lo) * js.to(tl.int64)) >> S)).to(tl.int32)
            acc = _accumulate(tl.zeros([KP, BLOCK], tl.float32), raw, inside, piv, mraw, c2, t, MODE, SCALE, KEY16)
            for start in range(BLOCK, CHUNK, BLOCK):
                offs = c * CHUNK + start + tl.arange(0, BLOCK)
                inside = offs < V
                raw = tl.load(row + offs, mask=inside, other=float("-inf"))
                acc = _accumulate(acc, raw, inside, piv, mraw, c2, t, MODE, SCALE, KEY16)
            tl.store(part_ptr + ((r * B + b) * C + c) * KP + js, tl.sum(acc, 1))

    @triton.jit
    def _hash32(x):  # noqa: ANN001, ANN202
        """``notelab.lm.sampling.hash32`` (lowbias32) on uint32."""
        x = x ^ (x >> 16)
        x = x * tl.full([], 0x7FEB352D, tl.uint32)
        x = x ^ (x >> 15)
        x = x * tl.full([], 0x846CA68B, tl.uint32)
        return x ^ (x >> 16)

    @triton.jit
    def _draw_kernel(  # noqa: ANN202
        x_ptr, stride, V, temp_ptr, thr_ptr, seed_ptr, count_ptr, val_ptr, idx_ptr, C,  # noqa: ANN001
        SAMPLE: tl.constexpr, FILTER: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        c, b = tl.program_id(0), tl.program_id(1)
        row = x_ptr + b.to(tl.int64) * stride
        t = _temperature(temp_ptr, b, SAMPLE)
        if FILTER:
            thr = tl.load(thr_ptr + b)
        if SAMPLE:
            noisy = tl.load(temp_ptr + b) > 0.0
            seed = (tl.load(seed_ptr + b) & 0xFFFFFFFF).to(tl.uint32)
            count = (tl.load(count_ptr + b) & 0xFFFFFFFF).to(tl.uint32)
            key = _hash32(_hash32(seed) ^ count)
        best = tl.full([BLOCK], float("-inf"), tl.float32)
        at = tl.zeros([BLOCK], tl.int32)
        for start in range(0, CHUNK, BLOCK):
            offs = c * CHUNK + start + tl.arange(0, BLOCK)
            inside = offs < V
            v = _scaled(row, offs, inside, t, SAMPLE)
            if FILTER:
                v = tl.where(v >= thr, v, float("-inf"))
            if SAMPLE:
                bits = _hash32(key ^ offs.to(tl.uint32)) >> 8
                u = (bits.to(tl.float32) + 0.5) * 5.9604644775390625e-08  # 2^-24
                v = tl.where(noisy, v + -tl.log(-tl.log(u)), v)
            take = v > best  # a lane keeps its first maximum
            best = tl.where(take, v, best)
            at = tl.where(take, offs, at)
        top = tl.max(best, 0)
        tl.store(val_ptr + b * C + c, top)
        tl.store(idx_ptr + b * C + c, tl.min(tl.where(best == top, at, V), 0))

    @triton.jit
    def _pick_kernel(val_ptr, idx_ptr, out_ptr, C, CP2: tl.constexpr):  # noqa: ANN001, ANN202
        b = tl.program_id(0)
        cs = tl.arange(0, CP2)
        vals = tl.load(val_ptr + b * C + cs, mask=cs < C, other=float("-inf"))
        first = tl.min(tl.where(vals == tl.max(vals, 0), cs, CP2), 0)
        tl.store(out_ptr + b, tl.load(idx_ptr + b * C + first).to(tl.int64))

    @torch.library.triton_op("notelab::draw_tokens", mutates_args=())
    def _draw_tokens(
        x: torch.Tensor,
        temperature: torch.Tensor,
        thr: torch.Tensor,
        seed: torch.Tensor,
        counter: torch.Tensor,
        sample: bool,
        filtered: bool,
        block: int,
    ) -> torch.Tensor:
        """:func:`draw_tokens` as an operator inductor compiles into its graph (the kernels launched as is)."""
        B, V = x.shape
        chunk, C = _chunks(B, V, block=block)
        val = torch.empty(B * C, dtype=torch.float32, device=x.device)
        idx = torch.empty(B * C, dtype=torch.int32, device=x.device)
        out = torch.empty(B, dtype=torch.int64, device=x.device)
        torch.library.wrap_triton(_draw_kernel)[(C, B)](
            x, x.stride(0), V, temperature, thr, seed, counter, val, idx, C,
            SAMPLE=sample, FILTER=filtered, CHUNK=chunk, BLOCK=block,
        )  # fmt: skip
        torch.library.wrap_triton(_pick_kernel)[(B,)](val, idx, out, C, CP2=max(2, _pow2(C)))
        return out

    @torch.library.triton_op("notelab::pivot_threshold", mutates_args=())
    def _pivot_threshold(
        x: torch.Tensor,
        temperature: torch.Tensor,
        top_k: torch.Tensor,
        top_p: torch.Tensor,
        with_top_k: bool,
        scale: bool,
        split_bits: int,
        programs: int,
        max_chunks: int,
        block: int,
    ) -> torch.Tensor:
        """:func:`pivot_threshold` as an operator inductor compiles into its graph (the kernels launched as is)."""
        B, V = x.shape
        chunk, C = _chunks(B, V, programs, max_chunks, block)
        key16 = x.element_size() == 2  # bf16 / fp16 logits: the search runs over their 2^16 values
        passes = -(-(16 if key16 else 32) // split_bits)
        nk = passes if with_top_k else 0
        total = nk + passes
        f32, dev = torch.float32, x.device
        mx, mn = torch.empty(B * C, dtype=f32, device=dev), torch.empty(B * C, dtype=f32, device=dev)
        br = torch.empty((total + 1) * B * 2, dtype=torch.int64, device=dev)
        part = torch.empty(total * B * C << split_bits, dtype=f32, device=dev)
        thr = torch.empty(B, dtype=f32, device=dev)
        torch.library.wrap_triton(_stats_kernel)[(C, B)](
            x, x.stride(0), V, mx, mn, C, CHUNK=chunk, BLOCK=min(chunk, STATS_BLOCK)
        )
        for r in range(total + 1):
            final = r == total
            prev = 0 if r == 0 else (1 if r - 1 < nk else 2)
            torch.library.wrap_triton(_pass_kernel)[(1 if final else C, B)](
                x, x.stride(0), V, temperature, mx, mn, br, part, top_k, top_p, thr, B, C, r, nk,
                PREV=prev, MODE=1 if r < nk else 2, FINAL=final, SCALE=scale, KEY16=key16, S=split_bits,
                CP2=max(2, _pow2(C)), CHUNK=chunk, BLOCK=min(chunk, block >> max(0, split_bits - 2)),
            )  # fmt: skip
        return thr


def pivot_threshold(
    logits: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    with_top_k: bool = True,
    temperature: torch.Tensor | None = None,
    split_bits: int = SPLIT_BITS,
    programs: int = PROGRAMS,
    max_chunks: int = MAX_CHUNKS,
    block: int = BLOCK,
) -> torch.Tensor:
    """``notelab.lm.sampling.bisect_threshold`` by the pivot search above (``split_bits`` = s): per row ``(B, 1)``
    a threshold such that ``x >= threshold`` is the set top-k then top-p keep, ``x`` the scaled logits
    (``notelab.lm.sampling.scale_logits`` of ``logits`` ``(B, V)``, any float dtype and row stride, and
    ``temperature`` ``(B, 1)``; None: ``logits`` are scaled already). ``top_k`` ``(B, 1)`` int64 (V: none),
    ``top_p`` ``(B, 1)`` (>= 1: none); about ``programs`` programs a pass, at most ``max_chunks`` a row, each
    loading ``block`` logits at once (a power of two). CUDA, or Triton's interpreter (:func:`pivot_unsupported`)."""
    if split_bits not in (1, 2, 3, 4):
        raise ValueError(f"pivot_threshold: expected split_bits 1, 2, 3 or 4, got {split_bits}")
    why = pivot_unsupported(logits)
    if why:
        raise RuntimeError(f"pivot_threshold: {why}")
    B = logits.shape[0]
    x = _rows(logits)
    k = top_k.reshape(B).to(torch.int64).contiguous()
    p = top_p.reshape(B).to(torch.float32).contiguous()
    t = _per_row(temperature, B, x.device)
    scaled = temperature is not None
    if block < 16 or block & (block - 1):
        raise ValueError(f"pivot_threshold: expected block a power of two >= 16, got {block}")
    args = (x, t, k, p, with_top_k, scaled, split_bits, programs, max_chunks, block)
    return torch.ops.notelab.pivot_threshold(*args)[:, None]


def draw_tokens(
    logits: torch.Tensor,
    temperature: torch.Tensor | None,
    threshold: torch.Tensor | None,
    seed: torch.Tensor,
    counter: torch.Tensor,
    block: int = BLOCK,
) -> torch.Tensor:
    """``notelab.lm.sampling.gumbel_argmax`` in two launches (see the module doc): the token ``(B,)`` of each row
    of ``logits`` ``(B, V)`` (any float dtype and row stride), each program loading ``block`` logits at once (a
    power of two). CUDA, or Triton's interpreter (:func:`pivot_unsupported`)."""
    why = pivot_unsupported(logits)
    if why:
        raise RuntimeError(f"draw_tokens: {why}")
    if block < 16 or block & (block - 1):
        raise ValueError(f"draw_tokens: expected block a power of two >= 16, got {block}")
    B, dev = logits.shape[0], logits.device
    thr = _per_row(threshold, B, dev)
    return torch.ops.notelab.draw_tokens(
        _rows(logits), _per_row(temperature, B, dev), thr, seed.reshape(B).contiguous(),
        counter.reshape(B).contiguous(), temperature is not None, threshold is not None, block,
    )  # fmt: skip


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` ``(B, V)`` as the kernels read it: unit stride along a row (any row stride)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _per_row(v: torch.Tensor | None, B: int, device: torch.device) -> torch.Tensor:
    """A per-row ``(B, 1)`` setting as a float32 ``(B,)`` vector (zeros for None: the kernels do not read it)."""
    if v is None:
        return torch.zeros(B, dtype=torch.float32, device=device)
    return v.reshape(B).to(torch.float32).contiguous()
