"""sage_attention's inner kernel for Hopper on the Mosaic GPU backend (`plgpu.kernel`, TMA copies, `plgpu.wgmma`).

The same computation as the Triton kernel in sage_attention.py (which plans the request-aligned query blocks and
K's means). Each program takes `compute_wgs` x `block_q` query rows of one request and
one head: a TMA warpgroup streams K (int8) and V through `stages` shared-memory buffers, and each
compute warpgroup (64 query rows) runs Q.K^T as int8 x int8 -> int32 warpgroup MMAs (one per 64 columns of the
head dim, accumulating into one int32 tile), rescales by Q's row scales times
the K tile's scale (K is quantised per `block_k`-key tile and head, SageAttention's per-block K scales: a per-key
scale costs a shared-memory load and a multiply per score: 2.18 -> 2.00 ms at S = 16k on an H100), runs the
online softmax in base 2 and multiplies P (in registers; through shared memory in the
interpreter) with V in a 16-bit MMA that accumulates into the running float32 output. A slot is refilled once
every compute warpgroup has freed it (barriers); in causal blocks the earlier warpgroup frees the tiles it does
not need unread. Key tiles that every row of a warpgroup sees whole run without the mask; with two compute
warpgroups a shared barrier alternates them (one's softmax runs while the other's MMAs do, as in JAX's
attention_mgpu), and the wait for the next K tile overlaps the P.V MMA.

TMA wants row offsets it can prove aligned (Mosaic GPU's layout inference checks that a copy's dynamic row index
is a multiple of the shared-memory tiling, 8 rows). Keys stay where they are: a request's key tiles start at its
first row rounded down to 8, and the few leading rows that belong to the request before are masked. `key_tiles`
(one Triton pass) smooths and quantises K per such tile in place; V is read as given. Each compute warpgroup
TMA-loads its 16-bit query rows from wherever they start into untiled, swizzled 64-column buffers (any row offset,
no bank conflicts) and quantises them to int8 per row itself (instead of a Q pass: 0.02-0.03 ms less per call at
S = 1k-4k on an H100; its rounding uses float adds, the conversion instructions being quarter-rate; for the same
reason the int32 scores become floats by an integer add, `common.int_scores`). Q and K may
come as parts along the head dim (MLA's [nope | pe]): each 64-column chunk of Q and each of K's chunks is read
from the part that holds it, with no concatenated copy. Each warpgroup writes its query rows of the request
straight into the packed output (`store_rows`: TMA stores of a power-of-two ladder of rows from an untiled buffer,
so rows of other requests are left alone; blocks past the plan write zeros into the rows past the last request),
and only the small LSE goes through per-program tiles and a gather. The Triton path's XLA passes (K minus its
mean, absmax, convert) are not needed here.

On CPU it runs in the Mosaic GPU interpreter (`plgpu.InterpretGPUParams`), which the tests use; lowering for an
H100 needs the `jax_cuda13_plugin` package (the CPU CI installs it without its CUDA runtime).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.common import (H100_SMEM_BYTES, H100_SMS, ROUNDER, ROUNDER_BITS, as_parts, cdiv, concat_parts,
                                   int_scores, leading_columns, next_pow2, online_softmax_step, pad_to, pow2_chunks,
                                   segment_of, segments, smem)


@dataclasses.dataclass(frozen=True)
class MosaicBlockSizes:
    block_q: int = 64  # query rows per compute warpgroup (one wgmma M tile)
    block_k: int = 128  # keys per step (sage_attention.default_block_sizes takes 64 for short requests)
    stages: int = 2  # K / V tiles in flight
    compute_wgs: int = 2  # compute warpgroups per program, sharing every K / V tile (plus one TMA warpgroup)

    @property
    def program_rows(self) -> int:
        return self.block_q * self.compute_wgs


def padded_dims(dqk: int, dv: int) -> tuple[int, int]:
    """The head dims the kernel runs: int8 wgmma contracts 32 at a time, K's int8 rows are TMA-read in 64-column
    chunks (a K wider than 64 must be whole chunks: 96 failed to lower) and V's tile wants a power-of-two width, so
    zero columns pad them (no-ops at the real sizes 192 = 128 + 64, 128, 64)."""
    d = cdiv(dqk, 32) * 32
    return (d if d <= 64 else cdiv(dqk, 64) * 64), max(16, next_pow2(dv))


# shared memory besides the buffers' own bytes (barriers, alignment): Mosaic GPU took 2.7-3.2 KiB more at the sizes
# lowered for an H100 (head dims 64-256, 2-12 stages; `test_shared_memory_estimate_bounds_mosaics`)
SMEM_OVERHEAD = 4096


def smem_bytes(dqk: int, dv: int, bs: MosaicBlockSizes) -> int:
    """Shared memory a compiled program takes at these head dims and block sizes (16-bit Q and V): Q's rows and
    their int8 codes per compute warpgroup, `stages` K (int8), K-scale and V tiles, the output rows and LSEs."""
    d, dvp = padded_dims(dqk, dv)
    rows = bs.compute_wgs * bs.block_q
    return rows * d * 3 + bs.stages * bs.block_k * (d + 2 * dvp + 4) + rows * (2 * dvp + 4) + SMEM_OVERHEAD


# the smallest block sizes the kernel runs: what decides whether head dims fit at all
SMALLEST = MosaicBlockSizes(block_k=64, stages=2)


def unsupported(dqk: int, dv: int, v_dtype, bs: MosaicBlockSizes = SMALLEST) -> str | None:
    """Why this kernel cannot take these head dims and V dtype at block sizes `bs` (None when it can); the default,
    the smallest block sizes it runs, asks whether any fit."""
    if jnp.dtype(v_dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"V must be bfloat16 or float16 for the 16-bit P.V MMA, got {jnp.dtype(v_dtype)}"
    if padded_dims(dqk, dv)[1] > 256:
        return f"the V head dim must be at most 256, got {dv}"
    return too_big(dqk, dv, bs)


def too_big(dqk: int, dv: int, bs: MosaicBlockSizes) -> str | None:
    """Why these block sizes do not fit shared memory at these head dims (None when they do)."""
    need = smem_bytes(dqk, dv, bs)
    if need <= H100_SMEM_BYTES:
        return None
    return f"{bs} at head dims {dqk} / {dv} needs {need} bytes of shared memory, an H100 program has {H100_SMEM_BYTES}"


def _quantize_tile(parts, eps):
    """int8-valued float32 parts of one tile and the tile's one float32 scale, broadcast over its rows: absmax / 127
    (floored at eps / 127), rounded half up."""
    amax = jnp.max(functools.reduce(jnp.maximum, [jnp.max(jnp.abs(x), axis=1) for x in parts]))
    # the floor and the division on the broadcast row vector, as the reference computes them: taken on the scalar
    # first, 39 of 215k values came out one off the reference's (halves rounded the other way; interpret mode)
    scale = jnp.maximum(jnp.full((parts[0].shape[0],), amax, jnp.float32), eps) / 127.0
    return [jnp.clip(jnp.floor(x / scale[:, None] + 0.5), -127.0, 127.0) for x in parts], scale


def _full(a):
    return pl.BlockSpec(a.shape, lambda i, j: (0,) * len(a.shape))


KEY_ALIGN = 8  # TMA rows of a tiled shared-memory buffer start at a multiple of its 8-row tiling


def key_tile_plan(cu, total: int, block: int):
    """K / V tiles of `block` packed rows per request, the first starting at the request's first row rounded down to
    a multiple of KEY_ALIGN (so TMA can fetch it; its first `lead` rows belong to the request before): (lead [B],
    tile_req / tile_idx [n] int32: each tile's request and index within it, n a static bound; tiles past the plan
    have indices past their request's tiles)."""
    nb = cu.shape[0] - 1
    lens = cu[1:] - cu[:-1]
    lead = lax.rem(cu[:-1], jnp.int32(KEY_ALIGN))
    tiles = jnp.where(lens > 0, cdiv(lens + lead, block), 0)
    cu_t = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(tiles)]).astype(jnp.int32)
    n = cdiv(total, block) + 2 * nb  # each request adds at most two partial tiles
    t = jnp.arange(n, dtype=jnp.int32)
    req = segment_of(cu_t, t, nb)
    return lead, req, t - cu_t[req], n


