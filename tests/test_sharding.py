"""Tensor/data parallelism on 8 simulated CPU devices: sharded runs equal unsharded ones (float32), and sharded
weights really are split (per-device bytes read from the arrays' shards)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlm.qwen3_vl as qvl
from hf_qwen3_vl import make_checkpoint, prompt
from jaxlm import mla, seed, sharding

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (simulated) devices")


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def layer():
    cfg = dataclasses.replace(mla.MLAConfig.tiny(), num_heads=8)
    return cfg, mla.init_params(cfg, jax.random.key(0), jnp.float32, gate=True)


def seed_pattern(params, cfg, impl, mesh=None, int8_latent=False):
    """The seed's prefill batch (history + new tokens) then 3 decode steps of its 4 requests, one call each."""
    rng = np.random.default_rng(0)
    past, seq = seed.PREFILL_PAST, seed.PREFILL_SEQ
    if mesh is not None:
        params = sharding.shard_mla(params, cfg, mesh)
    cache = mla.init_cache(cfg, len(past), max(p + s for p, s in zip(past, seq)) + 3, jnp.float32, mesh=mesh,
                           int8_latent=int8_latent)
    x_hist = rng.standard_normal((sum(past), cfg.hidden_size)).astype(np.float32)
    _, cache = mla.forward(params, cfg, x_hist, cache, past, [0] * 4, attention_impl=impl)
    x = rng.standard_normal((sum(seq), cfg.hidden_size)).astype(np.float32)
    y, cache = mla.forward(params, cfg, x, cache, seq, past, attention_impl=impl)
    xs = rng.standard_normal((3, 4, cfg.hidden_size)).astype(np.float32)
    ys, cache = mla.decode_steps(params, cfg, xs, cache, [p + s for p, s in zip(past, seq)], attention_impl=impl)
    return np.asarray(y), np.asarray(ys), cache


@pytest.mark.parametrize("impl,tp,dp,int8", [("xla", 8, 1, False), ("xla", 4, 2, False), ("pallas", 2, 4, False),
                                             ("pallas", 2, 2, True)])
def test_mla_sharded_equals_unsharded(layer, impl, tp, dp, int8):
    cfg, params = layer
    y_ref, ys_ref, cache_ref = seed_pattern(params, cfg, impl, int8_latent=int8)
    mesh = sharding.make_mesh(tp, dp)
    y, ys, cache = seed_pattern(params, cfg, impl, mesh, int8_latent=int8)
    if int8:  # the int8 latent's row scales live beside it, split the same way
        assert rel(cache.kv_scale, cache_ref.kv_scale) <= 1e-5
        assert cache.kv_scale.addressable_shards[0].data.shape[0] == 4 // dp
    assert rel(y, y_ref) <= 1e-5 and rel(ys, ys_ref) <= 1e-5, (rel(y, y_ref), rel(ys, ys_ref))
    assert rel(cache.kv_cache, cache_ref.kv_cache) <= 1e-5
    # the cache stays split by request over dp (each device holds 4/dp slots), replicated over tp
    assert cache.kv_cache.addressable_shards[0].data.shape[0] == 4 // dp


