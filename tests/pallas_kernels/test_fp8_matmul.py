"""fp8_matmul against its jnp reference (interpret mode on CPU) on awkward shapes, and lowered for an H100."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from pallas_kernels import fp8_matmul, fp8_matmul_reference, fp8_matmuls, fp8_matmuls_side_by_side
from pallas_kernels.fp8_matmul import (DEQUANTIZE_MIN_M, BlockSizes, dequantize, quantize, quantize_activations,
                                      quantize_activations_t)
from pallas_kernels.lowering import export_for_h100


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


CASES = [  # m, n, k, groups (0: plain 2-D), x shared by the groups, transpose_w, block
    (1, 576, 256, 0, False, True, 128),  # kv_a-like: 4.5 row blocks
    (16, 100, 200, 0, False, True, 128),  # neither N nor K a multiple of 16 -> padded tiles
    (300, 130, 256, 0, False, True, 32),  # prefill path (FP8 activations), partial N block
    (7, 64, 48, 3, False, False, 32),  # per-head W_UK form: x [M, G, K] @ w [G, K, N]
    (130, 64, 48, 3, True, True, 32),  # up-projection form: shared x [M, K], w [G, N, K], FP8 activations
    (5, 48, 80, 2, False, True, 128),  # per-head W_UV form
]


@pytest.mark.parametrize("m,n,k,g,shared,transpose_w,block", CASES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_matches_reference(m, n, k, g, shared, transpose_w, block, dtype):
    rng = np.random.default_rng(m * 7 + n + k)
    w_shape = ((g,) if g else ()) + ((n, k) if transpose_w else (k, n))
    w, s = quantize(rng.standard_normal(w_shape).astype(np.float32) * 3, block)
    x = jnp.asarray(rng.standard_normal((m, k) if (not g or shared) else (m, g, k)), dtype)
    out = fp8_matmul(x, w, s, block=block, transpose_w=transpose_w, interpret=True,
                     block_sizes=BlockSizes(block_m=64, k_splits=None))
    ref = fp8_matmul_reference(x, w, s, block=block, transpose_w=transpose_w)
    assert out.dtype == dtype and out.shape == ref.shape == (m, *((g,) if g else ()), n)
    # float32: only the summation order differs; bf16: the output rounding (and FP8 activations from bf16 x)
    assert rel(out, ref) <= (1e-5 if dtype == jnp.float32 else 4e-3), rel(out, ref)


@pytest.mark.parametrize("k,transpose_w,m", [(128, False, 16), (48, False, 16), (128, True, 200), (128, True, 16)])
def test_wider_x_is_its_leading_columns(k, transpose_w, m):
    """x wider than w's K stands for its leading K columns: the W_UK form reading q_nope as q's window (in place on
    the Triton kernel when K fills its tiles, sliced otherwise), the FP8-activation and dequantised paths; the
    extra columns (here huge) never count. An x narrower than K is an error."""
    rng = np.random.default_rng(k + m)
    g, n = 3, 64
    w, s = quantize(rng.standard_normal((g, n, k) if transpose_w else (g, k, n)).astype(np.float32), 32)
    x = jnp.asarray(rng.standard_normal((m, g, k)), jnp.bfloat16)
    wide = jnp.concatenate([x, jnp.full((m, g, 64), 1e4, jnp.bfloat16)], axis=-1)
    for activations in ("bf16", "auto"):
        run = functools.partial(fp8_matmul, block=32, transpose_w=transpose_w, activations=activations,
                                interpret=True)
        np.testing.assert_array_equal(np.asarray(run(wide, w, s), np.float32), np.asarray(run(x, w, s), np.float32))
        np.testing.assert_array_equal(
            np.asarray(fp8_matmul_reference(wide, w, s, block=32, transpose_w=transpose_w, activations=activations)),
            np.asarray(fp8_matmul_reference(x, w, s, block=32, transpose_w=transpose_w, activations=activations)))
    with pytest.raises(ValueError, match="does not match"):
        fp8_matmul(x[..., : k - 16], w, s, block=32, transpose_w=transpose_w, interpret=True)
    if transpose_w:  # fp8_matmuls shares one x among its weights: no window there
        x2, w2 = jnp.asarray(rng.standard_normal((m, k + 64)), jnp.bfloat16), w[0]
        with pytest.raises(ValueError, match="every weight's K"):
            fp8_matmuls(x2, [w2], [s[0]], block=32, interpret=True)


@pytest.mark.parametrize("activations", ["bf16", "fp8"])
def test_split_k_and_paths_agree(activations):
    rng = np.random.default_rng(3)
    w, s = quantize(rng.standard_normal((96, 512)).astype(np.float32), 128)
    x = jnp.asarray(rng.standard_normal((16, 512)), jnp.float32)
    ref = fp8_matmul_reference(x, w, s, activations=activations)
    for splits in (1, 3, 4):
        out = fp8_matmul(x, w, s, activations=activations, interpret=True, block_sizes=BlockSizes(k_splits=splits))
        assert rel(out, ref) <= 1e-5, (splits, rel(out, ref))


@pytest.mark.parametrize("g,transpose_w", [(0, True), (3, False), (3, True)])
def test_dequantized_path_matches_reference(g, transpose_w):
    """bf16 activations from DEQUANTIZE_MIN_M tokens on: the weight widened in XLA, XLA's GEMM (no kernel)."""
    m, n, k = DEQUANTIZE_MIN_M + 45, 72, 200
    rng = np.random.default_rng(g + 11)
    w_shape = ((g,) if g else ()) + ((n, k) if transpose_w else (k, n))
    w, s = quantize(rng.standard_normal(w_shape).astype(np.float32), 64)
    x = jnp.asarray(rng.standard_normal((m, g, k) if g and not transpose_w else (m, k)), jnp.float32)
    out = fp8_matmul(x, w, s, block=64, transpose_w=transpose_w, activations="bf16", interpret=True)
    ref = fp8_matmul_reference(x, w, s, block=64, transpose_w=transpose_w, activations="bf16")
    assert "pallas_call" not in str(jax.make_jaxpr(functools.partial(
        fp8_matmul, block=64, transpose_w=transpose_w, activations="bf16", interpret=True))(x, w, s))
    assert out.shape == ref.shape and rel(out, ref) <= 1e-5, rel(out, ref)


