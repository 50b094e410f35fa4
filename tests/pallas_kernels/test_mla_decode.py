"""mla_decode against its jnp reference (interpret mode on CPU) and lowered for an H100 without one."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import MLADecodeBlockSizes, mla_decode, mla_decode_reference, update_cache
from pallas_kernels.mla_decode import gather_pages
from pallas_kernels.lowering import export_for_h100


def make(rng, b, h, lat, rope, s, dtype, offset=0.0):
    def r(*shape):
        return jnp.asarray(rng.standard_normal(shape) + offset, dtype)

    return r(b, h, lat), r(b, h, rope), r(b, s, lat), r(b, s, rope)


def make_paged(rng, b, h, lat, rope, page_size, pages_per_req, spare):
    """Queries and paged bf16 caches [pages, page_size, ...] with `spare` pages no request owns, and a shuffled
    block table [b, pages_per_req]."""
    num_pages = b * pages_per_req + spare
    q, qp, kv, pe = make(rng, b, h, lat, rope, 1, jnp.bfloat16)
    kv, pe = (jnp.asarray(rng.standard_normal((num_pages, page_size, w)), jnp.bfloat16) for w in (lat, rope))
    table = jnp.asarray(rng.permutation(num_pages)[: b * pages_per_req].reshape(b, pages_per_req), jnp.int32)
    return q, qp, kv, pe, table


CASES = [  # b, heads, latent, rope, cache len, lengths, sequence splits (1: no merge pass)
    (1, 1, 32, 16, 64, [1], 3),
    (3, 16, 64, 16, 320, [0, 7, 300], 3),
    (3, 16, 64, 16, 320, [0, 7, 300], 1),
    (2, 5, 32, 16, 100, [100, 1], 3),  # cache length not a multiple of the block: padded copy
    (4, 20, 32, 16, 256, [0, 0, 0, 0], 3),
]


@pytest.mark.parametrize("b,h,lat,rope,s,lengths,splits", CASES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_matches_reference(b, h, lat, rope, s, lengths, splits, dtype):
    rng = np.random.default_rng(len(lengths) * 100 + h)
    q, qp, kv, pe = make(rng, b, h, lat, rope, s, dtype)
    lengths = jnp.asarray(lengths, jnp.int32)
    out, lse = mla_decode(q, qp, kv, pe, lengths, sm_scale=0.2, return_lse=True, interpret=True,
                          block_sizes=MLADecodeBlockSizes(block_k=32, k_splits=splits))
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


def int8_cache(kv):
    """kv [B, S, L] written into an int8 latent cache through update_cache (interpret mode): (cache, scales)."""
    b, s, lat = kv.shape
    slots, positions = jnp.repeat(jnp.arange(b), s), jnp.tile(jnp.arange(s), b)
    return update_cache(jnp.zeros((b, s, lat), jnp.int8), kv.reshape(-1, lat), slots, positions,
                        scales=jnp.zeros((b, s), jnp.float32), interpret=True)


@pytest.mark.parametrize("qk_int8", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_int8_latent_cache(qk_int8, dtype):
    """The latent cache stored as int8 rows with per-row scales (rope cache 16-bit): the kernel matches the reference
    on the same dequantised cache, and stays close to attention over the unquantised cache."""
    rng = np.random.default_rng(5)
    q, qp, kv, pe = make(rng, 3, 16, 64, 32, 320, dtype)
    kv8, scale = int8_cache(kv)
    lengths = jnp.asarray([300, 7, 1], jnp.int32)
    kw = dict(sm_scale=0.1, kv_scale=scale)
    out = mla_decode(q, qp, kv8, pe, lengths, qk_int8=qk_int8, interpret=True,
                     block_sizes=MLADecodeBlockSizes(block_k=32, k_splits=3), **kw)
    assert out.dtype == dtype and out.shape == (3, 16, 64)
    same_cache = np.asarray(mla_decode_reference(q, qp, kv8, pe, lengths, **kw), np.float32)
    unquantised = np.asarray(mla_decode_reference(q, qp, kv, pe, lengths, sm_scale=0.1), np.float32)
    out = np.asarray(out, np.float32)
    tol = {(False, jnp.float32): 2e-5}.get((qk_int8, dtype), 3e-2)
    np.testing.assert_allclose(out, same_cache, atol=tol, rtol=tol)
    rel_l1 = np.abs(out - unquantised).sum() / np.abs(unquantised).sum()
    assert rel_l1 <= 0.02, rel_l1


def test_int8_cache_needs_its_scales():
    rng = np.random.default_rng(1)
    q, qp, kv, pe = make(rng, 1, 1, 32, 16, 64, jnp.float32)
    with pytest.raises(ValueError, match="int8 kv_cache goes with its kv_scale"):
        mla_decode(q, qp, kv.astype(jnp.int8), pe, jnp.ones(1, jnp.int32), sm_scale=0.1, interpret=True)
    with pytest.raises(ValueError, match="int8 kv_cache goes with its kv_scale"):
        mla_decode(q, qp, kv, pe, jnp.ones(1, jnp.int32), sm_scale=0.1, kv_scale=jnp.ones((1, 64)), interpret=True)


@pytest.mark.parametrize("page_size", [16, 48])
@pytest.mark.parametrize("int8", [False, True], ids=["bf16", "int8-latent"])
def test_paged_cache(page_size, int8):
    """Paged caches [pages, page_size, ...] read through a shuffled block table (lengths 0, 1, odd, a whole table)
    equal the contiguous caches the table stands for."""
    rng = np.random.default_rng(page_size)
    b, pages_per_req = 4, 5
    q, qp, kv, pe, table = make_paged(rng, b, 16, 64, 32, page_size, pages_per_req, spare=3)
    lengths = jnp.asarray([0, 1, 2 * page_size + 5, pages_per_req * page_size], jnp.int32)
    kw = dict(sm_scale=0.1)
    if int8:
        kv, kw["kv_scale"] = int8_cache(kv)
    out = mla_decode(q, qp, kv, pe, lengths, block_table=table, interpret=True, **kw)
    scale = kw.pop("kv_scale", None)
    contiguous = (gather_pages(kv, table), gather_pages(pe, table))
    if int8:
        kw["kv_scale"] = gather_pages(scale, table)
    ref = mla_decode_reference(q, qp, *contiguous, lengths, **kw)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=2e-2, rtol=2e-2)
    assert np.all(np.asarray(out, np.float32)[0] == 0)
    with pytest.raises(ValueError, match="block_table has 3 rows for 4 requests"):
        mla_decode(q, qp, kv, pe, lengths, block_table=table[:3], interpret=True, **kw)


@pytest.mark.parametrize("qk_int8", [False, True])
def test_int8_and_paged_lower_for_h100(qk_int8):
    S = jax.ShapeDtypeStruct
    bf, i32 = jnp.bfloat16, jnp.int32
    fn = functools.partial(mla_decode, sm_scale=0.135, qk_int8=qk_int8, interpret=False)
    args = (S((16, 128, 512), bf), S((16, 128, 64), bf), S((16, 512, 512), jnp.int8), S((16, 512, 64), bf),
            S((16,), i32))
    int8 = lambda q, qp, kv, pe, n, s: fn(q, qp, kv, pe, n, kv_scale=s)  # noqa: E731
    assert "mla_decode" in export_for_h100(int8, *args, S((16, 512), jnp.float32))
    paged = (S((16, 128, 512), bf), S((16, 128, 64), bf), S((300, 64, 512), jnp.int8), S((300, 64, 64), bf),
             S((16,), i32))
    paged_fn = lambda q, qp, kv, pe, n, s, t: fn(q, qp, kv, pe, n, kv_scale=s, block_table=t)  # noqa: E731
    text = export_for_h100(paged_fn, *paged, S((300, 64), jnp.float32), S((16, 18), i32))
    assert "mla_decode" in text


@pytest.mark.parametrize("backend", ["triton", "mosaic"])
def test_no_requests(backend):
    """An empty batch gives empty outputs (no launch)."""
    q, qp, kv, pe = make(np.random.default_rng(0), 0, 64, 128, 64, 64, jnp.bfloat16)
    out, lse = mla_decode(q, qp, kv, pe, jnp.zeros((0,), jnp.int32), sm_scale=0.1, backend=backend, interpret=True,
                          return_lse=True)
    assert out.shape == (0, 64, 128) and lse.shape == (0, 64)


# ------------------------------------------------------------------ the Mosaic GPU kernel (TMA, two warpgroups)
@pytest.mark.parametrize("b,h,s,lengths,splits", [(3, 20, 100, [0, 37, 100], 2), (3, 20, 100, [0, 37, 150], 1),
                                                   (3, 20, 100, [0, 37, 150], 4), (2, 128, 256, [1, 200], 3)])
def test_mosaic_matches_reference(b, h, s, lengths, splits):
    """backend="mosaic" in the Mosaic GPU interpreter (bf16): heads padded to its 64-head tiles, caches to whole key
    tiles, splits merged by their LSE; empty requests give zeros and -inf; a length past the cache reads the cache."""
    from pallas_kernels.mla_decode_mgpu import MosaicBlockSizes

    rng = np.random.default_rng(b + h)
    q, qp, kv, pe = make(rng, b, h, 128, 64, s, jnp.bfloat16)
    lengths = jnp.asarray(lengths, jnp.int32)
    out, lse = mla_decode(q, qp, kv, pe, lengths, sm_scale=0.1, return_lse=True, backend="mosaic", interpret=True,
                          block_sizes=MosaicBlockSizes(k_splits=splits))
    ref, ref_lse = mla_decode_reference(q, qp, kv, pe, lengths, sm_scale=0.1, return_lse=True)
    assert out.shape == (b, h, 128) and out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=2e-2, rtol=2e-2)
    empty = np.asarray(lengths) == 0
    assert np.all(np.asarray(out, np.float32)[empty] == 0) and np.all(np.isneginf(np.asarray(lse)[empty]))
    np.testing.assert_allclose(np.asarray(lse)[~empty], np.asarray(ref_lse)[~empty], atol=1e-2)
    with pytest.raises(ValueError, match="16-bit caches only"):
        mla_decode(q, qp, kv, pe, lengths, sm_scale=0.1, qk_int8=True, backend="mosaic", interpret=True)
    with pytest.raises(ValueError, match="share a 16-bit dtype"):
        mla_decode(q.astype(jnp.float32), qp.astype(jnp.float32), kv.astype(jnp.float32), pe.astype(jnp.float32),
                   lengths, sm_scale=0.1, backend="mosaic", interpret=True)


@pytest.mark.parametrize("page_size,splits", [(64, 1), (128, 3)])
def test_mosaic_paged_cache(page_size, splits):
    """backend="mosaic" on paged caches [pages, page_size, ...] through a shuffled block table (lengths 0, 1, odd,
    a whole table; one and several splits) equals the reference on the contiguous caches the table stands for;
    pages that hold no whole number of the kernel's tiles are refused."""
    from pallas_kernels.mla_decode_mgpu import MosaicBlockSizes

    rng = np.random.default_rng(page_size + splits)
    b, pages_per_req = 4, 3
    q, qp, kv, pe, table = make_paged(rng, b, 20, 128, 64, page_size, pages_per_req, spare=2)
    lengths = jnp.asarray([0, 1, page_size + 37, pages_per_req * page_size], jnp.int32)
    out, lse = mla_decode(q, qp, kv, pe, lengths, sm_scale=0.1, block_table=table, backend="mosaic", interpret=True,
                          block_sizes=MosaicBlockSizes(k_splits=splits), return_lse=True)
    ref, ref_lse = mla_decode_reference(q, qp, gather_pages(kv, table), gather_pages(pe, table), lengths, sm_scale=0.1,
                                        return_lse=True)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=2e-2, rtol=2e-2)
    np.testing.assert_allclose(np.asarray(lse)[1:], np.asarray(ref_lse)[1:], atol=1e-2)
    assert np.all(np.asarray(out, np.float32)[0] == 0)
    with pytest.raises(ValueError, match="pages of a multiple of its block_k"):
        mla_decode(q, qp, kv[:, :48], pe[:, :48], lengths, sm_scale=0.1, block_table=table, backend="mosaic",
                   interpret=True)
    with pytest.raises(ValueError, match="block_table has 3 rows for 4 requests"):
        mla_decode(q, qp, kv, pe, lengths, sm_scale=0.1, block_table=table[:3], backend="mosaic", interpret=True)


