"""The MLA layer on FP8 weights (load_layer(keep_fp8=True), python -m convert --keep-fp8): the seed pattern against
the dequantised layer and against HF transformers loading the same FP8 checkpoint."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import convert
from convert.safetensors_io import CheckpointError, SafetensorsCheckpoint
from hf_mla import build_hf_model, quantize_fp8_checkpoint
from jaxlm import mla, seed
from pallas_kernels import Fp8Weight

ALIGNED = dict(qk_nope_head_dim=32, v_head_dim=32, qk_rope_head_dim=16, kv_lora_rank=32)  # 16-row blocks line up


def cos(a, b):
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def aligned(tmp_path_factory):
    path = tmp_path_factory.mktemp("fp8_aligned")
    model = build_hf_model(path, seed=21, **ALIGNED)
    quantize_fp8_checkpoint(path, model, block=(16, 16))
    return path, model


def seed_pattern(params, cfg, impl):
    """The seed's prefill (histories then [64,128,256,256] new tokens on [512,0,0,256]) and 3 decode steps."""
    rng = np.random.default_rng(0)
    past, seq = seed.PREFILL_PAST, seed.PREFILL_SEQ
    cache = mla.init_cache(cfg, 4, 800, np.float32)
    hist = [rng.standard_normal((p + s, cfg.hidden_size)).astype(np.float32) for p, s in zip(past, seq)]
    _, cache = mla.forward(params, cfg, np.concatenate([h[:p] for h, p in zip(hist, past)]), cache, past, [0] * 4,
                           attention_impl=impl)
    y, cache = mla.forward(params, cfg, np.concatenate([h[p:] for h, p in zip(hist, past)]), cache, seq, past,
                           attention_impl=impl)
    xs = rng.standard_normal((3, 4, cfg.hidden_size)).astype(np.float32)
    ys, _ = mla.decode_steps(params, cfg, xs, cache, [p + s for p, s in zip(past, seq)], attention_impl=impl)
    return np.asarray(y), np.asarray(ys), hist


def test_keep_fp8_keeps_the_checkpoint_bytes(aligned):
    path, _ = aligned
    cfg, p8 = mla.load_layer(path, 1, keep_fp8=True)
    ckpt = SafetensorsCheckpoint(path)
    kv_b = np.asarray(ckpt.read("model.layers.1.self_attn.kv_b_proj.weight")).view(np.uint8)
    n, p, v = cfg.num_heads, cfg.qk_nope_head_dim, cfg.v_head_dim
    assert isinstance(p8["w_uk"], Fp8Weight) and p8["w_uk"].block == 16
    np.testing.assert_array_equal(np.asarray(p8["w_uk"].w).view(np.uint8), kv_b.reshape(n, p + v, -1)[:, :p])
    np.testing.assert_array_equal(np.asarray(p8["w_uv"].w).view(np.uint8), kv_b.reshape(n, p + v, -1)[:, p:])
    o = np.asarray(ckpt.read("model.layers.1.self_attn.o_proj.weight")).view(np.uint8)
    np.testing.assert_array_equal(np.asarray(p8["o_proj"].w).view(np.uint8), o)
    weight_bytes = sum(w.nbytes for w in p8.values())
    _, p32 = mla.load_layer(path, 1, dtype="float32")
    assert weight_bytes < sum(w.nbytes for w in p32.values()) / 3  # 1 byte + scales vs 4 bytes per weight


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_seed_pattern_against_dequantised_layer_and_hf(aligned, impl):
    path, _ = aligned
    from transformers import DeepseekV3ForCausalLM, FineGrainedFP8Config

    cfg, p8 = mla.load_layer(path, 1, keep_fp8=True, dtype="float32")
    _, p32 = mla.load_layer(path, 1, dtype="float32")
    y8, ys8, hist = seed_pattern(p8, cfg, impl)
    y32, ys32, _ = seed_pattern(p32, cfg, impl)
    # prefill (704 tokens) quantises o_proj's activations to FP8; decode multiplies FP8 weights with f32 activations
    assert cos(y8, y32) >= 0.999 and cos(ys8, ys32) >= 0.99999, (cos(y8, y32), cos(ys8, ys32))
    hf = DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager",
                                               quantization_config=FineGrainedFP8Config(dequantize=True)).eval()
    from hf_mla import hf_attention

    ref = np.concatenate([hf_attention(hf, 1, h, p) for h, p in zip(hist, seed.PREFILL_PAST)])
    assert cos(y32, ref) >= 0.99999  # HF dequantises the same bytes: the dequantised layer matches it
    assert cos(y8, ref) >= 0.999


