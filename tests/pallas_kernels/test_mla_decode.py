"""mla_decode against its jnp reference (interpret mode on CPU) and lowered for an H100 without one."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import MLADecodeBlockSizes, mla_decode, mla_decode_reference
from pallas_kernels.lowering import export_for_h100


def make(rng, b, h, lat, rope, s, dtype, offset=0.0):
    def r(*shape):
        return jnp.asarray(rng.standard_normal(shape) + offset, dtype)

    return r(b, h, lat), r(b, h, rope), r(b, s, lat), r(b, s, rope)


CASES = [  # b, heads, latent, rope, cache len, lengths
    (1, 1, 32, 16, 64, [1]),
    (3, 16, 64, 16, 320, [0, 7, 300]),
    (2, 5, 32, 16, 100, [100, 1]),  # cache length not a multiple of the block: padded copy
    (4, 20, 32, 16, 256, [0, 0, 0, 0]),
]


@pytest.mark.parametrize("b,h,lat,rope,s,lengths", CASES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_matches_reference(b, h, lat, rope, s, lengths, dtype):
    rng = np.random.default_rng(len(lengths) * 100 + h)
    q, qp, kv, pe = make(rng, b, h, lat, rope, s, dtype)
    lengths = jnp.asarray(lengths, jnp.int32)
    out, lse = mla_decode(q, qp, kv, pe, lengths, sm_scale=0.2, return_lse=True, interpret=True,
                          block_sizes=MLADecodeBlockSizes(block_k=32, k_splits=3))
    ref, ref_lse = mla_decode_reference(q, qp, kv, pe, lengths, sm_scale=0.2, return_lse=True)
    assert out.dtype == dtype and out.shape == (b, h, lat)
    tol = 2e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=tol, rtol=tol)
    empty = np.asarray(lengths) == 0
    assert np.all(np.asarray(out, np.float32)[empty] == 0) and np.all(np.isneginf(np.asarray(lse)[empty]))
    np.testing.assert_allclose(np.asarray(lse)[~empty], np.asarray(ref_lse)[~empty], atol=tol * 10, rtol=tol)


def test_large_channel_offset_and_default_splits():
    """Keys with a large common offset (softmax far from uniform) and the automatic split count."""
    rng = np.random.default_rng(7)
    q, qp, kv, pe = make(rng, 2, 16, 64, 16, 448, jnp.float32, offset=3.0)
    lengths = jnp.asarray([448, 131], jnp.int32)
    out = mla_decode(q, qp, kv, pe, lengths, sm_scale=0.05, interpret=True)
    ref = mla_decode_reference(q, qp, kv, pe, lengths, sm_scale=0.05)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-4, rtol=1e-4)


def test_lowers_for_h100_at_r1_sizes():
    S = jax.ShapeDtypeStruct
    bf = jnp.bfloat16
    fn = functools.partial(mla_decode, sm_scale=0.135, interpret=False)
    text = export_for_h100(fn, S((16, 128, 512), bf), S((16, 128, 64), bf), S((16, 512, 512), bf),
                           S((16, 512, 64), bf), S((16,), jnp.int32))
    assert "mla_decode" in text
    bad = functools.partial(mla_decode, sm_scale=0.135, interpret=False, block_sizes=MLADecodeBlockSizes(block_k=48))
    with pytest.raises(Exception, match="power of 2"):
        export_for_h100(bad, S((16, 128, 512), bf), S((16, 128, 64), bf), S((16, 512, 512), bf),
                        S((16, 512, 64), bf), S((16,), jnp.int32))


@pytest.mark.parametrize("outliers", [False, True], ids=["gaussian", "outlier-channels"])
def test_qk_int8_against_float64_reference(outliers):
    """qk_int8=True quantises Q.K^T's operands per row; measured here (interpret mode): Gaussian cosine 0.999997,
    relative L1 0.0018; with 4 latent channels at 20x (row scales follow the outliers) cosine 0.99982, L1 0.0165."""
    rng = np.random.default_rng(11)
    q, qp, kv, pe = make(rng, 3, 16, 128, 32, 320, jnp.float32)
    if outliers:
        kv = kv.at[:, :, :4].multiply(20.0)
    lengths = jnp.asarray([300, 7, 1], jnp.int32)
    out = np.asarray(mla_decode(q, qp, kv, pe, lengths, sm_scale=0.05, qk_int8=True, interpret=True,
                                block_sizes=MLADecodeBlockSizes(block_k=32, k_splits=3)), np.float64)
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    s = (np.einsum("bhl,bsl->bhs", f64(q), f64(kv)) + np.einsum("bhr,bsr->bhs", f64(qp), f64(pe))) * 0.05
    valid = np.arange(320)[None, None, :] < np.asarray(lengths)[:, None, None]
    s = np.where(valid, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    ref = np.einsum("bhs,bsl->bhl", p / p.sum(-1, keepdims=True), f64(kv))
    cos = (out * ref).sum() / np.linalg.norm(out) / np.linalg.norm(ref)
    rel_l1 = np.abs(out - ref).sum() / np.abs(ref).sum()
    assert cos >= 0.999 and rel_l1 <= 0.02, (cos, rel_l1)
    exact = np.asarray(mla_decode(q, qp, kv, pe, lengths, sm_scale=0.05, interpret=True), np.float64)
    assert np.abs(exact - ref).sum() / np.abs(ref).sum() < rel_l1  # the int8 path is the approximate one


def test_qk_int8_lowers_for_h100():
    S = jax.ShapeDtypeStruct
    bf = jnp.bfloat16
    fn = functools.partial(mla_decode, sm_scale=0.135, qk_int8=True, interpret=False)
    text = export_for_h100(fn, S((16, 128, 512), bf), S((16, 128, 64), bf), S((16, 512, 512), bf),
                           S((16, 512, 64), bf), S((16,), jnp.int32))
    assert "mla_decode" in text
