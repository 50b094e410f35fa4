"""SageAttention-2-style attention for packed variable-length batches: INT8 Q.K^T, 16-bit P.V.

Algorithm: Zhang et al., "SageAttention2: Efficient Attention with Thorough Outlier Smoothing and Per-thread INT8
Quantization" (2025), as in thu-ml/SageAttention's Triton "8+16" kernels. K is smoothed by subtracting its
per-request, per-head channel mean (exact: q . mean is constant along each softmax row); Q and K are quantised to
int8 per token and head (absmax / 127, guarded against all-zero rows; finer than SageAttention's per-block scales,
coarser than its per-thread ones) - except K on the Mosaic backend, quantised per key tile and head as
SageAttention does (a per-key scale costs that kernel a load and a multiply per score) - with sm_scale * log2(e)
folded into Q's scale; Q.K^T runs as int8 x int8 -> int32 dots rescaled by the scales; the online softmax is
float32 in base 2; P.V runs in
V's 16-bit dtype with a float32 accumulator. Query blocks never straddle requests (they are counted from each
request's first token). A head dim that is not a power of two (MLA's 192) is split into power-of-two chunks whose
int32 dots are summed (one scale per row, so the sum is exact).

Layout (flash-attn varlen): q [Tq, Hq, Dqk], k [Tk, Hk, Dqk], v [Tk, Hk, Dv], cu_seqlens_q / cu_seqlens_k int32
[B+1]; GQA with Hq a multiple of Hk; causal masks are aligned bottom-right per request (query row r of a request
with Lq queries and Lk keys sees keys 0 .. r + Lk - Lq), so prefill on top of a history works.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import sage_attention_mgpu
from pallas_kernels.common import (as_parts, broadcast_heads, cdiv, concat_parts, int_vector, leading_columns,
                                   next_pow2, pad_to, pow2_chunks, quantize_parts_int8, resolve_backend,
                                   resolve_interpret, segment_of, segments)
from pallas_kernels.sage_attention_mgpu import MosaicBlockSizes

LOG2E = math.log2(math.e)
EPS = 1e-8


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    # From a sweep on one H100 (bench/RESULTS.md): 128 x 64 with 4 warps and 3 stages was fastest at S = 4k and 16k.
    block_q: int = 128
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3

    @property
    def program_rows(self) -> int:
        return self.block_q


# backend="auto" takes the Mosaic kernel from this mean request length on, for head dims up to MOSAIC_MAX_DQK (the
# crossover measured on an H100 at D 64, 128 and MLA's 192, 16 and 128 heads, causal: ties at 128 tokens, Mosaic
# ahead from 256 and with cached histories, Triton ahead at 64; common.DEFAULT_BACKEND's notes, bench/RESULTS.md)
MOSAIC_MIN_TOKENS = 128
MOSAIC_MAX_DQK = 256
# a Mosaic call without block sizes steps 64 keys at a time below this mean of keys per request, 128 from it on (the
# e0a4e85 table in bench/RESULTS.md: 64-key steps ahead up to 512-token requests, even at 1024, behind at 4096; the
# MLA seed prefill's GPU time 721 vs 734 us in the twelfth session)
MOSAIC_SHORT_KEYS = 1024
# ... and with 64-key steps at head dims past 128 (MLA's 192), 4 K / V tiles in flight instead of 2: the MLA seed
# prefill's attention 157.8 -> 151.5 us, 4 x 256 queries on 512 cached keys at 128 heads 375.7 -> 343.1 (H100, the
# twenty-second session's table in bench/RESULTS.md; D 64 and 128 gained nothing); 128-key tiles at D 192 do not fit
# shared memory with more than 2
MOSAIC_WIDE_STAGES = 4


def default_block_sizes(backend: str, tk: int, requests: int, dqk: int = 128,
                        dv: int = 128) -> BlockSizes | MosaicBlockSizes:
    """The block sizes a call that names none runs: the Triton kernel's BlockSizes(); the Mosaic kernel's
    MosaicBlockSizes() with 64-key steps for requests of fewer than MOSAIC_SHORT_KEYS keys on average (and
    MOSAIC_WIDE_STAGES tiles in flight when the head dim dqk is past 128), or 64-key steps in 2 stages where those
    would not fit shared memory at head dims dqk / dv (256 / 128 does not fit 128-key steps)."""
    if backend != "mosaic":
        return BlockSizes()
    if tk >= MOSAIC_SHORT_KEYS * max(requests, 1):
        want = MosaicBlockSizes()
    else:
        want = MosaicBlockSizes(block_k=64, stages=MOSAIC_WIDE_STAGES if dqk > 128 else 2)
    return sage_attention_mgpu.SMALLEST if sage_attention_mgpu.too_big(dqk, dv, want) else want


def auto_backend(tq: int, tk: int, requests: int, dqk: int, dv: int, v_dtype) -> str:
    """The backend `backend="auto"` runs: "mosaic" when the Mosaic kernel takes these sizes and the requests are
    long enough on average (queries and keys) for it to win, else "triton"."""
    if sage_attention_mgpu.unsupported(dqk, dv, v_dtype):
        return "triton"
    long_enough = min(tq, tk) >= MOSAIC_MIN_TOKENS * max(requests, 1)
    return "mosaic" if dqk <= MOSAIC_MAX_DQK and long_enough else "triton"


def request_means(parts, cu):
    """Per-request means over tokens of each of `parts` (x [T, H, D_i]) -> ([B, H, D_i] float32 per part, the request
    of each token), as one-hot matmuls (no scatter) sharing one membership matrix. K's smoothing shift."""
    seg, off = segments(cu, parts[0].shape[0])
    member = (jnp.arange(cu.shape[0] - 1)[:, None] == seg[None, :]) & (off < (cu[1:] - cu[:-1])[seg])[None, :]
    count = jnp.maximum(cu[1:] - cu[:-1], 1).astype(jnp.float32)[:, None, None]

    def mean(x):
        if x.dtype in (jnp.bfloat16, jnp.float16):  # 0/1 times a 16-bit value is exact: a 16-bit matmul, f32 sums
            return jnp.einsum("bt,thd->bhd", member.astype(x.dtype), x, preferred_element_type=jnp.float32) / count
        return jnp.einsum("bt,thd->bhd", member.astype(jnp.float32), x.astype(jnp.float32),
                          precision=jax.lax.Precision.HIGHEST) / count

    return [mean(x) for x in parts], seg