def _load_tile(x_refs, head, chunks, r0, ok, block):
    """One key tile's rows r0 .. r0 + block of every chunk of K's parts, float32, zeros where not `ok`."""
    return [pltriton.load(x_refs[part].at[pl.ds(r0, block), head[part], pl.ds(c0, w)], mask=ok[:, None],
                          other=0).astype(jnp.float32) for part, c0, w, _ in chunks]


def _store_tile(parts, y_ref, s_ref, h, chunks, pad_chunks, r0, ok, block, eps):
    """Quantises one smoothed key tile with its one scale and writes its `ok` rows (each row by its own request's
    tile only, so tiles sharing rows at request boundaries do not clash); padding columns zero."""
    parts, scale = _quantize_tile(parts, eps)
    pltriton.store(s_ref.at[h, pl.ds(r0, block)], scale, mask=ok)
    for (_, _, w, out), x in zip(chunks, parts):
        pltriton.store(y_ref.at[pl.ds(r0, block), h, pl.ds(out, w)], x.astype(y_ref.dtype), mask=ok[:, None])
    for c0, w in pad_chunks:
        pltriton.store(y_ref.at[pl.ds(r0, block), h, pl.ds(c0, w)], jnp.zeros((block, w), y_ref.dtype),
                       mask=ok[:, None])