@pytest.mark.parametrize("backend,splits", [("triton", 3), ("mosaic", 2), ("mosaic", 1)])
def test_q_pe_rotated_as_loaded(backend, splits):
    """q_pe as the trailing R columns of a wider q (read in place) rotated by q_pe_rope ([cos | sin] per request,
    as update_mla_cache(rope_out=True) gives it) inside the call: equal to the call on jaxlm.layers.apply_rope's
    rotated q_pe within one bf16 rounding, and to the reference (which rotates the same way); lengths 0, 1, odd."""
    from jaxlm.layers import apply_rope, rope_cos_sin
    from pallas_kernels.mla_decode_mgpu import MosaicBlockSizes

    rng = np.random.default_rng(splits + len(backend))
    b, h, s = 3, 20, 100
    q, _, kv, pe = make(rng, b, h, 128, 64, s, jnp.bfloat16)
    q_wide = jnp.asarray(rng.standard_normal((b, h, 128 + 64)), jnp.bfloat16)  # [q_nope | q_pe]
    positions = jnp.asarray(rng.integers(0, 5000, b), jnp.int32)
    inv_freq = 10000.0 ** -(np.arange(32) / 32.0)
    cos, sin = rope_cos_sin(positions, inv_freq, 1.2, jnp.bfloat16)  # [b, 64] each, halves repeated
    table = jnp.concatenate([cos[:, :32], sin[:, :32]], axis=-1).astype(jnp.float32)
    lengths = jnp.asarray([0, 1, 77], jnp.int32)
    bs = MosaicBlockSizes(k_splits=splits) if backend == "mosaic" else MLADecodeBlockSizes(block_k=32, k_splits=splits)
    out = mla_decode(q, q_wide, kv, pe, lengths, sm_scale=0.1, q_pe_rope=table, block_sizes=bs, interpret=True)
    roped = apply_rope(q_wide[..., 128:], cos[:, None], sin[:, None])
    plain = mla_decode(q, roped, kv, pe, lengths, sm_scale=0.1, block_sizes=bs, interpret=True)
    ref = mla_decode_reference(q, q_wide, kv, pe, lengths, sm_scale=0.1, q_pe_rope=table)
    ref_roped = mla_decode_reference(q, roped, kv, pe, lengths, sm_scale=0.1)
    np.testing.assert_allclose(np.asarray(ref, np.float32), np.asarray(ref_roped, np.float32), atol=2e-2, rtol=2e-2)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(plain, np.float32), atol=2e-2, rtol=2e-2)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=2e-2, rtol=2e-2)
    assert np.all(np.asarray(out, np.float32)[0] == 0)
    with pytest.raises(ValueError, match="q_pe_rope must be"):
        mla_decode(q, q_wide, kv, pe, lengths, sm_scale=0.1, q_pe_rope=table[:, :32], interpret=True)
    with pytest.raises(ValueError, match="q_pe must be"):
        mla_decode(q, q_wide[..., :32], kv, pe, lengths, sm_scale=0.1, interpret=True)
    # caches and lengths that do not fit the queries: named, for the kernel and its reference alike
    for fn in (functools.partial(mla_decode, interpret=True), mla_decode_reference):
        with pytest.raises(ValueError, match=r"do not fit q_latent \(3, 20, 128\): both \[3, S, \.\.\.\]"):
            fn(q, q_wide, kv[:2], pe[:2], lengths[:2], sm_scale=0.1)
        with pytest.raises(ValueError, match="the latent 64 wide"):
            fn(q[..., :64], q_wide, kv, pe, lengths, sm_scale=0.1)
        with pytest.raises(ValueError, match=r"lengths must be \[B\] = \[3\] integers, got \(3,\) float32"):
            fn(q, q_wide, kv, pe, lengths.astype(jnp.float32), sm_scale=0.1)
        with pytest.raises(ValueError, match="must be 3-D"):
            fn(q, q_wide, kv[0], pe, lengths, sm_scale=0.1)


