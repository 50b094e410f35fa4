"""MLA layer invariants that need no HF model: ragged batching, decode loops, gating, bucketing, bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlm.mla as mla
from jaxlm import batching
from pallas_kernels.common import segment_of


@pytest.fixture(scope="module")
def layer():
    cfg = mla.MLAConfig.tiny()
    return cfg, mla.init_params(cfg, jax.random.key(0), jnp.float32)


def rand(rng, n, cfg):
    return rng.standard_normal((n, cfg.hidden_size)).astype(np.float32)


def test_prefill_equals_prefill_minus_one_plus_decode(layer):
    cfg, params = layer
    rng = np.random.default_rng(0)
    seq, past = [7, 1, 13], [3, 9, 0]
    hist = [rand(rng, p + s, cfg) for p, s in zip(past, seq)]
    fill = np.concatenate([h[:p] for h, p in zip(hist, past)])

    cache = mla.init_cache(cfg, 3, 64, jnp.float32)
    _, cache = mla.forward(params, cfg, fill, cache, past, [0, 0, 0])
    y_full, cache_full = mla.forward(params, cfg, np.concatenate([h[p:] for h, p in zip(hist, past)]), cache, seq, past)

    cache = mla.init_cache(cfg, 3, 64, jnp.float32)
    _, cache = mla.forward(params, cfg, fill, cache, past, [0, 0, 0])
    head = [s - 1 for s in seq]
    y_head, cache = mla.forward(params, cfg, np.concatenate([h[p:p + s - 1] for h, p, s in zip(hist, past, seq)]),
                                cache, head, past)
    y_last, cache = mla.forward(params, cfg, np.stack([h[-1] for h in hist]), cache, [1, 1, 1],
                                [p + s for p, s in zip(past, head)])
    last_rows = np.cumsum(seq) - 1
    np.testing.assert_allclose(np.asarray(y_last), np.asarray(y_full)[last_rows], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(cache.kv_cache), np.asarray(cache_full.kv_cache), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_decode_steps_equals_repeated_forward(layer, impl):
    cfg, params = layer
    rng = np.random.default_rng(1)
    past = [4, 11, 0, 20]
    xs = rng.standard_normal((5, 4, cfg.hidden_size)).astype(np.float32)
    fill = rand(rng, sum(past), cfg)

    def filled():
        cache = mla.init_cache(cfg, 4, 40, jnp.float32)
        return mla.forward(params, cfg, fill, cache, past, [0] * 4)[1]

    ys, cache_loop = mla.decode_steps(params, cfg, xs, filled(), past, attention_impl=impl)
    cache = filled()
    for i in range(5):
        y, cache = mla.forward(params, cfg, xs[i], cache, [1] * 4, [p + i for p in past], attention_impl="xla")
        np.testing.assert_allclose(np.asarray(ys[i]), np.asarray(y), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(cache_loop.pe_cache), np.asarray(cache.pe_cache), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_decode_steps_with_no_steps(layer, impl):
    """Zero steps: an empty output and the cache as given."""
    cfg, params = layer
    cache = mla.init_cache(cfg, 2, 16, jnp.float32)
    cache = mla.MLACache(*(jnp.asarray(np.random.default_rng(4).standard_normal(c.shape), c.dtype) for c in cache[:2]))
    before = [np.asarray(c) for c in cache[:2]]
    ys, cache = mla.decode_steps(params, cfg, np.zeros((0, 2, cfg.hidden_size), np.float32), cache, [1, 2],
                                 attention_impl=impl)
    assert ys.shape == (0, 2, cfg.hidden_size)
    for got, want in zip(cache[:2], before):
        np.testing.assert_array_equal(np.asarray(got), want)


def test_decode_steps_input_waits_for_the_previous_output(layer):
    """Each decode_steps step's input is x + 0 * (previous output's first element): equal to x for any previous
    output (NaN and inf included), and the dependency survives XLA's optimiser in the compiled loop (it must reach
    the GPU's graph, where an optimization barrier did not order the kernels)."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((4, 8)), jnp.bfloat16)
    for first in (1.5, -2.0e30, np.inf, -np.inf, np.nan):
        prev = jnp.asarray(rng.standard_normal((4, 8)), jnp.float32).at[0, 0].set(first)
        np.testing.assert_array_equal(np.asarray(mla._after(x, prev)), np.asarray(x))
    cfg, params = layer
    xs = jnp.asarray(rng.standard_normal((3, 2, cfg.hidden_size)), jnp.float32)
    cache = mla.init_cache(cfg, 2, 16, jnp.float32)
    hlo = mla._decode_steps_jit.lower(params, cfg, xs, cache, np.array([1, 4], np.int32), 16, "absorbed",
                                      "xla").compile().as_text()
    # steps 2 and 3 (unrolled: 3 <= DECODE_UNROLL); step 1 follows the loop's initial zeros, which XLA folds
    assert hlo.count("is-finite") >= 2, "each unrolled step's input must depend on the step before"


