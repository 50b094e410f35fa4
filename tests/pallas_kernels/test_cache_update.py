"""update_cache and update_mla_cache against their jnp references: in place, ragged slots, padding rows dropped,
nothing else touched."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import update_cache, update_cache_reference, update_mla_cache, update_mla_cache_reference
from pallas_kernels.lowering import export_for_h100


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("slots,positions,width", [
    ([0], [0], 64),  # one row
    ([0, 0, 2, 2, 2, 1, 0], [0, 1, 5, 6, 39, 40, -1], 64),  # history offsets, last position, padding past the end
    ([1] * 7, list(range(11, 18)), 64),  # odd count, one request
    ([0, 0, 2, 2, 2, 1, 0], [0, 1, 5, 6, 39, 40, -1], 72),  # a row width that is no power of two (64 + 8)
])
def test_matches_reference(dtype, slots, positions, width):
    rng = np.random.default_rng(len(slots))
    cache = jnp.asarray(rng.standard_normal((3, 40, width)), dtype)  # fresh random contents: untouched rows stay
    rows = jnp.asarray(rng.standard_normal((len(slots), width)), dtype)
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
    with pytest.raises(ValueError, match="update_cache needs cache"):  # rows with heads not folded into D
        update_cache(cache, jnp.zeros((1, 2, 8)), jnp.zeros(1, jnp.int32), jnp.zeros(1, jnp.int32))
    # one slot and one position per row, integers: a shorter array would be read past its end
    rows = jnp.zeros((3, 16))
    with pytest.raises(ValueError, match=r"slots must be \[T\] = \[3\] integers \(one per row\), got \(2,\)"):
        update_cache(cache, rows, jnp.zeros(2, jnp.int32), jnp.zeros(3, jnp.int32))
    with pytest.raises(ValueError, match=r"positions must be \[T\] = \[3\] integers .*float32"):
        update_cache(cache, rows, jnp.zeros(3, jnp.int32), jnp.zeros(3, jnp.float32))


@pytest.mark.parametrize("width", [512, 640])  # 640: five 128-wide KV heads folded into a row, no power of two
def test_lowers_for_h100(width):
    S = jax.ShapeDtypeStruct
    fn = functools.partial(update_cache, interpret=False)
    text = export_for_h100(fn, S((16, 512, width), jnp.bfloat16), S((16, width), jnp.bfloat16), S((16,), jnp.int32),
                           S((16,), jnp.int32))
    assert "update_cache" in text


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("width", [64, 40])  # 40: quantised in power-of-two pieces (32 + 8) with one row scale
def test_int8_rows_with_scales(dtype, width):
    """An int8 cache: rows quantised per row in the kernel (absmax / 127), the scales written beside them; the
    dequantised rows are within half a step of the input, and untouched rows keep their contents."""
    rng = np.random.default_rng(3)
    cache = jnp.asarray(rng.integers(-127, 128, (3, 40, width)), jnp.int8)
    scales = jnp.asarray(rng.random((3, 40)), jnp.float32)
    rows = jnp.asarray(rng.standard_normal((7, width)) * rng.random((7, 1)) * 10, dtype)
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
        update_cache(jnp.zeros((3, 40, width)), rows, slots, positions, scales=scales)


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


def _mla_case(rng, dtype, splits, int8=False, lat=32, rope=8):
    """Caches with fresh random contents (rows the call must leave alone), kv_a's product or its split-K partial
    sums (float32), a norm weight, YaRN-like inverse frequencies, and tokens with history offsets, the last
    position, a position past the end and a negative one (both dropped)."""
    kv = (jnp.asarray(rng.integers(-127, 128, (3, 40, lat)), jnp.int8) if int8
          else jnp.asarray(rng.standard_normal((3, 40, lat)), dtype))
    pe = jnp.asarray(rng.standard_normal((3, 40, rope)), dtype)
    slots = jnp.asarray([0, 0, 2, 2, 2, 1, 0], jnp.int32)
    positions = jnp.asarray([0, 1, 5, 6, 39, 40, -1], jnp.int32)
    shape = (7, lat + rope) if splits is None else (splits, 7, lat + rope)
    ckv = jnp.asarray(rng.standard_normal(shape) * 3 + 1, dtype if splits is None else jnp.float32)
    weight = jnp.asarray(rng.standard_normal(lat), dtype)
    inv_freq = jnp.asarray(10000.0 ** -(np.arange(rope // 2) / (rope // 2)), jnp.float32)
    scales = jnp.asarray(rng.random((3, 40)), jnp.float32) if int8 else None
    return (kv, pe, ckv, slots, positions, weight, inv_freq), scales


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("splits", [None, 1, 4])
def test_mla_cache_matches_reference(dtype, splits):
    """update_mla_cache (norm + RoPE + both caches in one launch) against its reference: kv_a's product whole or as
    split-K partial sums; bit-equal in bf16, float32 within the partial sums' and cos's rounding order."""
    args, _ = _mla_case(np.random.default_rng(5), dtype, splits)
    opts = dict(eps=1e-6, rope_scale=1.3, dtype=dtype)
    want = update_mla_cache_reference(*args, **opts)
    got = update_mla_cache(*(jnp.array(a) for a in args), **opts, interpret=True)
    for g, w in zip(got, want):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        if dtype == jnp.bfloat16:
            np.testing.assert_array_equal(g, w)
        else:
            np.testing.assert_allclose(g, w, rtol=1e-6, atol=2e-6)
    kept = np.zeros((3, 40), bool)
    kept[np.asarray(args[3])[:5], np.asarray(args[4])[:5]] = True  # the five in-range tokens
    np.testing.assert_array_equal(np.asarray(got[0])[~kept], np.asarray(args[0])[~kept])  # the rest untouched
    np.testing.assert_array_equal(np.asarray(got[1])[~kept], np.asarray(args[1])[~kept])


def test_mla_cache_reference_is_the_layers_math():
    """The reference's norm and RoPE are jaxlm.layers' rms_norm, rope_cos_sin and apply_rope (the XLA path's)."""
    from jaxlm.layers import apply_rope, rms_norm, rope_cos_sin

    rng = np.random.default_rng(6)
    (kv, pe, ckv, slots, positions, weight, inv_freq), _ = _mla_case(rng, jnp.float32, None)
    got_kv, got_pe = update_mla_cache_reference(kv, pe, ckv, slots, positions, weight, inv_freq, eps=1e-6,
                                                rope_scale=1.3)
    cos, sin = rope_cos_sin(positions, np.asarray(inv_freq), 1.3, jnp.float32)
    want_kv = update_cache_reference(kv, rms_norm(ckv[:, :32], weight, 1e-6), slots, positions)
    want_pe = update_cache_reference(pe, apply_rope(ckv[:, 32:], cos, sin), slots, positions)
    np.testing.assert_allclose(np.asarray(got_kv), np.asarray(want_kv), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got_pe), np.asarray(want_pe), rtol=1e-6, atol=1e-6)


