"""Absorbed MLA decode: one query token per request attending over its `kv_cache` (latent) and `pe_cache` (rope).

Flash-decoding (Dao et al., "Flash-Decoding for long-context inference", 2023; split-K as in JAX's
`pallas/ops/gpu/decode_attention.py`; MLA layout as in DeepSeek FlashMLA): the grid is
(request, head block, sequence split); each program streams `block_k` cache rows at a time, scores them as two
dots (q_latent . kv^T over 512 + q_pe . pe^T over 64, so both are powers of two) with an online base-2 softmax,
accumulates p . kv into a [block_h, 512] float32 tile, and writes its normalised output and log-sum-exp; the
splits are merged by a small Pallas pass over each request's non-empty splits. Shorter requests skip the splits
past their length. One shared KV "head": the heads of a block reuse every cache tile they load.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import mla_decode_mgpu
from pallas_kernels.common import (H100_SMS, cdiv, int_vector, next_pow2, pad_to, quantize_rows_int8,
                                   resolve_backend, resolve_interpret, rotate_half_split)
from pallas_kernels.mla_decode_mgpu import MosaicBlockSizes

LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    # Defaults from a sweep on one H100 (bench/RESULTS.md): 32 heads x 64 rows, 4 warps, 2 stages was fastest at
    # B=64, L=4096 (0.93 TB/s vs 0.86 for 64 heads / 8 warps); 128 heads or 3 stages exceed shared memory.
    block_h: int = 32  # query heads per program (Triton dots need >= 16 rows)
    block_k: int = 64  # cache rows per inner step
    k_splits: int | None = None  # sequence splits per request; None: enough programs to fill the GPU
    num_warps: int = 4
    num_stages: int = 2


def _kernel(ql_ref, qp_ref, kv_ref, pe_ref, len_ref, *refs, scale, block_k, split_len, qk_int8, int8_cache, paged):
    # refs: [kv_scale_ref] [block_table_ref] o_ref lse_ref
    refs = list(refs)
    ks_ref = refs.pop(0) if int8_cache else None
    bt_ref = refs.pop(0) if paged else None
    o_ref, lse_ref = refs
    split = pl.program_id(2)
    length = len_ref[0]
    start = split * split_len
    stop = jnp.minimum(start + split_len, length)
    ql = ql_ref[...]  # [bh, L]
    qp = qp_ref[...]  # [bh, R]
    bh = ql.shape[0]
    rows = jnp.arange(block_k)
    if qk_int8:  # the query rows quantised once per program
        ql_i8, ql_s = quantize_rows_int8(ql)
        qp_i8, qp_s = quantize_rows_int8(qp)

    def at(ref, k0):
        """Rows k0 .. k0 + block_k of this request: contiguous ([S, ...] ref) or through its page table."""
        if not paged:
            return ref.at[pl.ds(k0, block_k)]
        page_size = ref.shape[1]
        return ref.at[bt_ref[k0 // page_size], pl.ds(k0 % page_size, block_k)]

    def body(i, carry):
        o, m, l = carry
        k0 = start + i * block_k
        valid = (k0 + rows) < stop
        kv = pltriton.load(at(kv_ref, k0), mask=valid[:, None], other=0)  # [bk, L]
        pe = pltriton.load(at(pe_ref, k0), mask=valid[:, None], other=0.0)  # [bk, R]
        hp = jax.lax.Precision.HIGHEST if pe.dtype == jnp.float32 else None  # float32 caches: IEEE, not TF32
        if int8_cache:  # rows quantised when written: kv = kv_i8 * kv_s
            kv_i8, kv_s = kv, pltriton.load(at(ks_ref, k0), mask=valid, other=0.0)
            kv = kv_i8.astype(pe.dtype)  # exact: |kv_i8| <= 127
        elif qk_int8:  # cache rows quantised per tile as they stream in
            kv_i8, kv_s = quantize_rows_int8(kv)
        if qk_int8:  # the 576-wide score as two int8 dots (512 + 64), each with its own row scales
            pe_i8, pe_s = quantize_rows_int8(pe)
            s = (jnp.dot(ql_i8, kv_i8.T, preferred_element_type=jnp.int32).astype(jnp.float32)
                 * (ql_s[:, None] * kv_s[None, :])
                 + jnp.dot(qp_i8, pe_i8.T, preferred_element_type=jnp.int32).astype(jnp.float32)
                 * (qp_s[:, None] * pe_s[None, :])) * scale
        else:
            s_lat = jnp.dot(ql.astype(kv.dtype), kv.T, preferred_element_type=jnp.float32, precision=hp)
            if int8_cache:
                s_lat = s_lat * kv_s[None, :]
            s = (s_lat + jnp.dot(qp, pe.T, preferred_element_type=jnp.float32, precision=hp)) * scale  # log2 domain
        s = jnp.where(valid[None, :], s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(axis=1))
        corr = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        l = l * corr + p.sum(axis=1)
        pv = p * kv_s[None, :] if int8_cache else p  # the row scales folded into the probabilities
        o = o * corr[:, None] + jnp.dot(pv.astype(kv.dtype), kv, preferred_element_type=jnp.float32, precision=hp)
        return o, m_new, l

    init = (jnp.zeros((bh, ql.shape[1]), jnp.float32), jnp.full((bh,), -jnp.inf, jnp.float32),
            jnp.zeros((bh,), jnp.float32))
    steps = jnp.maximum(cdiv(stop - start, block_k), 0)
    o, m, l = jax.lax.fori_loop(0, steps, body, init)
    has = l > 0  # the split's output normalised (in q's dtype: half the bytes of float32 partials to write and merge)
    l_safe = jnp.where(has, l, 1.0)

    @pl.when((steps > 0) | (pl.num_programs(2) == 1))  # the merge reads each request's non-empty splits only
    def _():
        o_ref[...] = (o / l_safe[:, None]).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(has, m + jnp.log2(l_safe), -jnp.inf)


def _q_pe_of(q_pe, rope: int, q_pe_rope):
    """q_pe's trailing `rope` columns, rotated by q_pe_rope [B, R] ([cos | sin]) when given."""
    q = q_pe[..., q_pe.shape[-1] - rope:]
    if q_pe_rope is None:
        return q
    half = rope // 2
    return rotate_half_split(q, q_pe_rope[:, None, :half], q_pe_rope[:, None, half:])