def test_zero_length_requests_leave_their_slot_untouched(layer):
    cfg, params = layer
    rng = np.random.default_rng(2)
    cache = mla.init_cache(cfg, 4, 32, jnp.float32)
    sentinel = rng.standard_normal(cache.kv_cache.shape).astype(np.float32)
    cache = mla.MLACache(jnp.asarray(sentinel), cache.pe_cache)
    seq, past = [5, 0, 0, 3], [0, 0, 0, 0]  # like pastlens [512, 0, 0, 256] when filling histories
    y, cache = mla.forward(params, cfg, rand(rng, 8, cfg), cache, seq, past)
    assert y.shape == (8, cfg.hidden_size) and np.isfinite(np.asarray(y)).all()
    kv = np.asarray(cache.kv_cache)
    np.testing.assert_array_equal(kv[1], sentinel[1])
    np.testing.assert_array_equal(kv[2], sentinel[2])
    np.testing.assert_array_equal(kv[0, 5:], sentinel[0, 5:])
    assert not np.array_equal(kv[0, :5], sentinel[0, :5])


def test_fewer_requests_than_slots_and_all_empty_step(layer):
    cfg, params = layer
    rng = np.random.default_rng(3)
    cache = mla.init_cache(cfg, 8, 16, jnp.float32)
    y, cache = mla.forward(params, cfg, rand(rng, 3, cfg), cache, [3], [0])
    assert y.shape == (3, cfg.hidden_size)
    y, cache = mla.forward(params, cfg, np.zeros((0, cfg.hidden_size), np.float32), cache, [0, 0], [3, 0])
    assert y.shape == (0, cfg.hidden_size)


