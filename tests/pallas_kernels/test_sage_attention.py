"""sage_attention against its exact float32 reference (interpret mode on CPU), and lowered for an H100."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.lowering import export_for_h100
from pallas_kernels.sage_attention import BlockSizes, MosaicBlockSizes, sage_attention, sage_attention_reference

SMALL = BlockSizes(block_q=16, block_k=16)


def make(rng, lq, lk, hq, hk, d, dv, dtype, k_offset=0.0):
    cq = np.concatenate([[0], np.cumsum(lq)]).astype(np.int32)
    ck = np.concatenate([[0], np.cumsum(lk)]).astype(np.int32)
    q = jnp.asarray(rng.standard_normal((cq[-1], hq, d)), dtype)
    k = jnp.asarray(rng.standard_normal((ck[-1], hk, d)) + k_offset * rng.standard_normal(d), dtype)
    v = jnp.asarray(rng.standard_normal((ck[-1], hk, dv)), dtype)
    return q, k, v, cq, ck


def metrics(out, ref):
    o, r = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    cos = float((o * r).sum() / (np.linalg.norm(o) * np.linalg.norm(r)))
    return cos, float(np.abs(o - r).sum() / np.abs(r).sum())


def close_to_reference(out, lse, ref, ref_lse):
    """The bounds every kernel meets against the reference: cosine >= 0.999, relative L1 <= 0.02, the same rows
    without keys (-inf LSE), and the other LSEs within 0.1."""
    cos, rel_l1 = metrics(out, ref)
    assert cos >= 0.999 and rel_l1 <= 0.02, (cos, rel_l1)
    finite = np.isfinite(np.asarray(ref_lse))
    np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), finite)
    np.testing.assert_allclose(np.asarray(lse)[finite], np.asarray(ref_lse)[finite], atol=0.1)


CASES = [  # lq, lk, hq, hk, d, dv
    ([1], [1], 1, 1, 32, 32),  # length 1
    ([7, 0, 300], [7, 0, 300], 4, 2, 64, 64),  # odd lengths, a zero-length request, GQA 2
    ([1, 5, 33], [50, 5, 40], 16, 2, 64, 32),  # history offsets (decode-like and chunked prefill), GQA 8, Dv != Dqk
    ([9, 20], [30, 20], 2, 2, 192, 128),  # MLA prefill head dims (192 = 128 + 64 chunks)
]


@pytest.mark.parametrize("lq,lk,hq,hk,d,dv", CASES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_matches_reference(lq, lk, hq, hk, d, dv, dtype):
    rng = np.random.default_rng(sum(lq) + hq)
    q, k, v, cq, ck = make(rng, lq, lk, hq, hk, d, dv, dtype)
    out, lse = sage_attention(q, k, v, cq, ck, return_lse=True, block_sizes=SMALL, interpret=True)
    ref, ref_lse = sage_attention_reference(q, k, v, cq, ck, return_lse=True)
    assert out.shape == (q.shape[0], hq, dv) and out.dtype == dtype
    close_to_reference(out, lse, ref, ref_lse)


def test_gaussian_and_outliers_against_float64():
    """Gaussian inputs meet cosine >= 0.999 and relative L1 <= 0.02; K with a large per-channel offset needs the
    smoothing (figures for the outlier case: with smoothing it stays at the Gaussian level, without it degrades)."""
    rng = np.random.default_rng(3)
    lq, lk = [100, 37], [160, 37]
    with jax.default_matmul_precision("highest"):
        q, k, v, cq, ck = make(rng, lq, lk, 4, 4, 64, 64, jnp.float32)
        ref = sage_attention_reference(q, k, v, cq, ck)
        cos, rel = metrics(sage_attention(q, k, v, cq, ck, block_sizes=SMALL, interpret=True), ref)
        assert cos >= 0.999 and rel <= 0.02, (cos, rel)
        q, k, v, cq, ck = make(rng, lq, lk, 4, 4, 64, 64, jnp.float32, k_offset=20.0)
        ref = sage_attention_reference(q, k, v, cq, ck)
        smooth = metrics(sage_attention(q, k, v, cq, ck, block_sizes=SMALL, interpret=True), ref)
        raw = metrics(sage_attention(q, k, v, cq, ck, block_sizes=SMALL, smooth_k=False, interpret=True), ref)
    assert smooth[0] >= 0.999 and smooth[1] <= 0.02, smooth
    assert raw[1] > 2 * smooth[1], (raw, smooth)


def test_non_causal_and_rows_without_keys():
    rng = np.random.default_rng(4)
    q, k, v, cq, ck = make(rng, [5, 3], [2, 6], 2, 1, 32, 32, jnp.float32)
    out = sage_attention(q, k, v, cq, ck, causal=False, block_sizes=SMALL, interpret=True)
    assert metrics(out, sage_attention_reference(q, k, v, cq, ck, causal=False))[0] >= 0.999
    # causal with more queries than keys: the first rows of request 0 see nothing and come out as zeros
    out = np.asarray(sage_attention(q, k, v, cq, ck, block_sizes=SMALL, interpret=True))
    np.testing.assert_array_equal(out[:3], 0)
    ref = np.asarray(sage_attention_reference(q, k, v, cq, ck))
    assert metrics(out[3:], ref[3:])[0] >= 0.999


@pytest.mark.parametrize("backend,bs", [("triton", SMALL), ("mosaic", MosaicBlockSizes())])
def test_parts_equal_their_concatenation(backend, bs):
    """Q and K given as parts along the head dim (MLA's [nope | pe], the pe part one row shared by every head: given
    broadcast, or as one head) give what their concatenation gives: the same scales, means and int8 values, so the
    same output and LSE. A q part wider than its k part counts with its leading columns (MLA's unroped q whole,
    whose trailing rope columns differ from the roped q_pe part). A q part narrower than its k part, or a k part of
    another head count than 1 or K's, is an error that names the shapes."""
    rng = np.random.default_rng(11)
    lq, lk = [9, 0, 20], [30, 0, 20]
    q, k, v, cq, ck = make(rng, lq, lk, 4, 4, 192, 128, jnp.bfloat16, k_offset=3.0)
    pe = k[:, :1, 128:]  # one rope row shared by every head, as MLA's k_pe
    k = jnp.concatenate([k[..., :128], jnp.broadcast_to(pe, (k.shape[0], 4, 64))], axis=-1)
    run = functools.partial(sage_attention, return_lse=True, backend=backend, block_sizes=bs, interpret=True)
    want, want_lse = run(q, k, v, cq, ck)
    unroped = jnp.concatenate([q[..., :128], jnp.asarray(rng.standard_normal((q.shape[0], 4, 64)), q.dtype)], -1)
    for q_parts in ((q[..., :128], q[..., 128:]), (unroped, q[..., 128:])):
        for k_parts in ((k[..., :128], jnp.broadcast_to(pe, (k.shape[0], 4, 64))), (k[..., :128], pe)):
            got, lse = run(q_parts, k_parts, v, cq, ck)
            np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
            np.testing.assert_allclose(np.asarray(lse), np.asarray(want_lse), rtol=1e-6, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(sage_attention_reference(q_parts, k_parts, v, cq, ck)),
                                  np.asarray(sage_attention_reference(q, k, v, cq, ck)))
    with pytest.raises(ValueError, match="one head shared by all"):
        sage_attention(q_parts, (k[..., :128], k[:, :2, 128:]), v, cq, ck, interpret=True)
    ref = sage_attention_reference((q[..., :128], q[..., 128:]), (k[..., :128], k[..., 128:]), v, cq, ck)
    assert metrics(got, ref)[0] >= 0.999
    with pytest.raises(ValueError, match="at least as wide as its k part"):
        sage_attention((q[..., :128], q[..., 128:]), (k[..., :64], k[..., 64:]), v, cq, ck, interpret=True)


