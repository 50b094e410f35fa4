"""Absorbed MLA decode: one query token per request attending over its `kv_cache` (latent) and `pe_cache` (rope).

Flash-decoding (Dao et al., "Flash-Decoding for long-context inference", 2023; split-K as in JAX's
`pallas/ops/gpu/decode_attention.py`; MLA layout as in DeepSeek FlashMLA): the grid is
(request, head block, sequence split); each program streams `block_k` cache rows at a time, scores them as two
dots (q_latent . kv^T over 512 + q_pe . pe^T over 64, so both are powers of two) with an online base-2 softmax,
accumulates p . kv into a [block_h, 512] float32 tile, and writes (o, m, l) for its split; the splits are merged
with their log-sum-exp in XLA. Shorter requests skip the splits past their length. One shared KV "head": the
heads of a block reuse every cache tile they load.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.common import cdiv, next_pow2, pad_to, quantize_rows_int8, resolve_interpret

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


def _kernel(ql_ref, qp_ref, kv_ref, pe_ref, len_ref, o_ref, m_ref, l_ref, *, scale, block_k, split_len, qk_int8):
    split = pl.program_id(2)
    length = len_ref[0]
    start = split * split_len
    stop = jnp.minimum(start + split_len, length)
    ql = ql_ref[...]  # [bh, L]
    qp = qp_ref[...]  # [bh, R]
    bh = ql.shape[0]
    rows = jnp.arange(block_k)
    if qk_int8:  # the query rows quantised once per program, the cache rows per tile as they stream in
        ql_i8, ql_s = quantize_rows_int8(ql)
        qp_i8, qp_s = quantize_rows_int8(qp)

    def body(i, carry):
        o, m, l = carry
        k0 = start + i * block_k
        valid = (k0 + rows) < stop
        kv = pltriton.load(kv_ref.at[pl.ds(k0, block_k), :], mask=valid[:, None], other=0.0)  # [bk, L]
        pe = pltriton.load(pe_ref.at[pl.ds(k0, block_k), :], mask=valid[:, None], other=0.0)  # [bk, R]
        hp = jax.lax.Precision.HIGHEST if kv.dtype == jnp.float32 else None  # float32 caches: IEEE, not TF32
        if qk_int8:  # the 576-wide score as two int8 dots (512 + 64), each with its own row scales
            kv_i8, kv_s = quantize_rows_int8(kv)
            pe_i8, pe_s = quantize_rows_int8(pe)
            s = (jnp.dot(ql_i8, kv_i8.T, preferred_element_type=jnp.int32).astype(jnp.float32)
                 * (ql_s[:, None] * kv_s[None, :])
                 + jnp.dot(qp_i8, pe_i8.T, preferred_element_type=jnp.int32).astype(jnp.float32)
                 * (qp_s[:, None] * pe_s[None, :])) * scale
        else:
            s = (jnp.dot(ql, kv.T, preferred_element_type=jnp.float32, precision=hp)
                 + jnp.dot(qp, pe.T, preferred_element_type=jnp.float32, precision=hp)) * scale  # log2 domain
        s = jnp.where(valid[None, :], s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(axis=1))
        corr = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        l = l * corr + p.sum(axis=1)
        o = o * corr[:, None] + jnp.dot(p.astype(kv.dtype), kv, preferred_element_type=jnp.float32, precision=hp)
        return o, m_new, l

    init = (jnp.zeros((bh, ql.shape[1]), jnp.float32), jnp.full((bh,), -jnp.inf, jnp.float32),
            jnp.zeros((bh,), jnp.float32))
    steps = jnp.maximum(cdiv(stop - start, block_k), 0)
    o, m, l = jax.lax.fori_loop(0, steps, body, init)
    o_ref[...] = o
    m_ref[...] = m
    l_ref[...] = l


@functools.partial(jax.jit, static_argnames=("sm_scale", "qk_int8", "block_sizes", "interpret", "return_lse"))
def mla_decode(q_latent, q_pe, kv_cache, pe_cache, lengths, *, sm_scale: float, qk_int8: bool = False,
               block_sizes: BlockSizes = BlockSizes(), interpret: bool | None = None, return_lse: bool = False):
    """Absorbed MLA decode attention.

    q_latent [B, H, L] (q_nope . W_UK), q_pe [B, H, R], kv_cache [B, S, L], pe_cache [B, S, R], lengths [B] int32
    (cached positions each request attends, 0 allowed). Returns o [B, H, L] in q's dtype (zeros for length 0),
    and the natural-log LSE [B, H] when `return_lse`. `qk_int8`: Q.K^T in int8 (query rows and each cache tile's
    rows quantised per row, absmax / 127; the latent and rope parts as two dots with their own scales); P.V stays
    in the cache dtype.
    """
    b, h, lat = q_latent.shape
    s_len, rope = kv_cache.shape[1], pe_cache.shape[2]
    interp = resolve_interpret(interpret)
    bs = block_sizes
    block_h = min(bs.block_h, max(16, next_pow2(h)))
    h_pad = cdiv(h, block_h) * block_h
    block_k = min(bs.block_k, max(16, next_pow2(s_len)))
    if not interp and (lat & (lat - 1) or rope & (rope - 1) or min(lat, rope) < 16):
        raise ValueError(f"mla_decode on GPU needs power-of-two latent/rope widths >= 16, got {lat}/{rope}")
    head_blocks = h_pad // block_h
    k_splits = bs.k_splits or max(1, min(cdiv(2 * 132, b * head_blocks), cdiv(s_len, 2 * block_k)))
    split_len = cdiv(cdiv(s_len, k_splits), block_k) * block_k
    # Rows are read in whole blocks of block_k, masked past each request's length; a cache whose length is not
    # a multiple of block_k is padded (a copy: jaxlm's init_cache allocates multiples of 64, so it never is).
    s_pad = cdiv(s_len, block_k) * block_k
    kv_cache, pe_cache = pad_to(kv_cache, 1, s_pad), pad_to(pe_cache, 1, s_pad)
    q_latent, q_pe = pad_to(q_latent, 1, h_pad), pad_to(q_pe, 1, h_pad)
    lengths = jnp.minimum(jnp.asarray(lengths, jnp.int32), s_len).reshape(b, 1)
    kernel = functools.partial(_kernel, scale=sm_scale * LOG2E, block_k=block_k, split_len=split_len, qk_int8=qk_int8)
    grid = (b, head_blocks, k_splits)
    f32 = jnp.float32
    o, m, l = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[
            pl.BlockSpec((None, block_h, lat), lambda i, j, k: (i, j, 0)),
            pl.BlockSpec((None, block_h, rope), lambda i, j, k: (i, j, 0)),
            pl.BlockSpec((None, s_pad, lat), lambda i, j, k: (i, 0, 0)),
            pl.BlockSpec((None, s_pad, rope), lambda i, j, k: (i, 0, 0)),
            pl.BlockSpec((None, 1), lambda i, j, k: (i, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, block_h, lat), lambda i, j, k: (i, k, j, 0)),
            pl.BlockSpec((None, None, block_h), lambda i, j, k: (i, k, j)),
            pl.BlockSpec((None, None, block_h), lambda i, j, k: (i, k, j)),
        ],
        out_shape=[jax.ShapeDtypeStruct((b, k_splits, h_pad, lat), f32),
                   jax.ShapeDtypeStruct((b, k_splits, h_pad), f32),
                   jax.ShapeDtypeStruct((b, k_splits, h_pad), f32)],
        compiler_params=pltriton.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
        interpret=interp,
        name="mla_decode",
    )(q_latent, q_pe, kv_cache, pe_cache, lengths)
    out, lse2 = _merge_splits(o, m, l)
    out = out[:, :h].astype(q_latent.dtype)
    return (out, lse2[:, :h] / LOG2E) if return_lse else out


def _merge_splits(o, m, l):
    """Combine per-split (o unnormalised, m, l) in base 2: [B, splits, H, ...] -> o [B, H, L], lse2 [B, H]."""
    m_max = m.max(axis=1)
    m_safe = jnp.where(jnp.isfinite(m_max), m_max, 0.0)
    w = jnp.where(jnp.isfinite(m), jnp.exp2(m - m_safe[:, None]), 0.0)  # [B, splits, H]
    l_tot = (l * w).sum(axis=1)
    o_tot = (o * w[..., None]).sum(axis=1)
    denom = jnp.where(l_tot > 0, l_tot, 1.0)
    return o_tot / denom[..., None], jnp.where(l_tot > 0, m_safe + jnp.log2(denom), -jnp.inf)


def mla_decode_reference(q_latent, q_pe, kv_cache, pe_cache, lengths, *, sm_scale: float, return_lse: bool = False):
    """Plain jnp, float32: softmax(scale * (q_latent kv^T + q_pe pe^T)) kv over the first lengths[b] rows."""
    f32 = jnp.float32
    s = (jnp.einsum("bhl,bsl->bhs", q_latent.astype(f32), kv_cache.astype(f32))
         + jnp.einsum("bhr,bsr->bhs", q_pe.astype(f32), pe_cache.astype(f32))) * sm_scale
    valid = jnp.arange(kv_cache.shape[1])[None, None, :] < jnp.asarray(lengths)[:, None, None]
    s = jnp.where(valid, s, -jnp.inf)
    m = jnp.where(valid.any(-1), s.max(-1), 0.0)
    p = jnp.where(valid, jnp.exp(s - m[..., None]), 0.0)
    l = p.sum(-1)
    o = jnp.einsum("bhs,bsl->bhl", p, kv_cache.astype(f32)) / jnp.where(l > 0, l, 1.0)[..., None]
    o = o.astype(q_latent.dtype)
    return (o, jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)) if return_lse else o