def numpy_attention(params, cfg, x, pos):
    """Plain numpy MLA for one request holding only new tokens (past 0), returning per-head outputs [T, N, V]."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    x = x.astype(np.float64)

    def norm(v, w):
        return v / np.sqrt((v * v).mean(-1, keepdims=True) + cfg.norm_eps) * w

    c = norm(x @ p["q_a_proj"], p["q_a_layernorm"])
    q = np.einsum("tq,qnh->tnh", c, p["q_b_proj"])
    ckv = x @ p["kv_a_proj_with_mqa"]
    lat = norm(ckv[:, : cfg.kv_lora_rank], p["kv_a_layernorm"])
    inv_freq, factor = cfg.rope()
    ang = pos[:, None] * inv_freq[None].astype(np.float64)
    cos, sin = np.cos(np.concatenate([ang, ang], -1)) * factor, np.sin(np.concatenate([ang, ang], -1)) * factor

    def rope(v, c_, s_):
        h = v.shape[-1] // 2
        return v * c_ + np.concatenate([-v[..., h:], v[..., :h]], -1) * s_

    q_pe = rope(q[..., cfg.qk_nope_head_dim :], cos[:, None], sin[:, None])
    k_pe = rope(ckv[:, cfg.kv_lora_rank :], cos, sin)
    k_nope = np.einsum("sl,npl->snp", lat, p["w_uk"])
    v = np.einsum("sl,nlv->snv", lat, p["w_uv"])
    s = (np.einsum("tnp,snp->nts", q[..., : cfg.qk_nope_head_dim], k_nope) + np.einsum("tnr,sr->nts", q_pe, k_pe))
    s = s * cfg.softmax_scale + np.triu(np.full((len(x), len(x)), -np.inf), 1)
    w = np.exp(s - s.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    return np.einsum("nts,snv->tnv", w, v)


def test_gated_attention_matches_numpy_formula():
    cfg = mla.MLAConfig.tiny()
    params = mla.init_params(cfg, jax.random.key(1), jnp.float32, gate=True)
    rng = np.random.default_rng(4)
    x = rand(rng, 9, cfg)
    y, _ = mla.forward(params, cfg, x, mla.init_cache(cfg, 1, 16, jnp.float32), [9], [0])
    attn = numpy_attention(params, cfg, x, np.arange(9.0))
    gate = 1 / (1 + np.exp(-np.einsum("td,dnv->tnv", x.astype(np.float64), np.asarray(params["gate_proj"], np.float64))))
    ref = np.einsum("tnv,nvd->td", attn * gate, np.asarray(params["o_proj"], np.float64))
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-4, atol=1e-5)
    ungated = {k: v for k, v in params.items() if k != "gate_proj"}
    y0, _ = mla.forward(ungated, cfg, x, mla.init_cache(cfg, 1, 16, jnp.float32), [9], [0])
    np.testing.assert_allclose(np.asarray(y0), np.einsum("tnv,nvd->td", attn, np.asarray(params["o_proj"])),
                               rtol=1e-4, atol=1e-5)


def test_bucketing_compiles_a_handful_of_programs(layer):
    """A serving loop: 6 requests decode for 48 steps with growing histories; a new prompt arrives every 8 steps."""
    cfg, params = layer
    rng = np.random.default_rng(5)
    mla._step_jit.clear_cache()
    cache = mla.init_cache(cfg, 7, 128, jnp.float32)
    past = np.array([3, 9, 17, 1, 30, 12])
    for step in range(48):
        if step % 8 == 0:
            n = int(rng.integers(2, 24))
            _, cache = mla.forward(params, cfg, rand(rng, n, cfg), cache, [0] * 6 + [n], [0] * 7)
        _, cache = mla.forward(params, cfg, rand(rng, 6, cfg), cache, [1] * 6, past)
        past = past + 1
    # 54 calls; programs grow with log(history) (4 kv buckets per octave, 16..128) plus a few prefill shapes
    assert mla._step_jit._cache_size() <= 14, mla._step_jit._cache_size()


@pytest.mark.parametrize("n", [1, 7, 8, 9, 100, 704, 1000, 5000])
def test_bucket_bounds_padding(n):
    b = batching.bucket(n)
    assert n <= b and (b <= 8 or b <= 1.25 * n + 1)


def test_segment_of_matches_searchsorted_with_empty_segments():
    """The compare-all segment lookup equals jnp.searchsorted's (side right, minus one, clipped), zero-length
    segments skipped, and builds no loop."""
    rng = np.random.default_rng(5)
    lens = rng.integers(0, 4, 40)
    lens[[0, 7, 8, 39]] = 0  # empty segments first, in a row and last
    starts = jnp.asarray(np.concatenate([[0], np.cumsum(lens)]), jnp.int32)
    idx = jnp.arange(int(lens.sum()) + 3, dtype=jnp.int32)  # past the end too: clipped to the last segment
    want = jnp.clip(jnp.searchsorted(starts, idx, side="right") - 1, 0, len(lens) - 1)
    got = segment_of(starts, idx, len(lens))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert got.dtype == jnp.int32 and lens[np.asarray(got)[: int(lens.sum())]].min() > 0
    assert "while" not in str(jax.make_jaxpr(lambda s, i: segment_of(s, i, len(lens)))(starts, idx))


def test_pad_rows_and_take_rows():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((5, 3)).astype(np.float32)
    host = batching.pad_rows(x, 8)  # numpy stays numpy (sent with the step's arguments)
    dev = batching.pad_rows(jnp.asarray(x), 8)
    assert isinstance(host, np.ndarray) and host.shape == dev.shape == (8, 3)
    np.testing.assert_array_equal(host[:5], x)
    np.testing.assert_array_equal(np.asarray(dev), host)
    assert not host[5:].any()
    np.testing.assert_array_equal(np.asarray(batching.take_rows(dev, 5)), x)
    assert batching.pad_rows(x, 5) is x and batching.take_rows(dev, 8) is dev


def test_plan_is_memoised_by_its_arguments():
    """A repeated plan() returns the same read-only result, whatever form the same values come in (lists, tuples,
    integer arrays, numpy scalars); bools are rejected; bad lengths raise every time; the memo stays bounded."""
    batching._PLANS.clear()
    opts = dict(num_tokens=7, num_slots=4, max_len=64)
    first = batching.plan([3, 4], [5, 0], **opts)
    assert batching.plan([3, 4], [5, 0], **opts) is first
    lengths = first[0]
    with pytest.raises(ValueError, match="read-only"):
        lengths[0, 0] = 9
    np.testing.assert_array_equal(lengths, [[3, 4, 0, 0], [5, 0, 0, 0]])
    for seq, past in (((3, 4), np.array([5, 0], np.int64)), (np.array([3, 4], np.int32), [5, 0]),
                      ([np.int64(3), 4], [5, 0])):
        assert batching.plan(seq, past, **opts) is first
    other = batching.plan([3, 4], [5, 1], **opts)  # another history: its own sizes and lengths
    assert other[0][1, 1] == 1 and other is not first
    assert batching.plan([3, 4], [5, 0], **{**opts, "max_len": 128}) is not first  # another cache: its own entry
    with pytest.raises(ValueError, match="must hold integers"):
        batching.plan([True, False], [0, 0], **opts)
    for _ in range(2):  # an error is not remembered: the repeat is checked again
        with pytest.raises(ValueError, match="cache positions"):
            batching.plan([3, 4], [70, 0], **opts)
    for i in range(batching._MEMO_MAX + 3):
        batching.plan([i, 1], [0, 0], num_tokens=i + 1, num_slots=2, max_len=512)
    assert len(batching._PLANS) == batching._MEMO_MAX and batching.plan([3, 4], [5, 0], **opts) is not first


def test_lengths_stay_on_the_device_between_steps(layer):
    """forward() and decode_steps() return the lengths their requests reach, computed on the device, and copy their
    own after the launch when they come a second time; the next call of a decode loop, or a further repeat of a call,
    takes those instead of sending its numpy lengths. Whatever the memo holds, a step's device lengths equal its host values, and the memo
    stays bounded."""
    cfg, params = layer
    rng = np.random.default_rng(11)
    batching._ON_DEVICE.clear()
    batching._SEEN.clear()
    cache = mla.init_cache(cfg, 4, 64, jnp.float32)
    past = np.array([3, 9, 0, 17], np.int32)
    lengths = np.stack([np.ones(4, np.int32), past])
    assert batching.on_device(lengths, cache.kv_cache) is lengths  # nothing kept yet: numpy, sent with the call
    _, cache = mla.forward(params, cfg, rand(rng, 4, cfg), cache, [1] * 4, past)
    reached = np.stack([np.ones(4, np.int32), past + 1])
    key = batching._lengths_key(reached, cache.kv_cache)[0]
    kept = batching._ON_DEVICE[key]  # forward's own output, not a copy from the host
    assert batching.on_device(reached, cache.kv_cache) is kept
    assert batching.on_device(lengths, cache.kv_cache) is lengths  # seen once: not copied
    _, cache = mla.forward(params, cfg, rand(rng, 4, cfg), cache, [1] * 4, past)  # the same call again
    for host in (reached, lengths):  # the step's output, and the copy of the repeated call's own lengths
        got = batching.on_device(host, cache.kv_cache)
        assert isinstance(got, jax.Array)
        np.testing.assert_array_equal(np.asarray(got), host)

    ys, cache = mla.decode_steps(params, cfg, rng.standard_normal((3, 4, cfg.hidden_size)).astype(np.float32), cache,
                                 past + 1)
    np.testing.assert_array_equal(np.asarray(batching.on_device(past + 4, cache.kv_cache)), past + 4)
    assert ys.shape == (3, 4, cfg.hidden_size) and np.isfinite(np.asarray(ys)).all()

    for _ in range(batching._MEMO_MAX + 5):  # distinct values, each sent twice: copied once, the oldest dropped
        values = rng.integers(0, 1000, (2, 4), dtype=np.int32)
        for _ in range(2):
            batching.remember(values, cache.kv_cache)
        np.testing.assert_array_equal(np.asarray(batching.on_device(values, cache.kv_cache)), values)
    assert len(batching._ON_DEVICE) == batching._MEMO_MAX and key not in batching._ON_DEVICE
    assert len(batching._SEEN) <= batching._MEMO_MAX
    assert batching.on_device(reached, np.zeros(3)) is reached  # not a device array to place them with: unchanged

    # inside a user's jit the cache is a tracer: the lengths go in as given and nothing is kept
    batching._ON_DEVICE.clear()
    x = rand(rng, 4, cfg)
    y_jit, _ = jax.jit(lambda c: mla.forward(params, cfg, x, c, [1] * 4, past))(mla.init_cache(cfg, 4, 64, jnp.float32))
    y, _ = mla.forward(params, cfg, x, mla.init_cache(cfg, 4, 64, jnp.float32), [1] * 4, past)
    np.testing.assert_allclose(np.asarray(y_jit), np.asarray(y), rtol=1e-5, atol=1e-6)
    assert len(batching._ON_DEVICE) == 1  # only the eager call's output


@pytest.mark.parametrize(
    "seq,past,slots,max_len,msg",
    [
        ([4], [62], 2, 32, "cache positions"),  # history longer than the cache (32 rounds up to 64 positions)
        ([1, 1, 1], [0, 0, 0], 2, 32, "slots"),  # more requests than cache slots
        ([-1, 2], [0, 0], 2, 32, ">= 0"),
        ([1, 1], [0, -3], 2, 32, ">= 0"),
        ([], [], 2, 32, "empty batch"),
        ([1, 2], [0], 2, 32, "one entry per request"),
    ],
)
def test_bad_lengths_raise_clear_errors(layer, seq, past, slots, max_len, msg):
    cfg, params = layer
    x = np.ones((max(sum(s for s in seq if s > 0), 0), cfg.hidden_size), np.float32)
    with pytest.raises(ValueError, match=msg):
        mla.forward(params, cfg, x, mla.init_cache(cfg, slots, max_len, jnp.float32), seq, past)


def test_cache_not_from_init_cache_raises(layer):
    """A cache whose length is not a whole number of the kernels' 64-position blocks gets a clear error."""
    cfg, params = layer
    cache = mla.init_cache(cfg, 2, 64, jnp.float32)
    odd = mla.MLACache(cache.kv_cache[:, :50], cache.pe_cache[:, :50])
    with pytest.raises(ValueError, match="not a multiple of 64.*init_cache"):
        mla.forward(params, cfg, np.ones((2, cfg.hidden_size), np.float32), odd, [1, 1], [0, 0])
    with pytest.raises(ValueError, match="not a multiple of 64.*init_cache"):
        mla.decode_steps(params, cfg, np.ones((2, 2, cfg.hidden_size), np.float32), odd, [0, 0])