def test_operands_of_the_wrong_rank_or_lengths_raise_clear_errors():
    """Shape-level mistakes get a ValueError naming them (the call is traced: the lengths' values cannot be read)."""
    rng = np.random.default_rng(7)
    q, k, v = (jnp.asarray(rng.standard_normal((10, 2, 32)), jnp.bfloat16) for _ in range(3))
    cu = jnp.asarray([0, 4, 10], jnp.int32)
    with pytest.raises(ValueError, match=r"must be \[tokens, heads, head dim\], got q \[\(10, 32\)\]"):
        sage_attention(q[:, 0], k, v, cu, cu, interpret=True)
    with pytest.raises(ValueError, match=r"cu_seqlens_k must be \[B \+ 1\] integers, got \(3,\) float32"):
        sage_attention(q, k, v, cu, cu.astype(jnp.float32), interpret=True)
    with pytest.raises(ValueError, match=r"cu_seqlens_q must be \[B \+ 1\] integers, got \(1, 3\)"):
        sage_attention(q, k, v, cu[None], cu, interpret=True)
    with pytest.raises(ValueError, match=r"cu_seqlens_q \(3,\) and cu_seqlens_k \(2,\) must both"):
        sage_attention(q, k, v, cu, jnp.asarray([0, 10], jnp.int32), interpret=True)


