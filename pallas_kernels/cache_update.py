"""Writing new rows into a preallocated KV cache in place (the cache buffers are aliased to the outputs).

One program per new token reads its (slot, position) and stores its row at cache[slot, position]; tokens whose
position is out of range (padding) write nothing. Used for the MLA `kv_cache` / `pe_cache` and any
[slots, S, D] cache (GQA K/V with heads folded into D). Follows the in-kernel slot mapping of vLLM's
`reshape_and_cache` / `concat_and_cache_mla`.

Two options on the same kernel:
- `scales`: an int8 cache with one float32 scale per cached row ([slots, S]); each row is quantised in the kernel
  (absmax / 127, `common.quantize_rows_int8`) as it is written. The MLA layer uses it for the 512-wide latent
  (`kv_cache`) while the 64-wide RoPE part (`pe_cache`) stays 16-bit; `mla_decode(..., kv_scale=)` reads it.
- `block_table`: a paged cache [pages, page_size, D]; request r's position p lives in page
  block_table[r, p // page_size] at row p % page_size (vLLM's layout). The (page, row) pairs are computed in XLA and
  the kernel writes them like (slot, position) pairs.

`update_mla_cache` is the MLA layer's whole cache write in one launch (vLLM's `concat_and_cache_mla` with the
latent's RMSNorm and the key's RoPE folded in): from kv_a's product [latent | k_pe], or its split-K partial sums,
it normalises the latent, rotates k_pe and writes both caches, where the separate passes took four launches.
"""

from __future__ import annotations

import functools
import operator

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.common import quantize_rows_int8, resolve_interpret

_F32 = jnp.float32


