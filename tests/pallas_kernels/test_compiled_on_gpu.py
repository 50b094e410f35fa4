"""Every kernel compiled on the GPU against its reference at real sizes: skipped without a GPU (the CPU suite runs
the same kernels in interpret mode and lowers them for an H100; neither can see a miscompile). On the GPU machine:

    PYTHONPATH=. JAX_PLATFORMS=cuda JAX_DEFAULT_MATMUL_PRECISION=highest python -m pytest -q \
        tests/pallas_kernels/test_compiled_on_gpu.py
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels.common import quantize_rows_int8
from pallas_kernels.fp8_matmul import quantize
from pallas_kernels.mla_decode import gather_pages
from pallas_kernels.sage_attention import MosaicBlockSizes

pytestmark = pytest.mark.skipif(not pk.on_gpu(), reason="compiled kernels need a GPU")


def cos_rel(out, ref):
    o, r = np.asarray(out, np.float64).ravel(), np.asarray(ref, np.float64).ravel()
    return float(o @ r / np.linalg.norm(o) / np.linalg.norm(r)), float(np.abs(o - r).sum() / np.abs(r).sum())


def close(out, ref, cos=0.999, rel_l1=0.02):
    c, r = cos_rel(out, ref)
    assert np.isfinite(np.asarray(out, np.float32)).all() and c >= cos and r <= rel_l1, (c, r)


@pytest.mark.parametrize("backend,bs", [("triton", None), ("mosaic", MosaicBlockSizes()),
                                        ("mosaic", MosaicBlockSizes(block_k=128, compute_wgs=1))])
@pytest.mark.parametrize("d,dv,causal", [(128, 128, True), (192, 128, True), (64, 64, False)])
def test_sage_attention(backend, bs, d, dv, causal):
    rng = np.random.default_rng(d + dv)
    lq, lk = [1, 300, 1000, 0], [700, 300, 1000, 0]  # decode-like with history, odd, long, empty
    cq, ck = (np.concatenate([[0], np.cumsum(x)]).astype(np.int32) for x in (lq, lk))
    q = jnp.asarray(rng.standard_normal((cq[-1], 8, d)), jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal((ck[-1], 2, d)) + 3 * rng.standard_normal(d), jnp.bfloat16)
    v = jnp.asarray(rng.standard_normal((ck[-1], 2, dv)), jnp.bfloat16)
    out, lse = pk.sage_attention(q, k, v, cq, ck, causal=causal, return_lse=True, backend=backend, block_sizes=bs)
    ref, ref_lse = pk.sage_attention_reference(q, k, v, cq, ck, causal=causal, return_lse=True)
    close(out, ref)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(ref_lse), atol=0.1)
    if d == 192:  # MLA's [nope | pe] as parts: each its own chunk in the kernel; q_nope as the window of a wider q
        unroped = jnp.concatenate([q[..., :128], -q[..., 128:]], axis=-1)  # trailing columns that must not count
        for q_parts in ((q[..., :128], q[..., 128:]), (unroped, q[..., 128:])):
            parts = pk.sage_attention(q_parts, (k[..., :128], k[..., 128:]), v, cq, ck, causal=causal,
                                      backend=backend, block_sizes=bs)
            close(parts, ref)


def test_sage_attention_means_in_the_key_pass():
    """Requests x heads enough for K's pass to compute the means itself (key_tiles_smoothed): 40 requests of odd
    lengths, some empty, 4 KV heads, K with a per-channel offset."""
    from pallas_kernels import sage_attention_mgpu

    rng = np.random.default_rng(5)
    lens = rng.integers(0, 700, 40)
    lens[[3, 17]] = 0
    assert 40 * 4 >= sage_attention_mgpu.SMOOTHED_MIN_PROGRAMS
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    q = jnp.asarray(rng.standard_normal((cu[-1], 8, 128)), jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal((cu[-1], 4, 128)) + 3 * rng.standard_normal(128), jnp.bfloat16)
    v = jnp.asarray(rng.standard_normal((cu[-1], 4, 128)), jnp.bfloat16)
    out, lse = pk.sage_attention(q, k, v, cu, cu, return_lse=True, backend="mosaic")
    ref, ref_lse = pk.sage_attention_reference(q, k, v, cu, cu, return_lse=True)
    close(out, ref)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(ref_lse), atol=0.1)


@pytest.mark.parametrize("d,dv", [(96, 96), (80, 64), (256, 128), (256, 256)])
def test_sage_attention_default_route_at_other_head_dims(d, dv):
    """The default route at head dims past MLA's and Qwen3-VL's, long requests (the Mosaic kernel where it fits:
    K padded to whole 64-column chunks, 64-key steps at 256 / 128; 256 / 256 on the Triton kernel)."""
    rng = np.random.default_rng(d * 7 + dv)
    lens = [1500, 700, 1]
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    q = jnp.asarray(rng.standard_normal((cu[-1], 4, d)), jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal((cu[-1], 2, d)) + 3 * rng.standard_normal(d), jnp.bfloat16)
    v = jnp.asarray(rng.standard_normal((cu[-1], 2, dv)), jnp.bfloat16)
    out, lse = pk.sage_attention(q, k, v, cu, cu, return_lse=True)
    ref, ref_lse = pk.sage_attention_reference(q, k, v, cu, cu, return_lse=True)
    close(out, ref)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(ref_lse), atol=0.1)


@pytest.mark.parametrize("cache", ["bf16", "int8", "paged", "paged-int8"])
@pytest.mark.parametrize("qk_int8", [False, True])
def test_mla_decode(cache, qk_int8):
    rng = np.random.default_rng(1)
    b, h, s = 16, 128, 1024
    bf = jnp.bfloat16
    q = jnp.asarray(rng.standard_normal((b, h, 512)), bf)
    qp = jnp.asarray(rng.standard_normal((b, h, 64)), bf)
    kv = jnp.asarray(rng.standard_normal((b, s, 512)), bf)
    pe = jnp.asarray(rng.standard_normal((b, s, 64)), bf)
    lengths = jnp.asarray(rng.integers(0, s + 1, b), jnp.int32).at[0].set(0).at[1].set(1).at[2].set(s)
    ref = pk.mla_decode_reference(q, qp, kv, pe, lengths, sm_scale=0.135)
    kv_ref, pe_ref = kv, pe
    kw = {}
    if "int8" in cache:
        kv, kw["kv_scale"] = quantize_rows_int8(kv)
    if "paged" in cache:  # the same rows in shuffled 64-row pages
        page = 64
        perm = rng.permutation(b * s // page)
        table = jnp.asarray(np.argsort(perm).reshape(b, s // page), jnp.int32)
        shuffle = lambda x: x.reshape(b * s // page, page, *x.shape[2:])[perm]  # noqa: E731
        pe_contiguous = pe
        kv, pe = shuffle(kv), shuffle(pe)
        kw = {k: shuffle(x) for k, x in kw.items()}
        kw["block_table"] = table
        np.testing.assert_array_equal(np.asarray(gather_pages(pe, table)), np.asarray(pe_contiguous))  # the table
    out = pk.mla_decode(q, qp, kv, pe, lengths, sm_scale=0.135, qk_int8=qk_int8, **kw)
    close(out, ref, cos=0.999, rel_l1=0.03)
    if cache in ("bf16", "paged") and not qk_int8:  # the Mosaic GPU kernel (contiguous and paged caches)
        close(pk.mla_decode(q, qp, kv, pe, lengths, sm_scale=0.135, backend="mosaic", **kw), ref, cos=0.999,
              rel_l1=0.03)
    if not qk_int8:  # q_pe as q's trailing columns, rotated as loaded (the layer's decode step) on either kernel
        from jaxlm.layers import rope_cos_sin

        q_wide = jnp.concatenate([jnp.asarray(rng.standard_normal((b, h, 128)), bf), qp], axis=-1)
        cos, sin = rope_cos_sin(jnp.asarray(rng.integers(0, 100000, b), jnp.int32),
                                10000.0 ** -(np.arange(32) / 32.0), 1.2, bf)
        table = jnp.concatenate([cos[:, :32], sin[:, :32]], axis=-1).astype(jnp.float32)
        ref = pk.mla_decode_reference(q, q_wide, kv_ref, pe_ref, lengths, sm_scale=0.135, q_pe_rope=table)
        for backend in ("triton",) + (("mosaic",) if "int8" not in cache else ()):
            close(pk.mla_decode(q, q_wide, kv, pe, lengths, sm_scale=0.135, q_pe_rope=table, backend=backend, **kw),
                  ref, cos=0.999, rel_l1=0.03)


@pytest.mark.parametrize("b,h,s", [(7, 16, 100), (3, 24, 320)])  # R1's heads over tp 8; heads and lengths unaligned
def test_mla_decode_odd_sizes(b, h, s):
    """The default (Mosaic) kernel where heads are no multiple of its 64-head blocks, the cache no multiple of its
    64-row tiles and requests of length 0, 1 and the whole cache sit beside others."""
    rng = np.random.default_rng(b * h)
    bf = jnp.bfloat16
    q, qp = (jnp.asarray(rng.standard_normal((b, h, w)), bf) for w in (512, 64))
    kv, pe = (jnp.asarray(rng.standard_normal((b, s, w)), bf) for w in (512, 64))
    lengths = jnp.asarray(rng.integers(0, s + 1, b), jnp.int32).at[0].set(0).at[1].set(1).at[2].set(s)
    close(pk.mla_decode(q, qp, kv, pe, lengths, sm_scale=0.135),
          pk.mla_decode_reference(q, qp, kv, pe, lengths, sm_scale=0.135), cos=0.999, rel_l1=0.03)


@pytest.mark.parametrize("m", [7, 129, 300])
def test_fp8_matmul_unaligned(m):
    """N and K no multiples of the 128-blocks (partial scale blocks at both ends), on each route a token count takes:
    the Triton kernel below 128 tokens, the Mosaic FP8 x FP8 kernel (padded to its tiles) from 128."""
    rng = np.random.default_rng(m + 1)
    w, s = quantize(rng.standard_normal((200, 1000)).astype(np.float32))
    x = jnp.asarray(rng.standard_normal((m, 1000)), jnp.bfloat16)
    close(pk.fp8_matmul(x, w, s), pk.fp8_matmul_reference(x, w, s), cos=0.9995, rel_l1=0.03)


@pytest.mark.parametrize("width", [512, 640])  # 640: five 128-wide KV heads, written in power-of-two pieces
def test_update_cache_int8_and_paged(width):
    rng = np.random.default_rng(2)
    rows = jnp.asarray(rng.standard_normal((40, width)), jnp.bfloat16)
    slots = jnp.asarray(rng.integers(0, 4, 40), jnp.int32)
    positions = jnp.asarray(rng.permutation(256)[:40], jnp.int32)
    table = jnp.asarray(rng.permutation(20)[:16].reshape(4, 4), jnp.int32)
    cache = jnp.asarray(rng.standard_normal((4, 256, width)), jnp.bfloat16)
    want = pk.update_cache_reference(cache, rows, slots, positions)
    np.testing.assert_array_equal(np.asarray(pk.update_cache(jnp.array(cache), rows, slots, positions), np.float32),
                                  np.asarray(want, np.float32))
    for kw, shape in (({}, (4, 256, width)), ({"block_table": table}, (20, 64, width))):
        cache = jnp.zeros(shape, jnp.int8)
        scales = jnp.zeros(shape[:2], jnp.float32)
        got = pk.update_cache(cache, rows, slots, positions, scales=scales, **kw)
        want = pk.update_cache_reference(jnp.zeros(shape, jnp.int8), rows, slots, positions,
                                         scales=jnp.zeros(shape[:2], jnp.float32), **kw)
        np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
        np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), rtol=1e-6)


@pytest.mark.parametrize("splits,int8", [(8, False), (1, False), (4, True)])
def test_update_mla_cache(splits, int8):
    """R1's widths (512 + 64): kv_a's product as split-K partial sums (or whole), bf16 caches or an int8 latent."""
    rng = np.random.default_rng(splits)
    slots = jnp.asarray(rng.integers(0, 4, 40), jnp.int32)
    positions = jnp.asarray(np.r_[rng.permutation(256)[:38], 256, -1], jnp.int32)  # two dropped
    ckv = jnp.asarray(rng.standard_normal((splits, 40, 576)) * 2, jnp.float32)
    weight = jnp.asarray(rng.standard_normal(512), jnp.bfloat16)
    inv_freq = jnp.asarray(10000.0 ** -(np.arange(32) / 32), jnp.float32)

    def caches():
        kv = jnp.zeros((4, 256, 512), jnp.int8) if int8 else jnp.asarray(rng.standard_normal((4, 256, 512)),
                                                                            jnp.bfloat16)
        scales = jnp.zeros((4, 256), jnp.float32) if int8 else None
        return kv, jnp.asarray(rng.standard_normal((4, 256, 64)), jnp.bfloat16), scales

    kv, pe, scales = caches()
    args = (slots, positions, weight, inv_freq)
    opts = dict(eps=1e-6, rope_scale=1.2, dtype=jnp.bfloat16)
    want = pk.update_mla_cache_reference(kv, pe, ckv, *args, **opts, kv_scale=scales)
    got = pk.update_mla_cache(jnp.array(kv), jnp.array(pe), ckv, *args, **opts,
                              kv_scale=None if scales is None else jnp.array(scales))
    for g, w in zip(got, want):  # within one rounding: float32 sums and cos in another order than XLA's
        step = 1.0 if g.dtype == jnp.int8 else 2.0 ** -7 * np.abs(np.asarray(w, np.float32)) + 1e-6
        assert np.all(np.abs(np.asarray(g, np.float32) - np.asarray(w, np.float32)) <= step), g.dtype


def test_q_a_kv_a_side_by_side_into_the_cache():
    """R1's decode start: q_a's and kv_a's products from one weight-only launch as split-K partial sums side by side
    (the GPU's default route at 16 tokens), read by update_mla_cache as both q and ckv: caches and the normalised q
    within one rounding of the reference on the same partial sums, and q against jaxlm's rms_norm of fp8_matmuls'
    q_a product."""
    from jaxlm.layers import rms_norm

    rng = np.random.default_rng(11)
    (wq, sq), (wkv, skv) = (quantize(rng.standard_normal((n, 7168)).astype(np.float32) / 80) for n in (1536, 576))
    x = jnp.asarray(rng.standard_normal((16, 7168)), jnp.bfloat16)
    parts = pk.fp8_matmuls_side_by_side(x, [wq, wkv], [sq, skv])
    assert parts is not None and parts.shape[1:] == (16, 2112), None if parts is None else parts.shape
    kv = jnp.asarray(rng.standard_normal((16, 512, 512)), jnp.bfloat16)
    pe = jnp.asarray(rng.standard_normal((16, 512, 64)), jnp.bfloat16)
    args = (jnp.arange(16, dtype=jnp.int32), jnp.asarray(rng.integers(0, 512, 16), jnp.int32),
            jnp.asarray(rng.standard_normal(512), jnp.bfloat16), jnp.asarray(10000.0 ** -(np.arange(32) / 32),
                                                                             jnp.float32))
    qw = jnp.asarray(rng.standard_normal(1536), jnp.bfloat16)
    opts = dict(eps=1e-6, rope_scale=1.2, dtype=jnp.bfloat16, q=parts, q_norm_weight=qw, rope_out=True)
    want = pk.update_mla_cache_reference(kv, pe, parts, *args, **opts)
    got = pk.update_mla_cache(jnp.array(kv), jnp.array(pe), parts, *args, **opts)
    qa, _ = pk.fp8_matmuls(x, [wq, wkv], [sq, skv])
    assert len(got) == len(want) == 4
    # within one rounding of the reference (sums and cos in another order); the layer's q within two (the product's
    # rounding, then the norm's)
    for g, w, roundings in zip(got + (got[2],), want + (rms_norm(qa, qw, 1e-6),), (1, 1, 1, 1, 2)):
        step = roundings * 2.0 ** -7 * np.abs(np.asarray(w, np.float32)) + 1e-6
        assert np.all(np.abs(np.asarray(g, np.float32) - np.asarray(w, np.float32)) <= step)


def test_one_pass_activation_quantisation():
    """The compiled act_quant pass gives XLA's bytes and scales (the division and the e4m3 rounding on the GPU)."""
    from pallas_kernels.fp8_matmul import quantize_activations, quantize_activations_t

    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((768, 16384)) * 3, jnp.bfloat16).at[5].set(0).at[7, :128].set(1e-6)
    q, s = quantize_activations(x, 128)
    q_t, s_t = quantize_activations_t(x, 128)
    np.testing.assert_array_equal(np.asarray(q_t).view(np.uint8), np.asarray(q).view(np.uint8))
    np.testing.assert_array_equal(np.asarray(s_t), np.asarray(s).T)