def _key_pass(k, width: int, block: int, headroom: int, interpret: bool):
    """What both K passes set up: K's parts (a one-head part is every head's; `headroom` zero rows appended for the
    interpreter, which clamps where Triton masks), the heads, the chunks (part, first column, width, output column)
    and the output's zero padding chunks (column, width), and the outputs' shapes: int8 rows [R, H, width] and their
    tiles' scales [H, R], R = T + block rounded up to a multiple of 8 (TMA wants the row counts of its sources in
    whole 8-row tiles: an odd T failed to lower)."""
    ks = as_parts(k)
    t_rows, heads = ks[0].shape[0], max(x.shape[1] for x in ks)
    widths = [x.shape[2] for x in ks]
    d = sum(widths)
    chunks = tuple((i, c0, w, sum(widths[:i]) + c0) for i, x in enumerate(ks) for c0, w in pow2_chunks(x.shape[2]))
    pad_chunks = tuple((d + o, w) for o, w in pow2_chunks(width - d))
    rows = cdiv(t_rows + block, 8) * 8
    out_shape = [jax.ShapeDtypeStruct((rows, heads, width), jnp.int8), jax.ShapeDtypeStruct((heads, rows), jnp.float32)]
    if interpret:
        ks = tuple(jnp.pad(x, ((0, headroom), (0, 0), (0, 0))) for x in ks)
    return ks, heads, chunks, pad_chunks, out_shape


def _key_tiles_kernel(tile_req_ref, tile_idx_ref, cu_ref, *refs, block, chunks, pad_chunks, n_parts, shift, eps):
    """One K tile of one head, in place: the request's rows of it loaded (chunk by chunk from K's parts), smoothed,
    quantised with the tile's one scale, written."""
    x_refs, refs = refs[:n_parts], refs[n_parts:]
    mean_refs, (y_ref, s_ref) = (refs[:n_parts], refs[n_parts:]) if shift else (None, refs)
    h = pl.program_id(1)
    head = [jnp.int32(0) if x.shape[1] == 1 else h for x in x_refs]  # a one-head part is every head's
    req, ti = tile_req_ref[0], tile_idx_ref[0]
    start, end = cu_ref[req], cu_ref[req + 1]
    r0 = start - lax.rem(start, jnp.int32(KEY_ALIGN)) + ti * block
    rows = r0 + jnp.arange(block)
    ok = (rows >= start) & (rows < end)
    parts = _load_tile(x_refs, head, chunks, r0, ok, block)
    if shift:
        parts = [jnp.where(ok[:, None], x - mean_refs[part][req, head[part], pl.ds(c0, w)][None, :], 0.0)
                 for (part, c0, w, _), x in zip(chunks, parts)]
    _store_tile(parts, y_ref, s_ref, h, chunks, pad_chunks, r0, ok, block, eps)


def _key_tiles_means_kernel(cu_ref, *refs, block, sum_rows, chunks, pad_chunks, n_parts, eps):
    """All of one request's K tiles of one head: a first pass sums its rows for the mean (written out), a second
    smooths and quantises each tile as `_key_tiles_kernel` does (its reads mostly hit the L2 the first pass filled)."""
    x_refs, (y_ref, s_ref), mean_refs = refs[:n_parts], refs[n_parts:n_parts + 2], refs[n_parts + 2:]
    req, h = pl.program_id(0), pl.program_id(1)
    head = [jnp.int32(0) if x.shape[1] == 1 else h for x in x_refs]
    start, end = cu_ref[req], cu_ref[req + 1]
    base = start - lax.rem(start, jnp.int32(KEY_ALIGN))

    def steps(rows):
        return lax.div(jnp.maximum(end - base, 0) + (rows - 1), jnp.int32(rows))

    def tile(t, rows=block):
        r0 = base + t * rows
        row = r0 + jnp.arange(rows)
        ok = (row >= start) & (row < end)
        return r0, ok, _load_tile(x_refs, head, chunks, r0, ok, rows)

    # the sum in steps of sum_rows rows (more loads in flight than one tile's)
    sums = lax.fori_loop(0, steps(sum_rows),
                         lambda t, acc: [a + x.sum(axis=0) for a, x in zip(acc, tile(t, sum_rows)[2])],
                         [jnp.zeros((w,), jnp.float32) for _, _, w, _ in chunks])
    means = [x / jnp.maximum(end - start, 1).astype(jnp.float32) for x in sums]
    for (part, c0, w, _), m in zip(chunks, means):
        pltriton.store(mean_refs[part].at[req, head[part], pl.ds(c0, w)], m)

    @pl.loop(0, steps(block))
    def _(t):
        r0, ok, parts = tile(t)
        parts = [jnp.where(ok[:, None], x - m[None, :], 0.0) for x, m in zip(parts, means)]
        _store_tile(parts, y_ref, s_ref, h, chunks, pad_chunks, r0, ok, block, eps)


