"""A tiny, randomly initialised Qwen3-VL written in HF format (config.json + model.safetensors), with the real
Qwen vocabulary size and special-token ids, so the demo runs end to end with the real tokenizer and no download.
Its weights are random: it produces fluent-looking nonsense, not descriptions."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

VOCAB = 151936
DEMO_CONFIG = {
    "model_type": "qwen3_vl", "architectures": ["Qwen3VLForConditionalGeneration"], "tie_word_embeddings": True,
    "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "text_config": {"model_type": "qwen3_vl_text", "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128,
                    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                    "rms_norm_eps": 1e-6, "max_position_embeddings": 4096,
                    "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [4, 2, 2],
                                        "mrope_interleaved": True}},
    "vision_config": {"model_type": "qwen3_vl", "depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 4,
                      "out_hidden_size": 64, "patch_size": 16, "temporal_patch_size": 2, "spatial_merge_size": 2,
                      "num_position_embeddings": 64, "deepstack_visual_indexes": [0], "in_channels": 3,
                      "hidden_act": "gelu_pytorch_tanh"},
}


def random_hf_tensors(cfg: dict, seed: int) -> dict[str, np.ndarray]:
    """HF-named float32 tensors with random values for an HF-style Qwen3-VL config dict."""
    rng = np.random.default_rng(seed)
    t, v = cfg["text_config"], cfg["vision_config"]
    out = {}

    def lin(name, o, i, bias=False):
        out[name + ".weight"] = (rng.standard_normal((o, i)) / np.sqrt(i)).astype(np.float32)
        if bias:
            out[name + ".bias"] = (0.02 * rng.standard_normal(o)).astype(np.float32)

    def norm(name, n, bias=False):
        out[name + ".weight"] = (1 + 0.1 * rng.standard_normal(n)).astype(np.float32)
        if bias:
            out[name + ".bias"] = (0.02 * rng.standard_normal(n)).astype(np.float32)

    d, vi = v["hidden_size"], v["intermediate_size"]
    p = "model.visual."
    out[p + "patch_embed.proj.weight"] = (rng.standard_normal((d, 3, 2, 16, 16)) / np.sqrt(1536)).astype(np.float32)
    out[p + "patch_embed.proj.bias"] = np.zeros(d, np.float32)
    out[p + "pos_embed.weight"] = (0.1 * rng.standard_normal((v["num_position_embeddings"], d))).astype(np.float32)
    for i in range(v["depth"]):
        b = f"{p}blocks.{i}."
        norm(b + "norm1", d, True)
        norm(b + "norm2", d, True)
        lin(b + "attn.qkv", 3 * d, d, True)
        lin(b + "attn.proj", d, d, True)
        lin(b + "mlp.linear_fc1", vi, d, True)
        lin(b + "mlp.linear_fc2", d, vi, True)
    d4 = 4 * d
    for m, n in [("merger", d)] + [(f"deepstack_merger_list.{j}", d4) for j in range(len(v["deepstack_visual_indexes"]))]:
        norm(f"{p}{m}.norm", n, True)
        lin(f"{p}{m}.linear_fc1", d4, d4, True)
        lin(f"{p}{m}.linear_fc2", v["out_hidden_size"], d4, True)
    h, hd, nh, nk = t["hidden_size"], t["head_dim"], t["num_attention_heads"], t["num_key_value_heads"]
    p = "model.language_model."
    out[p + "embed_tokens.weight"] = (rng.standard_normal((t["vocab_size"], h))).astype(np.float32)
    for i in range(t["num_hidden_layers"]):
        b = f"{p}layers.{i}."
        lin(b + "self_attn.q_proj", nh * hd, h)
        lin(b + "self_attn.k_proj", nk * hd, h)
        lin(b + "self_attn.v_proj", nk * hd, h)
        lin(b + "self_attn.o_proj", h, nh * hd)
        norm(b + "self_attn.q_norm", hd)
        norm(b + "self_attn.k_norm", hd)
        lin(b + "mlp.gate_proj", t["intermediate_size"], h)
        lin(b + "mlp.up_proj", t["intermediate_size"], h)
        lin(b + "mlp.down_proj", h, t["intermediate_size"])
        norm(b + "input_layernorm", h)
        norm(b + "post_attention_layernorm", h)
    norm(p + "norm", h)
    return out


def demo_checkpoint(cache_dir=None, seed: int = 0) -> Path:
    """Path of the demo checkpoint, written on first use under $JAXLM_CACHE (default ~/.cache/jaxlm)."""
    from safetensors.numpy import save_file

    root = Path(cache_dir or os.environ.get("JAXLM_CACHE", Path.home() / ".cache" / "jaxlm"))
    path = root / f"qwen3-vl-demo-random-{seed}"
    if (path / "model.safetensors").is_file() and (path / "config.json").is_file():
        return path
    tmp = root / f".{path.name}.tmp-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(random_hf_tensors(DEMO_CONFIG, seed), tmp / "model.safetensors", metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(DEMO_CONFIG, indent=1))
    if path.exists():  # a half-written earlier attempt
        import shutil

        shutil.rmtree(path)
    os.replace(tmp, path)
    return path