def test_quantizers_match_deepseek_formulas():
    rng = np.random.default_rng(4)
    w = rng.standard_normal((200, 130)).astype(np.float32)
    w[:128, :128] = 0.0  # an all-zero block: scale 1, no NaN
    q, s = quantize(w, 128)
    assert q.dtype == jnp.float8_e4m3fn and s.shape == (2, 2) and float(s[0, 0]) == 1.0
    expect = np.abs(w[128:, 128:]).max() / 448.0
    assert np.isclose(float(s[1, 1]), expect, rtol=1e-6)
    back = np.asarray(dequantize(q, s, 128))
    assert np.abs(back - w).max() <= np.abs(w).max() / 16  # e4m3: 3 mantissa bits
    # act_quant: s = max(amax, 1e-4) / 448 per 128 channels; the block's largest value lands on 448
    x = rng.standard_normal((3, 300)).astype(np.float32)
    xq, xs = quantize_activations(x, 128)
    assert xs.shape == (3, 3)
    np.testing.assert_allclose(np.asarray(xs[:, 0]), np.abs(x[:, :128]).max(1) / 448.0, rtol=1e-6)
    assert np.abs(np.asarray(xq, np.float32)[:, :128]).max() == 448.0
    assert np.asarray(xq).dtype == ml_dtypes.float8_e4m3fn


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_one_pass_activation_quantisation_equals_reference(dtype):
    """quantize_activations_t (the Pallas pass before the Mosaic FP8 x FP8 kernel) gives the reference's bytes and
    scales (transposed), all-zero rows and tiny blocks (the 1e-4 floor) included."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((128, 384)) * 3, dtype).at[5].set(0).at[7, :128].set(1e-6)
    q, s = quantize_activations(x, 128)
    q_t, s_t = quantize_activations_t(x, 128, interpret=True)
    np.testing.assert_array_equal(np.asarray(q_t).view(np.uint8), np.asarray(q).view(np.uint8))
    np.testing.assert_array_equal(np.asarray(s_t), np.asarray(s).T)


def test_bad_inputs():
    w, s = quantize(np.ones((64, 64), np.float32), 128)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        fp8_matmul(jnp.ones((2, 64)), w.astype(jnp.bfloat16), s)
    with pytest.raises(ValueError, match="does not match"):
        fp8_matmul(jnp.ones((2, 32)), w, s)
    with pytest.raises(ValueError, match="scale"):
        fp8_matmul(jnp.ones((2, 64)), w, s, block=32)


@pytest.mark.parametrize("m", [16, 704])
def test_lowers_for_h100_at_r1_sizes(m):
    """The Triton kernel: decode (16 tokens, weight-only, split-K) and prefill (704 tokens, FP8 activations) at R1's
    q_b, kv_a and per-head W_UK shapes (also on q_nope as the window of q [M, 128, 192], as the layer calls it)."""
    f8, f32, bf = jnp.float8_e4m3fn, jnp.float32, jnp.bfloat16
    sd = jax.ShapeDtypeStruct
    for x, w, s, tw in [((m, 1536), (24576, 1536), (192, 12), True), ((m, 7168), (576, 7168), (5, 56), True),
                        ((m, 128, 128), (128, 128, 512), (128, 1, 4), False),
                        ((m, 128, 192), (128, 128, 512), (128, 1, 4), False)]:
        text = export_for_h100(functools.partial(fp8_matmul, transpose_w=tw, backend="triton", interpret=False),
                               sd(x, bf), sd(w, f8), sd(s, f32))
        assert "__gpu$xla.gpu.triton" in text and "fp8_matmul" in text


# ------------------------------------------------------------------ the Mosaic GPU FP8 x FP8 kernel (wgmma)
@pytest.mark.parametrize("m,n,k", [(128, 256, 384), (130, 200, 300), (300, 128, 128)])
def test_mosaic_fp8_activations_match_reference(m, n, k):
    """backend="mosaic" in the Mosaic GPU interpreter: the FP8-activation path (per-128-K promotion) equals the
    reference's quantised-dequantised product; M, N, K that are not tile multiples are padded."""
    rng = np.random.default_rng(m + n + k)
    w, s = quantize(rng.standard_normal((n, k)).astype(np.float32) * 3)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    out = fp8_matmul(x, w, s, backend="mosaic", interpret=True)
    ref = fp8_matmul_reference(x, w, s, activations="fp8")
    assert out.shape == (m, n) and out.dtype == jnp.bfloat16
    assert rel(out, ref) <= 1e-2, rel(out, ref)
    if n % 64:  # 16 tokens take the weight-only path, whose Mosaic kernel needs N a multiple of 64
        with pytest.raises(ValueError, match="weight-only one"):
            fp8_matmul(x[:16], w, s, backend="mosaic", interpret=True)
    with pytest.raises(ValueError, match="backend must be one of"):
        fp8_matmul(x, w, s, backend="cutlass")