def _kernel(rows_ref, slot_ref, pos_ref, *refs, quantize: bool):
    # refs: the aliased inputs (cache[, scales]) then the outputs (cache[, scales])
    cache_ref = refs[len(refs) // 2]
    slot, pos = slot_ref[0], pos_ref[0]
    ok = (pos >= 0) & (pos < cache_ref.shape[1]) & (slot >= 0) & (slot < cache_ref.shape[0])

    @pl.when(ok)
    def _():
        if quantize:
            q, s = quantize_rows_int8(rows_ref[...])  # [1, D] int8, [1] float32
            cache_ref[slot, pl.ds(pos, 1), :] = q
            refs[-1][slot, pl.ds(pos, 1)] = s
        else:
            cache_ref[slot, pl.ds(pos, 1), :] = rows_ref[...].astype(cache_ref.dtype)


def _whole(x):
    return pl.BlockSpec(x.shape, lambda i: (0,) * x.ndim)


def _in_place(kernel, name: str, tokens: int, specs, args, caches, *, num_warps: int, interpret):
    """`kernel` with one program per token over `args` (read through `specs`) and `caches`, which are aliased to the
    outputs: written in place. Returns the caches as a tuple."""
    return tuple(pl.pallas_call(
        kernel,
        grid=(tokens,),
        in_specs=[*specs, *map(_whole, caches)],
        out_specs=[_whole(c) for c in caches],
        out_shape=[jax.ShapeDtypeStruct(c.shape, c.dtype) for c in caches],
        input_output_aliases={len(args) + i: i for i in range(len(caches))},
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=resolve_interpret(interpret),
        name=name,
    )(*args, *caches))


def paged_positions(block_table, slots, positions, page_size: int):
    """(request slot, position) pairs -> (page, row in page) pairs of a paged cache; positions outside the table
    (padding) map to row -1, which `update_cache` skips."""
    block_table = jnp.asarray(block_table, jnp.int32)
    slots, positions = jnp.asarray(slots, jnp.int32), jnp.asarray(positions, jnp.int32)
    capacity = block_table.shape[1] * page_size
    ok = (positions >= 0) & (positions < capacity) & (slots >= 0) & (slots < block_table.shape[0])
    page = block_table[jnp.clip(slots, 0, block_table.shape[0] - 1), jnp.clip(positions, 0, capacity - 1) // page_size]
    return jnp.where(ok, page, -1), jnp.where(ok, positions % page_size, -1)


@functools.partial(jax.jit, static_argnames=("interpret",), donate_argnames=("cache", "scales"))
def update_cache(cache, rows, slots, positions, *, scales=None, block_table=None, interpret: bool | None = None):
    """cache [B, S, D] (donated), rows [T, D], slots / positions [T] int32 -> cache with cache[slots[t], positions[t]]
    = rows[t]; rows with a position outside [0, S) are skipped.

    scales: with an int8 cache, its [B, S] float32 row scales (donated); rows are quantised per row and the call
    returns (cache, scales). block_table: [requests, pages per request] int32 for a paged cache [pages, page_size, D]
    (scales [pages, page_size]); slots then index the table's rows.
    """
    t, d = rows.shape
    if cache.ndim != 3 or cache.shape[2] != d:
        raise ValueError(f"update_cache needs cache [B, S, {d}] for rows [T, {d}], got {cache.shape}")
    quantize = scales is not None
    if quantize and (cache.dtype != jnp.int8 or scales.shape != cache.shape[:2]):
        raise ValueError(f"update_cache with scales needs an int8 cache and scales of shape {cache.shape[:2]}, got "
                         f"{cache.dtype} and {scales.shape}")
    if not quantize and cache.dtype == jnp.int8:
        raise ValueError("update_cache into an int8 cache needs its per-row `scales`")
    if block_table is not None:
        slots, positions = paged_positions(block_table, slots, positions, cache.shape[1])
    if t == 0:
        return (cache, scales) if quantize else cache
    caches = (cache, scales) if quantize else (cache,)
    tok = pl.BlockSpec((1,), lambda i: (i,))
    out = _in_place(functools.partial(_kernel, quantize=quantize), "update_cache", t,
                    [pl.BlockSpec((1, d), lambda i: (i, 0)), tok, tok],
                    [rows, jnp.asarray(slots, jnp.int32), jnp.asarray(positions, jnp.int32)], caches, num_warps=1,
                    interpret=interpret)
    return out if quantize else out[0]


def _mla_kernel(lat_ref, lo_ref, hi_ref, w_ref, freq_ref, slot_ref, pos_ref, *refs, eps: float, rope_scale: float,
                dtype, quantize: bool):
    # refs: the aliased inputs (kv_cache, pe_cache[, kv_scale]) then the outputs in the same order
    kv_ref, pe_ref, *scale_ref = refs[len(refs) // 2:]
    slot, pos = slot_ref[0], pos_ref[0]
    ok = (pos >= 0) & (pos < kv_ref.shape[1]) & (slot >= 0) & (slot < kv_ref.shape[0])

    @pl.when(ok)
    def _():
        def row(ref):  # [S, 1, C] partial sums -> the product's row [1, C], rounded to its dtype
            return jnp.sum(ref[...].astype(_F32), axis=0).astype(dtype).astype(_F32)

        x = row(lat_ref)
        normed = (x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)).astype(dtype)
        latent = (w_ref[...].astype(_F32) * normed.astype(_F32)).astype(dtype)
        c, s = _cos_sin(pos, freq_ref[...], rope_scale, dtype)
        lo, hi = row(lo_ref), row(hi_ref)
        half = lo.shape[-1]
        pe_ref[slot, pl.ds(pos, 1), pl.ds(0, half)] = (lo * c - hi * s).astype(dtype).astype(pe_ref.dtype)
        pe_ref[slot, pl.ds(pos, 1), pl.ds(half, half)] = (hi * c + lo * s).astype(dtype).astype(pe_ref.dtype)
        if quantize:
            q, scale = quantize_rows_int8(latent)
            kv_ref[slot, pl.ds(pos, 1), :] = q
            scale_ref[0][slot, pl.ds(pos, 1)] = scale
        else:
            kv_ref[slot, pl.ds(pos, 1), :] = latent.astype(kv_ref.dtype)


def _cos_sin(positions, inv_freq, rope_scale: float, dtype):
    """HF's RoPE tables at integer positions (one half of the half-split layout): cos / sin of positions x inv_freq
    in float32, times rope_scale, rounded to `dtype` (the model's tables are in its dtype)."""
    angles = jnp.asarray(positions).astype(_F32)[..., None] * inv_freq.astype(_F32)
    return [(f(angles) * rope_scale).astype(dtype).astype(_F32) for f in (jnp.cos, jnp.sin)]


def _mla_parts(ckv, kv_cache, pe_cache, norm_weight, inv_freq, kv_scale):
    """Checks of update_mla_cache's operands: returns ckv as partial sums [S, T, L + R]."""
    parts = ckv if ckv.ndim == 3 else ckv[None]
    lat, rope = kv_cache.shape[-1], pe_cache.shape[-1]
    shapes_ok = (parts.ndim == 3 and parts.shape[2] == lat + rope and kv_cache.ndim == 3 and rope % 2 == 0
                 and pe_cache.shape[:2] == kv_cache.shape[:2] and norm_weight.shape == (lat,)
                 and inv_freq.shape == (rope // 2,))
    if not shapes_ok:
        raise ValueError(f"update_mla_cache needs ckv [T, L + R] or [S, T, L + R], kv_cache [B, S, L], pe_cache "
                         f"[B, S, R] (R even), norm_weight [L], inv_freq [R / 2]; got ckv {ckv.shape}, kv_cache "
                         f"{kv_cache.shape}, pe_cache {pe_cache.shape}, norm_weight {norm_weight.shape}, inv_freq "
                         f"{inv_freq.shape}")
    if (kv_scale is not None) != (kv_cache.dtype == jnp.int8) or (
            kv_scale is not None and kv_scale.shape != kv_cache.shape[:2]):
        raise ValueError(f"update_mla_cache: an int8 kv_cache needs its [B, S] kv_scale and a 16 / 32-bit one "
                         f"none; got {kv_cache.dtype} with kv_scale {None if kv_scale is None else kv_scale.shape}")
    return parts


@functools.partial(jax.jit, static_argnames=("eps", "rope_scale", "dtype", "interpret"),
                   donate_argnames=("kv_cache", "pe_cache", "kv_scale"))
def update_mla_cache(kv_cache, pe_cache, ckv, slots, positions, norm_weight, inv_freq, *, eps: float,
                     rope_scale: float = 1.0, dtype=None, kv_scale=None, interpret: bool | None = None):
    """The MLA layer's cache write, in place, one launch: ckv [T, L + R] is kv_a's product [latent | k_pe] (or
    [S, T, L + R] split-K partial sums of it, added in float32 and rounded to `dtype`, default ckv's dtype); token
    t's rms_norm(latent) * norm_weight goes to kv_cache[slots[t], positions[t]] (kv_cache [B, S, L], donated; int8
    with its [B, S] float32 row scales `kv_scale` when given, quantised as in `update_cache`) and k_pe, rotated
    (HF's half-split layout) at its position by the inverse frequencies inv_freq [R / 2] with cos / sin scaled by
    `rope_scale` (YaRN's attention factor), to pe_cache [B, S, R]. Numerics of HF's RMSNorm and RoPE in `dtype`
    (float32 statistics and products, rounded where HF rounds). Tokens whose position is outside [0, S) write
    nothing. Returns (kv_cache, pe_cache[, kv_scale])."""
    parts = _mla_parts(ckv, kv_cache, pe_cache, norm_weight, inv_freq, kv_scale)
    dtype = jnp.dtype(dtype or ckv.dtype)
    s, t, _ = parts.shape
    lat, half = kv_cache.shape[-1], pe_cache.shape[-1] // 2
    caches = (kv_cache, pe_cache) + (() if kv_scale is None else (kv_scale,))
    if t == 0:
        return caches
    if lat % half:
        raise ValueError(f"update_mla_cache reads k_pe in blocks of R / 2 = {half}: L = {lat} must be a multiple")
    part = lambda width, col: pl.BlockSpec((s, 1, width), lambda i: (0, i, col))  # noqa: E731
    tok = pl.BlockSpec((1,), lambda i: (i,))
    freqs = inv_freq.astype(_F32)[None]
    return _in_place(
        functools.partial(_mla_kernel, eps=eps, rope_scale=rope_scale, dtype=dtype, quantize=kv_scale is not None),
        "update_mla_cache", t,
        [part(lat, 0), part(half, lat // half), part(half, lat // half + 1), _whole(norm_weight), _whole(freqs), tok,
         tok],
        [parts, parts, parts, norm_weight, freqs, jnp.asarray(slots, jnp.int32), jnp.asarray(positions, jnp.int32)],
        caches, num_warps=4, interpret=interpret)


def update_cache_reference(cache, rows, slots, positions, *, scales=None, block_table=None):
    """Plain jnp scatter; out-of-range positions are dropped. Same options and results as `update_cache`."""
    if block_table is not None:
        slots, positions = paged_positions(block_table, slots, positions, cache.shape[1])
    slots, positions = jnp.asarray(slots, jnp.int32), jnp.asarray(positions, jnp.int32)
    positions = jnp.where((positions >= 0) & (positions < cache.shape[1]) & (slots >= 0), positions, cache.shape[1])
    if scales is None:
        return cache.at[slots, positions].set(rows.astype(cache.dtype), mode="drop")
    q, s = quantize_rows_int8(rows)
    return cache.at[slots, positions].set(q, mode="drop"), scales.at[slots, positions].set(s, mode="drop")


def update_mla_cache_reference(kv_cache, pe_cache, ckv, slots, positions, norm_weight, inv_freq, *, eps: float,
                               rope_scale: float = 1.0, dtype=None, kv_scale=None):
    """Plain jnp: the partial sums added, HF's RMSNorm of the latent and rotate-half RoPE of k_pe, then
    `update_cache_reference` into each cache. Same arguments and results as `update_mla_cache`."""
    parts = _mla_parts(ckv, kv_cache, pe_cache, norm_weight, inv_freq, kv_scale)
    dtype = jnp.dtype(dtype or ckv.dtype)
    x = functools.reduce(operator.add, [p.astype(_F32) for p in parts]).astype(dtype)
    lat = kv_cache.shape[-1]
    x32 = x[:, :lat].astype(_F32)
    normed = (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)).astype(dtype)
    latent = (norm_weight.astype(_F32) * normed.astype(_F32)).astype(dtype)
    half = pe_cache.shape[-1] // 2
    lo, hi = x[:, lat:lat + half].astype(_F32), x[:, lat + half:].astype(_F32)
    c, s = _cos_sin(positions, inv_freq, rope_scale, dtype)
    k_pe = jnp.concatenate([lo * c - hi * s, hi * c + lo * s], axis=-1).astype(dtype)
    pe_cache = update_cache_reference(pe_cache, k_pe, slots, positions)
    if kv_scale is None:
        return update_cache_reference(kv_cache, latent, slots, positions), pe_cache
    kv_cache, kv_scale = update_cache_reference(kv_cache, latent, slots, positions, scales=kv_scale)
    return kv_cache, pe_cache, kv_scale