def test_unaligned_blocks_are_requantised(tmp_path):
    """Heads of 24 + 16 rows and a 20-row V under 32-row blocks: rope rows and head parts cross scale blocks, so
    those weights are re-quantised on head-aligned blocks (close to, not bit-equal with, the checkpoint)."""
    model = build_hf_model(tmp_path, seed=22)
    quantize_fp8_checkpoint(tmp_path, model, block=(32, 32))
    cfg, p8 = mla.load_layer(tmp_path, 1, keep_fp8=True, dtype="float32")
    _, p32 = mla.load_layer(tmp_path, 1, dtype="float32")
    assert p8["w_uk"].scale.shape == (cfg.num_heads, 1, 1)
    y8, ys8, _ = seed_pattern(p8, cfg, "xla")
    y32, ys32, _ = seed_pattern(p32, cfg, "xla")
    assert cos(y8, y32) >= 0.999 and cos(ys8, ys32) >= 0.999, (cos(y8, y32), cos(ys8, ys32))


def test_convert_keep_fp8_round_trip_and_errors(aligned, tmp_path):
    path, _ = aligned
    out = tmp_path / "out"
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "convert", str(path), str(out), "--keep-fp8", "--layers", "1"],
                          cwd=root, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    cfg, layers = convert.load(out)
    _, direct = mla.load_layer(path, 1, keep_fp8=True)
    for name, w in direct.items():
        got = layers[1][name]
        assert type(got) is type(w), name
        if isinstance(w, Fp8Weight):
            assert got.block == w.block
            np.testing.assert_array_equal(np.asarray(got.w).view(np.uint8), np.asarray(w.w).view(np.uint8))
            np.testing.assert_array_equal(np.asarray(got.scale), np.asarray(w.scale))
    plain = tmp_path / "bf16"
    build_hf_model(plain, seed=3)
    with pytest.raises(CheckpointError, match="not float8_e4m3fn"):
        mla.load_layer(plain, 0, keep_fp8=True)


def test_decode_with_q_a_and_kv_a_side_by_side(monkeypatch):
    """The GPU's decode route for q_a / kv_a, run on the CPU: their products as the Mosaic weight-only launch's
    split-K partial sums side by side (the Mosaic GPU interpreter; the CPU default routes to Triton, where
    `fp8_matmuls_side_by_side` returns None), read by update_mla_cache as both q and ckv. Against the same decode
    steps with the products apart (the Triton kernel's): outputs within the kernels' rounding, the caches too. The
    decode steps' launches take the previous step's o_proj parts as an operand (the step's tie to it: no pass of its
    own), o_proj on the Mosaic weight-only kernel too."""
    import jax
    import jax.numpy as jnp
    import pallas_kernels
    from pallas_kernels.fp8_matmul_mgpu import MosaicBlockSizes

    cfg = mla.MLAConfig(hidden_size=256, num_heads=2, q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=32,
                        qk_rope_head_dim=64, v_head_dim=128)  # q_a 128, kv_a 192 rows, o_proj K 256: the kernel's tiles
    p8 = mla.quantize_fp8(mla.init_params(cfg, jax.random.key(3), jnp.bfloat16), cfg)
    rng = np.random.default_rng(4)
    past = [5, 0, 17]
    hist = jnp.asarray(rng.standard_normal((sum(past), 256)), jnp.bfloat16)
    xs = jnp.asarray(rng.standard_normal((2, 3, 256)), jnp.bfloat16)

    def decode():
        for step in (mla._step_jit, mla._decode_steps_jit):  # traced anew: else they keep an earlier trace's route
            step.clear_cache()
        cache = mla.init_cache(cfg, 3, 64, jnp.bfloat16)
        _, cache = mla.forward(p8, cfg, hist, cache, past, [0] * 3, attention_impl="pallas")
        ys, cache = mla.decode_steps(p8, cfg, xs, cache, past, attention_impl="pallas")
        return np.asarray(ys, np.float32), [np.asarray(c, np.float32) for c in cache[:2]]

    apart, apart_cache = decode()
    calls = []
    side_by_side = pallas_kernels.fp8_matmuls_side_by_side

    out_parts = pallas_kernels.fp8_matmul_parts
    mosaic_sizes = MosaicBlockSizes(stages=2, k_splits=2)

    def mosaic(*args, **kw):
        parts = side_by_side(*args, **kw, block_sizes=mosaic_sizes)
        calls.append((parts.shape, getattr(kw.get("after"), "shape", None)))
        return parts

    monkeypatch.setattr(pallas_kernels, "fp8_matmuls_side_by_side", mosaic)
    monkeypatch.setattr(pallas_kernels, "fp8_matmul_parts",
                        lambda *args, **kw: out_parts(*args, **kw, block_sizes=mosaic_sizes))
    together, together_cache = decode()
    assert calls and all(c[0] == 2 and c[2] == 128 + 192 for c, _ in calls), calls  # every decode step's launch
    # forward()'s launch has no step before it; decode_steps' scan body's (traced last, after a shape-only trace of
    # the step) waits for the previous step's o_proj: its launch takes that launch's split-K parts
    assert calls[0][1] is None and calls[-1][1] == (2, 3, 256), calls
    assert cos(together, apart) >= 0.9999, cos(together, apart)
    for a, b in zip(together_cache, apart_cache):
        assert cos(a, b) >= 0.9999, cos(a, b)