@pytest.mark.parametrize("backend,bs", [("triton", SMALL), ("mosaic", MosaicBlockSizes())])
def test_given_key_means(backend, bs):
    """k_mean given (MLA computes it from the latent): K's own means give the default call's output and LSE; any
    other shift per request and head (here the means plus noise) leaves the output within the INT8 bounds of the
    exact reference and the LSE the reference's (the smoothing is undone); a mean of the wrong shape is an error."""
    from pallas_kernels.sage_attention import request_means

    rng = np.random.default_rng(12)
    q, k, v, cq, ck = make(rng, [9, 0, 20], [30, 0, 20], 4, 4, 192, 128, jnp.bfloat16, k_offset=3.0)
    parts = (k[..., :128], k[:, :1, 128:])  # MLA's form: a one-head rope part
    qp = (q[..., :128], q[..., 128:])
    call = functools.partial(sage_attention, return_lse=True, backend=backend, block_sizes=bs, interpret=True)

    def run(*args, **kwargs):
        # each call finished before the next computation starts: the Mosaic GPU interpreter's warpgroups wait on
        # one another, and with the reference's ops dispatched beside them one CI run stalled here
        return jax.block_until_ready(call(*args, **kwargs))

    want, want_lse = run(qp, parts, v, cq, ck)
    means, _ = request_means(parts, jnp.asarray(ck))
    got, lse = run(qp, parts, v, cq, ck, k_mean=tuple(means))
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    np.testing.assert_allclose(np.asarray(lse), np.asarray(want_lse), rtol=1e-6, atol=1e-5)
    shifted = tuple(m + jnp.asarray(rng.standard_normal(m.shape), jnp.float32) for m in means)
    got, lse = run(qp, parts, v, cq, ck, k_mean=shifted)
    ref, ref_lse = sage_attention_reference(qp, parts, v, cq, ck, return_lse=True)
    cos, rel_l1 = metrics(got, ref)
    assert cos >= 0.999 and rel_l1 <= 0.02, (cos, rel_l1)
    rows = int(cq[-1])
    np.testing.assert_allclose(np.asarray(lse)[:rows], np.asarray(ref_lse)[:rows], atol=0.05)
    with pytest.raises(ValueError, match="k_mean"):
        run(qp, parts, v, cq, ck, k_mean=(means[0][:, :2], means[1]))


@pytest.mark.parametrize("backend", ["triton", "mosaic"])
@pytest.mark.parametrize("rows,cu", [(0, [0]), (0, [0, 0]), (5, [0])], ids=["no-rows", "empty-request", "no-requests"])
def test_nothing_to_attend(backend, rows, cu):
    """No query rows, or no requests (rows all padding): zeros and -inf LSEs, nothing launched (the Mosaic GPU
    interpreter would otherwise wait forever on a kernel with no work)."""
    x = jnp.ones((rows, 4, 64), jnp.bfloat16)
    cu = jnp.asarray(cu, jnp.int32)
    o, lse = sage_attention(x, x, x, cu, cu, backend=backend, interpret=True, return_lse=True)
    assert o.shape == (rows, 4, 64) and lse.shape == (rows, 4)
    assert np.all(np.asarray(o, np.float32) == 0) and np.all(np.isneginf(np.asarray(lse)))


def lowered(fn, tq: int, tk: int, hq: int, hk: int, d: int, dv: int, cu: int) -> str:
    """fn(q, k, v, cu_q, cu_k) lowered for an H100 (StableHLO text) at bf16 q [tq, hq, d], k [tk, hk, d],
    v [tk, hk, dv] and [cu] cumulative lengths, all abstract."""
    S = jax.ShapeDtypeStruct
    bf = jnp.bfloat16
    return export_for_h100(fn, S((tq, hq, d), bf), S((tk, hk, d), bf), S((tk, hk, dv), bf), S((cu,), jnp.int32),
                           S((cu,), jnp.int32))


@pytest.mark.parametrize("d,dv", [(128, 128), (192, 128), (64, 64)])
def test_lowers_for_h100(d, dv):
    assert "sage_attention" in lowered(functools.partial(sage_attention, interpret=False), 704, 1472, 16, 8, d, dv, 5)


# ------------------------------------------------------------------ the Mosaic GPU kernel (Hopper wgmma, TMA)
MOSAIC = MosaicBlockSizes(block_q=64, block_k=64, compute_wgs=2)


# the Mosaic interpreter runs programs one by one: CASES with the 16-head case at 8 heads (GQA 8 kept; the Triton
# tests above cover 16 heads)
MOSAIC_CASES = [c if c[2] != 16 else (c[0], c[1], 8, 1, *c[4:]) for c in CASES]