def key_tiles_warps(block: int) -> int:
    """Warps per key_tiles program (tiles outermost in the grid), measured on the MLA seed prefill's K on an H100:
    8 for 128-key tiles (66 us; 4 / 16 warps 75 / 69, heads outermost 72; at D 128, S 16k 4 warps are 42 vs 45 us),
    4 for 64-key tiles (47 us; 2 / 8 warps 59 / 53, two or more heads per program 54-71)."""
    return 4 if block <= 64 else 8


def key_tiles(k, cu, block: int, *, width: int, shift=None, eps: float = 1e-8, interpret: bool = False):
    """K's pass: k [T, H, D] (or a tuple of parts [T, H or 1, D_i] along D, read as they are; a one-head part is
    shared by every head) smoothed (minus `shift` [B, H, D], its per-request mean, or its parts [B, H or 1, D_i],
    when given) and quantised to int8 per tile of `key_tile_plan` and
    head (the tile's absmax, as SageAttention quantises K per block), rows staying where they are. Returns
    (y [R, H, width] int8, scale [H, R] float32, R = T + block rounded up to 8: each row holds its tile's scale;
    the rows past T are headroom that no row of a request occupies)."""
    shifts = () if shift is None else as_parts(shift)
    _, tile_req, tile_idx, n = key_tile_plan(cu, as_parts(k)[0].shape[0], block)
    ks, heads, chunks, pad_chunks, out_shape = _key_pass(k, width, block, block, interpret)
    ins = [tile_req, tile_idx, cu, *ks, *(x.astype(jnp.float32) for x in shifts)]
    kernel = functools.partial(_key_tiles_kernel, block=block, chunks=chunks, pad_chunks=pad_chunks,
                               n_parts=len(ks), shift=bool(shifts), eps=eps)
    y, scale = pl.pallas_call(
        kernel,
        grid=(n, heads),
        in_specs=[pl.BlockSpec((1,), lambda i, j: (i,)), pl.BlockSpec((1,), lambda i, j: (i,))]
        + [_full(a) for a in ins[2:]],
        out_specs=[_full(o) for o in out_shape],
        out_shape=out_shape,
        compiler_params=pltriton.CompilerParams(num_warps=key_tiles_warps(block), num_stages=1),
        interpret=interpret,
        name="key_tiles",
    )(*ins)
    return y, scale


# `key_tiles_smoothed` (one program per request and head) where requests x heads give every SM a program; fewer,
# longer requests keep the one-hot mean and a program per tile
SMOOTHED_MIN_PROGRAMS = H100_SMS
# rows per step of its sum pass: at D 128, 16 heads, B 16 x 1024 / B 32 x 512 on an H100, 128 / 256 / 512 / 1024 rows
# took 78 / 74 / 86 / 90 and 75 / 69 / 75 / 82 us for the whole pass (4 / 8 / 16 warps, 1-3 stages: within 5%)
SMOOTHED_SUM_ROWS = 256


def key_tiles_smoothed(k, cu, block: int, *, width: int, eps: float = 1e-8, interpret: bool = False):
    """`key_tiles` smoothed by K's own per-request means, computed in the same launch: one program per (request,
    head) sums its request's rows, then smooths and quantises its tiles (no one-hot product reading K from memory a
    second time). Returns (y, scale) as key_tiles does, and the means [B, H or 1, D_i] float32 per part of k."""
    nb = cu.shape[0] - 1
    ks, heads, chunks, pad_chunks, out_shape = _key_pass(k, width, block, max(block, SMOOTHED_SUM_ROWS), interpret)
    out_shape += [jax.ShapeDtypeStruct((nb, x.shape[1], x.shape[2]), jnp.float32) for x in ks]
    kernel = functools.partial(_key_tiles_means_kernel, block=block, sum_rows=SMOOTHED_SUM_ROWS, chunks=chunks,
                               pad_chunks=pad_chunks, n_parts=len(ks), eps=eps)
    y, scale, *means = pl.pallas_call(
        kernel,
        grid=(nb, heads),
        in_specs=[_full(a) for a in (cu, *ks)],
        out_specs=[_full(o) for o in out_shape],
        out_shape=out_shape,
        compiler_params=pltriton.CompilerParams(num_warps=key_tiles_warps(block), num_stages=1),
        interpret=interpret,
        name="key_tiles_smoothed",
    )(cu, *ks)
    return y, scale, means


