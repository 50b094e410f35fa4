"""Qwen3-VL: HF tensor names -> jaxlm layouts (vision encoder so far). Linear kernels become `W.T` ([in, out]);
the Conv3d patch embedding becomes one [C*T*P*P, D] matrix, its inner order being the processor's row order."""

from __future__ import annotations

import numpy as np

from jaxlm.qwen3_vl.vision import VisionConfig


def _merger(get, prefix):
    return {"norm_w": get(prefix + "norm.weight"), "norm_b": get(prefix + "norm.bias"),
            "fc1_w": get(prefix + "linear_fc1.weight").T, "fc1_b": get(prefix + "linear_fc1.bias"),
            "fc2_w": get(prefix + "linear_fc2.weight").T, "fc2_b": get(prefix + "linear_fc2.bias")}


def vision_params(get, cfg: VisionConfig, prefix: str = "model.visual.") -> dict:
    """`get(name) -> float32 numpy array` for HF tensor names; returns the vision params pytree (numpy)."""
    p = lambda name: get(prefix + name)
    w = p("patch_embed.proj.weight")
    blocks = []
    for i in range(cfg.depth):
        b = f"blocks.{i}."
        blocks.append({
            "norm1_w": p(b + "norm1.weight"), "norm1_b": p(b + "norm1.bias"),
            "norm2_w": p(b + "norm2.weight"), "norm2_b": p(b + "norm2.bias"),
            "qkv_w": p(b + "attn.qkv.weight").T, "qkv_b": p(b + "attn.qkv.bias"),
            "proj_w": p(b + "attn.proj.weight").T, "proj_b": p(b + "attn.proj.bias"),
            "fc1_w": p(b + "mlp.linear_fc1.weight").T, "fc1_b": p(b + "mlp.linear_fc1.bias"),
            "fc2_w": p(b + "mlp.linear_fc2.weight").T, "fc2_b": p(b + "mlp.linear_fc2.bias"),
        })
    return {
        "patch_embed": {"w": np.ascontiguousarray(w.reshape(w.shape[0], -1).T), "b": p("patch_embed.proj.bias")},
        "pos_embed": p("pos_embed.weight"),
        "blocks": blocks,
        "merger": _merger(get, prefix + "merger."),
        "deepstack": [_merger(get, f"{prefix}deepstack_merger_list.{j}.") for j in range(len(cfg.deepstack_visual_indexes))],
    }


def text_params(get, cfg, tied: bool, prefix: str = "model.language_model.") -> dict:
    p = lambda name: get(prefix + name)
    layers = []
    for i in range(cfg.num_layers):
        b = f"layers.{i}."
        layers.append({
            "input_norm": p(b + "input_layernorm.weight"), "post_norm": p(b + "post_attention_layernorm.weight"),
            "q_w": p(b + "self_attn.q_proj.weight").T, "k_w": p(b + "self_attn.k_proj.weight").T,
            "v_w": p(b + "self_attn.v_proj.weight").T, "o_w": p(b + "self_attn.o_proj.weight").T,
            "q_norm": p(b + "self_attn.q_norm.weight"), "k_norm": p(b + "self_attn.k_norm.weight"),
            "gate_w": p(b + "mlp.gate_proj.weight").T, "up_w": p(b + "mlp.up_proj.weight").T,
            "down_w": p(b + "mlp.down_proj.weight").T,
        })
    out = {"embed": p("embed_tokens.weight"), "layers": layers, "norm": p("norm.weight")}
    if not tied:
        out["lm_head"] = get("lm_head.weight").T
    return out


def load_hf(path, dtype=None):
    """(Qwen3VL) from an HF directory: config.json + safetensors (single or sharded)."""
    import jax
    import jax.numpy as jnp

    from convert.safetensors_io import SafetensorsCheckpoint, read_config
    from jaxlm.qwen3_vl.model import Qwen3VL, Qwen3VLConfig
    from jaxlm.qwen3_vl.tokenizer import load_tokenizer

    hf = read_config(path)
    cfg = Qwen3VLConfig.from_hf(hf)
    ckpt = SafetensorsCheckpoint(path)
    first = "model.language_model.embed_tokens.weight"
    dt = jnp.dtype(dtype) if dtype is not None else jnp.dtype(ckpt.dtype(first))
    get = lambda name: ckpt.read_float(name)
    params = {"vision": vision_params(get, cfg.vision), "text": text_params(get, cfg.text, cfg.text.tie_word_embeddings)}
    params = jax.tree.map(lambda a: jnp.asarray(np.ascontiguousarray(a), dt), params)
    return Qwen3VL(cfg, params, load_tokenizer(path))