def _check_shapes(q_latent, q_pe, kv_cache, pe_cache, lengths, q_pe_rope, paged: bool):
    """Clear errors for operands that do not fit together (all checked on shapes: the call is traced)."""
    if q_latent.ndim != 3 or kv_cache.ndim != 3 or pe_cache.ndim != 3:
        raise ValueError(f"mla_decode: q_latent [B, H, L], kv_cache and pe_cache [B (or pages), S, width] must be 3-D, "
                         f"got {q_latent.shape}, {kv_cache.shape}, {pe_cache.shape}")
    b, h, lat = q_latent.shape
    if kv_cache.shape[2] != lat or kv_cache.shape[:2] != pe_cache.shape[:2] or (not paged and kv_cache.shape[0] != b):
        raise ValueError(f"mla_decode: kv_cache {kv_cache.shape} and pe_cache {pe_cache.shape} do not fit q_latent "
                         f"{q_latent.shape}: both [{'pages' if paged else b}, S, ...], the latent {lat} wide")
    if not int_vector(lengths, b):
        raise ValueError(f"mla_decode: lengths must be [B] = [{b}] integers, got {jnp.shape(lengths)} "
                         f"{jnp.result_type(lengths)}")
    rope = pe_cache.shape[2]
    if q_pe.ndim != 3 or q_pe.shape[:2] != (b, h) or q_pe.shape[2] < rope:
        raise ValueError(f"mla_decode: q_pe must be [B, H, >= R] = [{b}, {h}, >= {rope}], got {q_pe.shape}")
    if q_pe_rope is not None and (q_pe_rope.shape != (b, rope) or rope % 2):
        raise ValueError(f"mla_decode: q_pe_rope must be [B, R] = [{b}, {rope}] ([cos | sin], R even), got "
                         f"{q_pe_rope.shape}")


@functools.partial(jax.jit, static_argnames=("sm_scale", "qk_int8", "block_sizes", "backend", "interpret",
                                             "return_lse"))