def test_mosaic_lowers_for_h100_at_r1_sizes():
    pytest.importorskip("jax_cuda13_plugin", reason="Mosaic GPU lowering needs jax_cuda13_plugin (.ci/env.sh test)")
    S = jax.ShapeDtypeStruct
    bf = jnp.bfloat16
    fn = functools.partial(mla_decode, sm_scale=0.135, backend="mosaic", interpret=False)
    text = export_for_h100(fn, S((64, 128, 512), bf), S((64, 128, 64), bf), S((64, 4096, 512), bf),
                           S((64, 4096, 64), bf), S((64,), jnp.int32))
    assert "mosaic_gpu" in text
    paged = lambda q, qp, kv, pe, n, t: fn(q, qp, kv, pe, n, block_table=t)  # noqa: E731
    text = export_for_h100(paged, S((16, 128, 512), bf), S((16, 128, 64), bf), S((300, 64, 512), bf),
                           S((300, 64, 64), bf), S((16,), jnp.int32), S((16, 18), jnp.int32))
    assert "mosaic_gpu" in text
    # the layer's decode step: q_pe as q's trailing columns, rotated in the kernel by the cache write's table
    roped = lambda q, qp, kv, pe, n, t, r: fn(q, qp, kv, pe, n, block_table=t, q_pe_rope=r)  # noqa: E731
    text = export_for_h100(roped, S((16, 128, 512), bf), S((16, 128, 192), bf), S((300, 64, 512), bf),
                           S((300, 64, 64), bf), S((16,), jnp.int32), S((16, 1), jnp.int32), S((16, 64), jnp.float32))
    assert "mosaic_gpu" in text


def test_default_backend_is_mosaic_when_compiled_and_triton_in_interpret_mode():
    """common.DEFAULT_BACKEND picks compiled calls' backend (mla_decode: the Mosaic kernel); interpret mode runs the
    Triton kernel unless a backend or block sizes are named; block sizes of the other backend are an error."""
    from pallas_kernels.common import DEFAULT_BACKEND, resolve_backend
    from pallas_kernels.mla_decode import BlockSizes, MosaicBlockSizes

    assert resolve_backend("mla_decode", None, None, MosaicBlockSizes) == DEFAULT_BACKEND["mla_decode"] == "mosaic"
    assert resolve_backend("mla_decode", None, None, MosaicBlockSizes, interpret=True) == "triton"
    assert resolve_backend("mla_decode", None, MosaicBlockSizes(), MosaicBlockSizes, interpret=True) == "mosaic"
    assert resolve_backend("mla_decode", "mosaic", None, MosaicBlockSizes, interpret=True) == "mosaic"
    with pytest.raises(ValueError, match="do not belong"):
        resolve_backend("mla_decode", "mosaic", BlockSizes(), MosaicBlockSizes)