def key_tiles_reference(k, cu, block: int, *, width: int, shift=None, eps: float = 1e-8):
    """key_tiles in plain jnp, on the request rows [T, H, width] / [H, T] (the headroom rows are left out); parts of
    k / shift are concatenated."""
    k, shift = concat_parts(k), None if shift is None else concat_parts(shift)
    t_rows = k.shape[0]
    seg, off = segments(cu, t_rows)
    lead, _, _, _ = key_tile_plan(cu, t_rows, block)
    tile_of_row = (off + lead[seg]) // block
    y = k.astype(jnp.float32) - (shift.astype(jnp.float32)[seg] if shift is not None else 0.0)
    amax_row = jnp.abs(y).max(axis=2)  # [T, H]
    key = seg * (t_rows + 1) + tile_of_row  # one id per (request, tile)
    same = key[:, None] == key[None, :]
    amax = jnp.where(same[:, :, None], amax_row[None, :, :], 0.0).max(axis=1)  # the tile's absmax for each row
    scale = jnp.maximum(amax, eps) / 127.0
    y = jnp.clip(jnp.floor(y / scale[..., None] + 0.5), -127.0, 127.0)
    return pad_to(y.astype(jnp.int8), 2, width), scale.T


def store_rows(src, dst_at, n, max_rows: int):
    """TMA-store the first n (dynamic, <= max_rows) rows of the untiled shared-memory `src` to `dst_at(r0, size)`
    (the destination slice for rows r0 .. r0 + size) as a ladder of power-of-two copies (a TMA box has a static
    size: one copy per set bit of n), so that rows past n, which belong to other requests, are left alone."""
    r0 = 0  # a Python int until the first copy: a static first slice
    for size in (1 << b for b in reversed(range(max_rows.bit_length()))):
        take = (n & size) != 0

        @pl.when(take)
        def _(r=r0, z=size):
            plgpu.copy_smem_to_gmem(src.at[pl.ds(r, z)], dst_at(r, z))

        r0 = r0 + jnp.where(take, size, 0)


