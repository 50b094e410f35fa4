"""Writing new rows into a preallocated KV cache in place (the cache buffer is aliased to the output).

One program per new token reads its (slot, position) and stores its row at cache[slot, position]; tokens whose
position is out of range (padding) write nothing. Used for the MLA `kv_cache` / `pe_cache` and any
[slots, S, D] cache (GQA K/V with heads folded into D). Follows the in-kernel slot mapping of vLLM's
`reshape_and_cache` / `concat_and_cache_mla`, without paging.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.common import resolve_interpret


def _kernel(rows_ref, slot_ref, pos_ref, cache_in_ref, cache_ref):
    del cache_in_ref  # aliased to cache_ref
    slot, pos = slot_ref[0], pos_ref[0]
    seq_len = cache_ref.shape[1]
    ok = (pos >= 0) & (pos < seq_len) & (slot >= 0) & (slot < cache_ref.shape[0])

    @pl.when(ok)
    def _():
        cache_ref[slot, pl.ds(pos, 1), :] = rows_ref[...].astype(cache_ref.dtype)


@functools.partial(jax.jit, static_argnames=("interpret",), donate_argnames=("cache",))
def update_cache(cache, rows, slots, positions, *, interpret: bool | None = None):
    """cache [B, S, D] (donated), rows [T, D], slots / positions [T] int32 -> cache with cache[slots[t], positions[t]]
    = rows[t]; rows with a position outside [0, S) are skipped."""
    t, d = rows.shape
    if cache.ndim != 3 or cache.shape[2] != d:
        raise ValueError(f"update_cache needs cache [B, S, {d}] for rows [T, {d}], got {cache.shape}")
    if t == 0:
        return cache
    return pl.pallas_call(
        _kernel,
        grid=(t,),
        in_specs=[
            pl.BlockSpec((1, d), lambda i: (i, 0)),
            pl.BlockSpec((1,), lambda i: (i,)),
            pl.BlockSpec((1,), lambda i: (i,)),
            pl.BlockSpec(cache.shape, lambda i: (0, 0, 0)),
        ],
        out_specs=pl.BlockSpec(cache.shape, lambda i: (0, 0, 0)),
        out_shape=jax.ShapeDtypeStruct(cache.shape, cache.dtype),
        input_output_aliases={3: 0},
        compiler_params=pltriton.CompilerParams(num_warps=1, num_stages=1),
        interpret=resolve_interpret(interpret),
        name="update_cache",
    )(rows, jnp.asarray(slots, jnp.int32), jnp.asarray(positions, jnp.int32), cache)


def update_cache_reference(cache, rows, slots, positions):
    """Plain jnp scatter; out-of-range positions are dropped."""
    positions = jnp.where((positions >= 0) & (positions < cache.shape[1]), positions, cache.shape[1])
    return cache.at[slots, positions].set(rows.astype(cache.dtype), mode="drop")