@pytest.mark.parametrize("m,n,k,splits", [(1, 128, 256, None), (16, 192, 640, 2), (13, 64, 512, 3),
                                          (40, 128, 384, 4)])
def test_mosaic_weight_only_matches_reference(m, n, k, splits):
    """backend="mosaic" below 128 tokens in the Mosaic GPU interpreter: the weight-only kernel (y^T = W x^T, e4m3
    tiles widened in registers, per-block scales, split-K partial sums; a split may get no K step) against the
    float32 reference, tokens not a multiple of 8 padded."""
    from pallas_kernels.fp8_matmul_mgpu import MosaicBlockSizes

    rng = np.random.default_rng(m + n + k)
    w, s = quantize(rng.standard_normal((n, k)).astype(np.float32) * 3)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    out = fp8_matmul(x, w, s, backend="mosaic", interpret=True, block_sizes=MosaicBlockSizes(stages=2, k_splits=splits))
    ref = fp8_matmul_reference(x, w, s)
    assert out.shape == (m, n) and out.dtype == jnp.bfloat16
    assert rel(out, ref) <= 1e-2, rel(out, ref)


@pytest.mark.parametrize("shared_x,splits", [(False, 2), (True, 2), (False, 1)],
                         ids=["x-per-group", "x-shared", "one-split"])