def test_mla_weights_split_over_tp(layer):
    cfg, params = layer
    mesh = sharding.make_mesh(tp=8, dp=1)
    placed = sharding.shard_mla(params, cfg, mesh)
    split = {"q_b_proj", "w_uk", "w_uv", "o_proj", "gate_proj"}
    for name, x in placed.items():
        per_device = x.addressable_shards[0].data.nbytes
        assert per_device == (x.nbytes // 8 if name in split else x.nbytes), name
    total = sum(x.nbytes for x in placed.values())
    sharded = sum(x.nbytes for k, x in placed.items() if k in split)
    device0 = sum(x.addressable_shards[0].data.nbytes for x in placed.values())
    assert device0 == total - sharded + sharded // 8
    # at R1 sizes the head-split weights are most of the layer: a device holds ~1/tp of it plus the latent parts
    r1 = mla.MLAConfig.r1()
    shapes = jax.eval_shape(lambda: mla.init_params(r1, jax.random.key(0)))
    r1_split = sum(s.size for k, s in shapes.items() if k in split)
    assert r1_split / sum(s.size for s in shapes.values()) > 0.8


def test_mla_mesh_errors(layer):
    cfg, params = layer
    with pytest.raises(ValueError, match="needs 16 devices"):
        sharding.make_mesh(tp=16, dp=1)
    with pytest.raises(ValueError, match="does not divide the 6 attention heads"):
        sharding.shard_mla(params, dataclasses.replace(cfg, num_heads=6), sharding.make_mesh(tp=4, dp=1))
    with pytest.raises(ValueError, match="do not split over dp=2"):
        mla.init_cache(cfg, 3, 64, mesh=sharding.make_mesh(tp=4, dp=2))


def test_mesh_of_finds_the_mesh_and_skips_the_walk_on_one_device():
    """mesh_of: the mesh of a tree's sharded leaves (here: 8 devices), None for leaves on one device; in a process
    with one device per backend, None without walking the tree (a check in a one-device subprocess)."""
    import os
    import subprocess
    import sys

    mesh = sharding.make_mesh(tp=4, dp=2)
    split = jax.device_put(jnp.ones((8, 4)), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("tp")))
    assert not sharding._one_device_per_backend()
    assert sharding.mesh_of({"a": jnp.ones(3), "b": split}) is mesh
    assert sharding.mesh_of({"a": jnp.ones(3)}) is None
    code = ("import jax, jax.numpy as jnp\nfrom jaxlm import sharding\n"
            "assert len(jax.devices()) == 1 and sharding._one_device_per_backend()\n"
            "walked = []\njax.tree.leaves = lambda *a, **k: walked.append(1) or []\n"
            "assert sharding.mesh_of({'a': jnp.ones(3)}) is None and not walked\nprint('ok')\n")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3vl_tp")
    make_checkpoint(path)
    return path, qvl.load(path, dtype="float32")


@pytest.mark.parametrize("tp,dp,impl", [(2, 1, "xla"), (4, 2, "xla"), (2, 2, "pallas")],
                         ids=["tp2-kv-split", "tp4-kv-replicated-dp2", "tp2-dp2-pallas"])
def test_qwen3_vl_generate_sharded_same_tokens(qwen, tp, dp, impl):
    _, qwen = qwen
    qwen = dataclasses.replace(qwen, attention_impl=impl)
    rng = np.random.default_rng(5)
    grid = (1, 4, 6)
    prompts = [list(prompt(rng, [grid])[0]), list(prompt(rng, [], text_len=9)[0])]
    pixels = rng.standard_normal((24, 1536)).astype(np.float32)
    images = [[(pixels, grid)], None]
    ref, ref_logits = qwen.generate_tokens(prompts, images, max_new_tokens=4, stop_tokens=(), return_logits=True)
    sharded = qwen.shard(sharding.make_mesh(tp, dp))
    out, logits = sharded.generate_tokens(prompts, images, max_new_tokens=4, stop_tokens=(), return_logits=True)
    assert out == ref
    assert rel(logits, ref_logits) <= 1e-5
    text = sharded.params["text"]
    q_w = text["layers"][0]["q_w"]
    assert q_w.addressable_shards[0].data.nbytes == q_w.nbytes // tp
    k_w = text["layers"][0]["k_w"]
    kv_split = qwen.config.text.num_kv_heads % tp == 0
    assert k_w.addressable_shards[0].data.nbytes == (k_w.nbytes // tp if kv_split else k_w.nbytes)
    assert text["embed"].addressable_shards[0].data.shape[0] == qwen.config.text.vocab_size // tp
    assert rel(sharded.forward(np.asarray([prompts[1]])), qwen.forward(np.asarray([prompts[1]]))) <= 1e-5


def test_cli_tp(qwen):
    import subprocess
    import sys

    path, model = qwen
    expect = model.generate(["Hi"], max_new_tokens=4)[0]
    run = lambda tp: subprocess.run([sys.executable, "-m", "jaxlm.cli", "generate", "--model", str(path), "--prompt",  # noqa: E731
                                     "Hi", "--max-new-tokens", "4", "--dtype", "float32", "--tp", str(tp)],
                                    capture_output=True, text=True)
    proc = run(2)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == expect.strip()
    bad = run(16)
    assert bad.returncode == 2 and "--tp 16" in bad.stderr and "needs 16 devices" in bad.stderr