def test_mla_cache_int8_latent_and_errors():
    """An int8 latent cache: quantised rows and scales as `update_cache` writes them; the k_pe cache stays 16-bit."""
    args, scales = _mla_case(np.random.default_rng(7), jnp.bfloat16, 4, int8=True)
    opts = dict(eps=1e-6, rope_scale=1.0, dtype=jnp.bfloat16)
    want = update_mla_cache_reference(*args, **opts, kv_scale=scales)
    got = update_mla_cache(*(jnp.array(a) for a in args), **opts, kv_scale=jnp.array(scales), interpret=True)
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    np.testing.assert_array_equal(np.asarray(got[1], np.float32), np.asarray(want[1], np.float32))
    np.testing.assert_allclose(np.asarray(got[2]), np.asarray(want[2]), rtol=1e-6)
    with pytest.raises(ValueError, match="needs its \\[B, S\\] kv_scale"):
        update_mla_cache(*args, **opts)
    with pytest.raises(ValueError, match="update_mla_cache needs ckv"):
        update_mla_cache(args[0], args[1], args[2][..., :-1], *args[3:], **opts, kv_scale=scales)
    with pytest.raises(ValueError, match=r"update_mla_cache: positions must be \[T\]"):
        update_mla_cache(*args[:4], args[4][:-1], *args[5:], **opts, kv_scale=scales)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("splits,side_by_side", [(None, False), (4, True), (1, True), (2, False)])