@pytest.mark.parametrize("lq,lk,hq,hk,d,dv", MOSAIC_CASES)
def test_mosaic_matches_reference(lq, lk, hq, hk, d, dv):
    """backend="mosaic" in the Mosaic GPU interpreter: same bounds as the Triton kernel, bf16 inputs (its P.V MMA
    is 16-bit), block tails and zero-length requests included."""
    rng = np.random.default_rng(sum(lq) + hq + 1)
    q, k, v, cq, ck = make(rng, lq, lk, hq, hk, d, dv, jnp.bfloat16)
    out, lse = sage_attention(q, k, v, cq, ck, return_lse=True, backend="mosaic", block_sizes=MOSAIC, interpret=True)
    ref, ref_lse = sage_attention_reference(q, k, v, cq, ck, return_lse=True)
    assert out.shape == (q.shape[0], hq, dv) and out.dtype == jnp.bfloat16
    close_to_reference(out, lse, ref, ref_lse)


@pytest.mark.parametrize("wgs", [1, 2])
def test_mosaic_non_causal_longer_keys_and_errors(wgs):
    """Vision-style non-causal attention over several key tiles (block_k 128, 3 stages of prefetch, one or two
    compute warpgroups), rows without keys, and the errors for what the kernel cannot take."""
    rng = np.random.default_rng(5)
    q, k, v, cq, ck = make(rng, [70, 3], [300, 0], 2, 1, 64, 64, jnp.bfloat16, k_offset=5.0)
    bs = MosaicBlockSizes(block_q=64, block_k=128, stages=3, compute_wgs=wgs)
    out = sage_attention(q, k, v, cq, ck, causal=False, backend="mosaic", block_sizes=bs, interpret=True)
    ref = sage_attention_reference(q, k, v, cq, ck, causal=False)
    cos, rel_l1 = metrics(out[:70], ref[:70])
    assert cos >= 0.999 and rel_l1 <= 0.02, (cos, rel_l1)
    np.testing.assert_array_equal(np.asarray(out[70:], np.float32), 0)  # request 1 has no keys
    with pytest.raises(ValueError, match="V must be bfloat16 or float16"):
        sage_attention(q, k, v.astype(jnp.float32), cq, ck, backend="mosaic", interpret=True)
    with pytest.raises(ValueError, match="backend must be one of"):
        sage_attention(q, k, v, cq, ck, backend="cuda")
    with pytest.raises(ValueError, match="do not belong to backend 'mosaic'"):
        sage_attention(q, k, v, cq, ck, backend="mosaic", block_sizes=SMALL)


def test_default_block_sizes_follow_the_mean_request_length():
    """A call naming no block sizes: the Mosaic kernel steps 64 keys at a time below MOSAIC_SHORT_KEYS keys per
    request on average (the MLA seed prefill: 1536 keys over 4 requests), 128 from there on; Triton's defaults."""
    from pallas_kernels.sage_attention import MOSAIC_SHORT_KEYS, MOSAIC_WIDE_STAGES, BlockSizes, default_block_sizes

    assert default_block_sizes("mosaic", 1536, 4) == MosaicBlockSizes(block_k=64)
    assert default_block_sizes("mosaic", 1536, 4, 192) == MosaicBlockSizes(block_k=64, stages=MOSAIC_WIDE_STAGES)
    assert default_block_sizes("mosaic", MOSAIC_SHORT_KEYS * 4, 4, 192) == MosaicBlockSizes()  # 2 stages fit
    assert default_block_sizes("mosaic", MOSAIC_SHORT_KEYS * 4, 4) == MosaicBlockSizes()
    assert default_block_sizes("mosaic", 16384, 1).block_k == 128
    assert default_block_sizes("triton", 1536, 4) == BlockSizes()
    # head dims whose tiles would not fit shared memory step down to 64-key steps in 2 stages
    assert default_block_sizes("mosaic", 1536, 4, 256, 128) == MosaicBlockSizes(block_k=64)
    assert default_block_sizes("mosaic", 16384, 1, 256, 128) == MosaicBlockSizes(block_k=64)


