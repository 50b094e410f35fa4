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
it normalises the latent, rotates k_pe and writes both caches, where the separate passes took four launches. It can
also normalise q_a's product (q_a_layernorm) on the way: at decode sizes both products come from one weight-only
launch as split-K partial sums side by side, which the kernel adds as it reads them (no pass of their own).
"""

from __future__ import annotations

import functools
import operator

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.common import (int_vector, pow2_chunks, quantize_parts_int8, quantize_rows_int8,
                                   resolve_interpret, rotate_half_split)

_F32 = jnp.float32
MLA_WARPS = 4  # update_mla_cache's warps per program


def _kernel(rows_ref, slot_ref, pos_ref, *refs, quantize: bool):
    # refs: the aliased inputs (cache[, scales]) then the outputs (cache[, scales])
    cache_ref = refs[len(refs) // 2]
    slot, pos = slot_ref[0], pos_ref[0]
    ok = (pos >= 0) & (pos < cache_ref.shape[1]) & (slot >= 0) & (slot < cache_ref.shape[0])

    @pl.when(ok)
    def _():
        chunks = pow2_chunks(rows_ref.shape[1])  # Triton's loads and stores are power-of-two wide: 72 = 64 + 8
        xs = [rows_ref[:, pl.ds(c0, w)] for c0, w in chunks]
        if quantize:
            xs, s = quantize_parts_int8(xs)  # [1, w] int8 each, [1] float32: one scale over the whole row
            refs[-1][slot, pl.ds(pos, 1)] = s
        for (c0, w), x in zip(chunks, xs):
            cache_ref[slot, pl.ds(pos, 1), pl.ds(c0, w)] = x.astype(cache_ref.dtype)


def _check_targets(name: str, slots, positions, tokens: int):
    """slots and positions must be [T] integers, one per row written (a shorter one would be read past its end)."""
    for what, x in (("slots", slots), ("positions", positions)):
        if not int_vector(x, tokens):
            raise ValueError(f"{name}: {what} must be [T] = [{tokens}] integers (one per row), got {jnp.shape(x)} "
                             f"{jnp.result_type(x)}")


def _whole(x):
    return pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)


def _in_place(kernel, name: str, tokens: int, specs, args, caches, *, num_warps: int, interpret, extra_out=(),
              per_token: int = 1):
    """`kernel` with `per_token` programs per token (grid (tokens,) or (tokens, per_token)) over `args` (read through
    `specs`) and `caches`, which are aliased to the outputs: written in place. extra_out: (ShapeDtypeStruct,
    BlockSpec) of outputs after the caches, which the kernel writes whole. Returns the caches and the extra outputs
    as a tuple."""
    return tuple(pl.pallas_call(
        kernel,
        grid=(tokens,) if per_token == 1 else (tokens, per_token),
        in_specs=[*specs, *map(_whole, caches)],
        out_specs=[*(_whole(c) for c in caches), *(spec for _, spec in extra_out)],
        out_shape=[*(jax.ShapeDtypeStruct(c.shape, c.dtype) for c in caches), *(shape for shape, _ in extra_out)],
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
    if rows.ndim != 2 or cache.ndim != 3 or cache.shape[2] != rows.shape[1]:
        raise ValueError(f"update_cache needs cache [B, S, D] and rows [T, D] (heads folded into D), got cache "
                         f"{cache.shape} and rows {rows.shape}")
    t, d = rows.shape
    _check_targets("update_cache", slots, positions, t)
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


def _rms_norm(x, sum_sq, width: int, weight, eps: float, dtype):
    """HF's RMSNorm of float32 x (values of `dtype`) whose row's sum of squares over `width` columns is sum_sq."""
    normed = (x * jax.lax.rsqrt(sum_sq / width + eps)).astype(dtype)
    return (weight.astype(_F32) * normed.astype(_F32)).astype(dtype)


def _mla_kernel(ckv_ref, w_ref, freq_ref, slot_ref, pos_ref, *refs, eps: float, rope_scale: float, dtype,
                quantize: bool, q_width: int, rope_out: bool):
    # refs: [q, its norm weight,] the aliased inputs (kv_cache, pe_cache[, kv_scale]), then the outputs: the same
    # caches[, the normalised q][, the tokens' (cos | sin)]
    q_ref, qw_ref, *refs = refs if q_width else (None, None, *refs)
    cs_out = refs.pop() if rope_out else None
    q_out = refs.pop() if q_width else None
    kv_ref, pe_ref, *scale_ref = refs[len(refs) // 2:]  # the caches as outputs (aliased: the same buffers)
    slot, pos = slot_ref[0], pos_ref[0]
    ok = (pos >= 0) & (pos < kv_ref.shape[1]) & (slot >= 0) & (slot < kv_ref.shape[0])
    lat, half = kv_ref.shape[-1], pe_ref.shape[-1] // 2
    first = ckv_ref.shape[-1] - lat - 2 * half  # kv_a's product: the trailing L + R columns

    def row(ref, col, width):  # columns [col, col + width) of a [S, 1, C] block of partial sums -> the product's
        return jnp.sum(ref[:, :, pl.ds(col, width)].astype(_F32), axis=0).astype(dtype).astype(_F32)  # [1, width]

    # with q, program (t, 0) normalises token t's q row (padding tokens too: their rows are dropped later) and
    # program (t, 1) writes its cache rows: two short programs where one did both in turn
    if q_width:
        @pl.when(pl.program_id(1) == 0)
        def _():
            pieces = [(off, w, row(q_ref, off, w)) for off, w in pow2_chunks(q_width)]  # power-of-two loads
            sum_sq = sum(jnp.sum(x * x, axis=-1, keepdims=True) for _, _, x in pieces)
            for off, w, x in pieces:
                q_out[:, pl.ds(off, w)] = _rms_norm(x, sum_sq, q_width, qw_ref[pl.ds(off, w)], eps, dtype)

    def cache_program():  # token t's cache rows and its rope table: program (t, 1) with q, the only one without
        c, s = _cos_sin(pos, freq_ref[...], rope_scale, dtype)  # [1, R / 2] each
        if rope_out:  # every token's, padding ones too (their q rows are computed and dropped later)
            cs_out[:, pl.ds(0, half)] = c
            cs_out[:, pl.ds(half, half)] = s

        @pl.when(ok)
        def _():
            x = row(ckv_ref, first, lat)
            latent = _rms_norm(x, jnp.sum(x * x, axis=-1, keepdims=True), lat, w_ref[...], eps, dtype)
            lo, hi = row(ckv_ref, first + lat, half), row(ckv_ref, first + lat + half, half)
            pe_ref[slot, pl.ds(pos, 1), pl.ds(0, half)] = (lo * c - hi * s).astype(dtype).astype(pe_ref.dtype)
            pe_ref[slot, pl.ds(pos, 1), pl.ds(half, half)] = (hi * c + lo * s).astype(dtype).astype(pe_ref.dtype)
            if quantize:
                q, scale = quantize_rows_int8(latent)
                kv_ref[slot, pl.ds(pos, 1), :] = q
                scale_ref[0][slot, pl.ds(pos, 1)] = scale
            else:
                kv_ref[slot, pl.ds(pos, 1), :] = latent.astype(kv_ref.dtype)

    pl.when(pl.program_id(1) == 1)(cache_program) if q_width else cache_program()


def _cos_sin(positions, inv_freq, rope_scale: float, dtype):
    """HF's RoPE tables at integer positions (one half of the half-split layout): cos / sin of positions x inv_freq
    in float32, times rope_scale, rounded to `dtype` (the model's tables are in its dtype)."""
    angles = jnp.asarray(positions).astype(_F32)[..., None] * inv_freq.astype(_F32)
    return [(f(angles) * rope_scale).astype(dtype).astype(_F32) for f in (jnp.cos, jnp.sin)]


def _as_parts(x):
    """[T, C] or split-K partial sums [S, T, C] -> [S, T, C]."""
    return x if x.ndim == 3 else x[None]


def _mla_parts(ckv, kv_cache, pe_cache, norm_weight, inv_freq, kv_scale, q, q_norm_weight):
    """Checks of update_mla_cache's operands: returns ckv and q (or None) as partial sums [S, T, C]."""
    parts = _as_parts(ckv)
    lat, rope = kv_cache.shape[-1], pe_cache.shape[-1]
    shapes_ok = (parts.ndim == 3 and parts.shape[2] >= lat + rope and kv_cache.ndim == 3 and rope % 2 == 0
                 and pe_cache.shape[:2] == kv_cache.shape[:2] and norm_weight.shape == (lat,)
                 and inv_freq.shape == (rope // 2,))
    if not shapes_ok:
        raise ValueError(f"update_mla_cache needs ckv [T, >= L + R] or [S, T, >= L + R], kv_cache [B, S, L], "
                         f"pe_cache [B, S, R] (R even), norm_weight [L], inv_freq [R / 2]; got ckv {ckv.shape}, "
                         f"kv_cache {kv_cache.shape}, pe_cache {pe_cache.shape}, norm_weight {norm_weight.shape}, "
                         f"inv_freq {inv_freq.shape}")
    if (kv_scale is not None) != (kv_cache.dtype == jnp.int8) or (
            kv_scale is not None and kv_scale.shape != kv_cache.shape[:2]):
        raise ValueError(f"update_mla_cache: an int8 kv_cache needs its [B, S] kv_scale and a 16 / 32-bit one "
                         f"none; got {kv_cache.dtype} with kv_scale {None if kv_scale is None else kv_scale.shape}")
    if (q is None) != (q_norm_weight is None):
        raise ValueError("update_mla_cache: q and q_norm_weight go together (q_a's product and q_a_layernorm's "
                         "weight); pass both or neither")
    if q is None:
        return parts, None
    q_parts = _as_parts(q)
    if (q_parts.ndim != 3 or q_norm_weight.ndim != 1 or q_parts.shape[2] < q_norm_weight.shape[0]
            or q_parts.shape[1] != parts.shape[1]):
        raise ValueError(f"update_mla_cache needs q [T, >= Q] or [S, T, >= Q] for q_norm_weight [Q], with ckv's T; "
                         f"got q {q.shape}, q_norm_weight {q_norm_weight.shape}, ckv {ckv.shape}")
    return parts, q_parts


@functools.partial(jax.jit, static_argnames=("eps", "rope_scale", "dtype", "rope_out", "interpret"),
                   donate_argnames=("kv_cache", "pe_cache", "kv_scale"))
def update_mla_cache(kv_cache, pe_cache, ckv, slots, positions, norm_weight, inv_freq, *, eps: float,
                     rope_scale: float = 1.0, dtype=None, kv_scale=None, q=None, q_norm_weight=None,
                     rope_out: bool = False, interpret: bool | None = None):
    """The MLA layer's cache write, in place, one launch: ckv [T, L + R] is kv_a's product [latent | k_pe] (or
    [S, T, L + R] split-K partial sums of it, added in float32 and rounded to `dtype`, default ckv's dtype; a wider
    ckv holds it in its trailing L + R columns); token t's rms_norm(latent) * norm_weight goes to
    kv_cache[slots[t], positions[t]] (kv_cache [B, S, L], donated; int8 with its [B, S] float32 row scales
    `kv_scale` when given, quantised as in `update_cache`) and k_pe, rotated (HF's half-split layout) at its
    position by the inverse frequencies inv_freq [R / 2] with cos / sin scaled by `rope_scale` (YaRN's attention
    factor), to pe_cache [B, S, R]. Numerics of HF's RMSNorm and RoPE in `dtype` (float32 statistics and products,
    rounded where HF rounds). Tokens whose position is outside [0, S) write nothing.

    q, q_norm_weight [Q]: q_a's product in the leading Q columns of q ([T, >= Q] or partial sums [S, T, >= Q]; the
    same array as ckv when one launch made both side by side), returned normalised (RMSNorm with q_norm_weight and
    eps) as [T, Q] in `dtype`, every token's row.

    rope_out: also return every token's RoPE table [T, R] float32, [cos | sin] of its position as k_pe was rotated
    (rounded to `dtype`, times rope_scale): the same rotation for the token's query (`mla_decode(q_pe_rope=)`).

    Returns (kv_cache, pe_cache[, kv_scale][, q][, rope table])."""
    parts, q_parts = _mla_parts(ckv, kv_cache, pe_cache, norm_weight, inv_freq, kv_scale, q, q_norm_weight)
    _check_targets("update_mla_cache", slots, positions, parts.shape[1])
    lat, half = kv_cache.shape[-1], pe_cache.shape[-1] // 2
    if not resolve_interpret(interpret) and (lat & (lat - 1) or half & (half - 1)):
        raise ValueError(f"update_mla_cache on GPU needs power-of-two latent and half-rope widths (Triton's loads, as "
                         f"mla_decode needs), got {lat} and {half}; the MLA layer's attention_impl='xla' takes others")
    dtype = jnp.dtype(dtype or ckv.dtype)
    t = parts.shape[1]
    caches = (kv_cache, pe_cache) + (() if kv_scale is None else (kv_scale,))
    q_width = 0 if q is None else q_norm_weight.shape[0]
    rope = pe_cache.shape[-1]
    if t == 0:
        return (caches + (() if q is None else (jnp.zeros((0, q_width), dtype),))
                + ((jnp.zeros((0, rope), _F32),) if rope_out else ()))
    tok = pl.BlockSpec((1,), lambda i, *_: (i,))
    rows = lambda x: pl.BlockSpec((x.shape[0], 1, x.shape[2]), lambda i, *_: (0, i, 0))  # noqa: E731  (token i's)
    freqs = inv_freq.astype(_F32)[None]
    specs = [rows(parts), _whole(norm_weight), _whole(freqs), tok, tok]
    args = [parts, norm_weight, freqs, jnp.asarray(slots, jnp.int32), jnp.asarray(positions, jnp.int32)]
    extra_out = ()
    if q is not None:
        specs += [rows(q_parts), _whole(q_norm_weight)]
        args += [q_parts, q_norm_weight]
        extra_out = ((jax.ShapeDtypeStruct((t, q_width), dtype), pl.BlockSpec((1, q_width), lambda i, *_: (i, 0))),)
    if rope_out:
        extra_out += ((jax.ShapeDtypeStruct((t, rope), _F32), pl.BlockSpec((1, rope), lambda i, *_: (i, 0))),)
    return _in_place(
        functools.partial(_mla_kernel, eps=eps, rope_scale=rope_scale, dtype=dtype, quantize=kv_scale is not None,
                          q_width=q_width, rope_out=rope_out),
        "update_mla_cache", t, specs, args, caches, num_warps=MLA_WARPS, interpret=interpret, extra_out=extra_out,
        per_token=2 if q_width else 1)


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
                               rope_scale: float = 1.0, dtype=None, kv_scale=None, q=None, q_norm_weight=None,
                               rope_out: bool = False):
    """Plain jnp: the partial sums added, HF's RMSNorm of the latent (and of q) and rotate-half RoPE of k_pe, then
    `update_cache_reference` into each cache. Same arguments and results as `update_mla_cache`."""
    parts, q_parts = _mla_parts(ckv, kv_cache, pe_cache, norm_weight, inv_freq, kv_scale, q, q_norm_weight)
    dtype = jnp.dtype(dtype or ckv.dtype)

    def product(p, cols):  # the partial sums' columns `cols` added in float32, rounded to dtype
        return functools.reduce(operator.add, [x[:, cols].astype(_F32) for x in p]).astype(dtype)

    def rms_norm(x, weight):
        x32 = x.astype(_F32)
        return _rms_norm(x32, jnp.sum(x32 * x32, axis=-1, keepdims=True), x.shape[-1], weight, eps, dtype)

    lat, half = kv_cache.shape[-1], pe_cache.shape[-1] // 2
    x = product(parts, slice(parts.shape[2] - lat - 2 * half, None))  # kv_a's product: the trailing columns
    latent = rms_norm(x[:, :lat], norm_weight)
    c, s = _cos_sin(positions, inv_freq, rope_scale, dtype)
    k_pe = rotate_half_split(x[:, lat:], c, s)
    pe_cache = update_cache_reference(pe_cache, k_pe, slots, positions)
    if kv_scale is None:
        out = (update_cache_reference(kv_cache, latent, slots, positions), pe_cache)
    else:
        kv_cache, kv_scale = update_cache_reference(kv_cache, latent, slots, positions, scales=kv_scale)
        out = (kv_cache, pe_cache, kv_scale)
    if q is not None:
        out += (rms_norm(product(q_parts, slice(0, q_norm_weight.shape[0])), q_norm_weight),)
    return out + ((jnp.concatenate([c, s], axis=-1),) if rope_out else ())