def test_mla_cache_normalises_q(dtype, splits, side_by_side):
    """With q_a's product (48 columns: two power-of-two pieces) and its norm weight, the launch also returns every
    token's rms_norm(q_a) (padding tokens included), from q and ckv given apart or as one array of split-K partial
    sums side by side [S, T, Q + L + R]; caches as without q. Against the reference (whose q is jaxlm.layers'
    rms_norm of the summed product): caches bit-equal in bf16, q within one rounding (another order of its sum of
    squares over two pieces)."""
    rng = np.random.default_rng(9 + (splits or 0))
    args, _ = _mla_case(rng, dtype, splits)
    kv, pe, ckv, slots, positions, weight, inv_freq = args
    q_shape = (7, 48) if splits is None else (splits, 7, 48)
    qa = jnp.asarray(rng.standard_normal(q_shape) * 2 - 0.5, ckv.dtype)
    q_weight = jnp.asarray(rng.standard_normal(48), dtype)
    if side_by_side:
        ckv = qa = jnp.concatenate([qa, ckv], axis=-1)  # [S, T, 48 + 32 + 8]
    opts = dict(eps=1e-6, rope_scale=1.3, dtype=dtype)
    want = update_mla_cache_reference(kv, pe, ckv, slots, positions, weight, inv_freq, **opts, q=qa,
                                      q_norm_weight=q_weight)
    got = update_mla_cache(jnp.array(kv), jnp.array(pe), ckv, slots, positions, weight, inv_freq, **opts, q=qa,
                           q_norm_weight=q_weight, interpret=True)
    assert len(got) == 3 and got[2].shape == (7, 48) and got[2].dtype == dtype
    plain = update_mla_cache_reference(kv, pe, ckv[..., -40:], slots, positions, weight, inv_freq, **opts)
    for g, w, p in zip(got[:2], want[:2], plain):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        np.testing.assert_array_equal(w, np.asarray(p, np.float32))  # the q option leaves the caches' math alone
        if dtype == jnp.bfloat16:
            np.testing.assert_array_equal(g, w)
        else:
            np.testing.assert_allclose(g, w, rtol=1e-6, atol=2e-6)
    from jaxlm.layers import rms_norm

    summed = functools.reduce(lambda a, b: a + b, [p.astype(jnp.float32) for p in (qa if qa.ndim == 3 else qa[None])])
    layers_q = np.asarray(rms_norm(summed[:, :48].astype(dtype), q_weight, 1e-6), np.float32)
    np.testing.assert_array_equal(np.asarray(want[2], np.float32), layers_q)
    g, w = np.asarray(got[2], np.float32), np.asarray(want[2], np.float32)
    step = (2.0 ** -7 if dtype == jnp.bfloat16 else 2.0 ** -20) * np.abs(w) + 1e-6
    assert np.all(np.abs(g - w) <= step), np.abs(g - w).max()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("with_q", [False, True])
def test_mla_cache_rope_table(dtype, with_q):
    """rope_out: every token's [cos | sin] table (padding positions too), the values k_pe was rotated by (rounded to
    dtype, times rope_scale, as jaxlm.layers' rope_cos_sin), from the one-program and the two-program (with q)
    launches; the other outputs as without it."""
    from jaxlm.layers import rope_cos_sin

    rng = np.random.default_rng(11)
    args, _ = _mla_case(rng, dtype, 2)
    kv, pe, ckv, slots, positions, weight, inv_freq = args
    q_opts = dict(q=jnp.asarray(rng.standard_normal((2, 7, 48)), jnp.float32),
                  q_norm_weight=jnp.asarray(rng.standard_normal(48), dtype)) if with_q else {}
    opts = dict(eps=1e-6, rope_scale=1.3, dtype=dtype, **q_opts)
    got = update_mla_cache(jnp.array(kv), jnp.array(pe), *args[2:], **opts, rope_out=True, interpret=True)
    plain = update_mla_cache(jnp.array(kv), jnp.array(pe), *args[2:], **opts, interpret=True)
    want = update_mla_cache_reference(*args, **opts, rope_out=True)
    assert len(got) == len(plain) + 1 == len(want) and got[-1].shape == (7, 8) and got[-1].dtype == jnp.float32
    for g, p in zip(got[:-1], plain):
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(p, np.float32))
    cos, sin = rope_cos_sin(positions, np.asarray(inv_freq), 1.3, dtype)
    layers = np.concatenate([np.asarray(cos, np.float32)[:, :4], np.asarray(sin, np.float32)[:, :4]], axis=-1)
    np.testing.assert_array_equal(np.asarray(want[-1]), layers)
    np.testing.assert_allclose(np.asarray(got[-1]), layers, rtol=1e-6 if dtype == jnp.float32 else 0, atol=1e-6)
    empty = update_mla_cache(kv, pe, ckv[:, :0], slots[:0], positions[:0], weight, inv_freq, eps=1e-6, rope_out=True)
    assert empty[-1].shape == (0, 8)


