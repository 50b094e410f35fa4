"""update_cache against its jnp reference: in place, ragged slots, padding rows dropped, nothing else touched."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import update_cache, update_cache_reference
from pallas_kernels.lowering import export_for_h100


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("slots,positions", [
    ([0], [0]),  # one row
    ([0, 0, 2, 2, 2, 1, 0], [0, 1, 5, 6, 39, 40, -1]),  # history offsets, last position, padding past the end
    ([1] * 7, list(range(11, 18))),  # odd count, one request
])
def test_matches_reference(dtype, slots, positions):
    rng = np.random.default_rng(len(slots))
    cache = jnp.asarray(rng.standard_normal((3, 40, 64)), dtype)  # fresh random contents: untouched rows must stay
    rows = jnp.asarray(rng.standard_normal((len(slots), 64)), dtype)
    slots, positions = jnp.asarray(slots, jnp.int32), jnp.asarray(positions, jnp.int32)
    want = np.asarray(update_cache_reference(cache, rows, slots, positions), np.float32)
    got = np.asarray(update_cache(jnp.array(cache), rows, slots, positions, interpret=True), np.float32)
    np.testing.assert_array_equal(got, want)


def test_empty_and_shape_errors():
    cache = jnp.ones((2, 8, 16))
    np.testing.assert_array_equal(np.asarray(update_cache(jnp.array(cache), jnp.zeros((0, 16)), jnp.zeros(0, jnp.int32),
                                                          jnp.zeros(0, jnp.int32))), np.asarray(cache))
    with pytest.raises(ValueError, match="update_cache needs cache"):
        update_cache(cache, jnp.zeros((1, 8)), jnp.zeros(1, jnp.int32), jnp.zeros(1, jnp.int32))


def test_lowers_for_h100():
    S = jax.ShapeDtypeStruct
    fn = functools.partial(update_cache, interpret=False)
    text = export_for_h100(fn, S((16, 512, 512), jnp.bfloat16), S((16, 512), jnp.bfloat16), S((16,), jnp.int32),
                           S((16,), jnp.int32))
    assert "update_cache" in text


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_int8_rows_with_scales(dtype):
    """An int8 cache: rows quantised per row in the kernel (absmax / 127), the scales written beside them; the
    dequantised rows are within half a step of the input, and untouched rows keep their contents."""
    rng = np.random.default_rng(3)
    cache = jnp.asarray(rng.integers(-127, 128, (3, 40, 64)), jnp.int8)
    scales = jnp.asarray(rng.random((3, 40)), jnp.float32)
    rows = jnp.asarray(rng.standard_normal((7, 64)) * rng.random((7, 1)) * 10, dtype)
    slots = jnp.asarray([0, 0, 2, 2, 2, 1, 0], jnp.int32)
    positions = jnp.asarray([0, 1, 5, 6, 39, 40, -1], jnp.int32)
    want = update_cache_reference(cache, rows, slots, positions, scales=scales)
    got = update_cache(jnp.array(cache), rows, slots, positions, scales=jnp.array(scales), interpret=True)
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), rtol=1e-6)
    kept = (np.asarray(positions) >= 0) & (np.asarray(positions) < 40)
    at = (slots[kept], positions[kept])
    back = np.asarray(got[0], np.float32)[at] * np.asarray(got[1])[at][:, None]
    x = np.asarray(rows, np.float32)[kept]
    assert np.all(np.abs(back - x) <= np.abs(x).max(-1, keepdims=True) / 127 * 0.5 + 1e-6)
    with pytest.raises(ValueError, match="needs its per-row `scales`"):
        update_cache(cache, rows, slots, positions)
    with pytest.raises(ValueError, match="needs an int8 cache and scales of shape"):
        update_cache(jnp.zeros((3, 40, 64)), rows, slots, positions, scales=scales)


def test_paged_cache():
    """A paged cache [pages, page_size, D] written through a block table: each (request, position) lands in row
    position % page_size of page table[request, position // page_size]; positions past the table are dropped."""
    rng = np.random.default_rng(4)
    page_size, num_pages = 8, 10
    table = jnp.asarray(rng.permutation(num_pages)[:9].reshape(3, 3), jnp.int32)
    cache = jnp.asarray(rng.standard_normal((num_pages, page_size, 32)), jnp.float32)
    slots = jnp.asarray([0, 1, 1, 2, 2, 2, 0], jnp.int32)
    positions = jnp.asarray([0, 7, 8, 23, 11, 24, 5], jnp.int32)  # 24: past the table's 3 pages
    rows = jnp.asarray(rng.standard_normal((7, 32)), jnp.float32)
    got = np.asarray(update_cache(jnp.array(cache), rows, slots, positions, block_table=table, interpret=True))
    want = np.array(cache)
    for t, (r, p) in enumerate(zip(np.asarray(slots), np.asarray(positions))):
        if p < 3 * page_size:
            want[np.asarray(table)[r, p // page_size], p % page_size] = np.asarray(rows)[t]
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(
        np.asarray(update_cache_reference(cache, rows, slots, positions, block_table=table)), want)


def test_int8_and_paged_lower_for_h100():
    S = jax.ShapeDtypeStruct
    fn = functools.partial(update_cache, interpret=False)
    text = export_for_h100(lambda c, r, s, p, sc, t: fn(c, r, s, p, scales=sc, block_table=t),
                           S((300, 64, 512), jnp.int8), S((16, 512), jnp.bfloat16), S((16,), jnp.int32),
                           S((16,), jnp.int32), S((300, 64), jnp.float32), S((16, 18), jnp.int32))
    assert "update_cache" in text
