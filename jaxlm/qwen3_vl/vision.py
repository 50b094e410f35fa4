"""Qwen3-VL vision encoder (HF transformers 5.x `Qwen3VLVisionModel`), as pure functions over a params pytree.

Patch embedding (the Conv3d as one matmul over [C * T * P * P] rows), the learned square position table
bilinearly interpolated to each image grid (align_corners=True), 2-D axial RoPE over (row, col), pre-norm ViT
blocks whose attention stays inside each image, the 2 x 2 patch merger, and the DeepStack mergers whose outputs
are returned for the layers named in the config. Per-image metadata (interpolation taps, rope positions, segment
ids) is computed once on the host in numpy.

Params: patch_embed {w [CTPP, D], b}, pos_embed [G*G, D], blocks [ {norm1_w, norm1_b, qkv_w [D, 3D], qkv_b,
proj_w, proj_b, norm2_w, norm2_b, fc1_w, fc1_b, fc2_w, fc2_b} ... ], merger {norm_w, norm_b, fc1_w, fc1_b, fc2_w,
fc2_b}, deepstack [merger ...] (norm over the merged 4D).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels
from jaxlm import sharding
from jaxlm.layers import apply_rope


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int
    num_position_embeddings: int
    deepstack_visual_indexes: tuple[int, ...]
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    hidden_act: str = "gelu_pytorch_tanh"
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf(cls, v: dict[str, Any]) -> "VisionConfig":
        rope = v.get("rope_parameters") or {}
        act = v.get("hidden_act", "gelu_pytorch_tanh")
        if act not in ("gelu_pytorch_tanh", "gelu"):
            raise ValueError(f"vision_config.hidden_act {act!r} is not supported (gelu_pytorch_tanh or gelu)")
        return cls(depth=v["depth"], hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"],
                   num_heads=v["num_heads"], out_hidden_size=v["out_hidden_size"],
                   num_position_embeddings=v["num_position_embeddings"],
                   deepstack_visual_indexes=tuple(v.get("deepstack_visual_indexes") or ()),
                   patch_size=v.get("patch_size", 16), temporal_patch_size=v.get("temporal_patch_size", 2),
                   spatial_merge_size=v.get("spatial_merge_size", 2), in_channels=v.get("in_channels", 3),
                   hidden_act=act, rope_theta=float(rope.get("rope_theta", 10000.0)))


def _merged_order(h: int, w: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) of each patch in the processor's block-major order."""
    r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    shape = (h // m, m, w // m, m)
    return r.reshape(shape).transpose(0, 2, 1, 3).ravel(), c.reshape(shape).transpose(0, 2, 1, 3).ravel()


def _axis_taps(index: np.ndarray, size: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear taps and weights on one axis, align_corners=True, border clamp (F.interpolate semantics)."""
    src = index.astype(np.float32) * np.float32(side - 1) / np.float32(max(size - 1, 1))
    floor = np.floor(src)
    taps = np.clip(floor[:, None].astype(np.int64) + np.arange(2), 0, side - 1)
    weights = np.clip(1 - np.abs(src[:, None] - floor[:, None] - np.arange(2)), 0, None).astype(np.float32)
    return taps, weights


def vision_metadata(cfg: VisionConfig, grid_thw) -> dict[str, np.ndarray]:
    """Host-side per-patch metadata for images/videos with grid_thw [n, 3]: interpolation taps [N, 4] and
    weights [N, 4], rope positions [N, 2] (row, col), segment ids [N] (one per frame: attention stays inside) and
    the frames' cumulative lengths [frames + 1] (the varlen layout of the Pallas attention kernel)."""
    side = int(round(cfg.num_position_embeddings**0.5))
    idx, wts, pos, seg = [], [], [], []
    s = 0
    for t, h, w in np.asarray(grid_thw, np.int64).tolist():
        r, c = _merged_order(h, w, cfg.spatial_merge_size)
        ht, hw = _axis_taps(r, h, side)
        wt, ww = _axis_taps(c, w, side)
        taps = (ht[:, :, None] * side + wt[:, None, :]).reshape(-1, 4)
        weights = (hw[:, :, None] * ww[:, None, :]).reshape(-1, 4)
        for _ in range(t):
            idx.append(taps)
            wts.append(weights)
            pos.append(np.stack([r, c], -1))
            seg.append(np.full(h * w, s))
            s += 1
    sizes = [len(g) for g in seg]
    return {"interp_idx": np.concatenate(idx).astype(np.int32), "interp_w": np.concatenate(wts),
            "positions": np.concatenate(pos).astype(np.int32), "segments": np.concatenate(seg).astype(np.int32),
            "cu_seqlens": np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32)}


def _layer_norm(x, w, b, eps=1e-6):
    x32 = x.astype(jnp.float32)
    mu = x32.mean(-1, keepdims=True)
    var = ((x32 - mu) ** 2).mean(-1, keepdims=True)
    return ((x32 - mu) * jax.lax.rsqrt(var + eps) * w + b).astype(x.dtype)


def _rope_tables(cfg: VisionConfig, positions):
    """cos/sin [N, head_dim]: (row, col) frequencies over head_dim // 4 each, concatenated, then repeated."""
    spatial = cfg.head_dim // 2
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, spatial, 2, dtype=jnp.float32) / spatial))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [N, 2, head_dim // 4]
    hw = jnp.concatenate([freqs[:, 0], freqs[:, 1]], -1)
    emb = jnp.concatenate([hw, hw], -1)
    return jnp.cos(emb), jnp.sin(emb)


def _attention(blk, cfg: VisionConfig, x, cos, sin, segments, cu_seqlens, impl: str):
    n = x.shape[0]
    qkv = (x @ blk["qkv_w"] + blk["qkv_b"]).reshape(n, 3, cfg.num_heads, cfg.head_dim)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    f32 = jnp.float32
    q = apply_rope(q.astype(f32), cos[:, None], sin[:, None]).astype(x.dtype)  # HF rotates in float32
    k = apply_rope(k.astype(f32), cos[:, None], sin[:, None]).astype(x.dtype)
    if impl == "pallas":  # varlen, one segment per frame, no mask materialised (the XLA form below is O(N^2))
        o = sharding.replicated(functools.partial(pallas_kernels.sage_attention, causal=False,
                                                  sm_scale=cfg.head_dim**-0.5))(q, k, v, cu_seqlens, cu_seqlens)
        return o.reshape(n, -1) @ blk["proj_w"] + blk["proj_b"]
    s = jnp.einsum("qhd,khd->hqk", q, k).astype(f32) * cfg.head_dim**-0.5
    same = segments[:, None] == segments[None, :]  # full attention inside each image, never across
    p = jax.nn.softmax(jnp.where(same[None], s, -jnp.inf), axis=-1).astype(x.dtype)
    o = jnp.einsum("hqk,khd->qhd", p, v).reshape(n, -1)
    return o @ blk["proj_w"] + blk["proj_b"]


def _merge(mp, cfg: VisionConfig, x, postshuffle: bool):
    d4 = cfg.hidden_size * cfg.spatial_merge_size**2
    x = _layer_norm(x.reshape(-1, d4), mp["norm_w"], mp["norm_b"]) if postshuffle else \
        _layer_norm(x, mp["norm_w"], mp["norm_b"]).reshape(-1, d4)
    x = jax.nn.gelu(x @ mp["fc1_w"] + mp["fc1_b"], approximate=False)
    return x @ mp["fc2_w"] + mp["fc2_b"]


def vision_forward(params, cfg: VisionConfig, pixel_values, meta, impl: str = "xla"
                   ) -> tuple[jax.Array, list[jax.Array], jax.Array]:
    """pixel_values [N, C*T*P*P] (processor order) -> (merged [N / m^2, out], deepstack [k x [N / m^2, out]],
    last hidden states [N, D]). impl: "xla" (dense segment-masked attention) or "pallas" (sage_attention)."""
    x = pixel_values.astype(params["patch_embed"]["w"].dtype) @ params["patch_embed"]["w"] + params["patch_embed"]["b"]
    pos = (params["pos_embed"][meta["interp_idx"]] * meta["interp_w"][..., None].astype(x.dtype)).sum(1)
    x = x + pos.astype(x.dtype)
    cos, sin = _rope_tables(cfg, jnp.asarray(meta["positions"]))
    segments, cu_seqlens = jnp.asarray(meta["segments"]), jnp.asarray(meta["cu_seqlens"])
    act = (lambda y: jax.nn.gelu(y, approximate=True)) if cfg.hidden_act == "gelu_pytorch_tanh" else \
        (lambda y: jax.nn.gelu(y, approximate=False))
    deepstack = []
    for i, blk in enumerate(params["blocks"]):
        x = x + _attention(blk, cfg, _layer_norm(x, blk["norm1_w"], blk["norm1_b"]), cos, sin, segments, cu_seqlens,
                           impl)
        h = _layer_norm(x, blk["norm2_w"], blk["norm2_b"])
        x = x + act(h @ blk["fc1_w"] + blk["fc1_b"]) @ blk["fc2_w"] + blk["fc2_b"]
        if i in cfg.deepstack_visual_indexes:
            j = cfg.deepstack_visual_indexes.index(i)
            deepstack.append(_merge(params["deepstack"][j], cfg, x, postshuffle=True))
    return _merge(params["merger"], cfg, x, postshuffle=False), deepstack, x