def test_mosaic_weight_only_grouped(shared_x, splits):
    """The Mosaic weight-only kernel on grouped weights [G, N, K] (MLA's per-head W_UV; a shared 2-D x for the
    prefill's up-projection) against the float32 reference, in the Mosaic GPU interpreter: each group's x, weight
    and block scales, odd token count, two K splits (partial sums) or one (the kernel's transposed store)."""
    from pallas_kernels.fp8_matmul_mgpu import MosaicBlockSizes

    rng = np.random.default_rng(7 + shared_x)
    g, n, k, m = 3, 128, 384, 13
    w, s = quantize(rng.standard_normal((g, n, k)).astype(np.float32) * 3)
    x = jnp.asarray(rng.standard_normal((m, k) if shared_x else (m, g, k)), jnp.bfloat16)
    out = fp8_matmul(x, w, s, backend="mosaic", interpret=True,
                     block_sizes=MosaicBlockSizes(stages=2, k_splits=splits))
    ref = fp8_matmul_reference(x, w, s)
    assert out.shape == (m, g, n) and out.dtype == jnp.bfloat16
    assert rel(out, ref) <= 1e-2, rel(out, ref)


@pytest.mark.parametrize("m,n,k,g,programs", [(130, 576, 256, 0, None), (256, 256, 128, 0, 3), (384, 128, 384, 0, 2),
                                               (200, 128, 384, 3, None), (128, 128, 256, 0, None)])
def test_mosaic_dequant_matches_reference(m, n, k, g, programs):
    """The dequantising kernel (backend="mosaic" with 16-bit x from 128 tokens) in the Mosaic GPU interpreter against
    the float32 reference and against the XLA dequantised path (same weight in x's dtype: equal up to the GEMMs'
    summation order): tokens padded to the tile (130, 200), kv_a's 576 rows padded to 128, a grouped weight
    read as one, one K step, and persistent programs that take several tiles each (4 tiles on 3 programs; 3 tiles
    of 3 K steps on 2 programs: the 2 buffers carried from one tile into the next)."""
    from pallas_kernels import fp8_matmul_mgpu

    rng = np.random.default_rng(m + n + k + g)
    w, s = quantize(rng.standard_normal((g, n, k) if g else (n, k)).astype(np.float32) * 3)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    if programs:  # the kernel itself, fewer programs than tiles
        out = fp8_matmul_mgpu.dequant_matmul(x, w, fp8_matmul_mgpu.scale_rows(s), block_m=128, programs=programs,
                                             interpret=True)
    else:
        out = fp8_matmul(x, w, s, backend="mosaic", activations="bf16", interpret=True)
    xla = fp8_matmul(x, w, s, activations="bf16", interpret=True)  # the interpreter's default: XLA's dequantised path
    ref = fp8_matmul_reference(x, w, s, activations="bf16")
    assert out.shape == ref.shape == xla.shape and out.dtype == jnp.bfloat16
    assert rel(out, ref) <= 1e-2, rel(out, ref)
    assert rel(out, xla) <= 1e-2, rel(out, xla)


@pytest.mark.parametrize("n2,backend", [(192, "mosaic"), (192, "triton"), (100, None)])
def test_fp8_matmuls_shared_x(n2, backend):
    """Several weights on one x (MLA's q_a and kv_a): one Mosaic weight-only launch when the kernel takes every
    weight (N multiples of 64), else one fp8_matmul each (the Triton kernel: asked for, or the interpreter's
    default); each output equals its own reference either way."""
    rng = np.random.default_rng(n2)
    (w1, s1), (w2, s2) = (quantize(rng.standard_normal((n, 384)).astype(np.float32)) for n in (128, n2))
    x = jnp.asarray(rng.standard_normal((13, 384)), jnp.bfloat16)
    y1, y2 = fp8_matmuls(x, [w1, w2], [s1, s2], backend=backend, interpret=True)
    for y, w, s in ((y1, w1, s1), (y2, w2, s2)):
        ref = fp8_matmul_reference(x, w, s)
        assert y.shape == ref.shape and y.dtype == jnp.bfloat16 and rel(y, ref) <= 1e-2, rel(y, ref)
    with pytest.raises(ValueError, match="one scale per weight"):
        fp8_matmuls(x, [w1, w2], [s1], interpret=True)


