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