def test_decode_steps_checks_its_inputs(layer):
    """decode_steps' xs must be [steps, requests, hidden] with one past length per request."""
    cfg, params = layer
    cache = mla.init_cache(cfg, 2, 64, jnp.float32)
    for shape in ((2, cfg.hidden_size), (3, 2, cfg.hidden_size + 1)):
        with pytest.raises(ValueError, match=f"xs must be \\[steps, requests, {cfg.hidden_size}\\]"):
            mla.decode_steps(params, cfg, np.ones(shape, np.float32), cache, [0, 0])
    with pytest.raises(ValueError, match="3 requests per step but past_lens is \\[0, 0\\]"):
        mla.decode_steps(params, cfg, np.ones((4, 3, cfg.hidden_size), np.float32), cache, [0, 0])


def test_a_donated_cache_gets_a_clear_error(layer):
    """forward() and decode_steps() donate the cache: passing the old one again names the problem instead of
    JAX's "Array has been deleted"."""
    cfg, params = layer
    cache = mla.init_cache(cfg, 2, 64, jnp.float32)
    x = np.ones((2, cfg.hidden_size), np.float32)
    _, new = mla.forward(params, cfg, x, cache, [1, 1], [0, 0])
    with pytest.raises(ValueError, match="donated to an earlier .*pass the cache that call returned"):
        mla.forward(params, cfg, x, cache, [1, 1], [1, 1])
    _, newer = mla.decode_steps(params, cfg, x[None], new, [1, 1])
    with pytest.raises(ValueError, match="donated"):
        mla.decode_steps(params, cfg, x[None], new, [2, 2])
    y, _ = mla.forward(params, cfg, x, newer, [1, 1], [2, 2])  # the returned cache goes on
    assert y.shape == x.shape and np.isfinite(np.asarray(y)).all()


