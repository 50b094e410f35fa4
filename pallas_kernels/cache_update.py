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
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.common import quantize_rows_int8, resolve_interpret


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
    full = lambda x: pl.BlockSpec(x.shape, lambda i: (0,) * x.ndim)
    out = pl.pallas_call(
        functools.partial(_kernel, quantize=quantize),
        grid=(t,),
        in_specs=[pl.BlockSpec((1, d), lambda i: (i, 0)), pl.BlockSpec((1,), lambda i: (i,)),
                  pl.BlockSpec((1,), lambda i: (i,)), *map(full, caches)],
        out_specs=[full(c) for c in caches],
        out_shape=[jax.ShapeDtypeStruct(c.shape, c.dtype) for c in caches],
        input_output_aliases={3 + i: i for i in range(len(caches))},
        compiler_params=pltriton.CompilerParams(num_warps=1, num_stages=1),
        interpret=resolve_interpret(interpret),
        name="update_cache",
    )(rows, jnp.asarray(slots, jnp.int32), jnp.asarray(positions, jnp.int32), *caches)
    return tuple(out) if quantize else out[0]


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