@pytest.mark.parametrize("d,dv", [(128, 128), (192, 128), (64, 64), (64, 48)])  # 48: V padded to 64 columns
def test_mosaic_lowers_for_h100(d, dv):
    pytest.importorskip("jax_cuda13_plugin", reason="Mosaic GPU lowering needs jax_cuda13_plugin (.ci/env.sh test)")
    S = jax.ShapeDtypeStruct
    bf = jnp.bfloat16
    fn = functools.partial(sage_attention, backend="mosaic", interpret=False)
    # 4 requests (368 keys each: 64-key steps by default), one (1472 keys: 128-key steps), 17 x 8 heads (enough
    # programs for the K pass that computes the means itself), and an odd number of keys (TMA's 16-byte row rule on
    # the K scales)
    for cu, tk in ((5, 1472), (2, 1472), (18, 1472), (5, 1473)):
        assert "mosaic_gpu" in lowered(fn, 704, tk, 16, 8, d, dv, cu)
    if d == 192:  # MLA's parts, each 64-column chunk TMA-read from its own part
        parts = lambda t, h: (S((t, h, 128), bf), S((t, h, 64), bf))  # noqa: E731
        fn = lambda q, k, v, cq, ck: sage_attention(q, k, v, cq, ck, backend="mosaic", interpret=False)  # noqa: E731
        for k_parts in (parts(1472, 8), (S((1472, 8, 128), bf), S((1472, 1, 64), bf))):  # pe: per head or shared
            text = export_for_h100(fn, parts(704, 16), k_parts, S((1472, 8, dv), bf), S((5,), jnp.int32),
                                   S((5,), jnp.int32))
            assert "mosaic_gpu" in text


def test_mosaic_head_dims_padded_to_whole_chunks():
    """A head dim past 64 that is not whole 64-column chunks (80: K's int8 rows padded to 128 for TMA) and a V
    padded to a power of two (48 -> 64), in the Mosaic GPU interpreter against the reference."""
    rng = np.random.default_rng(8)
    q, k, v, cq, ck = make(rng, [5, 70], [9, 70], 2, 1, 80, 48, jnp.bfloat16, k_offset=3.0)
    out = sage_attention(q, k, v, cq, ck, backend="mosaic", block_sizes=MOSAIC, interpret=True)
    cos, rel_l1 = metrics(out, sage_attention_reference(q, k, v, cq, ck))
    assert out.shape == (75, 2, 48) and cos >= 0.999 and rel_l1 <= 0.02, (cos, rel_l1)


@pytest.mark.parametrize("d,dv", [(96, 96), (80, 64), (160, 128), (256, 128)])
def test_default_route_lowers_at_other_head_dims(d, dv):
    """The default route (backend "auto": Mosaic for long requests) at head dims besides MLA's and Qwen3-VL's: 96
    and 160 failed to lower (K's rows not whole 64-column chunks) and 256 / 128 took more shared memory than an
    H100 has (now 64-key steps)."""
    pytest.importorskip("jax_cuda13_plugin", reason="Mosaic GPU lowering needs jax_cuda13_plugin (.ci/env.sh test)")
    assert "mosaic_gpu" in lowered(functools.partial(sage_attention, interpret=False), 2048, 2048, 8, 2, d, dv, 3)


def test_head_dims_past_shared_memory():
    """256 / 256 does not fit an H100 program's shared memory at any block sizes: the default route takes the
    Triton kernel, and the Mosaic backend asked for by name says why."""
    from pallas_kernels import sage_attention_mgpu

    assert "shared memory" in sage_attention_mgpu.unsupported(256, 256, jnp.bfloat16)
    assert sage_attention_mgpu.unsupported(256, 128, jnp.bfloat16) is None
    x = jnp.zeros((2048, 2, 256), jnp.bfloat16)
    cu = jnp.asarray([0, 1024, 2048], jnp.int32)
    with pytest.raises(ValueError, match=r"block_k=64, stages=2.* needs \d+ bytes of shared memory"):
        sage_attention(x, x, x, cu, cu, backend="mosaic", interpret=True)
    with pytest.raises(ValueError, match=r"stages=8.* needs \d+ bytes of shared memory.*other block sizes"):
        sage_attention(x[..., :128], x[..., :128], x[..., :128], cu, cu, backend="mosaic", interpret=True,
                       block_sizes=MosaicBlockSizes(stages=8))


@pytest.mark.parametrize("d,dv,bs", [(256, 256, MosaicBlockSizes()), (192, 128, MosaicBlockSizes(stages=3)),
                                     (128, 128, MosaicBlockSizes(stages=6)), (64, 64, MosaicBlockSizes(stages=12))])
def test_shared_memory_estimate_bounds_mosaics(monkeypatch, d, dv, bs):
    """`smem_bytes` (which picks the default block sizes and refuses what cannot fit) is at least what Mosaic GPU
    allocates, and not more than SMEM_OVERHEAD above it: lowered for an H100 with our check off, at sizes past the
    limit, where Mosaic reports its own figure."""
    pytest.importorskip("jax_cuda13_plugin", reason="Mosaic GPU lowering needs jax_cuda13_plugin (.ci/env.sh test)")
    from pallas_kernels import sage_attention_mgpu

    monkeypatch.setattr(sage_attention_mgpu, "too_big", lambda *_: None)  # what `unsupported` asks
    fn = functools.partial(sage_attention, backend="mosaic", block_sizes=bs, interpret=False)
    with pytest.raises(ValueError, match="exceeds available shared memory") as err:
        lowered(fn, 1024, 1024, 8, 2, d, dv, 3)
    mosaic = int(re.search(r"smem_bytes=(\d+)", str(err.value)).group(1))
    estimate = sage_attention_mgpu.smem_bytes(d, dv, bs)
    assert mosaic <= estimate <= mosaic + sage_attention_mgpu.SMEM_OVERHEAD, (mosaic, estimate)


