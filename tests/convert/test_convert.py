"""Conversion: FP8 block dequantisation, orbax round trip, the CLI, FP8 parity with HF, and every bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import convert
import jaxlm.mla as mla
from convert.safetensors_io import CheckpointError, SafetensorsCheckpoint, dequantize_fp8
from hf_mla import build_hf_model, hf_attention, quantize_fp8_checkpoint

ROOT = Path(__file__).resolve().parents[2]


def test_dequantize_fp8_matches_elementwise_formula_with_partial_blocks():
    rng = np.random.default_rng(0)
    m, n, bm, bn = 576, 300, 128, 128  # 4.5 row blocks, 2.3 column blocks, as kv_a_proj_with_mqa
    w = (rng.standard_normal((m, n)) * 100).astype(ml_dtypes.float8_e4m3fn)
    s = rng.uniform(0.001, 0.1, (5, 3)).astype(np.float32)
    out = dequantize_fp8(w, s, (bm, bn))
    i, j = np.meshgrid(np.arange(m), np.arange(n), indexing="ij")
    ref = w.astype(np.float32) * s[i // bm, j // bn]
    np.testing.assert_array_equal(out, ref)
    with pytest.raises(CheckpointError, match="weight_scale_inv of shape"):
        dequantize_fp8(w, s[:4], (bm, bn))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_v3")
    model = build_hf_model(path, q_lora_rank=48, rope="yarn", seed=11)
    return path, model


def test_round_trip_and_cli(hf_dir, tmp_path):
    path, _ = hf_dir
    out = tmp_path / "conv"
    proc = subprocess.run([sys.executable, "-m", "convert", str(path), str(out), "--layers", "1", "--dtype", "float32"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    cfg, layers = convert.load(out)
    assert list(layers) == [1]
    cfg_hf, direct = mla.load_layer(path, 1, dtype="float32")
    assert cfg == cfg_hf
    assert set(layers[1]) == set(direct)
    for k in direct:
        np.testing.assert_array_equal(np.asarray(layers[1][k]), np.asarray(direct[k]))
    assert not list(tmp_path.glob(".conv.tmp-*"))
    # refuses to overwrite, keeps what is there
    proc = subprocess.run([sys.executable, "-m", "convert", str(path), str(out)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "exists" in proc.stderr
    assert (out / "jaxlm_config.json").is_file()


def test_sharded_checkpoint(hf_dir, tmp_path):
    path, _ = hf_dir
    from safetensors.numpy import save_file

    ckpt = SafetensorsCheckpoint(path)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shutil.copy(path / "config.json", sharded / "config.json")
    names = ckpt.keys()
    weight_map = {}
    for s, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
        fname = f"model-{s + 1:05d}-of-00002.safetensors"
        save_file({k: np.ascontiguousarray(ckpt.read(k)) for k in part}, sharded / fname)
        weight_map.update({k: fname for k in part})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    _, a = mla.load_layer(path, 0, dtype="float32")
    _, b = mla.load_layer(sharded, 0, dtype="float32")
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))


def test_fp8_checkpoint_matches_hf(tmp_path):
    path = tmp_path / "fp8"
    model = build_hf_model(path, q_lora_rank=48, rope="yarn", seed=12)
    quantize_fp8_checkpoint(path, model, block=(32, 32))  # tiny sizes: 32x32 blocks give partial edge blocks
    ckpt = SafetensorsCheckpoint(path)
    assert ckpt.dtype("model.layers.1.self_attn.o_proj.weight") == np.dtype(ml_dtypes.float8_e4m3fn)
    cfg, params = mla.load_layer(path, 1, dtype="float32")
    rng = np.random.default_rng(0)
    seq, past = [6, 12, 25, 25], [50, 0, 0, 25]
    hist = [rng.standard_normal((p + s, cfg.hidden_size)).astype(np.float32) for p, s in zip(past, seq)]
    cache = mla.init_cache(cfg, 4, 128, np.float32)
    _, cache = mla.forward(params, cfg, np.concatenate([h[:p] for h, p in zip(hist, past)]), cache, past, [0] * 4)
    y, _ = mla.forward(params, cfg, np.concatenate([h[p:] for h, p in zip(hist, past)]), cache, seq, past)
    ref = np.concatenate([hf_attention(model, 1, h, p) for h, p in zip(hist, past)])
    assert np.abs(np.asarray(y) - ref).max() / np.abs(ref).max() <= 1e-4
    _, p16 = mla.load_layer(path, 1)
    assert str(p16["o_proj"].dtype) == "bfloat16"  # FP8 checkpoints default to bf16


def edit_checkpoint(src: Path, dst: Path, fn) -> Path:
    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dst)
    f = next(dst.glob("*.safetensors"))
    tensors = dict(load_file(f))
    fn(tensors)
    save_file(tensors, f)
    return dst


def test_bad_checkpoints(hf_dir, tmp_path):
    path, _ = hf_dir
    key = "model.layers.1.self_attn.kv_b_proj.weight"

    missing = edit_checkpoint(path, tmp_path / "missing", lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match="missing tensor model.layers.1.self_attn.kv_b_proj.weight"):
        mla.load_layer(missing, 1)

    def reshape(t):
        t[key] = t[key][:-4]

    with pytest.raises(CheckpointError, match="kv_b_proj.weight has shape"):
        mla.load_layer(edit_checkpoint(path, tmp_path / "shape", reshape), 1)

    def to_int(t):
        t[key] = t[key].astype(np.int32)

    with pytest.raises(CheckpointError, match="non-float dtype"):
        mla.load_layer(edit_checkpoint(path, tmp_path / "dtype", to_int), 1)

    def fp8_no_scale(t):
        t[key] = t[key].astype(ml_dtypes.float8_e4m3fn)

    with pytest.raises(CheckpointError, match="has no 'model.layers.1.self_attn.kv_b_proj.weight_scale_inv'"):
        mla.load_layer(edit_checkpoint(path, tmp_path / "noscale", fp8_no_scale), 1)


def test_corrupt_and_pickle_and_unknown(hf_dir, tmp_path):
    path, _ = hf_dir
    trunc = tmp_path / "trunc"
    shutil.copytree(path, trunc)
    f = next(trunc.glob("*.safetensors"))
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        mla.load_layer(trunc, 1)
    f.write_bytes(b"\x05\x00")
    with pytest.raises(CheckpointError, match="truncated safetensors"):
        mla.load_layer(trunc, 1)

    pickle_dir = tmp_path / "pickle"
    pickle_dir.mkdir()
    shutil.copy(path / "config.json", pickle_dir)
    (pickle_dir / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="safetensors only"):
        mla.load_layer(pickle_dir, 1)

    unknown = tmp_path / "unknown"
    shutil.copytree(path, unknown)
    cfg = json.loads((unknown / "config.json").read_text())
    cfg["model_type"] = "llama"
    (unknown / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unknown model_type 'llama'"):
        mla.load_layer(unknown, 1)

    (tmp_path / "nocfg").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        mla.load_layer(tmp_path / "nocfg", 0)
    with pytest.raises(ValueError, match="out of range"):
        mla.load_layer(path, 7)
    with pytest.raises(CheckpointError, match="not a converted jaxlm checkpoint"):
        convert.load(path)


def test_failed_conversion_leaves_nothing(hf_dir, tmp_path):
    path, _ = hf_dir
    broken = edit_checkpoint(path, tmp_path / "broken", lambda t: t.pop("model.layers.1.self_attn.o_proj.weight"))
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="o_proj.weight"):
        convert.convert_mla(broken, out, progress=False)
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_bf16_checkpoint_and_gate_proj_are_read(tmp_path):
    import torch

    path = tmp_path / "gated"
    model = build_hf_model(path, q_lora_rank=None, rope="default", seed=13, gate=True)
    from safetensors.torch import load_file

    saved = load_file(next(path.glob("*.safetensors")))
    cfg, params = mla.load_layer(path, 0, dtype="float32")
    gate = saved["model.layers.0.self_attn.gate_proj.weight"].numpy()
    np.testing.assert_array_equal(np.asarray(params["gate_proj"]),
                                  gate.T.reshape(cfg.hidden_size, cfg.num_heads, cfg.v_head_dim))
    bf16_dir = tmp_path / "bf16"
    model.to(torch.bfloat16).save_pretrained(bf16_dir, safe_serialization=True)
    cfg16, p16 = mla.load_layer(bf16_dir, 0)
    assert str(p16["o_proj"].dtype) == "bfloat16" and "gate_proj" not in p16
    np.testing.assert_allclose(np.asarray(p16["w_uk"], np.float32), np.asarray(params["w_uk"]), rtol=1e-2, atol=1e-2)