def _kernel(blk_req_ref, blk_idx_ref, cu_q_ref, cu_k_ref, qs_ref, ks_ref, *refs, block_q, block_k, group, causal,
            chunks):
    # refs: the Q parts, the K parts (len(parts) each), v_ref, o_ref, lse_ref; chunks: (part, offset, width)
    n_parts = (len(refs) - 3) // 2
    q_refs, k_refs, (v_ref, o_ref, lse_ref) = refs[:n_parts], refs[n_parts:2 * n_parts], refs[2 * n_parts:]
    head = pl.program_id(1)
    kv_head = head // group
    req = blk_req_ref[0]
    i = blk_idx_ref[0]
    q_start, k_start = cu_q_ref[req], cu_k_ref[req]
    len_q = cu_q_ref[req + 1] - q_start
    len_k = cu_k_ref[req + 1] - k_start
    rows = i * block_q + jnp.arange(block_q)  # request-local query rows (none for a block past the plan)
    row_ok = rows < len_q
    q0 = q_start + i * block_q
    qs = pltriton.load(qs_ref.at[pl.ds(q0, block_q), head], mask=row_ok, other=0.0)  # [bq], incl. sm_scale*log2e
    qc = [pltriton.load(q_refs[part].at[pl.ds(q0, block_q), head, pl.ds(off, w)], mask=row_ok[:, None], other=0)
          for part, off, w in chunks]
    dv = v_ref.shape[-1]
    diag = len_k - len_q  # bottom-right alignment
    k_end = jnp.minimum(len_k, (i + 1) * block_q + diag) if causal else len_k
    cols = jnp.arange(block_k)

    def body(j, carry):
        acc, m, l = carry
        kcols = j * block_k + cols
        col_ok = kcols < len_k
        k0 = k_start + j * block_k
        s_int = None
        for qi, (part, off, w) in zip(qc, chunks):
            kk = pltriton.load(k_refs[part].at[pl.ds(k0, block_k), kv_head, pl.ds(off, w)], mask=col_ok[:, None],
                               other=0)
            d = jnp.dot(qi, kk.T, preferred_element_type=jnp.int32)
            s_int = d if s_int is None else s_int + d
        ks = pltriton.load(ks_ref.at[pl.ds(k0, block_k), kv_head], mask=col_ok, other=0.0)
        s = s_int.astype(jnp.float32) * (qs[:, None] * ks[None, :])  # base-2 logits
        ok = col_ok[None, :] & row_ok[:, None]
        if causal:
            ok = ok & (kcols[None, :] <= rows[:, None] + diag)
        s = jnp.where(ok, s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(axis=1))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        p = jnp.exp2(s - m_safe[:, None])
        corr = jnp.exp2(m - m_safe)
        vv = pltriton.load(v_ref.at[pl.ds(k0, block_k), kv_head, :], mask=col_ok[:, None], other=0)
        hp = jax.lax.Precision.HIGHEST if vv.dtype == jnp.float32 else None  # float32 V: IEEE, not TF32
        acc = acc * corr[:, None] + jnp.dot(p.astype(vv.dtype), vv, preferred_element_type=jnp.float32, precision=hp)
        return acc, m_new, l * corr + p.sum(axis=1)

    init = (jnp.zeros((block_q, dv), jnp.float32), jnp.full((block_q,), -jnp.inf, jnp.float32),
            jnp.zeros((block_q,), jnp.float32))
    acc, m, l = jax.lax.fori_loop(0, jnp.maximum(cdiv(k_end, block_k), 0), body, init)
    has = l > 0
    out = acc / jnp.where(has, l, 1.0)[:, None]
    pltriton.store(o_ref.at[pl.ds(q0, block_q), head, :], out.astype(o_ref.dtype), mask=row_ok[:, None])
    lse = jnp.where(has, m + jnp.log2(jnp.where(has, l, 1.0)), -jnp.inf)  # base 2
    pltriton.store(lse_ref.at[pl.ds(q0, block_q), head], lse, mask=row_ok)