def test_rows_past_the_last_request():
    """Packed rows past the last request (padding up to a bucket; here more than a program's rows, random values)
    come back from the Mosaic path, which writes its output rows in place, as zeros with -inf LSEs (its blocks past
    the plan write them), and the requests' rows are untouched by them. (The Triton kernel leaves such rows
    unwritten: having its idle blocks write them cost it 23% at S=16k on an H100.)"""
    rng = np.random.default_rng(3)
    q, k, v, cq, ck = make(rng, [7, 140], [7, 140], 2, 1, 64, 64, jnp.bfloat16)
    pad = jnp.asarray(rng.standard_normal((150, 2, 64)), jnp.bfloat16)
    run = functools.partial(sage_attention, return_lse=True, backend="mosaic", block_sizes=MOSAIC, interpret=True)
    out, lse = run(jnp.concatenate([q, pad]), k, v, cq, ck)
    want, want_lse = run(q, k, v, cq, ck)
    np.testing.assert_array_equal(np.asarray(out[:147], np.float32), np.asarray(want, np.float32))
    np.testing.assert_array_equal(np.asarray(lse[:147]), np.asarray(want_lse))
    np.testing.assert_array_equal(np.asarray(out[147:], np.float32), 0.0)
    assert np.all(np.asarray(lse[147:]) == -np.inf)


LENS = [0, 1, 7, 300, 0, 65]  # zero-length, 1-row and odd requests, one longer than a tile, unaligned starts


@pytest.mark.parametrize("block,d,width,shift,split,shared", [(64, 40, 64, True, None, False),
                                                              (128, 192, 192, False, None, False),
                                                              (128, 192, 192, True, 128, False),
                                                              (128, 192, 192, True, 128, True)])