def mla_decode(q_latent, q_pe, kv_cache, pe_cache, lengths, *, sm_scale: float, qk_int8: bool = False,
               kv_scale=None, block_table=None, q_pe_rope=None,
               block_sizes: BlockSizes | MosaicBlockSizes | None = None, backend: str | None = None,
               interpret: bool | None = None, return_lse: bool = False):
    """Absorbed MLA decode attention.

    q_latent [B, H, L] (q_nope . W_UK), q_pe [B, H, R], kv_cache [B, S, L], pe_cache [B, S, R], lengths [B] int32
    (cached positions each request attends, 0 allowed). Returns o [B, H, L] in q's dtype (zeros for length 0),
    and the natural-log LSE [B, H] when `return_lse`.
    q_pe may be wider, [B, H, W > R]: its trailing R columns are the rope part (MLA's q as projected, [q_nope |
    q_pe], read in place by the Mosaic kernel). q_pe_rope: [B, R] float32 [cos | sin] of each request's new position
    (`update_mla_cache(rope_out=True)`): q_pe is rotated by it first (half-split RoPE in float32, rounded to q_pe's
    dtype), inside the Mosaic kernel as it loads q_pe, else by XLA before the kernel.
    qk_int8: Q.K^T in int8 (query rows quantised per row, absmax / 127; the latent and rope parts as two dots with
    their own scales; cache rows quantised per tile as read unless the cache is already int8); P.V in 16 bits.
    kv_scale: an int8 latent cache (written by `update_cache(..., scales=)`), its [B, S] float32 row scales;
    the rope cache stays 16-bit. block_table: [B, pages per request] int32 for paged caches [pages, page_size, ...]
    (kv_scale [pages, page_size]); request b's position p is row p % page_size of page block_table[b, p // page_size].
    backend: "triton" (every option) or "mosaic" (Hopper TMA + wgmma kernel, mla_decode_mgpu.py: 16-bit caches,
    contiguous or paged with pages of a multiple of its block_k rows (64), latent a multiple of 128); None: the
    backend block_sizes belong to, else common.DEFAULT_BACKEND.
    block_sizes: that backend's BlockSizes / MosaicBlockSizes.
    """
    _check_shapes(q_latent, q_pe, kv_cache, pe_cache, lengths, q_pe_rope, block_table is not None)
    b, h, lat = q_latent.shape
    rope = pe_cache.shape[2]
    if q_pe_rope is not None:
        q_pe_rope = jnp.asarray(q_pe_rope, jnp.float32)
    if b == 0:  # no requests: nothing to launch
        out = jnp.zeros((0, h, lat), q_latent.dtype)
        return (out, jnp.zeros((0, h), jnp.float32)) if return_lse else out
    interp = resolve_interpret(interpret)
    explicit = backend is not None or block_sizes is not None  # block sizes name their backend too
    backend = resolve_backend("mla_decode", backend, block_sizes, MosaicBlockSizes, interp)
    if backend == "mosaic":  # a "mosaic" default takes the calls its kernel covers (16-bit caches)
        mbs = block_sizes or MosaicBlockSizes()
        why = _mosaic_unsupported(q_latent, q_pe, kv_cache, pe_cache, qk_int8, kv_scale, block_table, mbs)
        if why is None:
            return _mosaic(q_latent, q_pe, kv_cache, pe_cache, lengths, sm_scale=sm_scale, block_table=block_table,
                           q_pe_rope=q_pe_rope, block_sizes=mbs, interpret=interp, return_lse=return_lse)
        if explicit:
            raise ValueError(f"mla_decode backend='mosaic': {why}; use backend='triton'")
    q_pe = _q_pe_of(q_pe, rope, q_pe_rope)
    bs = block_sizes or BlockSizes()
    int8_cache, paged = kv_scale is not None, block_table is not None
    if int8_cache != (kv_cache.dtype == jnp.int8):
        raise ValueError(f"mla_decode: an int8 kv_cache goes with its kv_scale and only then (kv_cache "
                         f"{kv_cache.dtype}, kv_scale {'given' if int8_cache else 'None'})")
    if not interp and (lat & (lat - 1) or rope & (rope - 1) or min(lat, rope) < (32 if int8_cache or qk_int8 else 16)):
        raise ValueError(f"mla_decode on GPU needs power-of-two latent/rope widths >= 16 (>= 32 with int8), got "
                         f"{lat}/{rope}")
    block_h = min(bs.block_h, max(16, next_pow2(h)))
    h_pad = cdiv(h, block_h) * block_h
    head_blocks = h_pad // block_h
    q_latent, q_pe = pad_to(q_latent, 1, h_pad), pad_to(q_pe, 1, h_pad)
    caches = [kv_cache, pe_cache] + ([kv_scale] if int8_cache else [])
    if paged:
        block_table = _check_block_table(block_table, b)
        page_size = kv_cache.shape[1]
        block_k = min(bs.block_k, page_size & -page_size)  # the largest power of two that divides a page
        if not interp and block_k < 16:
            raise ValueError(f"mla_decode on GPU needs a page size that is a multiple of 16, got {page_size}")
        s_len = s_pad = block_table.shape[1] * page_size
        whole = lambda x: pl.BlockSpec(x.shape, lambda i, j, k: (0,) * x.ndim)  # pages addressed in the kernel
        cache_specs = [whole(c) for c in caches] + [pl.BlockSpec((None, block_table.shape[1]), lambda i, j, k: (i, 0))]
        caches.append(block_table)
    else:
        s_len = kv_cache.shape[1]
        block_k = min(bs.block_k, max(16, next_pow2(s_len)))
        # Rows are read in whole blocks of block_k, masked past each request's length; a cache whose length is not
        # a multiple of block_k is padded (a copy: jaxlm's init_cache allocates multiples of 64, so it never is).
        s_pad = cdiv(s_len, block_k) * block_k
        caches = [pad_to(c, 1, s_pad) for c in caches]
        cache_specs = [pl.BlockSpec((None, s_pad, *c.shape[2:]), lambda i, j, k, n=c.ndim: (i,) + (0,) * (n - 1))
                       for c in caches]
    k_splits = bs.k_splits or max(1, min(cdiv(2 * H100_SMS, b * head_blocks), cdiv(s_len, 2 * block_k)))
    split_len = _split_len(s_len, k_splits, block_k)
    lengths = jnp.minimum(jnp.asarray(lengths, jnp.int32), s_len).reshape(b, 1)
    kernel = functools.partial(_kernel, scale=sm_scale * LOG2E, block_k=block_k, split_len=split_len, qk_int8=qk_int8,
                               int8_cache=int8_cache, paged=paged)
    grid = (b, head_blocks, k_splits)
    o, lse2 = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[
            pl.BlockSpec((None, block_h, lat), lambda i, j, k: (i, j, 0)),
            pl.BlockSpec((None, block_h, rope), lambda i, j, k: (i, j, 0)),
            *cache_specs[:2],
            pl.BlockSpec((None, 1), lambda i, j, k: (i, 0)),
            *cache_specs[2:],
        ],
        out_specs=[
            pl.BlockSpec((None, None, block_h, lat), lambda i, j, k: (i, k, j, 0)),
            pl.BlockSpec((None, None, block_h), lambda i, j, k: (i, k, j)),
        ],
        out_shape=[jax.ShapeDtypeStruct((b, k_splits, h_pad, lat), q_latent.dtype),
                   jax.ShapeDtypeStruct((b, k_splits, h_pad), jnp.float32)],
        compiler_params=pltriton.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
        interpret=interp,
        name="mla_decode",
    )(q_latent, q_pe, *caches[:2], lengths, *caches[2:])
    return _merge_splits(o, lse2, lengths[:, 0], split_len, s_len, h, return_lse, interp)