def test_token_count_and_hidden_size_mismatch(layer):
    cfg, params = layer
    cache = mla.init_cache(cfg, 2, 16, jnp.float32)
    with pytest.raises(ValueError, match="sum\\(seq_lens\\)"):
        mla.forward(params, cfg, np.ones((5, cfg.hidden_size), np.float32), cache, [2, 2], [0, 0])
    with pytest.raises(ValueError, match=str(cfg.hidden_size)):
        mla.forward(params, cfg, np.ones((4, cfg.hidden_size + 1), np.float32), cache, [2, 2], [0, 0])


def test_cache_is_1152_bytes_per_token_at_r1_sizes():
    cfg = mla.MLAConfig.r1()
    assert cfg.cache_bytes_per_token(jnp.bfloat16) == 1152
    shapes = jax.eval_shape(lambda: mla.init_cache(cfg, 16, 4096, jnp.bfloat16))
    assert shapes.kv_cache.shape == (16, 4096, 512) and shapes.pe_cache.shape == (16, 4096, 64)
    assert abs(cfg.softmax_scale - 0.1352338) < 1e-6


R1_HUB_CONFIG = {  # the layout of DeepSeek-R1's config.json on the hub (legacy rope_scaling + rope_theta)
    "model_type": "deepseek_v3", "hidden_size": 7168, "num_attention_heads": 128, "q_lora_rank": 1536,
    "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "max_position_embeddings": 163840, "rope_theta": 10000,
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                     "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
}