def test_mla_cache_q_errors():
    args, _ = _mla_case(np.random.default_rng(3), jnp.float32, None)
    opts = dict(eps=1e-6, rope_scale=1.0)
    q_weight = jnp.ones(48, jnp.float32)
    with pytest.raises(ValueError, match="q and q_norm_weight go together"):
        update_mla_cache(*args, **opts, q=jnp.ones((7, 48)))
    with pytest.raises(ValueError, match="needs q \\[T, >= Q\\]"):
        update_mla_cache(*args, **opts, q=jnp.ones((7, 40)), q_norm_weight=q_weight)
    with pytest.raises(ValueError, match="needs q \\[T, >= Q\\]"):
        update_mla_cache(*args, **opts, q=jnp.ones((6, 48)), q_norm_weight=q_weight)
    kv, pe, ckv, slots, positions, weight, inv_freq = args
    empty = update_mla_cache(kv, pe, ckv[:0], slots[:0], positions[:0], weight, inv_freq, **opts, q=jnp.ones((0, 48)),
                             q_norm_weight=q_weight)
    assert len(empty) == 3 and empty[2].shape == (0, 48)


def test_mla_cache_lowers_for_h100():
    """R1's sizes: the seed decode's 16 tokens as 8 split-K partial sums, 512 + 64 wide, bf16 caches."""
    S = jax.ShapeDtypeStruct
    fn = functools.partial(update_mla_cache, eps=1e-6, rope_scale=1.2, dtype=jnp.bfloat16, interpret=False)
    text = export_for_h100(fn, S((16, 512, 512), jnp.bfloat16), S((16, 512, 64), jnp.bfloat16),
                           S((8, 16, 576), jnp.float32), S((16,), jnp.int32), S((16,), jnp.int32),
                           S((512,), jnp.bfloat16), S((32,), jnp.float32))
    assert "update_mla_cache" in text
    odd = (S((16, 512, 96), jnp.bfloat16), S((16, 512, 24), jnp.bfloat16), S((16, 120), jnp.bfloat16),
           S((16,), jnp.int32), S((16,), jnp.int32), S((96,), jnp.bfloat16), S((12,), jnp.float32))
    with pytest.raises(ValueError, match="power-of-two latent and half-rope widths"):  # not a raw lowering error
        export_for_h100(fn, *odd)


def test_mla_cache_with_q_lowers_for_h100():
    """R1's decode: q_a's and kv_a's products side by side as 8 split-K partial sums [8, 16, 1536 + 512 + 64], q_a's
    1536 columns read as 1024 + 512 pieces; with the tokens' RoPE table out, as the layer's decode step asks."""
    S = jax.ShapeDtypeStruct
    fn = functools.partial(update_mla_cache, eps=1e-6, rope_scale=1.2, dtype=jnp.bfloat16, interpret=False)
    text = export_for_h100(lambda kv, pe, parts, s, p, w, f, qw: fn(kv, pe, parts, s, p, w, f, q=parts,
                                                                   q_norm_weight=qw, rope_out=True),
                           S((16, 512, 512), jnp.bfloat16), S((16, 512, 64), jnp.bfloat16),
                           S((8, 16, 2112), jnp.float32), S((16,), jnp.int32), S((16,), jnp.int32),
                           S((512,), jnp.bfloat16), S((32,), jnp.float32), S((1536,), jnp.bfloat16))
    assert "update_mla_cache" in text