def test_key_tiles_match_reference(block, d, width, shift, split, shared):
    """The Mosaic path's K pass (smoothed, int8 per key tile, rows in place, each request's tiles starting at its
    first row rounded down to 8) equals its jnp reference exactly on the request rows; every row's scale is its own
    request's tile's, and a tile's rows dequantise back to K minus its mean. `split`: K and its mean given as two
    parts along D (MLA's [nope | pe]), read where they are; `shared`: the second part the same for every head and
    given as one head (MLA's k_pe)."""
    from pallas_kernels.sage_attention_mgpu import KEY_ALIGN, key_tile_plan, key_tiles, key_tiles_reference

    rng = np.random.default_rng(block + d)
    cu = jnp.asarray(np.concatenate([[0], np.cumsum(LENS)]), jnp.int32)
    t = sum(LENS)
    k = jnp.asarray(rng.standard_normal((t, 3, d)) * 4 + 2, jnp.bfloat16)
    mean = jnp.asarray(rng.standard_normal((len(LENS), 3, d)), jnp.float32) if shift else None
    if shared:  # the columns from `split` on equal in every head
        k = k.at[:, :, split:].set(jnp.broadcast_to(k[:, :1, split:], k[:, :, split:].shape))
        mean = mean.at[:, :, split:].set(jnp.broadcast_to(mean[:, :1, split:], mean[:, :, split:].shape))
    one = (lambda x: x[:, :1]) if shared else (lambda x: x)  # noqa: E731
    cut = (lambda x: (x[..., :split], one(x[..., split:]))) if split else (lambda x: x)  # noqa: E731
    y, scale = key_tiles(cut(k), cu, block, width=width, shift=None if mean is None else cut(mean), interpret=True)
    y_ref, scale_ref = key_tiles_reference(k, cu, block, width=width, shift=mean)
    rows = -(-(t + block) // 8) * 8  # headroom past the requests, whole 8-row tiles for TMA
    assert y.shape == (rows, 3, width) and scale.shape == (3, rows)
    np.testing.assert_array_equal(np.asarray(y[:t], np.float32), np.asarray(y_ref, np.float32))
    np.testing.assert_allclose(np.asarray(scale[:, :t]), np.asarray(scale_ref), rtol=1e-6)
    lead, _, _, _ = key_tile_plan(cu, t, block)
    np.testing.assert_array_equal(np.asarray(lead), np.asarray(cu[:-1]) % KEY_ALIGN)
    r = 3  # 300 rows from row 8: tiles of `block` rows from row 8 (no lead rows)
    got = np.asarray(y[8:308, :, :d], np.float32) * np.asarray(scale)[:, 8:308].T[..., None]
    want = np.asarray(k[8:308], np.float32) - (np.asarray(mean)[r] if shift else 0)
    np.testing.assert_allclose(got, want, atol=0.02 * np.abs(want).max())
    assert len(np.unique(np.asarray(scale)[0, 8:8 + block])) == 1  # one scale per tile
    r = 5  # 65 rows from row 308 (lead 4): its first tile holds rows 304.., of which 308.. are its own
    first = np.asarray(scale)[0, 308:min(304 + block, t)]
    assert len(np.unique(first)) == 1 and first[0] != np.asarray(scale)[0, 307]


@pytest.mark.parametrize("block,d,width,split,shared", [(64, 40, 64, None, False), (128, 192, 192, 128, False),
                                                       (128, 192, 192, 128, True)])
def test_key_tiles_smoothed_computes_the_means(block, d, width, split, shared):
    """key_tiles_smoothed (one program per request and head: K's means, then its tiles) returns K's per-request
    means (zero for empty requests) and the tiles key_tiles makes with those means, exactly; parts and a shared
    one-head part as in the key_tiles test; K offset per channel (where smoothing matters)."""
    from pallas_kernels.sage_attention import request_means
    from pallas_kernels.sage_attention_mgpu import key_tiles_reference, key_tiles_smoothed

    rng = np.random.default_rng(block + d + 1)
    cu = jnp.asarray(np.concatenate([[0], np.cumsum(LENS)]), jnp.int32)
    t = sum(LENS)
    k = jnp.asarray(rng.standard_normal((t, 3, d)) * 4 + 8 * rng.standard_normal(d), jnp.bfloat16)
    if shared:
        k = k.at[:, :, split:].set(jnp.broadcast_to(k[:, :1, split:], k[:, :, split:].shape))
    parts = (k[..., :split], k[:, :1, split:] if shared else k[..., split:]) if split else k
    y, scale, means = key_tiles_smoothed(parts, cu, block, width=width, interpret=True)
    want, _ = request_means(parts if split else (k,), cu)
    assert len(means) == len(want)
    for m, w in zip(means, want):
        assert m.shape == w.shape
        np.testing.assert_allclose(np.asarray(m), np.asarray(w), rtol=1e-5, atol=1e-5)
    mean = jnp.concatenate([jnp.broadcast_to(m, (m.shape[0], 3, m.shape[2])) for m in means], axis=2)
    y_ref, scale_ref = key_tiles_reference(k, cu, block, width=width, shift=mean)
    np.testing.assert_array_equal(np.asarray(y[:t], np.float32), np.asarray(y_ref, np.float32))
    np.testing.assert_allclose(np.asarray(scale[:, :t]), np.asarray(scale_ref), rtol=1e-6)


@pytest.mark.parametrize("lq,lk,hq,hk,d,dv", [MOSAIC_CASES[1], MOSAIC_CASES[3]])
def test_mosaic_means_in_the_key_pass(monkeypatch, request, lq, lk, hq, hk, d, dv):
    """Where requests x heads give every SM a program, the Mosaic path's K pass computes K's means itself
    (key_tiles_smoothed; forced here): the reference's bounds, and the LSE corrected by those means, on K with a
    large per-channel offset (where smoothing matters)."""
    from pallas_kernels import sage_attention_mgpu

    monkeypatch.setattr(sage_attention_mgpu, "SMOOTHED_MIN_PROGRAMS", 0)
    jax.clear_caches()  # other tests compiled these shapes on the other path (the rule is read when tracing)
    request.addfinalizer(jax.clear_caches)
    calls, smoothed = [], sage_attention_mgpu.key_tiles_smoothed
    monkeypatch.setattr(sage_attention_mgpu, "key_tiles_smoothed",
                        lambda *a, **kw: calls.append(1) or smoothed(*a, **kw))
    rng = np.random.default_rng(sum(lq) + hq + 2)
    q, k, v, cq, ck = make(rng, lq, lk, hq, hk, d, dv, jnp.bfloat16, k_offset=8.0)
    out, lse = sage_attention(q, k, v, cq, ck, return_lse=True, backend="mosaic", block_sizes=MOSAIC, interpret=True)
    ref, ref_lse = sage_attention_reference(q, k, v, cq, ck, return_lse=True)
    assert calls  # the K pass that computes the means ran
    close_to_reference(out, lse, ref, ref_lse)


def test_auto_backend_picks_by_request_length():
    """backend="auto" (the compiled default) takes the Mosaic kernel for long requests, where it was measured faster
    (common.DEFAULT_BACKEND's notes), and the Triton one for short requests, head dims past the rule, or a V the
    Mosaic kernel cannot multiply; "auto" is accepted by name, unknown backends are an error naming the choices."""
    from pallas_kernels.common import resolve_backend
    from pallas_kernels.sage_attention import MOSAIC_MAX_DQK, MOSAIC_MIN_TOKENS, auto_backend

    bf, n = jnp.bfloat16, MOSAIC_MIN_TOKENS
    assert auto_backend(16384, 16384, 1, 128, 128, bf) == "mosaic"
    assert auto_backend(16 * n, 16 * n, 16, 128, 128, bf) == "mosaic"
    assert auto_backend(16 * n - 1, 16 * n, 16, 128, 128, bf) == "triton"  # one row short of the mean
    assert auto_backend(16 * n, 16 * n - 1, 16, 192, 128, bf) == "triton"  # keys count too
    assert auto_backend(16 * n, 16 * n, 16, 192, 128, bf) == "mosaic"  # MLA's head dims
    assert auto_backend(4 * 176, 4 * 368, 4, 192, 128, bf) == "mosaic"  # the MLA seed's prefill: 176 per request
    assert auto_backend(16 * 64, 16 * 64, 16, 192, 128, bf) == "triton"  # 64 per request: Triton measured faster
    assert auto_backend(16384, 16384, 1, 2 * MOSAIC_MAX_DQK, 128, bf) == "triton"  # head dim past the rule
    assert auto_backend(16384, 16384, 1, 128, 128, jnp.float32) == "triton"  # the Mosaic P.V is 16-bit
    assert resolve_backend("sage_attention", None) == "auto"
    assert resolve_backend("sage_attention", "auto") == "auto"
    assert resolve_backend("sage_attention", None, interpret=True) == "triton"
    with pytest.raises(ValueError, match="'triton', 'mosaic', 'auto'"):
        resolve_backend("sage_attention", "cudnn")
    with pytest.raises(ValueError, match=r"\('triton', 'mosaic'\)"):
        resolve_backend("mla_decode", "auto")


def test_int_scores_take_the_shift_out_in_the_exponent():
    """The Mosaic kernel's int32 scores go to floats by an integer add of ROUNDER's bits (common.int_scores), the
    softmax step taking the shift out: the same p, max, sum and output as the plain conversion at the largest scores
    a 256-wide int8 product reaches, with masked (-inf) entries and a row that is all masked; past 2^22 the plain
    conversion is kept. The shift's product with the row's scale rounds once per row, moving that row's exponents
    by at most ~1.5 units of the int32 score (relative error in p <= ~1.1 x scale; the int8 rounding of Q and K moves
    a score by hundreds of units), so the bound is 2 x the largest scale: logits of up to +-40 in base 2 here."""
    from pallas_kernels.common import int_scores, online_softmax_step

    rng = np.random.default_rng(7)
    top = 127 * 127 * 256
    s_int = jnp.asarray(rng.integers(-top, top + 1, (64, 128)), jnp.int32)
    s_int = s_int.at[0, :3].set(jnp.asarray([top, -top, 0], jnp.int32))
    s, shift = int_scores(s_int, top)
    assert shift > 0 and np.array_equal(np.asarray(s, np.float64) - shift, np.asarray(s_int, np.float64))
    mask = jnp.asarray(rng.random((64, 128)) < 0.8).at[5].set(False)
    scale = jnp.asarray(rng.uniform(1e-6, 1e-5, 64), jnp.float32)  # per row: Q's scale times the tile's
    m = jnp.asarray(rng.uniform(-5, 5, 64), jnp.float32).at[5].set(-jnp.inf)
    l = jnp.asarray(rng.uniform(0.5, 2, 64), jnp.float32).at[5].set(0.0)
    acc = jnp.asarray(rng.standard_normal((64, 32)), jnp.float32).at[5].set(0.0)
    plain = online_softmax_step(jnp.where(mask, s_int.astype(jnp.float32), -jnp.inf), m, l, acc, True, scale=scale)
    shifted = online_softmax_step(jnp.where(mask, s, -jnp.inf), m, l, acc, True, scale=scale, shift=shift)
    for a, b in zip(plain, shifted):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-5, atol=1e-30)
    assert np.all(np.asarray(shifted[0])[5] == 0) and np.all(np.asarray(shifted[0])[~np.asarray(mask)] == 0)
    wide, none = int_scores(s_int, 2**22)
    assert none == 0.0 and np.array_equal(np.asarray(wide), np.asarray(s_int, np.float32))