def test_config_layouts_agree_and_match_hf():
    """Hub `rope_scaling` and transformers-5 `rope_parameters` layouts give one config; rope as HF computes it."""
    import torch
    from transformers import DeepseekV3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hub = mla.MLAConfig.from_hf(R1_HUB_CONFIG)
    assert hub == mla.MLAConfig.r1()
    assert abs(hub.softmax_scale - 0.1352338) < 1e-7
    hf = DeepseekV3Config(**{k: v for k, v in R1_HUB_CONFIG.items() if k != "model_type"})
    v5 = mla.MLAConfig.from_hf(hf.to_dict())
    assert v5.rope()[1] == hub.rope()[1]
    np.testing.assert_array_equal(v5.rope()[0], hub.rope()[0])
    inv_freq, factor = ROPE_INIT_FUNCTIONS["yarn"](hf, torch.device("cpu"))
    np.testing.assert_allclose(hub.rope()[0], inv_freq.numpy(), rtol=1e-6)
    assert factor == pytest.approx(hub.rope()[1])
    with pytest.raises(ValueError, match="unknown model_type 'qwen3'"):
        mla.MLAConfig.from_hf({**R1_HUB_CONFIG, "model_type": "qwen3"})
    with pytest.raises(ValueError, match="unsupported rope type 'longrope'"):
        mla.MLAConfig.from_hf({**R1_HUB_CONFIG, "rope_scaling": {"type": "longrope", "factor": 2}})


def test_pallas_decode_with_idle_slots_matches_xla(layer):
    """Decode through the kernel with zero-length requests mixed in (their slots idle) equals the XLA path."""
    cfg, params = layer
    rng = np.random.default_rng(6)
    past = [5, 0, 17, 9, 0]
    fill = rand(rng, sum(past), cfg)
    x = rand(rng, 3, cfg)
    out = {}
    for impl in ("xla", "pallas"):
        cache = mla.init_cache(cfg, 6, 32, jnp.float32)
        _, cache = mla.forward(params, cfg, fill, cache, past, [0] * 5)
        out[impl] = mla.forward(params, cfg, x, cache, [1, 0, 1, 0, 1], past, attention_impl=impl)
    np.testing.assert_allclose(np.asarray(out["pallas"][0]), np.asarray(out["xla"][0]), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(out["pallas"][1].kv_cache), np.asarray(out["xla"][1].kv_cache))
    with pytest.raises(ValueError, match="attention_impl"):
        mla.forward(params, cfg, x, mla.init_cache(cfg, 6, 32), [1, 0, 1, 0, 1], past, attention_impl="cudnn")