@pytest.mark.parametrize("m", [1, 16, 300])
def test_fp8_matmul(m):
    rng = np.random.default_rng(m)
    w, s = quantize(rng.standard_normal((1536, 7168)).astype(np.float32))
    x = jnp.asarray(rng.standard_normal((m, 7168)), jnp.bfloat16)
    ref = pk.fp8_matmul_reference(x, w, s)
    close(pk.fp8_matmul(x, w, s), ref, cos=0.9995, rel_l1=0.03)
    for backend in ("mosaic", "triton"):  # Mosaic: FP8 x FP8 from 128 tokens, weight-only below
        close(pk.fp8_matmul(x, w, s, backend=backend), ref, cos=0.9995, rel_l1=0.03)
    w2, s2 = quantize(rng.standard_normal((576, 7168)).astype(np.float32))  # q_a and kv_a: one launch below 128
    for y, want in zip(pk.fp8_matmuls(x, [w, w2], [s, s2]), (ref, pk.fp8_matmul_reference(x, w2, s2))):
        close(y, want, cos=0.9995, rel_l1=0.03)
    if m > 128:  # the dequantising kernel (bf16 activations), asked for; q_b's shape takes it by default
        close(pk.fp8_matmul(x, w, s, backend="mosaic", activations="bf16"),
              pk.fp8_matmul_reference(x, w, s, activations="bf16"), cos=0.9995, rel_l1=0.03)
        wb, sb = quantize(rng.standard_normal((24576, 1536)).astype(np.float32))
        xb = jnp.asarray(rng.standard_normal((m, 1536)), jnp.bfloat16)
        close(pk.fp8_matmul(xb, wb, sb, activations="bf16"), pk.fp8_matmul_reference(xb, wb, sb, activations="bf16"),
              cos=0.9995, rel_l1=0.03)
    if m <= 128:  # W_UV per head (grouped weight, x per head): the Mosaic weight-only kernel by default
        wv, sv = quantize(rng.standard_normal((128, 128, 512)).astype(np.float32))
        xv = jnp.asarray(rng.standard_normal((m, 128, 512)), jnp.bfloat16)
        close(pk.fp8_matmul(xv, wv, sv), pk.fp8_matmul_reference(xv, wv, sv), cos=0.9995, rel_l1=0.03)
        # W_UK per head on q_nope read as the leading 128 columns of q [m, 128, 192] (Triton, in place)
        wk, sk = quantize(rng.standard_normal((128, 128, 512)).astype(np.float32))
        q = jnp.asarray(rng.standard_normal((m, 128, 192)), jnp.bfloat16)
        got = pk.fp8_matmul(q, wk, sk, transpose_w=False)
        np.testing.assert_array_equal(np.asarray(got, np.float32),
                                      np.asarray(pk.fp8_matmul(q[..., :128], wk, sk, transpose_w=False), np.float32))
        close(got, pk.fp8_matmul_reference(q[..., :128], wk, sk, transpose_w=False), cos=0.9995, rel_l1=0.03)
