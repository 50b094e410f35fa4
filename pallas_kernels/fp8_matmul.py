"""Block-scaled FP8 matmul: y = x @ dequant(W)^T with W in float8_e4m3fn and one float32 scale per 128x128 block
(DeepSeek-V3/R1's checkpoint format: W_bf16[i, j] = W[i, j] * weight_scale_inv[i // 128, j // 128]).

Three paths, chosen by the token count M and the activation format:
- weight-only (decode, M < 128): each program streams 128-wide K tiles of its weight columns as FP8 (half the bytes
  of bf16), widens them exactly to x's dtype in registers, multiplies with x on the tensor cores and adds the
  tile's product times its block scale into a float32 accumulator. Memory-bound: the K loop is split across
  programs (split-K, partial sums added in XLA) so that a few output tiles still fill the GPU. Two kernels: the
  Triton one (every layout) and the Mosaic GPU one (fp8_matmul_mgpu.weight_only: TMA-fed, y^T = W x^T on wgmma;
  HF-layout weights, 2-D or grouped per head (W_UV), with N a multiple of 64), the GPU default where it applies.
- FP8 activations (prefill, M >= 128): x is quantised per token per 128 channels first (DeepSeek's `act_quant`:
  s = max(|x|, 1e-4) / 448, x / s in e4m3; one Pallas pass before the Mosaic kernel, XLA before the Triton one),
  then the kernel runs FP8 x FP8 dots with float32 accumulation, scaling each 128-wide partial product by
  s_x[m] * s_w before adding it (the per-block promotion that keeps Hopper's FP8 accumulation exact enough, as in
  DeepSeek's `fp8_gemm_kernel`).
- dequantised (M >= 128 with bf16 activations, the projections kept in 16-bit for accuracy): the product with the
  weight dequantised to x's dtype, as DeepSeek's reference does for wkv_b at prefill. On the GPU, where its tiles
  fill the chip (R1's q_b, W_UK, W_UV at prefill), the Mosaic kernel fp8_matmul_mgpu.dequant_matmul widens and
  scales each weight tile in registers right before its 16-bit MMA (persistent programs, no widened copy of the
  weight); otherwise the weight is widened in one XLA pass and XLA's GEMM (cuBLAS) runs the product (R1's q_a /
  kv_a: few long-K tiles, where cuBLAS's GEMM wins; measured on the H100: bench/RESULTS.md).

Layouts: x [M, K] or [M, G, K]; w [N, K] / [G, N, K] (`transpose_w=True`, HF `nn.Linear` rows, y = x W^T) or
[K, N] / [G, K, N] (`transpose_w=False`, y = x W); scales follow w's last two dims in blocks of `block`. G groups
(MLA heads) index x, w and y together; a 2-D x with a grouped w is shared by every group. Shapes need not be
multiples of anything: K and N tiles are the largest of 128/64/32/16 that divide them (padding only below 16).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import fp8_matmul_mgpu
from pallas_kernels.common import (DEFAULT_BACKEND, H100_SMS, cdiv, next_pow2, pad_to, resolve_backend,
                                   resolve_interpret)
from pallas_kernels.fp8_matmul_mgpu import MosaicBlockSizes

E4M3 = jnp.float8_e4m3fn
E4M3_MAX = 448.0
ACT_EPS = 1e-4  # DeepSeek's act_quant floor on the block amax
FP8_ACTIVATIONS_MIN_M = 128  # "auto": token counts from here on quantise activations (prefill)
DEQUANTIZE_MIN_M = 128  # bf16-activation calls from here on: the dequantised path (no explicit backend)
# the dequantised path's Mosaic kernel (weight widened in registers) up to this many tokens, when its tiles fill the
# GPU; beyond, or with fewer tiles, XLA's GEMM on the widened weight. R1's prefill GEMMs on an H100 (RESULTS): the
# kernel wins at 768-1024 tokens (q_b -22%, W_UK -12..30%), ties at 1536 (the seed prefill's up-projections) and
# loses from 2048 (W_UK +8%; cuBLAS's GEMM outgrows the widening pass it needs)
DEQUANT_KERNEL_MAX_M = 1536


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Fp8Weight:
    """An FP8 e4m3 weight with float32 block scales, rows = outputs (HF layout) unless stated by its user."""

    w: jax.Array  # float8_e4m3fn [..., N, K]
    scale: jax.Array  # float32 [..., ceil(N / block), ceil(K / block)]
    block: int = dataclasses.field(default=128, metadata=dict(static=True))

    @property
    def shape(self):
        return self.w.shape

    @property
    def nbytes(self) -> int:
        return self.w.nbytes + self.scale.nbytes


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    block_m: int = 64  # token rows per program (>= 16 for the tensor cores; smaller M is padded to 16)
    # output columns per program (at most the scale block) and warps: on the GPU the Triton kernel's default user is
    # R1's decode W_UK (16 tokens x 128 heads, [128, 512] per head, contracting its rows), where 128 columns with 8
    # warps take 7.3-7.4 us against 8.1 for 64 with 4 (H100; bench/RESULTS.md, sixteenth session)
    block_n: int = 128
    k_splits: int | None = None  # split-K factor; None: enough programs to fill an H100 (132 SMs) twice
    num_warps: int = 8
    num_stages: int = 3


# ------------------------------------------------------------------------------------------------ references
def dequantize(w, scale, block: int = 128):
    """float32 W from e4m3 `w` [..., N, K] and `scale` [..., ceil(N/b), ceil(K/b)]."""
    n, k = w.shape[-2:]
    s = jnp.repeat(jnp.repeat(scale.astype(jnp.float32), block, axis=-2), block, axis=-1)[..., :n, :k]
    return w.astype(jnp.float32) * s


def quantize(w, block: int = 128):
    """(e4m3 [..., N, K], float32 scales [..., ceil(N/b), ceil(K/b)]): per-block absmax / 448, the way DeepSeek's
    checkpoints are made; all-zero blocks get scale 1."""
    w = jnp.asarray(w, jnp.float32)
    n, k = w.shape[-2:]
    gn, gk = cdiv(n, block), cdiv(k, block)
    pad = [(0, 0)] * (w.ndim - 2) + [(0, gn * block - n), (0, gk * block - k)]
    blocks = jnp.pad(w, pad).reshape(*w.shape[:-2], gn, block, gk, block)
    amax = jnp.abs(blocks).max(axis=(-3, -1))
    scale = jnp.where(amax > 0, amax / E4M3_MAX, 1.0)
    q = (blocks / scale[..., :, None, :, None]).reshape(*w.shape[:-2], gn * block, gk * block)[..., :n, :k]
    return q.astype(E4M3), scale.astype(jnp.float32)


def quantize_activations(x, block: int = 128):
    """DeepSeek `act_quant` over the last axis: (e4m3 x / s, s [..., ceil(K/b)]) with s = max(amax, 1e-4) / 448 per
    `block` channels of each token."""
    x = jnp.asarray(x, jnp.float32)
    k = x.shape[-1]
    gk = cdiv(k, block)
    xb = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, gk * block - k)]).reshape(*x.shape[:-1], gk, block)
    s = jnp.maximum(jnp.abs(xb).max(-1), ACT_EPS) / E4M3_MAX
    q = (xb / s[..., None]).reshape(*x.shape[:-1], gk * block)[..., :k]
    return q.astype(E4M3), s


def _act_quant_kernel(x_ref, q_ref, s_ref):
    x = x_ref[...].astype(jnp.float32)  # [rows, block]: one scale block of each row
    s = jnp.maximum(jnp.max(jnp.abs(x), axis=1), ACT_EPS) / E4M3_MAX
    q_ref[...] = (x / s[:, None]).astype(E4M3)
    s_ref[...] = s[None, :]  # a row of the transposed scales


# rows per program of the one-pass activation quantisation (M must be a multiple) and its warps: 8.1 us at
# [768, 16384] on the H100 (XLA's two passes 23.7; 32-256 rows with 1-8 warps: 7.8-31 us, build/aq.py in RESULTS)
ACT_QUANT_ROWS, ACT_QUANT_WARPS = 64, 2


def quantize_activations_t(x, block: int = 128, *, interpret: bool = False):
    """`quantize_activations` of x [M, K] (M a multiple of ACT_QUANT_ROWS, K of `block`) as one Pallas pass: reads
    x once (XLA runs the block maxima and the division as two passes over x) and writes (e4m3 [M, K], the scales
    transposed [K / block, M], the layout the Mosaic FP8 x FP8 kernel reads). The same values as the reference."""
    m, k = x.shape
    return pl.pallas_call(
        _act_quant_kernel,
        grid=(m // ACT_QUANT_ROWS, k // block),
        in_specs=[pl.BlockSpec((ACT_QUANT_ROWS, block), lambda i, j: (i, j))],
        out_specs=[pl.BlockSpec((ACT_QUANT_ROWS, block), lambda i, j: (i, j)),
                   pl.BlockSpec((1, ACT_QUANT_ROWS), lambda i, j: (j, i))],
        out_shape=[jax.ShapeDtypeStruct((m, k), E4M3), jax.ShapeDtypeStruct((k // block, m), jnp.float32)],
        compiler_params=pltriton.CompilerParams(num_warps=ACT_QUANT_WARPS, num_stages=1),
        interpret=interpret,
        name="act_quant",
    )(x)


def fp8_matmul_reference(x, w, w_scale, *, block: int = 128, transpose_w: bool = True, activations: str = "auto"):
    """Pure jnp: dequantised weight (and, on the FP8-activation path, quantised-dequantised x), float32 product."""
    fp8_act = _use_fp8_activations(activations, x.shape[0])
    x = x[..., : w.shape[-1] if transpose_w else w.shape[-2]]  # a wider x: its leading K columns
    wf = dequantize(w, w_scale, block)
    if not transpose_w:
        wf = jnp.swapaxes(wf, -1, -2)  # -> [..., N, K]
    xf = x.astype(jnp.float32)
    if fp8_act:
        q, s = quantize_activations(xf, block)
        xf = q.astype(jnp.float32) * jnp.repeat(s, block, axis=-1)[..., : x.shape[-1]]
    return _dot_rows(xf, wf, jax.lax.Precision.HIGHEST).astype(x.dtype)


def _dot_rows(x, w, precision=None):
    """x [M, K] / [M, G, K] times w [N, K] / [G, N, K] (rows = outputs) transposed: [M, N] / [M, G, N]."""
    if w.ndim == 2:
        return jnp.einsum("...k,nk->...n", x, w, precision=precision)
    return jnp.einsum("mk,gnk->mgn" if x.ndim == 2 else "mgk,gnk->mgn", x, w, precision=precision)


def _dequantized(x, w, w_scale, *, block, transpose_w):
    """The dequantised path: W widened to x's dtype (one fused XLA pass over the FP8 bytes), then XLA's GEMM."""
    wd = dequantize(w, w_scale, block).astype(x.dtype)
    if not transpose_w:
        wd = jnp.swapaxes(wd, -1, -2)
    hp = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None  # float32 x: IEEE, not TF32
    return _dot_rows(x, wd, hp)


def _use_fp8_activations(activations: str, m: int) -> bool:
    if activations not in ("auto", "bf16", "fp8"):
        raise ValueError(f"activations must be 'auto', 'bf16' or 'fp8', got {activations!r}")
    return activations == "fp8" or (activations == "auto" and m >= FP8_ACTIVATIONS_MIN_M)


# ------------------------------------------------------------------------------------------------------ kernel
def _kernel(*refs, bk, bn, block, tiles_per_split, transpose_w, fp8_act, native_fp8):
    if fp8_act:
        x_ref, xs_ref, w_ref, s_ref, o_ref = refs
    else:
        x_ref, w_ref, s_ref, o_ref = refs
    n_tile, split = pl.program_id(2), pl.program_id(3)
    first = split * tiles_per_split
    n_scale = (n_tile * bn) // block
    f32 = jnp.float32

    def body(i, acc):
        k0 = (first + i) * bk
        xb = x_ref[:, pl.ds(k0, bk)]  # [bm, bk]
        wb = w_ref[:, pl.ds(k0, bk)] if transpose_w else w_ref[pl.ds(k0, bk), :]  # [bn, bk] / [bk, bn]
        s_w = s_ref[n_scale, k0 // block] if transpose_w else s_ref[k0 // block, n_scale]
        if fp8_act:  # x arrives quantised per token per block (one XLA pass), with its scales
            s_x = xs_ref[:, pl.ds(k0 // block, 1)]  # [bm, 1]
            if not native_fp8:  # interpret mode: e4m3 products are exact in float32
                xb, wb = xb.astype(f32), wb.astype(f32)
            d = jnp.dot(xb, wb.T if transpose_w else wb, preferred_element_type=f32)
            return acc + d * (s_x * s_w)
        wd = wb.astype(xb.dtype)  # e4m3 -> bf16/f32 is exact
        hp = jax.lax.Precision.HIGHEST if xb.dtype == f32 else None  # float32 x: IEEE, not TF32
        d = jnp.dot(xb, wd.T if transpose_w else wd, preferred_element_type=f32, precision=hp)
        return acc + d * s_w

    acc = jax.lax.fori_loop(0, tiles_per_split, body, jnp.zeros(o_ref.shape, f32))
    o_ref[...] = acc.astype(o_ref.dtype)


def _mosaic_applies(x, w, block, transpose_w, activations) -> bool:
    """The Mosaic kernel's scope: the FP8-activation path of x [M, K] @ w [N, K]^T with 128-blocks (a default of
    "mosaic" sends only these calls there; the rest stay on the Triton kernel)."""
    return (x.ndim == 2 and w.ndim == 2 and transpose_w and block == fp8_matmul_mgpu.BLOCK
            and _use_fp8_activations(activations, x.shape[0]))


def _mosaic(x, w, w_scale, *, block, transpose_w, activations, block_sizes, interpret):
    """The Mosaic GPU FP8 x FP8 kernel (calls inside `_mosaic_applies`): activations quantised here (one Pallas
    pass), shapes padded to its tiles (checked by the caller)."""
    m, n = x.shape[0], w.shape[0]
    m_pad = cdiv(m, block_sizes.block_m) * block_sizes.block_m
    k_pad, n_pad = cdiv(x.shape[1], block) * block, cdiv(n, block) * block
    xq, xs_t = quantize_activations_t(pad_to(pad_to(x, 0, m_pad), 1, k_pad), block, interpret=interpret)
    y = fp8_matmul_mgpu.matmul(xq, xs_t, pad_to(pad_to(w, 0, n_pad), 1, k_pad),
                               fp8_matmul_mgpu.scale_rows(w_scale),
                               out_dtype=x.dtype, block_sizes=block_sizes, interpret=interpret)
    return y[:m, :n]


def _mosaic_weight_only_applies(x, w, block, transpose_w, activations) -> bool:
    """The Mosaic weight-only kernel's scope: 16-bit x [M, K] or [M, G, K] (M <= 128: its tiles fit shared memory)
    @ w [N, K]^T or [G, N, K]^T (HF rows; grouped: MLA's per-head W_UV), 128-blocks, N a multiple of 64 and K of 128
    (R1's q_a, q_b, kv_a, o_proj and W_UV), bf16 activations."""
    n, k = w.shape[-2:]
    return ((x.ndim == 2 or w.ndim == 3) and transpose_w and block == fp8_matmul_mgpu.BLOCK
            and not _use_fp8_activations(activations, x.shape[0]) and 0 < x.shape[0] <= 128
            and x.dtype in (jnp.bfloat16, jnp.float16) and n % fp8_matmul_mgpu.WEIGHT_ROWS == 0 and k % block == 0)


def _mosaic_dequant_applies(x, w, block, transpose_w, activations) -> bool:
    """The Mosaic dequantising kernel's scope: 16-bit x [M, K] with bf16 activations from DEQUANTIZE_MIN_M tokens @
    w [N, K]^T or [G, N, K]^T (HF rows; a grouped w is read as one [G N, K] weight, so N a multiple of 128),
    128-blocks, K a multiple of 128 (R1's q_a, q_b, kv_a and W_UK / W_UV at prefill)."""
    n, k = w.shape[-2:]
    return (x.ndim == 2 and transpose_w and block == fp8_matmul_mgpu.BLOCK and x.shape[0] >= DEQUANTIZE_MIN_M
            and not _use_fp8_activations(activations, x.shape[0]) and x.dtype in (jnp.bfloat16, jnp.float16)
            and k % block == 0 and (w.ndim == 2 or n % block == 0))


def _mosaic_dequant_fills(x, w) -> bool:
    """The default route's test: M within DEQUANT_KERNEL_MAX_M and tiles for every SM (q_b and W_UK / W_UV at the
    seed prefill; not q_a / kv_a, whose few long-K tiles XLA's GEMM runs faster)."""
    m, rows = x.shape[0], w.shape[-2] * (w.shape[0] if w.ndim == 3 else 1)
    tiles = cdiv(m, fp8_matmul_mgpu.dequant_tile_m(m)) * cdiv(rows, fp8_matmul_mgpu.BLOCK)
    return m <= DEQUANT_KERNEL_MAX_M and tiles >= H100_SMS


def _route(x, w, block, transpose_w, activations, block_sizes, backend, interp) -> str:
    """Which path a call takes: "mosaic_dequant" or "dequantized" (bf16 activations from DEQUANTIZE_MIN_M tokens, no
    backend or block sizes asked for: the Mosaic kernel on a GPU where it applies and fills the GPU, else XLA),
    "mosaic" (FP8 x FP8), "mosaic_weight_only" or "triton". A "mosaic" default sends only the calls a Mosaic kernel
    covers there; asked for by name, a call it does not cover is an error."""
    explicit = backend is not None or block_sizes is not None  # block sizes name their backend too
    if not _use_fp8_activations(activations, x.shape[0]) and x.shape[0] >= DEQUANTIZE_MIN_M and not explicit:
        kernel = (not interp and DEFAULT_BACKEND["fp8_matmul"] == "mosaic" and _mosaic_dequant_fills(x, w)
                  and _mosaic_dequant_applies(x, w, block, transpose_w, activations))
        return "mosaic_dequant" if kernel else "dequantized"
    if resolve_backend("fp8_matmul", backend, block_sizes, MosaicBlockSizes, interp) == "triton":
        return "triton"
    if _mosaic_applies(x, w, block, transpose_w, activations):
        return "mosaic"
    if _mosaic_weight_only_applies(x, w, block, transpose_w, activations):
        return "mosaic_weight_only"
    if _mosaic_dequant_applies(x, w, block, transpose_w, activations):
        return "mosaic_dequant"
    if explicit:
        raise ValueError("fp8_matmul backend='mosaic' runs x @ w^T with HF-layout w and 128-blocks: the "
                         "FP8-activation path (2-D x and w; activations='fp8', or 'auto' with M >= 128), the "
                         "weight-only one (16-bit x, M <= 128, N a multiple of 64, K of 128, grouped w too) and the "
                         "dequantising one (16-bit 2-D x, M >= 128, K a multiple of 128, grouped w with N of 128): "
                         "use backend='triton'")
    return "triton"


def _check_shapes(x, w, w_scale, block, transpose_w) -> tuple[int, int, int]:
    """(groups, N, K) of a valid call (groups 1 for a 2-D w); a clear error otherwise."""
    if w.dtype != E4M3:
        raise ValueError(f"fp8_matmul needs float8_e4m3fn weights, got {w.dtype}")
    if w.ndim not in (2, 3) or x.ndim not in (2, 3):
        raise ValueError(f"fp8_matmul: x [M, K] / [M, G, K] and w [N, K] / [G, N, K], got x {x.shape}, w {w.shape}")
    if block < 16 or block & (block - 1):
        raise ValueError(f"fp8_matmul: the scale block must be a power of two >= 16, got {block}")
    g = w.shape[0] if w.ndim == 3 else 1
    n, k = (w.shape[-2], w.shape[-1]) if transpose_w else (w.shape[-1], w.shape[-2])
    if x.shape[-1] < k or (x.ndim == 3 and (w.ndim != 3 or x.shape[1] != g)):
        raise ValueError(f"fp8_matmul: x {x.shape} does not match w {w.shape} (transpose_w={transpose_w})")
    expect_scale = (*w.shape[:-2], cdiv(w.shape[-2], block), cdiv(w.shape[-1], block))
    if tuple(w_scale.shape) != expect_scale:
        raise ValueError(f"fp8_matmul: scale {w_scale.shape} does not match w {w.shape} in {block}-blocks")
    return g, n, k


def _tile(size: int, cap: int) -> int:
    """Largest of cap, cap/2, ..., 16 dividing `size`; 16 when none does (the caller pads to it)."""
    t = cap
    while t > 16 and size % t:
        t //= 2
    return t


@functools.partial(jax.jit, static_argnames=("block", "transpose_w", "activations", "block_sizes", "backend",
                                             "interpret"))
def fp8_matmul(x, w, w_scale, *, block: int = 128, transpose_w: bool = True, activations: str = "auto",
               block_sizes: BlockSizes | MosaicBlockSizes | None = None, backend: str | None = None,
               interpret: bool | None = None):
    """x @ dequant(w)^T (or x @ dequant(w) with transpose_w=False) in x's dtype; see the module docstring.
    x's last axis may be wider than w's K: its leading K columns are the operand (MLA's W_UK takes q_nope as the
    window of q; the Triton kernel reads it in place).

    activations: "auto" (bf16 x with FP8 weights below 128 tokens, FP8 x at 128 and above), "bf16" or "fp8".
    bf16 activations at M >= DEQUANTIZE_MIN_M take the dequantised path (the Mosaic dequantising kernel on a GPU
    where it fills the chip, else XLA's GEMM on the widened weight) unless a backend or block sizes ask for a
    kernel.
    backend: "triton" (every layout) or "mosaic" (fp8_matmul_mgpu.py, HF-layout weights with 128-blocks: FP8 x FP8
    wgmma on the FP8-activation path for a 2-D x and w, the weight-only kernel for 16-bit x of <= 128 tokens with N
    a multiple of 64, grouped weights included, the dequantising kernel for 16-bit 2-D x of more tokens, K a
    multiple of 128); None: the backend that block_sizes belong to, else common.DEFAULT_BACKEND.
    """
    interp = resolve_interpret(interpret)
    g, n, k = _check_shapes(x, w, w_scale, block, transpose_w)
    x_wide, x = x, x[..., :k]  # a wider x: its leading K columns (read in place by the Triton kernel, else sliced)
    m = x.shape[0]
    if m == 0:  # no tokens (an empty batch): nothing to launch
        return jnp.zeros((0, g, n) if w.ndim == 3 else (0, n), x.dtype)
    fp8_act = _use_fp8_activations(activations, m)
    route = _route(x, w, block, transpose_w, activations, block_sizes, backend, interp)
    if route == "dequantized":
        return _dequantized(x, w, w_scale, block=block, transpose_w=transpose_w)
    if route == "mosaic":
        return _mosaic(x, w, w_scale, block=block, transpose_w=transpose_w, activations=activations,
                       block_sizes=block_sizes or MosaicBlockSizes(), interpret=interp)
    if route == "mosaic_dequant":
        return fp8_matmul_mgpu.dequant_product(x, w, w_scale, block_sizes=block_sizes, interpret=interp)
    if route == "mosaic_weight_only":
        return fp8_matmul_mgpu.weight_only_products(x, [(w, w_scale)], block_sizes=block_sizes, interpret=interp)[0]
    bs = block_sizes or BlockSizes()
    grouped = w.ndim == 3
    w3 = w if grouped else w[None]
    s3 = (w_scale if grouped else w_scale[None]).astype(jnp.float32)
    shared_x = x.ndim == 2
    # K tiles: one scale block each at most; the FP8-activation path quantises whole `block`-channel groups
    if fp8_act and block > 128:
        raise ValueError(f"fp8_matmul: FP8 activations need a scale block <= 128, got {block}")
    bk = block if fp8_act else _tile(k, min(block, 128))
    bn = _tile(n, min(bs.block_n, block))
    k_pad, n_pad = cdiv(k, bk) * bk, cdiv(n, bn) * bn
    bm = min(bs.block_m, max(16, next_pow2(m)))
    m_pad = cdiv(m, bm) * bm
    # a wider x is read in place (its leading k_pad columns), unless K needs zero columns or x is quantised first
    x3 = x_wide if not fp8_act and k_pad == k else pad_to(x, x.ndim - 1, k_pad)
    x3 = pad_to(x3[:, None] if shared_x else x3, 0, m_pad)
    if transpose_w:
        w3 = pad_to(pad_to(w3, 1, n_pad), 2, k_pad)  # a copy only for sizes that are not multiples of 16
    else:
        w3 = pad_to(pad_to(w3, 1, k_pad), 2, n_pad)
    k_tiles, n_tiles, m_tiles = k_pad // bk, n_pad // bn, m_pad // bm
    want = bs.k_splits or (1 if fp8_act else max(1, cdiv(2 * H100_SMS, m_tiles * g * n_tiles)))
    splits = max(d for d in range(1, min(want, k_tiles) + 1) if k_tiles % d == 0)  # equal, static trip counts
    out_dtype = x.dtype if splits == 1 else jnp.float32
    kernel = functools.partial(_kernel, bk=bk, bn=bn, block=block, tiles_per_split=k_tiles // splits,
                               transpose_w=transpose_w, fp8_act=fp8_act, native_fp8=not interp)
    x_map = (lambda i, j, t, s: (i, 0, 0)) if shared_x else (lambda i, j, t, s: (i, j, 0))
    w_block = (None, bn, k_pad) if transpose_w else (None, k_pad, bn)
    w_map = (lambda i, j, t, s: (j, t, 0)) if transpose_w else (lambda i, j, t, s: (j, 0, t))
    x_specs, x_args = [pl.BlockSpec((bm, None, k_pad), x_map)], [x3]
    if fp8_act:  # DeepSeek's act_quant as one fused XLA pass; the kernel reads e4m3 x and its per-block scales
        xq, xs = quantize_activations(x3, block)
        x_specs.append(pl.BlockSpec((bm, None, xs.shape[-1]), x_map))
        x_args = [xq, xs]
    out = pl.pallas_call(
        kernel,
        grid=(m_tiles, g, n_tiles, splits),
        in_specs=[
            *x_specs,
            pl.BlockSpec(w_block, w_map),
            pl.BlockSpec((None, *s3.shape[1:]), lambda i, j, t, s: (j, 0, 0)),
        ],
        out_specs=pl.BlockSpec((None, bm, None, bn), lambda i, j, t, s: (s, i, j, t)),
        out_shape=jax.ShapeDtypeStruct((splits, m_pad, g, n_pad), out_dtype),
        compiler_params=pltriton.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
        interpret=interp,
        name="fp8_matmul",
    )(*x_args, w3, s3)
    y = out[0] if splits == 1 else out.sum(0).astype(x.dtype)
    y = y[:m, :, :n]
    return y if grouped else y[:, 0]


@functools.partial(jax.jit, static_argnames=("block", "activations", "block_sizes", "interpret"))
def fp8_matmul_parts(x, w, w_scale, *, block: int = 128, activations: str = "auto",
                     block_sizes: BlockSizes | MosaicBlockSizes | None = None, interpret: bool | None = None):
    """`fp8_matmul`'s x [M, K] @ dequant(w)^T (w [N, K]) as its launch leaves it: [S, M, N] whose sum over the
    first axis (`sum_parts`) is the product. Where the call takes the Mosaic weight-only route (the GPU default at
    decode sizes) the kernel's split-K partial sums, float32 for S > 1; else [1, M, N], the product itself. For a
    consumer that adds the parts as it reads them, or that waits on the launch without a pass of its own (MLA's
    decode steps: the next step's first launch takes the previous o_proj's parts as an operand)."""
    interp = resolve_interpret(interpret)
    if x.ndim != 2 or w.ndim != 2:
        raise ValueError(f"fp8_matmul_parts: x [M, K] and w [N, K], got x {x.shape}, w {w.shape}")
    _, _, k = _check_shapes(x, w, w_scale, block, True)
    if x.shape[0] and _route(x[:, :k], w, block, True, activations, block_sizes, None, interp) == "mosaic_weight_only":
        return fp8_matmul_mgpu.weight_only_parts(x[:, :k], [(w, w_scale)], block_sizes=block_sizes,
                                                 interpret=interp)[:, :, 0]
    return fp8_matmul(x, w, w_scale, block=block, activations=activations, block_sizes=block_sizes,
                      interpret=interpret)[None]


def _shared_x_weights(name: str, x, weights, scales, block: int):
    """Checks of weights that all multiply x [M, K] (one scale each, every weight's K that of x); as tuples."""
    weights, scales = tuple(weights), tuple(scales)
    if len(weights) != len(scales) or not weights:
        raise ValueError(f"{name}: one scale per weight, at least one weight; got {len(weights)} / {len(scales)}")
    for w, sc in zip(weights, scales):
        _check_shapes(x, w, sc, block, True)
        if w.shape[-1] != x.shape[-1]:  # one x for all: no window of a wider x here
            raise ValueError(f"{name}: x {x.shape} does not match w {w.shape}: every weight's K must be x's")
    return weights, scales


def _one_weight_only_launch(x, weights, block, activations, block_sizes, backend, interp) -> bool:
    """Whether the Mosaic weight-only kernel takes x with every weight (then one launch runs them all). No tokens:
    no launch (routing would call an empty "mosaic" call an error)."""
    return x.shape[0] > 0 and all(_route(x, w, block, True, activations, block_sizes, backend, interp)
                                  == "mosaic_weight_only" for w in weights)


@functools.partial(jax.jit, static_argnames=("block", "activations", "block_sizes", "backend", "interpret"))
def fp8_matmuls(x, weights, scales, *, block: int = 128, activations: str = "auto",
                block_sizes: BlockSizes | MosaicBlockSizes | None = None, backend: str | None = None,
                interpret: bool | None = None):
    """x @ dequant(w_i)^T for several HF-layout weights that multiply the same x [M, K] (MLA's q_a and kv_a): one
    Mosaic weight-only launch for all of them where that kernel takes every one (the GPU default at decode sizes:
    one launch and one split-K sum instead of one each), else `fp8_matmul` per weight. Returns a tuple."""
    weights, scales = _shared_x_weights("fp8_matmuls", x, weights, scales, block)
    interp = resolve_interpret(interpret)
    if _one_weight_only_launch(x, weights, block, activations, block_sizes, backend, interp):
        return tuple(fp8_matmul_mgpu.weight_only_products(x, list(zip(weights, scales)), block_sizes=block_sizes,
                                                          interpret=interp))
    # one call each; XLA's dot merger would run dequantised-path GEMMs as one, on the widened weights concatenated
    # anew at every call (a copy of them all), so each call after the first gets x through an optimization barrier
    return tuple(fp8_matmul(x if i == 0 else jax.lax.optimization_barrier(x), w, sc, block=block,
                            activations=activations, block_sizes=block_sizes, backend=backend, interpret=interpret)
                 for i, (w, sc) in enumerate(zip(weights, scales)))


@functools.partial(jax.jit, static_argnames=("block", "block_sizes", "interpret"))
def fp8_matmuls_side_by_side(x, weights, scales, *, block: int = 128, block_sizes: MosaicBlockSizes | None = None,
                             after=None, interpret: bool | None = None):
    """`fp8_matmuls`' one-launch products (bf16 activations) unsummed and side by side: [S, M, sum N_i] split-K
    partial sums (float32 for S > 1; S = 1: the products in x's dtype) from one Mosaic weight-only launch, for a
    consumer that adds them as it reads them (`update_mla_cache`: no pass of their own). None where that kernel does
    not take every weight (use `fp8_matmuls`), e.g. on the CPU (interpret mode picks the Triton kernel) or beyond
    128 tokens; weights [N_i, K] only. `after`: an array the launch waits for without reading it (an operand
    only: the GPU runs the launch after its producer; a decode step's first launch after the previous step's
    output, with no pass of its own to tie them)."""
    weights, scales = _shared_x_weights("fp8_matmuls_side_by_side", x, weights, scales, block)
    interp = resolve_interpret(interpret)
    if any(w.ndim != 2 for w in weights) or not _one_weight_only_launch(x, weights, block, "bf16", block_sizes,
                                                                         None, interp):
        return None
    return fp8_matmul_mgpu.weight_only_parts(x, list(zip(weights, scales)), block_sizes=block_sizes, interpret=interp,
                                             after=() if after is None else (after,))[:, :, 0]
