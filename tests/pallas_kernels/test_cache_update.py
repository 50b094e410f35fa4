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