def _eqns(jaxpr):
    """Every equation of a jaxpr, those of the jaxprs inside its equations (jit, scan) included."""
    for e in jaxpr.eqns:
        yield e
        for v in e.params.values():
            inner = getattr(v, "jaxpr", v)
            if hasattr(inner, "eqns"):
                yield from _eqns(inner)


@pytest.mark.parametrize("splits", [1, 2])
def test_fp8_matmuls_side_by_side(splits):
    """The one Mosaic weight-only launch's products unsummed, side by side (Mosaic GPU interpreter): their partial
    sums add up to fp8_matmuls' products (bit-equal: the same adds), [S, M, N1 + N2], float32 when split; the same
    with an `after` operand, which the launch takes and does not read; None
    where the kernel does not take every weight (the interpreter's default Triton route), an error where Mosaic
    block sizes ask for it and it cannot (N not a multiple of 64)."""
    from pallas_kernels.fp8_matmul_mgpu import MosaicBlockSizes

    rng = np.random.default_rng(splits)
    (w1, s1), (w2, s2) = (quantize(rng.standard_normal((n, 512)).astype(np.float32)) for n in (128, 192))
    x = jnp.asarray(rng.standard_normal((13, 512)), jnp.bfloat16)
    bs = MosaicBlockSizes(stages=2, k_splits=splits)
    parts = fp8_matmuls_side_by_side(x, [w1, w2], [s1, s2], block_sizes=bs, interpret=True)
    assert parts.shape == (splits, 13, 320) and parts.dtype == (jnp.float32 if splits > 1 else jnp.bfloat16)
    y = functools.reduce(lambda a, b: a + b, list(parts)).astype(jnp.bfloat16)
    y1, y2 = fp8_matmuls(x, [w1, w2], [s1, s2], block_sizes=bs, interpret=True)
    np.testing.assert_array_equal(np.asarray(y[:, :128], np.float32), np.asarray(y1, np.float32))
    np.testing.assert_array_equal(np.asarray(y[:, 128:], np.float32), np.asarray(y2, np.float32))
    assert rel(y2, fp8_matmul_reference(x, w2, s2)) <= 1e-2
    # `after`: an operand of the launch (the GPU orders the launch after its producer), not read: the same products
    prev = jnp.asarray(rng.standard_normal((5, 24)), jnp.float32)
    tied = functools.partial(fp8_matmuls_side_by_side, x, [w1, w2], [s1, s2], block_sizes=bs, interpret=True)
    np.testing.assert_array_equal(np.asarray(tied(after=prev), np.float32), np.asarray(parts, np.float32))
    launches = [e for e in _eqns(jax.make_jaxpr(lambda p: tied(after=p))(prev).jaxpr)
                if e.primitive.name in ("pallas_call", "mpmd_map")]  # mpmd_map: the Mosaic GPU interpreter's
    assert len(launches) == 1 and any(v.aval.shape == prev.shape for v in launches[0].invars), launches
    assert fp8_matmuls_side_by_side(x, [w1, w2], [s1, s2], interpret=True) is None  # Triton route
    w3, s3 = quantize(rng.standard_normal((100, 512)).astype(np.float32))
    with pytest.raises(ValueError, match="use backend='triton'"):
        fp8_matmuls_side_by_side(x, [w1, w3], [s1, s3], block_sizes=bs, interpret=True)
    with pytest.raises(ValueError, match="one scale per weight"):
        fp8_matmuls_side_by_side(x, [w1, w2], [s1], interpret=True)