def _check_cu_seqlens(cu_seqlens_q, cu_seqlens_k):
    """The cumulative lengths as int32 arrays, or a clear error: 1-D integers, one entry per request plus one, both
    (checked on shapes: the call is traced, so their values cannot be read)."""
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not int_vector(cu) or jnp.shape(cu)[0] < 1:
            raise ValueError(f"sage_attention: {name} must be [B + 1] integers, got {jnp.shape(cu)} "
                             f"{jnp.result_type(cu)}")
    if jnp.shape(cu_seqlens_q) != jnp.shape(cu_seqlens_k):
        raise ValueError(f"sage_attention: cu_seqlens_q {jnp.shape(cu_seqlens_q)} and cu_seqlens_k "
                         f"{jnp.shape(cu_seqlens_k)} must both have one entry per request plus one")
    return jnp.asarray(cu_seqlens_q, jnp.int32), jnp.asarray(cu_seqlens_k, jnp.int32)


@functools.partial(jax.jit, static_argnames=("causal", "sm_scale", "smooth_k", "return_lse", "block_sizes",
                                             "backend", "interpret"))
def sage_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, *, causal: bool = True, sm_scale: float | None = None,
                   smooth_k: bool = True, k_mean=None, return_lse: bool = False,
                   block_sizes: BlockSizes | MosaicBlockSizes | None = None, backend: str | None = None,
                   interpret: bool | None = None):
    """Packed varlen attention with INT8 Q.K^T. Returns o [Tq, Hq, Dv] in q's dtype (zeros for rows that see no key;
    rows past cu_seqlens_q[-1] belong to no request and are left unspecified - zeros on the Mosaic path),
    and the natural-log LSE [Tq, Hq] of the true (unsmoothed, unquantised-scale) logits when `return_lse`.

    q and k may each be a tuple of parts along the head dim (as many for both), standing for their concatenation:
    MLA's (q_nope, q_pe) and (k_nope, k_pe) go in without a concatenated copy (each kernel reads a chunk of the head
    dim from the part that holds it). K's parts set the widths; a q part may be wider than its k part, and then its
    leading columns are the part (MLA passes its unroped q [Tq, H, P + R] whole as the first part, the roped q_pe
    second: the Mosaic path reads the window in place, no sliced copy). A k part may have one head, shared by every
    K head (MLA's rope key k_pe [Tk, 1, R]): the Mosaic path reads it once per head where it is; the Triton path
    broadcasts it.
    k_mean: K's per-request channel means [B, Hk or 1, D_i] per part (as k), when the caller has them for less than
    a pass over K (MLA: the latent's mean through W_UK); None: `request_means` of k. The smoothing subtracts them
    from K (with smooth_k): any shift per request and head leaves the softmax as it is (the LSE is corrected by the
    same means), so they need not be exact.
    backend: "triton", "mosaic" (Hopper wgmma kernel, sage_attention_mgpu.py; 16-bit V) or "auto" (`auto_backend`:
    Mosaic for long requests); None: the backend block_sizes belong to, else common.DEFAULT_BACKEND ("auto") for
    compiled calls and "triton" in interpret mode;
    block_sizes: BlockSizes for the first, MosaicBlockSizes for the second (None: `default_block_sizes`)."""
    qp, kp = as_parts(q), as_parts(k)
    if any(jnp.ndim(x) != 3 for x in (*qp, *kp, v)):
        raise ValueError(f"sage_attention: q, k (or their parts) and v must be [tokens, heads, head dim], got q "
                         f"{[jnp.shape(x) for x in qp]}, k {[jnp.shape(x) for x in kp]}, v {jnp.shape(v)}")
    cu_q, cu_k = _check_cu_seqlens(cu_seqlens_q, cu_seqlens_k)
    tq, hq = qp[0].shape[:2]
    tk, hk = kp[0].shape[0], max(x.shape[1] for x in kp)
    widths = [x.shape[2] for x in kp]
    if (any(x.shape[:2] != (tq, hq) for x in qp) or any(x.shape[0] != tk or x.shape[1] not in (1, hk) for x in kp)
            or len(qp) != len(kp) or any(x.shape[2] < w for x, w in zip(qp, widths)) or v.shape[:2] != (tk, hk)
            or hq % hk):
        raise ValueError(f"sage_attention: q {[x.shape for x in qp]}, k {[x.shape for x in kp]}, v {v.shape} do not "
                         "fit (as many q as k parts, each q part at least as wide as its k part, k and v of equal "
                         "length and heads, a k part of one head shared by all, Hq % Hk == 0)")
    dqk = sum(widths)
    interp = resolve_interpret(interpret)
    nb = cu_q.shape[0] - 1
    backend = resolve_backend("sage_attention", backend, block_sizes, MosaicBlockSizes, interp)
    if backend == "auto":
        backend = auto_backend(tq, tk, nb, dqk, v.shape[2], v.dtype)
    bs = block_sizes or default_block_sizes(backend, tk, nb, dqk, v.shape[2])
    sm_scale = dqk**-0.5 if sm_scale is None else sm_scale
    if tq == 0 or nb == 0:  # no query rows, or no requests (every row padding): zeros, nothing to launch
        o = jnp.zeros((tq, hq, v.shape[2]), qp[0].dtype)
        return (o, jnp.full((tq, hq), -jnp.inf, jnp.float32)) if return_lse else o
    means, own_means = None, False
    if smooth_k and tk:
        if k_mean is None and backend == "mosaic" and nb * hk >= sage_attention_mgpu.SMOOTHED_MIN_PROGRAMS:
            own_means = True  # K's pass computes them (one program per request and head)
        elif k_mean is None:
            means, seg_k = request_means(kp, cu_k)
        else:
            means, seg_k = [m.astype(jnp.float32) for m in as_parts(k_mean)], segments(cu_k, tk)[0]
            if len(means) != len(kp) or any(m.shape != (nb, x.shape[1], w) for m, x, w in zip(means, kp, widths)):
                raise ValueError(f"sage_attention: k_mean {[m.shape for m in means]} does not fit k "
                                 f"{[x.shape for x in kp]} with {nb} requests (one [B, heads of the part, width] each)")
    # request-aligned query blocks: a static bound on their number, each (request, block index) from cu_q
    rows = bs.program_rows  # query rows per program
    nqb = cdiv(tq, rows) + nb
    blocks_per_req = (cu_q[1:] - cu_q[:-1] + rows - 1) // rows
    cu_qb = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(blocks_per_req)])
    blk = jnp.arange(nqb, dtype=jnp.int32)
    blk_req = segment_of(cu_qb, blk, nb)
    # a block past the plan gets index nqb + k (the k-th such block): no rows of a request; the Mosaic kernel has
    # it write zeros into the k-th block of rows past the last request (padding), which these blocks always cover
    blk_idx = jnp.where(blk < cu_qb[-1], blk - cu_qb[blk_req], nqb + blk - cu_qb[-1])
    dv = v.shape[2]
    if backend == "mosaic":  # K: one pass (smoothing, quantisation per key tile); Q quantised in the kernel
        o, lse2, means = sage_attention_mgpu.attention(qp, kp, v, means, cu_q, cu_k, blk_req, blk_idx, cu_qb,
                                                       q_mult=sm_scale * LOG2E, group=hq // hk, causal=causal,
                                                       block_sizes=bs, eps=EPS, interpret=interp,
                                                       own_means=own_means)
    qp = leading_columns(qp, widths)  # below: XLA-side uses (the slices fuse into them)
    if backend != "mosaic":
        kp = [broadcast_heads(x, hk) for x in kp]  # a shared part: one copy per head here
        if means is not None:
            kp = [x.astype(jnp.float32) - m[seg_k] for x, m in zip(kp, means)]
        # one scale per (token, head): the Pallas stand-in for SageAttention-2's per-thread scales (finer than its
        # per-block ones); an elementwise pass with no segment reductions, one outer-product rescale per score tile
        q_i8, q_scale = quantize_parts_int8(qp, EPS)
        k_i8, k_scale = quantize_parts_int8(kp, EPS)
        q_scale = q_scale * (sm_scale * LOG2E)
        # Tensor-core dots need an int8 contraction of >= 32 (mma k32) and loads need power-of-two widths: zero-pad
        # each part's width to a multiple of 32 (zero int8 columns add nothing) and V's to a power of two >= 16
        # (extra output columns dropped). No copy at the real sizes (192 = 128 + 64, 128, 64).
        pad32 = lambda x: pad_to(x, 2, cdiv(x.shape[2], 32) * 32)  # noqa: E731
        q_i8, k_i8, v = [pad32(x) for x in q_i8], [pad32(x) for x in k_i8], pad_to(v, 2, max(16, next_pow2(dv)))
        o, lse2 = _triton(q_i8, k_i8, v, q_scale, k_scale, cu_q, cu_k, blk_req, blk_idx, causal=causal,
                          group=hq // hk, out_dtype=qp[0].dtype, block_sizes=bs, interpret=interp)
    o, lse = o[:, :, :dv].astype(qp[0].dtype), lse2 / LOG2E
    if not return_lse:
        return o
    if means is not None:  # undo the smoothing's per-row shift: lse(q.k) = lse(q.(k - mean)) + scale * q.mean
        seg_q, _ = segments(cu_q, tq)
        per_q_head = lambda m: jnp.repeat(broadcast_heads(m, hk), hq // hk, axis=1)[seg_q]  # noqa: E731
        lse = lse + sm_scale * sum(jnp.einsum("thd,thd->th", x.astype(jnp.float32), per_q_head(m))
                                   for x, m in zip(qp, means))
    return o, lse


def _triton(q_i8, k_i8, v, q_scale, k_scale, cu_q, cu_k, blk_req, blk_idx, *, causal, group, out_dtype, block_sizes,
            interpret):
    """The Triton kernel over the prepared operands (Q and K as lists of int8 parts): (o [Tq, Hq, Dv], base-2 LSE
    [Tq, Hq])."""
    bs = block_sizes
    tq, hq = q_scale.shape
    if interpret:  # the interpreter clamps out-of-range slices instead of masking them: give every tile room
        pad = max(bs.block_q, bs.block_k)
        rows = lambda x: jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1))  # noqa: E731
        q_i8, k_i8, v, q_scale, k_scale = [rows(x) for x in q_i8], [rows(x) for x in k_i8], rows(v), rows(
            q_scale), rows(k_scale)
    tq_buf = q_i8[0].shape[0]
    full = lambda shape: pl.BlockSpec(shape, lambda i, h: (0,) * len(shape))  # noqa: E731
    chunks = tuple((part, off, w) for part, x in enumerate(q_i8) for off, w in pow2_chunks(x.shape[2]))
    kernel = functools.partial(_kernel, block_q=bs.block_q, block_k=bs.block_k, group=group, causal=causal,
                               chunks=chunks)
    operands = [*q_i8, *k_i8, v]
    o, lse = pl.pallas_call(
        kernel,
        grid=(blk_req.shape[0], hq),
        in_specs=[pl.BlockSpec((1,), lambda i, h: (i,)), pl.BlockSpec((1,), lambda i, h: (i,)),
                  full(cu_q.shape), full(cu_k.shape), full(q_scale.shape), full(k_scale.shape)]
        + [full(x.shape) for x in operands],
        out_specs=[full((tq_buf, hq, v.shape[2])), full((tq_buf, hq))],
        out_shape=[jax.ShapeDtypeStruct((tq_buf, hq, v.shape[2]), out_dtype),
                   jax.ShapeDtypeStruct((tq_buf, hq), jnp.float32)],
        compiler_params=pltriton.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
        interpret=interpret,
        name="sage_attention",
    )(blk_req, blk_idx, cu_q, cu_k, q_scale, k_scale, *operands)
    return o[:tq], lse[:tq]