def attention(q, k, v, k_mean, cu_q, cu_k, blk_req, blk_idx, cu_qb, *, q_mult: float, group: int, causal: bool,
              block_sizes: MosaicBlockSizes = MosaicBlockSizes(), eps: float = 1e-8, interpret: bool = False,
              own_means: bool = False):
    """q [Tq, Hq, D] / k [Tk, Hk, D] / v [Tk, Hk, Dv] packed, v 16-bit (q of another dtype is rounded to v's before
    its int8 quantisation); q and k may each be a tuple of parts along D (read where they are: each 64-column chunk
    of Q from its part, when no chunk straddles two; k's parts set the widths, a wider q part gives its leading
    columns); k_mean [B, Hk, D] (or its parts: K's per-request mean, subtracted before quantising) or None
    (own_means: K's pass computes the means itself, `key_tiles_smoothed`); cu_q / cu_k [B+1]; the query blocks
    of `block_sizes.program_rows` rows (blk_req, blk_idx [NQB], cu_qb [B+1]) as sage_attention plans them;
    q_mult: sm_scale * log2(e), folded into Q's scales; eps: the floor of the absmax that Q's row scales and K's tile
    scales divide by 127. Returns (o [Tq, Hq, Dv'] in v's dtype, Dv' = Dv padded
    to a power of two >= 16; lse2 [Tq, Hq] base-2; the means K was smoothed by, per part, or None)."""
    bs = block_sizes
    bq, bk, stages, wgs = bs.block_q, bs.block_k, bs.stages, bs.compute_wgs
    rows_per_blk = bs.program_rows
    q_parts = as_parts(q)
    tq, hq = q_parts[0].shape[:2]
    widths = [x.shape[2] for x in as_parts(k)]  # a q part may be wider than its k part: its leading columns count
    dqk = sum(widths)
    vdt = v.dtype
    d, dv = padded_dims(dqk, v.shape[2])
    why = unsupported(dqk, v.shape[2], vdt, bs)
    if why:
        raise ValueError(f"sage_attention backend='mosaic': {why}; use other block sizes or backend='triton'")
    nqb = blk_req.shape[0]
    # 64-column chunks of the head dim (the last one 32 wide when d is an odd multiple of 32): Q's 16-bit rows come
    # in as 128-byte rows that the 128-byte swizzle spreads over the banks
    chunks = tuple((o, min(64, d - o)) for o in range(0, d, 64))
    n_chunks = len(chunks)
    # K: one Triton pass (smoothed and quantised per key tile in place); Q is quantised in the kernel, V read as is
    if own_means:
        k_i8, ks_t, k_mean = key_tiles_smoothed(k, cu_k, bk, width=d, eps=eps, interpret=interpret)
    else:
        k_i8, ks_t = key_tiles(k, cu_k, bk, width=d, shift=k_mean, eps=eps, interpret=interpret)
    # each Q chunk TMA-read from the part that holds it: (part, column in it); one padded whole when a chunk would
    # straddle two parts or D needs zero columns
    starts = [sum(widths[:i]) for i in range(len(widths))]
    q_src = [next(((i, o - s0) for i, s0 in enumerate(starts) if s0 <= o and o + w <= s0 + widths[i]), None)
             for o, w in chunks]
    if d != dqk or None in q_src:
        q_parts = (pad_to(concat_parts(leading_columns(q_parts, widths)), 2, d),)
        q_src = [(0, o) for o, _ in chunks]
    # 16-bit rows; the interpreter's TMA needs headroom past the last row
    q_parts = tuple(jnp.pad(x.astype(vdt), ((0, rows_per_blk), (0, 0), (0, 0))) if interpret else x.astype(vdt)
                    for x in q_parts)
    # V padded (a copy) to a width the MMA takes, to whole 8-row tiles for TMA, and with headroom for the
    # interpreter's TMA; read as given at the real sizes
    v_rows = cdiv(v.shape[0] + (bk if interpret else 0), 8) * 8
    if (v_rows, dv) != (v.shape[0], v.shape[2]):
        v = jnp.pad(v, ((0, v_rows - v.shape[0]), (0, 0), (0, dv - v.shape[2])))
    wgmma = plgpu.Layout.WGMMA

    def body(blk_req_ref, blk_idx_ref, cu_q_ref, cu_k_ref, *refs):
        q_refs, (k_ref, v_ref, ks_ref, o_ref, lse_ref) = refs[:len(q_parts)], refs[len(q_parts):]
        blk, h, wg = lax.axis_index("qb"), lax.axis_index("h"), lax.axis_index("wg")
        kv_head = lax.div(h, jnp.int32(group))
        req, i = blk_req_ref[blk], blk_idx_ref[blk]
        len_q = cu_q_ref[req + 1] - cu_q_ref[req]
        len_k = cu_k_ref[req + 1] - cu_k_ref[req]
        live = i * rows_per_blk < len_q  # blocks past the plan's end: read row 0, compute nothing
        # key tile j holds packed rows k_start + j * bk ..., k_start the request's first row rounded down to
        # KEY_ALIGN: its first `lead` rows belong to the request before (masked), as key_tiles plans them
        lead = lax.rem(cu_k_ref[req], jnp.int32(KEY_ALIGN))
        k_start = pl.multiple_of(cu_k_ref[req] - lead, KEY_ALIGN)
        diag = len_k - len_q  # bottom-right causal alignment

        def steps_until(row_end):  # key tiles that rows < row_end (request-local) can see
            k_end = jnp.minimum(len_k, row_end + diag) if causal else len_k
            return jnp.where(live & (k_end > 0), lax.div(k_end + lead + (bk - 1), jnp.int32(bk)), 0)

        blk_steps = steps_until((i + 1) * rows_per_blk)  # what the program's last warpgroup needs

        def scoped(q_in, q_smem, k_smem, v_smem, ks_smem, o_smem, lse_smem, p_smem, q_bar, k_bar, v_bar, k_free,
                   v_free, turn):
            def fetch(j, slot):
                k0 = pl.multiple_of(k_start + j * bk, KEY_ALIGN)
                for c, (c0, w) in enumerate(chunks):
                    plgpu.copy_gmem_to_smem(k_ref.at[pl.ds(k0, bk), kv_head, pl.ds(c0, w)], k_smem[c].at[slot],
                                            k_bar.at[slot])
                plgpu.copy_gmem_to_smem(ks_ref.at[kv_head, pl.ds(k0, bk)], ks_smem.at[slot], k_bar.at[slot])
                plgpu.copy_gmem_to_smem(v_ref.at[pl.ds(k0, bk), kv_head], v_smem.at[slot], v_bar.at[slot])

            def take_turn():  # two compute warpgroups alternate on the tensor cores (a no-op with one)
                if wgs == 2:
                    plgpu.barrier_arrive(turn)
                    plgpu.barrier_wait(turn)

            @pl.when(wg == wgs)
            def _memory():  # the TMA warpgroup: fills the stages, refills a slot once every compute group freed it
                plgpu.set_max_registers(40, action="decrease")
                for s in range(stages):
                    pl.when(s < blk_steps)(lambda s=s: fetch(s, s))

                @pl.loop(stages, blk_steps + stages)
                def _(j):  # step j reuses the slot of step j - stages once both are free; past the end: drain
                    slot = lax.rem(j, jnp.int32(stages))

                    @pl.when(j - stages < blk_steps)
                    def _():
                        plgpu.barrier_wait(k_free.at[slot])
                        plgpu.barrier_wait(v_free.at[slot])

                    pl.when(j < blk_steps)(lambda: fetch(j, slot))

            @pl.when(wg < wgs)
            def _compute():
                plgpu.set_max_registers(232 if wgs == 2 else 240, action="increase")
                row_base = i * rows_per_blk + wg * bq
                # this warpgroup's query rows, from any packed row (an untiled buffer; rows past the request are
                # other requests' or TMA's zeros past the end, computed and not stored), quantised to int8 per row
                q0 = jnp.where(live, cu_q_ref[req] + row_base, 0)
                for c, ((part, c0), (_, w)) in enumerate(zip(q_src, chunks)):
                    plgpu.copy_gmem_to_smem(q_refs[part].at[pl.ds(q0, bq), h, pl.ds(c0, w)], q_in[c].at[wg],
                                            q_bar.at[wg])
                plgpu.barrier_wait(q_bar.at[wg])
                xs = [plgpu.load(q_in[c].at[wg], layout=wgmma).astype(jnp.float32) for c in range(n_chunks)]
                amax = jnp.maximum(functools.reduce(jnp.maximum, [jnp.max(jnp.abs(x), axis=1) for x in xs]), eps)
                inv = 127.0 / amax
                for c, x in enumerate(xs):
                    # rounded to the nearest integer (ties to even) by adding 1.5 * 2^23, whose float spacing is 1,
                    # and read back from the low mantissa bits: full-rate adds instead of quarter-rate conversions
                    y = jnp.clip(x * lax.broadcast_in_dim(inv, x.shape, [0]), -127.0, 127.0) + ROUNDER
                    q_int = lax.bitcast_convert_type(y, jnp.int32) - ROUNDER_BITS
                    q_smem[c].at[wg][...] = q_int.astype(jnp.int8)
                plgpu.commit_smem()
                qs = amax * (q_mult / 127.0)
                my_steps = jnp.where(row_base < len_q, steps_until(row_base + bq), 0)
                # tiles every row of this warpgroup sees whole (no mask): past the first when it has lead rows,
                # and holding only keys < min(len_k, row_base + diag + 1)
                seen = jnp.minimum(len_k, row_base + diag + 1) if causal else len_k
                first_full = jnp.minimum(my_steps, (lead > 0).astype(jnp.int32))
                full_end = jnp.clip(lax.div(jnp.maximum(seen, 0) + lead, jnp.int32(bk)), first_full, my_steps)

                def step(j, carry, masked):
                    acc, m, l = carry
                    slot = lax.rem(j, jnp.int32(stages))

                    def qk(acc_ref):  # K's tile has landed (waited before the loop or in the previous P.V)
                        for c in range(n_chunks):
                            plgpu.wgmma(acc_ref, q_smem[c].at[wg], k_smem[c].at[slot].transpose((1, 0)))
                        take_turn()
                        return acc_ref[...]

                    s_int = pl.run_scoped(qk, plgpu.ACC((bq, bk), jnp.int32))
                    # the K tile's scale, TMA-copied with it: every row holds its own tile's, so read a row of
                    # this request (the first tile's first rows belong to the request before)
                    ks = ks_smem[slot, jnp.where(j == 0, lead, 0)]
                    plgpu.barrier_arrive(k_free.at[slot])
                    s, shift = int_scores(s_int, 127 * 127 * d)  # base-2 logits / (qs * ks), plus shift
                    if masked:
                        # built here, not before the loops: two [bq, bk] int32 index tiles held across them would
                        # take 64 registers a thread each
                        cols = (j * bk - lead) + plgpu.broadcasted_iota(jnp.int32, (bq, bk), 1, layout=wgmma)
                        ok = (cols >= 0) & (cols < len_k)
                        if causal:  # key <= query row + diag, the row being row_base + the tile's row
                            ok = ok & (cols - plgpu.broadcasted_iota(jnp.int32, (bq, bk), 0, layout=wgmma)
                                       <= row_base + diag)
                        s = jnp.where(ok, s, -jnp.inf)
                    p, m_new, l, acc, _ = online_softmax_step(s, m, l, acc, masked, scale=qs * ks, shift=shift)
                    if interpret:  # the interpreter's wgmma reads its left operand from shared memory only
                        p_smem.at[wg][...] = p.astype(vdt)
                        plgpu.commit_smem()
                        p_op = p_smem.at[wg]
                    else:  # on the GPU P stays in registers (wgmma's register A operand)
                        p_op = p.astype(vdt)
                    if wgs == 2:  # softmax done: let the other warpgroup's Q.K^T go, then wait for the MMA turn
                        plgpu.barrier_arrive(turn)
                        plgpu.barrier_wait(v_bar.at[slot])
                        plgpu.barrier_wait(turn)
                    else:
                        plgpu.barrier_wait(v_bar.at[slot])

                    def pv(acc_ref):
                        plgpu.wgmma(acc_ref, p_op, v_smem.at[slot])
                        nxt = j + 1  # wait for the next K tile while the MMA runs

                        @pl.when(nxt < my_steps)
                        def _():
                            plgpu.barrier_wait(k_bar.at[lax.rem(nxt, jnp.int32(stages))])

                    if interpret:  # the interpreter cannot run an MMA into an initialised accumulator: add after
                        acc = acc + pl.run_scoped(lambda r: (pv(r), r[...])[1], plgpu.ACC((bq, dv), jnp.float32))
                    else:  # on the GPU P.V accumulates into the running output (no second accumulator)
                        acc = pl.run_state(pv)(plgpu.ACC.init(acc))
                    plgpu.barrier_arrive(v_free.at[slot])
                    return acc, m_new, l

                init = (plgpu.layout_cast(jnp.zeros((bq, dv), jnp.float32), wgmma),
                        plgpu.layout_cast(jnp.full((bq,), -jnp.inf, jnp.float32), wgmma.reduce(1)),
                        plgpu.layout_cast(jnp.zeros((bq,), jnp.float32), wgmma.reduce(1)))
                pl.when(my_steps > 0)(lambda: plgpu.barrier_wait(k_bar.at[0]))
                if wgs == 2:
                    pl.when(wg == 1)(take_turn)  # the second warpgroup starts half a step behind
                carry = lax.fori_loop(0, first_full, lambda j, c: step(j, c, True), init)
                carry = lax.fori_loop(first_full, full_end, lambda j, c: step(j, c, False), carry)
                acc, m, l = lax.fori_loop(full_end, my_steps, lambda j, c: step(j, c, True), carry)

                @pl.loop(my_steps, blk_steps)
                def _(j):  # tiles only a later warpgroup needs (causal): see them land, free them unread
                    slot = lax.rem(j, jnp.int32(stages))
                    plgpu.barrier_wait(k_bar.at[slot])
                    plgpu.barrier_arrive(k_free.at[slot])
                    plgpu.barrier_wait(v_bar.at[slot])
                    plgpu.barrier_arrive(v_free.at[slot])
                    take_turn()  # keep alternating with the warpgroup that still runs
                    take_turn()

                if wgs == 2:
                    pl.when(wg == 0)(take_turn)  # match the second warpgroup's extra turn
                has = l > 0
                l_safe = jnp.where(has, l, 1.0)
                o_smem.at[wg][...] = (acc / lax.broadcast_in_dim(l_safe, (bq, dv), [0])).astype(vdt)
                lse_smem.at[wg][...] = jnp.where(has, m + jnp.log2(l_safe), -jnp.inf)
                plgpu.commit_smem()
                # the output rows straight into the packed [Tq, Hq, Dv] result: this warpgroup's rows of the request
                # (a block past the plan writes zeros into the rows past the last request: blocks past the plan
                # are at least as many as those rows' blocks)
                past = cu_q_ref[cu_q_ref.shape[0] - 1] + (i - nqb) * rows_per_blk + wg * bq  # block nqb + k
                dst = jnp.where(live, cu_q_ref[req] + row_base, past)
                n_rows = jnp.clip(jnp.where(live, len_q - row_base, tq - past), 0, bq)
                store_rows(o_smem.at[wg], lambda r0, size: o_ref.at[pl.ds(dst + r0, size), h], n_rows, bq)
                plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[blk, h, pl.ds(wg * bq, bq)])
                plgpu.wait_smem_to_gmem(0)

        pl.run_scoped(
            scoped,
            # Q's 16-bit rows, untiled (TMA loads from any row) but swizzled (register loads without bank conflicts)
            tuple(plgpu.SMEM((wgs, bq, w), vdt, transforms=(plgpu.SwizzleTransform(2 * w),)) for _, w in chunks),
            tuple(smem((wgs, bq, w), jnp.int8) for _, w in chunks),  # int8 Q and K tiles, one per chunk
            tuple(smem((stages, bk, w), jnp.int8) for _, w in chunks),
            smem((stages, bk, dv), vdt), plgpu.SMEM((stages, bk), jnp.float32),
            plgpu.SMEM((wgs, bq, dv), vdt),  # untiled: TMA stores of any row count from any row
            plgpu.SMEM((wgs, bq), jnp.float32), smem((wgs, bq, bk), vdt) if interpret else None,
            plgpu.Barrier(num_arrivals=n_chunks, num_barriers=wgs),
            plgpu.Barrier(num_arrivals=n_chunks + 1, num_barriers=stages),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),
            plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),
            plgpu.Barrier(num_arrivals=wgs),  # the compute warpgroups' turns
            collective_axes="wg",
        )

    o, lse_tiles = plgpu.kernel(
        body,
        out_type=(jax.ShapeDtypeStruct((tq, hq, dv), vdt),
                  jax.ShapeDtypeStruct((nqb, hq, rows_per_blk), jnp.float32)),
        grid=(nqb, hq),
        grid_names=("qb", "h"),
        num_threads=wgs + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=plgpu.InterpretGPUParams() if interpret else False,
    )(blk_req, blk_idx, cu_q, cu_k, *q_parts, k_i8, v, ks_t)
    # the LSE of packed row t of request r (offset o) sits in tile cu_qb[r] + o // rows at row o % rows; rows past
    # the last request see nothing
    seg, off = segments(cu_q, tq)
    tile = jnp.minimum(cu_qb[seg] + off // rows_per_blk, nqb - 1)
    in_request = (jnp.arange(tq) < cu_q[-1])[:, None]
    return o, jnp.where(in_request, lse_tiles[tile, :, off % rows_per_blk], -jnp.inf), k_mean