@pytest.mark.parametrize("splits", [1, 2])
def test_fp8_matmul_parts(splits):
    """fp8_matmul's product as its launch leaves it (Mosaic GPU interpreter where Mosaic block sizes ask for the
    weight-only kernel): [S, M, N] split-K partial sums whose sum is fp8_matmul's product bit for bit; [1, M, N],
    the product itself, on the other routes (Triton; FP8 activations from 128 tokens); a clear error for 3-D x."""
    from pallas_kernels import fp8_matmul_parts, sum_parts
    from pallas_kernels.fp8_matmul_mgpu import MosaicBlockSizes

    rng = np.random.default_rng(10 + splits)
    w, s = quantize(rng.standard_normal((192, 384)).astype(np.float32))
    x = jnp.asarray(rng.standard_normal((13, 384)), jnp.bfloat16)
    bs = MosaicBlockSizes(stages=2, k_splits=splits)
    parts = fp8_matmul_parts(x, w, s, block_sizes=bs, interpret=True)
    assert parts.shape == (splits, 13, 192) and parts.dtype == (jnp.float32 if splits > 1 else jnp.bfloat16)
    want = fp8_matmul(x, w, s, block_sizes=bs, interpret=True)
    np.testing.assert_array_equal(np.asarray(sum_parts(parts, x.dtype), np.float32), np.asarray(want, np.float32))
    assert rel(want, fp8_matmul_reference(x, w, s)) <= 1e-2
    for m in (13, 130):  # the Triton route (weight-only, then FP8 activations): the product, as fp8_matmul's
        xm = jnp.asarray(rng.standard_normal((m, 384)), jnp.bfloat16)
        got = fp8_matmul_parts(xm, w, s, interpret=True)
        assert got.shape == (1, m, 192)
        np.testing.assert_array_equal(np.asarray(got[0], np.float32),
                                      np.asarray(fp8_matmul(xm, w, s, interpret=True), np.float32))
    with pytest.raises(ValueError, match=r"x \[M, K\] and w \[N, K\]"):
        fp8_matmul_parts(x[:, None], w[None], s[None], interpret=True)


@pytest.mark.parametrize("backend", [None, "mosaic"])
def test_no_tokens(backend):
    """An empty batch gives an empty product (no launch), for 2-D and grouped weights and through fp8_matmuls."""
    rng = np.random.default_rng(0)
    w, s = quantize(rng.standard_normal((128, 256)).astype(np.float32))
    wg, sg = quantize(rng.standard_normal((4, 64, 256)).astype(np.float32))
    x = jnp.zeros((0, 256), jnp.bfloat16)
    assert fp8_matmul(x, w, s, backend=backend, interpret=True).shape == (0, 128)
    assert fp8_matmul(x, wg, sg, interpret=True).shape == (0, 4, 64)
    assert [y.shape for y in fp8_matmuls(x, [w, w], [s, s], backend=backend, interpret=True)] == [(0, 128)] * 2


def test_mosaic_lowers_for_h100_at_r1_o_proj():
    pytest.importorskip("jax_cuda13_plugin", reason="Mosaic GPU lowering needs jax_cuda13_plugin (.ci/env.sh test)")
    S = jax.ShapeDtypeStruct
    fn = functools.partial(fp8_matmul, backend="mosaic", interpret=False)
    for m in (1024, 16):  # FP8 x FP8 (prefill), weight-only (decode)
        text = export_for_h100(fn, S((m, 16384), jnp.bfloat16), S((7168, 16384), jnp.float8_e4m3fn),
                               S((56, 128), jnp.float32))
        assert "mosaic_gpu" in text and ("act_quant" in text) == (m >= 128)  # the one-pass quantisation (Triton)
    text = export_for_h100(fn, S((16, 128, 512), jnp.bfloat16), S((128, 128, 512), jnp.float8_e4m3fn),
                           S((128, 1, 4), jnp.float32))  # W_UV per head at decode
    assert "mosaic_gpu" in text
    # the dequantising kernel at R1's prefill: q_b (256-token tiles) and the up-projection W_UK (grouped)
    dq = functools.partial(fp8_matmul, activations="bf16", backend="mosaic", interpret=False)
    for x, w, sc in (((768, 1536), (24576, 1536), (192, 12)), ((704, 512), (128, 128, 512), (128, 1, 4))):
        text = export_for_h100(dq, S(x, jnp.bfloat16), S(w, jnp.float8_e4m3fn), S(sc, jnp.float32))
        assert "mosaic_gpu" in text
