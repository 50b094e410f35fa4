"""Helpers shared by the kernels: the one place that decides compiled Pallas vs interpret mode."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


# Streaming multiprocessors of the H100 the kernels' split heuristics fill (k_splits, grid sizes).
H100_SMS = 132
# Shared memory one H100 program (thread block) may take, bytes: 227 KiB (Mosaic GPU's max_smem_bytes for sm_90a).
H100_SMEM_BYTES = 232448


def on_gpu() -> bool:
    return jax.default_backend() in ("gpu", "cuda", "rocm")


def resolve_interpret(interpret: bool | None) -> bool:
    """Compiled Pallas (Triton) on a GPU, the Pallas interpreter elsewhere; `interpret=True` forces the interpreter."""
    if interpret is None:
        return not on_gpu()
    return bool(interpret)


# Which Pallas GPU backend each kernel uses when the caller does not say (backend=None, no block sizes); the one
# place to flip. Measured on one H100 (bench/RESULTS.md, 2026-11-25): fp8_matmul's Mosaic FP8 x FP8 kernel beat the
# Triton one at every R1 projection at 704 tokens (o_proj 0.295 vs 0.520 ms, q_b 0.126 vs 0.166), so it is the
# default for the FP8-activation path; its weight-only kernel (2-D weights) beat the Triton one at 16 tokens at R1's
# o_proj (49 vs ~56 us) and q_a (9.3 vs 12.4), tied at q_b (20.2 vs 20.0) and lost at kv_a (9.1 vs 8.2; fp8_tune.py
# --grid mosaic, 2026-11-26), so it is the default there too; per-head W_UV (HF rows) takes it as well (7.5 vs 9.3
# us per call, 2026-11-26), W_UK (its contracted dim as rows) stays on Triton.
# mla_decode's Mosaic kernel (scores once per tile, P shared between its two warpgroups) reads the cache at
# 2.27 TB/s at B=64 L=4096 vs 0.76 for the Triton one (bench/kernels.py, b193faa), and is faster at the seed case
# (14.8 vs 19.9 us of GPU kernel time).
# sage_attention ("auto": by request length, sage_attention.auto_backend): its Mosaic kernel wins from 256 tokens per
# request, ties at 128 and loses below, where its 128-row programs are mostly padding (16k packed tokens in equal
# requests, 16 heads, causal, Q quantised in the kernel, 2026-11-26: D 128 Mosaic / Triton ms 0.31 / 0.37 at 256
# tokens per request, 0.30 / 0.40 at 512, 0.32 / 0.49 at 1024, 2.0 / 3.1 at 16384, 0.37 / 0.37 at 128, 0.50 / 0.40
# at 64; MLA's D 192: 0.38 / 0.47 at 256, 0.38 / 0.59 at 1024, 0.68 / 1.15 at 4096). GPU time with the passes
# around the kernels, Mosaic / Triton (2026-11-26, eleventh session): MLA's 128 heads, D 192 / 128 as parts: the
# seed's prefill (64 / 128 / 256 / 256 new tokens on 512 / 0 / 0 / 256 cached) 0.70x, 4 x 128 on 512 cached 0.70x,
# 8 x 128 0.91x, 16 x 64 1.23x, 32 x 32 1.71x; D 128, 16 heads: 128 x 128 1.00x, 32 x 128 1.02x, 64 x 256 0.84x,
# 16 x 128 on 512 cached 0.67x; so the crossover is 128 tokens per request.
# A "mosaic" default sends only the calls a Mosaic kernel covers there (fp8_matmul: FP8 activations, and weight-only
# calls on HF-layout weights, 2-D or per head, of <= 128 tokens; mla_decode: 16-bit caches, paged ones in pages of
# whole 64-row tiles; sage_attention: 16-bit V).
DEFAULT_BACKEND = {"sage_attention": "auto", "mla_decode": "mosaic", "fp8_matmul": "mosaic"}


def resolve_backend(kernel: str, backend: str | None, block_sizes=None, mosaic_sizes: type | None = None,
                    interpret: bool = False) -> str:
    """`backend`, else the backend that `block_sizes` belong to (an instance of `mosaic_sizes`: "mosaic", any other
    block sizes: "triton"), else the kernel's DEFAULT_BACKEND entry for compiled calls and "triton" in interpret
    mode (the Triton kernels cover every option; the Mosaic GPU interpreter runs each warpgroup as its own XLA
    computation, minutes for a layer's test: the Mosaic kernels' own tests name their backend). Block sizes of the
    other backend are an error. "auto" (sage_attention's default) is returned as is: the kernel decides from its
    inputs."""
    sized = block_sizes is not None and mosaic_sizes is not None
    if backend is None and sized:
        backend = "mosaic" if isinstance(block_sizes, mosaic_sizes) else "triton"
    backend = backend or ("triton" if interpret else DEFAULT_BACKEND[kernel])
    choices = ("triton", "mosaic", "auto") if DEFAULT_BACKEND[kernel] == "auto" else ("triton", "mosaic")
    if backend not in choices:
        raise ValueError(f"{kernel}: backend must be one of {choices}, got {backend!r}")
    if sized and isinstance(block_sizes, mosaic_sizes) != (backend == "mosaic"):
        raise ValueError(f"{kernel}: block_sizes {block_sizes} do not belong to backend {backend!r}")
    return backend


ATTENTION_IMPLS = ("pallas", "xla")


def resolve_attention_impl(attention_impl: str | None) -> str:
    """The models' one switch: "pallas" (compiled kernels on a GPU, interpret mode on CPU) or "xla" (plain XLA,
    only when asked for by name); None picks "pallas" on a GPU and "xla" elsewhere."""
    if attention_impl is None:
        return "pallas" if on_gpu() else "xla"
    if attention_impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {attention_impl!r}")
    return attention_impl


def as_parts(x) -> tuple:
    """An operand given whole or as a tuple of parts along its last axis -> the tuple of its parts."""
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def leading_columns(parts, widths) -> tuple:
    """Each of `parts` cut to its first widths[i] columns (last axis): a part may be wider than the operand's part
    it stands for (sage_attention's Q parts); no-op slices where the widths agree."""
    return tuple(x if x.shape[-1] == w else x[..., :w] for x, w in zip(parts, widths))


def broadcast_heads(x, heads: int):
    """x [..., 1 or heads, D] -> [..., heads, D]: a part with one head (MLA's rope key), shared by every head."""
    return jnp.broadcast_to(x, (*x.shape[:-2], heads, x.shape[-1]))


def concat_parts(x):
    """An operand given whole or in parts -> the whole array (a concatenation for parts; a part with one head, shared
    by every head like MLA's rope key, broadcast over the others' head axis, the second to last)."""
    parts = as_parts(x)
    if len(parts) == 1:
        return parts[0]
    heads = max(p.shape[-2] for p in parts)
    return jnp.concatenate([broadcast_heads(p, heads) for p in parts], axis=-1)


def quantize_rows_int8(x, eps: float = 1e-8):
    """int8 x (last axis) with one float32 scale per row: absmax / 127 (floored at eps / 127), rounded half up.
    Plain jnp: used by XLA-side passes and inside Triton kernels alike."""
    (q,), scale = quantize_parts_int8((x,), eps)
    return q, scale


def quantize_parts_int8(parts, eps: float = 1e-8):
    """`quantize_rows_int8` of the concatenation of `parts` along the last axis, without building it: (the int8
    parts, the shared float32 row scales)."""
    fs = [x.astype(jnp.float32) for x in parts]
    amax = jnp.maximum(functools.reduce(jnp.maximum, [jnp.max(jnp.abs(x), axis=-1) for x in fs]), eps)
    # codes from one multiply by the row's 127 / absmax, not a division by the scale: XLA rewrites a division by a
    # broadcast row into that multiply in some programs and not in others (on CPU: the unsharded MLA layer's but not
    # its shard_map'ed one), and the two round ties differently, so the same rows got different codes
    inv = 127.0 / amax
    return ([jnp.clip(jnp.floor(x * inv[..., None] + 0.5), -127.0, 127.0).astype(jnp.int8) for x in fs],
            amax / 127.0)


def online_softmax_step(s, m, l, acc, masked: bool, scale=1.0, shift: float = 0.0):
    """One online-softmax step in base 2, as the Mosaic GPU kernels run it: logits (s - shift) * scale (s [R, C],
    -inf where masked; scale a positive float or per-row [R] vector, applied inside the exponent's multiply-add, which
    also takes the constant `shift` out: see `int_scores`), the running max m [R] (of the scaled logits), sum l [R]
    and output acc [R, D]. Returns (p, m_new, l_new, acc rescaled, the rescale). masked=False promises every row of s
    a finite score (no -inf guard)."""
    m_new = jnp.maximum(m, (s.max(axis=1) - shift) * scale if shift else s.max(axis=1) * scale)
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
    scale_s = lax.broadcast_in_dim(scale, s.shape, [0]) if jnp.ndim(scale) else scale
    bias = m_safe + shift * scale if shift else m_safe  # per row: the shift's product rounds once a row, not a score
    p = jnp.exp2(s * scale_s - lax.broadcast_in_dim(bias, s.shape, [0]))
    corr = jnp.exp2(m - m_safe)
    return p, m_new, l * corr + p.sum(axis=1), acc * lax.broadcast_in_dim(corr, acc.shape, [0]), corr


# float32 spacing is 1 on [2^23, 2^24): ROUNDER + n is exact for integers |n| < 2^22, so adding it to a float rounds
# that float to an integer held in the low mantissa bits, and adding its bits to an int32 gives the float ROUNDER + n
ROUNDER = 1.5 * 2.0**23
ROUNDER_BITS = int(np.float32(ROUNDER).view(np.int32))


def int_scores(s_int, max_abs: int):
    """int32 scores (|s| <= max_abs) as float32 for `online_softmax_step(..., shift=)`: with max_abs < 2^22, their
    bits plus ROUNDER's read as floats are ROUNDER + s exactly, so one full-rate integer add stands in for the
    quarter-rate int -> float conversion and the exponent's multiply-add takes the shift out. Returns (s as floats,
    the shift to pass); beyond 2^22 the plain conversion and shift 0."""
    if max_abs >= 2**22:
        return s_int.astype(jnp.float32), 0.0
    return lax.bitcast_convert_type(s_int + ROUNDER_BITS, jnp.float32), ROUNDER


def rotate_half_split(x, c, s):
    """Half-split RoPE of x [..., R]: [lo c - hi s, hi c + lo s] with lo / hi its halves and c, s [..., R / 2]
    (broadcast against them), in float32, back in x's dtype. Plain jnp on arrays, as the Mosaic GPU kernels run it on
    registers."""
    half = x.shape[-1] // 2
    lo, hi = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([lo * c - hi * s, hi * c + lo * s], axis=-1).astype(x.dtype)


def smem(shape, dtype):
    """A shared-memory buffer laid out for TMA and wgmma: (8, row) tiles, swizzled by the row's bytes (<= 128)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    item = jnp.dtype(dtype).itemsize
    swizzle = min(128, shape[-1] * item)
    return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, swizzle // item)),
                                                plgpu.SwizzleTransform(swizzle)))


def segment_of(starts, idx, num_segments: int):
    """For each of `idx`, the segment s with starts[s] <= idx < starts[s + 1] (`starts` sorted; empty segments, whose
    start equals the next one's, are skipped), clipped to [0, num_segments - 1], int32. One compare-all fusion:
    jnp.searchsorted's default builds a while loop, which inside a jitted step costs a launch per iteration."""
    pos = jnp.searchsorted(starts, idx, side="right", method="compare_all")
    return jnp.clip(pos - 1, 0, num_segments - 1).astype(jnp.int32)


def segments(cu, total: int):
    """For `total` packed rows and cumulative lengths cu [B+1]: (request of each row, offset within it).
    Rows past cu[-1] are attributed to the last request with an offset past its end."""
    t = jnp.arange(total, dtype=jnp.int32)
    seg = segment_of(cu, t, cu.shape[0] - 1)
    return seg, t - cu[seg]


def next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def pow2_chunks(d: int) -> tuple[tuple[int, int], ...]:
    """(offset, width) power-of-two pieces of d, largest first: 192 -> ((0, 128), (128, 64))."""
    chunks, off = [], 0
    while off < d:
        w = 1 << ((d - off).bit_length() - 1)
        chunks.append((off, w))
        off += w
    return tuple(chunks)


def int_vector(x, n: int | None = None) -> bool:
    """Whether x is a 1-D integer array (of length n when given): the lengths and row indices the kernels take,
    checked on shapes and dtypes (a traced call cannot read their values)."""
    return jnp.ndim(x) == 1 and (n is None or jnp.shape(x)[0] == n) and jnp.issubdtype(jnp.result_type(x), jnp.integer)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def pad_to(x, axis: int, size: int):
    """`x` zero-padded at the end of `axis` to `size` (x itself when already that size)."""
    if x.shape[axis] == size:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad)