def test_pallas_prefill_with_empty_requests_close_to_xla(layer):
    """Filling histories (pastlens [12, 0, 0, 7]-style, zero-length requests) and a ragged prefill on top of them
    through the kernels (INT8 Q.K^T) stay within SageAttention bounds of the XLA path; caches are written alike."""
    cfg, params = layer
    rng = np.random.default_rng(8)
    fill_seq, seq, past = [12, 0, 0, 7], [3, 0, 9, 5], [12, 0, 0, 7]
    x_fill, x_new = rand(rng, sum(fill_seq), cfg), rand(rng, sum(seq), cfg)
    out = {}
    for impl in ("xla", "pallas"):
        cache = mla.init_cache(cfg, 4, 32, jnp.float32)
        y0, cache = mla.forward(params, cfg, x_fill, cache, fill_seq, [0] * 4, attention_impl=impl)
        y1, cache = mla.forward(params, cfg, x_new, cache, seq, past, attention_impl=impl)
        out[impl] = (np.concatenate([np.asarray(y0), np.asarray(y1)]), np.asarray(cache.kv_cache))
    a, b = out["pallas"][0].astype(np.float64), out["xla"][0].astype(np.float64)
    assert np.isfinite(a).all()
    cos = float((a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b))
    assert cos >= 0.999 and np.abs(a - b).sum() / np.abs(b).sum() <= 0.02
    np.testing.assert_allclose(out["pallas"][1], out["xla"][1], rtol=1e-6, atol=1e-6)


def cosine(a, b):
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_int8_latent_cache(layer, impl):
    """init_cache(..., int8_latent=True): the latent is quantised per row as it is written (scales beside it, RoPE
    cache untouched); a history fill, a ragged prefill with an empty request and decode steps on top stay close to
    the same steps over a float cache, and the cached rows dequantise to the float cache's within half a step."""
    cfg, params = layer
    rng = np.random.default_rng(9)
    past, seq = [12, 0, 30, 7], [3, 0, 1, 5]
    x_fill, x_new = rand(rng, sum(past), cfg), rand(rng, sum(seq), cfg)
    xs = rng.standard_normal((3, 4, cfg.hidden_size)).astype(np.float32)
    out = {}
    for int8 in (False, True):
        cache = mla.init_cache(cfg, 4, 64, jnp.float32, int8_latent=int8)
        y0, cache = mla.forward(params, cfg, x_fill, cache, past, [0] * 4, attention_impl=impl)
        y1, cache = mla.forward(params, cfg, x_new, cache, seq, past, attention_impl=impl)
        ys, cache = mla.decode_steps(params, cfg, xs, cache, [p + s for p, s in zip(past, seq)], attention_impl=impl)
        out[int8] = np.concatenate([y0, y1, np.asarray(ys).reshape(-1, cfg.hidden_size)]), cache
    (y_f, c_f), (y_q, c_q) = out[False], out[True]
    assert c_q.kv_cache.dtype == jnp.int8 and c_q.kv_scale.shape == c_q.kv_cache.shape[:2]
    np.testing.assert_array_equal(np.asarray(c_q.pe_cache), np.asarray(c_f.pe_cache))
    latent = np.asarray(c_f.kv_cache)
    step = np.abs(latent).max(-1, keepdims=True) / 127
    assert np.all(np.abs(np.asarray(c_q.latent(slice(None), jnp.float32)) - latent) <= step * 0.5 + 1e-6)
    assert np.isfinite(y_q).all() and cosine(y_q, y_f) >= 0.9999, cosine(y_q, y_f)
    assert np.abs(y_q - y_f).sum() / np.abs(y_f).sum() <= 0.01


def test_int8_latent_cache_bytes():
    r1 = mla.MLAConfig.r1()
    assert r1.cache_bytes_per_token() == 1152 and r1.cache_bytes_per_token(int8_latent=True) == 512 + 4 + 128
    cache = jax.eval_shape(lambda: mla.init_cache(r1, 2, 100, int8_latent=True))
    assert sum(np.prod(c.shape) * c.dtype.itemsize for c in cache) == 2 * 128 * r1.cache_bytes_per_token(int8_latent=True)