def sage_attention_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, *, causal: bool = True,
                             sm_scale: float | None = None, return_lse: bool = False):
    """Exact attention in float32 over the packed layout (dense [Tq, Tk] mask), bottom-right causal per request.
    q / k whole or in parts, as for sage_attention."""
    f32 = jnp.float32
    k = as_parts(k)
    q, k = concat_parts(leading_columns(as_parts(q), [x.shape[-1] for x in k])), concat_parts(k)
    tq, hq, dqk = q.shape
    tk, hk, _ = k.shape
    sm_scale = dqk**-0.5 if sm_scale is None else sm_scale
    cu_q, cu_k = jnp.asarray(cu_seqlens_q), jnp.asarray(cu_seqlens_k)
    seg_q, off_q = segments(cu_q, tq)
    seg_k, off_k = segments(cu_k, tk)
    len_q, len_k = (cu_q[1:] - cu_q[:-1])[seg_q], (cu_k[1:] - cu_k[:-1])[seg_q]
    mask = seg_q[:, None] == seg_k[None, :]
    if causal:
        mask &= off_k[None, :] <= (off_q + len_k - len_q)[:, None]
    kr = jnp.repeat(k.astype(f32), hq // hk, axis=1)
    vr = jnp.repeat(v.astype(f32), hq // hk, axis=1)
    s = jnp.einsum("thd,shd->hts", q.astype(f32), kr) * sm_scale
    s = jnp.where(mask[None], s, -jnp.inf)
    m = jnp.where(mask.any(-1)[None], s.max(-1), 0.0)
    p = jnp.where(mask[None], jnp.exp(s - m[..., None]), 0.0)
    l = p.sum(-1)
    o = jnp.einsum("hts,shd->thd", p, vr) / jnp.where(l > 0, l, 1.0).T[..., None]
    o = o.astype(q.dtype)
    if not return_lse:
        return o
    return o, jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf).T