def _mosaic_unsupported(q_latent, q_pe, kv_cache, pe_cache, qk_int8, kv_scale, block_table,
                        block_sizes: MosaicBlockSizes) -> str | None:
    """Why the Mosaic kernel cannot take this call (None when it can)."""
    if qk_int8 or kv_scale is not None:
        return "it takes 16-bit caches only (no qk_int8 or int8 latent cache yet)"
    if block_table is not None and kv_cache.shape[1] % block_sizes.block_k:
        return (f"a paged cache needs pages of a multiple of its block_k ({block_sizes.block_k}) rows, got "
                f"{kv_cache.shape[1]}")
    if pe_cache.dtype != kv_cache.dtype or q_pe.dtype != q_latent.dtype:
        return "q_pe / pe_cache dtypes differ from q_latent / kv_cache"
    return mla_decode_mgpu.unsupported(q_latent.shape[2], pe_cache.shape[2], q_latent.dtype, kv_cache.dtype)


def _mosaic(q_latent, q_pe, kv_cache, pe_cache, lengths, *, sm_scale, block_table, q_pe_rope, block_sizes, interpret,
            return_lse):
    """The Mosaic GPU kernel (calls `_mosaic_unsupported` passes): heads padded to its 64-head tiles, a contiguous
    cache to whole key tiles (paged ones are whole tiles already); splits merged here."""
    b, h, lat = q_latent.shape
    bk = block_sizes.block_k
    if block_table is not None:
        block_table = _check_block_table(block_table, b)
        s_len = s_pad = block_table.shape[1] * kv_cache.shape[1]
    else:
        s_len = kv_cache.shape[1]
        s_pad = cdiv(s_len, bk) * bk
        kv_cache, pe_cache = pad_to(kv_cache, 1, s_pad), pad_to(pe_cache, 1, s_pad)
    h_pad = cdiv(h, mla_decode_mgpu.HEADS) * mla_decode_mgpu.HEADS
    programs = b * (h_pad // mla_decode_mgpu.HEADS)
    # splits while a whole wave of programs fits the SMs (B=64 x 2 head blocks: 1; the seed's 16 x 2: 4)
    k_splits = block_sizes.k_splits or max(1, min(H100_SMS // programs, cdiv(s_len, 2 * bk)))
    lengths = jnp.asarray(lengths, jnp.int32)
    split_len = _split_len(s_pad, k_splits, bk)
    o, lse2 = mla_decode_mgpu.decode(
        pad_to(q_latent, 1, h_pad), pad_to(q_pe, 1, h_pad), kv_cache, pe_cache, lengths, max_len=s_len,
        scale_log2=sm_scale * LOG2E, block_sizes=block_sizes, k_splits=k_splits, split_len=split_len,
        block_table=block_table, q_pe_rope=q_pe_rope, interpret=interpret)
    return _merge_splits(o, lse2, lengths, split_len, s_len, h, return_lse, interpret)


def _check_block_table(block_table, b: int):
    block_table = jnp.asarray(block_table, jnp.int32)
    if block_table.ndim != 2:
        raise ValueError(f"mla_decode: block_table must be [requests, pages per request], got {block_table.shape}")
    if block_table.shape[0] != b:
        raise ValueError(f"mla_decode: block_table has {block_table.shape[0]} rows for {b} requests")
    return block_table


def _split_len(s_len: int, k_splits: int, block_k: int) -> int:
    """Cache rows per sequence split (whole key tiles): split s covers [s * split_len, (s + 1) * split_len), so a
    request's non-empty splits are the first ceil(length / split_len)."""
    return cdiv(cdiv(s_len, k_splits), block_k) * block_k


MERGE_UNROLL = 4  # splits whose loads the merge issues together


def _merge_kernel(len_ref, o_ref, lse_ref, out_ref, lse_out_ref, *, split_len: int, splits: int, max_len: int):
    """One (request, 16-head block, latent chunk): the request's non-empty splits only (a prefix: the others were
    never written), weighted by exp2(lse - max lse); MERGE_UNROLL masked loads in flight at a time."""
    n = jnp.clip(cdiv(jnp.minimum(len_ref[0], max_len), split_len), 0, splits)

    def splits_of(i):  # (split, mask) of group i
        return [(jnp.minimum(i * MERGE_UNROLL + u, splits - 1), i * MERGE_UNROLL + u < n) for u in range(MERGE_UNROLL)]

    def lse_of(s, ok):
        return pltriton.load(lse_ref.at[s], mask=jnp.full(lse_ref.shape[1:], ok), other=-jnp.inf)

    groups = cdiv(n, MERGE_UNROLL)
    top = jax.lax.fori_loop(0, groups, lambda i, t: functools.reduce(
        jnp.maximum, [lse_of(s, ok) for s, ok in splits_of(i)], t), jnp.full(lse_ref.shape[1:], -jnp.inf))
    top_safe = jnp.where(jnp.isfinite(top), top, 0.0)

    def add(i, carry):
        acc, total = carry
        for s, ok in splits_of(i):
            w = jnp.exp2(lse_of(s, ok) - top_safe)  # [bh]; 0 past the non-empty splits
            o = pltriton.load(o_ref.at[s], mask=jnp.full(out_ref.shape, ok), other=0.0)
            acc, total = acc + o.astype(jnp.float32) * w[:, None], total + w
        return acc, total

    acc, total = jax.lax.fori_loop(0, groups, add, (jnp.zeros(out_ref.shape, jnp.float32), jnp.zeros_like(top)))
    denom = jnp.where(total > 0, total, 1.0)
    out_ref[...] = (acc / denom[:, None]).astype(out_ref.dtype)
    lse_out_ref[...] = jnp.where(total > 0, top_safe + jnp.log2(denom), -jnp.inf) / LOG2E


def _merge_splits(o, lse2, lengths, split_len: int, max_len: int, h: int, return_lse: bool, interpret: bool):
    """Combine the splits' normalised outputs o [B, splits, Hp, L] with their base-2 LSEs [B, splits, Hp] (-inf:
    the split saw no key; with several splits the kernels write only each request's first
    ceil(min(length, max_len) / split_len), the non-empty ones) -> o [B, h, L] in o's dtype (zeros where no split saw
    a key), and the natural-log LSE. A single split is the answer already (B=64 x 128 heads fills the GPU unsplit):
    no pass over o. Otherwise one Pallas pass over the non-empty splits (the seed's decode case: half of them)."""
    b, splits, hp, lat = o.shape
    if splits == 1:
        return (o[:, 0, :h], lse2[:, 0, :h] / LOG2E) if return_lse else o[:, 0, :h]
    bh = 16  # Hp is a multiple of 16 (both kernels' head tiles)
    bl = min(lat & -lat, 128)  # a power of two dividing L
    out, lse = pl.pallas_call(
        functools.partial(_merge_kernel, split_len=split_len, splits=splits, max_len=max_len),
        grid=(b, hp // bh, lat // bl),
        in_specs=[pl.BlockSpec((1,), lambda i, j, k: (i,)),
                  pl.BlockSpec((None, splits, bh, bl), lambda i, j, k: (i, 0, j, k)),
                  pl.BlockSpec((None, splits, bh), lambda i, j, k: (i, 0, j))],
        out_specs=[pl.BlockSpec((None, bh, bl), lambda i, j, k: (i, j, k)),
                   pl.BlockSpec((None, bh), lambda i, j, k: (i, j))],
        out_shape=[jax.ShapeDtypeStruct((b, hp, lat), o.dtype), jax.ShapeDtypeStruct((b, hp), jnp.float32)],
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="mla_decode_merge",
    )(lengths, o, lse2)
    return (out[:, :h], lse[:, :h]) if return_lse else out[:, :h]


def gather_pages(cache, block_table):
    """A paged cache [pages, page_size, ...] as the contiguous [B, pages per request * page_size, ...] it stands for."""
    g = cache[jnp.asarray(block_table, jnp.int32)]  # [B, n, page_size, ...]
    return g.reshape(g.shape[0], -1, *g.shape[3:])


def dequantize_rows(cache, kv_scale):
    """An int8 cache and its row scales -> float32 values."""
    return cache.astype(jnp.float32) * kv_scale[..., None]


def mla_decode_reference(q_latent, q_pe, kv_cache, pe_cache, lengths, *, sm_scale: float, kv_scale=None,
                         block_table=None, q_pe_rope=None, return_lse: bool = False):
    """Plain jnp, float32: softmax(scale * (q_latent kv^T + q_pe pe^T)) kv over the first lengths[b] rows (int8 and
    paged caches dequantised / gathered first; q_pe's trailing R columns, rotated by q_pe_rope first when given)."""
    f32 = jnp.float32
    _check_shapes(q_latent, q_pe, kv_cache, pe_cache, lengths, q_pe_rope, block_table is not None)
    q_pe = _q_pe_of(q_pe, pe_cache.shape[2], None if q_pe_rope is None else jnp.asarray(q_pe_rope, f32))
    kv_cache = kv_cache.astype(f32) if kv_scale is None else dequantize_rows(kv_cache, kv_scale)
    if block_table is not None:
        kv_cache, pe_cache = gather_pages(kv_cache, block_table), gather_pages(pe_cache, block_table)
    s = (jnp.einsum("bhl,bsl->bhs", q_latent.astype(f32), kv_cache)
         + jnp.einsum("bhr,bsr->bhs", q_pe.astype(f32), pe_cache.astype(f32))) * sm_scale
    valid = jnp.arange(kv_cache.shape[1])[None, None, :] < jnp.asarray(lengths)[:, None, None]
    s = jnp.where(valid, s, -jnp.inf)
    m = jnp.where(valid.any(-1), s.max(-1), 0.0)
    p = jnp.where(valid, jnp.exp(s - m[..., None]), 0.0)
    l = p.sum(-1)
    o = jnp.einsum("bhs,bsl->bhl", p, kv_cache) / jnp.where(l > 0, l, 1.0)[..., None]
    o = o.astype(q_latent.dtype)
    return (o, jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)) if return_lse else o
