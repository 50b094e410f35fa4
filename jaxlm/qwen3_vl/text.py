"""Qwen3-VL text decoder (HF transformers 5.x `Qwen3VLTextModel`): Qwen3 layers (per-head q/k RMSNorm, GQA,
SwiGLU) with interleaved multimodal RoPE, and DeepStack features added after the first decoder layers at
image-token positions; a GQA KV cache (one [B, S, K, H] buffer per layer) written in place by each step.

Params: embed [V, D], layers [ {input_norm, q_w [D, N*H], k_w [D, K*H], v_w, o_w [N*H, D], q_norm [H], k_norm,
post_norm, gate_w [D, F], up_w, down_w [F, D]} ... ], norm [D], lm_head [D, V] (absent when tied).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

import pallas_kernels
from jaxlm import sharding
from jaxlm.layers import apply_rope, rms_norm


@dataclasses.dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple[int, int, int]
    tie_word_embeddings: bool
    max_position_embeddings: int = 262144

    @classmethod
    def from_hf(cls, t: dict[str, Any], tie_word_embeddings: bool) -> "TextConfig":
        rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
        section = tuple(rope.get("mrope_section", (24, 20, 20)))
        head_dim = t.get("head_dim") or t["hidden_size"] // t["num_attention_heads"]
        if sum(section) != head_dim // 2:
            raise ValueError(f"mrope_section {section} must sum to head_dim / 2 = {head_dim // 2}")
        if rope.get("mrope_interleaved") is False:
            raise ValueError("only interleaved MRoPE (Qwen3-VL) is supported")
        return cls(vocab_size=t["vocab_size"], hidden_size=t["hidden_size"], intermediate_size=t["intermediate_size"],
                   num_layers=t["num_hidden_layers"], num_heads=t["num_attention_heads"],
                   num_kv_heads=t.get("num_key_value_heads", t["num_attention_heads"]), head_dim=head_dim,
                   rms_norm_eps=t.get("rms_norm_eps", 1e-6), rope_theta=float(rope.get("rope_theta", t.get("rope_theta", 5e6))),
                   mrope_section=section, tie_word_embeddings=tie_word_embeddings,
                   max_position_embeddings=t.get("max_position_embeddings", 262144))


def mrope_cos_sin(cfg: TextConfig, positions, dtype):
    """positions [3, ..., T] (t, h, w) -> cos, sin [..., T, head_dim]: frequency i takes its angle from the h
    positions when i % 3 == 1 and i < 3 * section[1], from w when i % 3 == 2 and i < 3 * section[2], else from t."""
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float32) / cfg.head_dim))
    i = np.arange(cfg.head_dim // 2)
    axis = np.zeros_like(i)
    axis[(i % 3 == 1) & (i < 3 * cfg.mrope_section[1])] = 1
    axis[(i % 3 == 2) & (i < 3 * cfg.mrope_section[2])] = 2
    freqs = jnp.asarray(positions, jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [3, ..., T, hd/2]
    pick = jnp.asarray(np.eye(3, dtype=np.float32)[axis])  # [hd/2, 3] one-hot: which axis feeds frequency i
    picked = jnp.einsum("a...f,fa->...f", freqs, pick)
    emb = jnp.concatenate([picked, picked], -1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def rope_index(cfg_merge: int, input_ids: np.ndarray, image_token_id: int, video_token_id: int,
               image_grid_thw=None, video_grid_thw=None) -> tuple[np.ndarray, np.ndarray]:
    """HF `get_rope_index` for a batch without padding: (positions [3, B, T], deltas [B]). Each run of image
    (or video-frame) tokens takes (t, h/m, w/m) grid positions offset by the text position before it; the next
    text resumes at that offset + max(h, w) / m."""
    input_ids = np.asarray(input_ids)
    grids = {1: iter(np.asarray(image_grid_thw).tolist() if image_grid_thw is not None else []),
             2: iter([[1, h, w] for t, h, w in np.asarray(video_grid_thw).tolist() for _ in range(t)]
                     if video_grid_thw is not None else [])}
    b, t = input_ids.shape
    out = np.zeros((3, b, t), np.int64)
    deltas = np.zeros(b, np.int64)
    for r in range(b):
        kinds = np.where(input_ids[r] == image_token_id, 1, np.where(input_ids[r] == video_token_id, 2, 0))
        pos, cols, start = 0, [], 0
        while start < t:
            end = start
            while end < t and kinds[end] == kinds[start]:
                end += 1
            if kinds[start] == 0:
                cols.append(np.broadcast_to(np.arange(end - start) + pos, (3, end - start)))
                pos += end - start
            else:
                gt, gh, gw = next(grids[int(kinds[start])])
                gh, gw = gh // cfg_merge, gw // cfg_merge
                tt, hh, ww = np.meshgrid(np.arange(gt), np.arange(gh), np.arange(gw), indexing="ij")
                block = np.stack([tt.ravel() + pos, hh.ravel() + pos, ww.ravel() + pos])
                if block.shape[1] != end - start:
                    raise ValueError(f"request {r}: a run of {end - start} image/video tokens, but its grid gives "
                                     f"{block.shape[1]}: one <|image_pad|> per merged patch (h*w/{cfg_merge ** 2})")
                cols.append(block)
                pos += max(gh, gw)
            start = end
        out[:, r] = np.concatenate(cols, axis=1)
        deltas[r] = out[:, r].max() + 1 - t
    return out, deltas


def init_cache(cfg: TextConfig, batch: int, max_len: int, dtype=jnp.bfloat16, mesh=None) -> dict:
    """GQA KV cache: {"k": [per layer [B, S, K, H]], "v": [...]}, S rounded up to a multiple of 64. One buffer per
    layer, so a donated step updates each in place (a stacked [layers, ...] array would be copied whole every
    step). With a `mesh`, laid out by jaxlm.sharding.qwen3_vl_cache_spec (batch over dp, KV heads over tp)."""
    max_len = -(-max_len // 64) * 64
    shape = (batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    cache = _zeros(shape, jnp.dtype(dtype), cfg.num_layers)  # one dispatch, not 2 x layers eager zeros
    if mesh is not None:
        cache = jax.device_put(cache, sharding.cache_sharding(sharding.qwen3_vl_cache_spec(cfg, mesh), shape, mesh))
    return cache


@functools.partial(jax.jit, static_argnames=("shape", "dtype", "layers"))
def _zeros(shape, dtype, layers):
    return {name: [jnp.zeros(shape, dtype) for _ in range(layers)] for name in ("k", "v")}


def _attention(lp, cfg: TextConfig, x, cos, sin, k_cache, v_cache, start, impl: str):
    """x [B, T, D]; new keys/values go to cache rows start[b] + t; query t sees rows < start[b] + t + 1.
    impl == "pallas" is for steps without history (start == 0: prefill, full sequences): causal GQA through the
    INT8 varlen kernel over the new keys themselves; otherwise XLA attention over the cache."""
    b, t, _ = x.shape
    q = (x @ lp["q_w"]).reshape(b, t, cfg.num_heads, cfg.head_dim)
    k = (x @ lp["k_w"]).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    v = (x @ lp["v_w"]).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    q = apply_rope(rms_norm(q, lp["q_norm"], cfg.rms_norm_eps), cos[:, :, None], sin[:, :, None])
    k = apply_rope(rms_norm(k, lp["k_norm"], cfg.rms_norm_eps), cos[:, :, None], sin[:, :, None])
    rows = start[:, None] + jnp.arange(t)[None, :]  # [B, T]
    k_cache, v_cache = (_write_kv(cfg, c, new, rows, impl) for c, new in ((k_cache, k), (v_cache, v)))
    if impl == "pallas":
        cu = jnp.arange(b + 1, dtype=jnp.int32) * t  # each row one request of t tokens
        flat = lambda a: a.reshape(b * t, *a.shape[2:])  # noqa: E731
        o = _gqa_kernel(cfg)(flat(q), flat(k), flat(v), cu, cu).reshape(b, t, -1)
        return o @ lp["o_w"], k_cache, v_cache
    g = cfg.num_heads // cfg.num_kv_heads
    q = q.reshape(b, t, cfg.num_kv_heads, g, cfg.head_dim).astype(k_cache.dtype)
    s = jnp.einsum("bqkgh,bskh->bkgqs", q, k_cache).astype(jnp.float32) * cfg.head_dim**-0.5
    visible = jnp.arange(k_cache.shape[1])[None, None, :] <= rows[:, :, None]  # [B, T, S]
    p = jax.nn.softmax(jnp.where(visible[:, None, None], s, -jnp.inf), axis=-1).astype(v_cache.dtype)
    o = jnp.einsum("bkgqs,bskh->bqkgh", p, v_cache).reshape(b, t, -1).astype(x.dtype)
    return o @ lp["o_w"], k_cache, v_cache


def _write_kv(cfg: TextConfig, cache, new, rows, impl: str):
    """new [B, T, K, H] into cache [B, S, K, H] at rows[b, t] (rows past S dropped), heads folded into the row
    width: the in-place Pallas kernel (per device under a mesh) or, with impl "xla", its jnp reference."""
    write = pallas_kernels.update_cache if impl == "pallas" else pallas_kernels.update_cache_reference

    def local(cache, new, rows):
        b, t = rows.shape
        flat = cache.reshape(*cache.shape[:2], -1)
        slots = jnp.repeat(jnp.arange(b, dtype=jnp.int32), t)
        return write(flat, new.reshape(b * t, -1), slots, rows.reshape(-1)).reshape(cache.shape)

    if impl != "pallas":
        return local(cache, new, rows)

    mesh = jax.sharding.get_abstract_mesh()
    spec = sharding.fit_spec(sharding.qwen3_vl_cache_spec(cfg, mesh), cache.shape, mesh)  # batch 1: not over dp
    return sharding.per_device(local, (spec, spec, P(spec[0], None)), spec)(cache, new, rows)


def _gqa_kernel(cfg: TextConfig):
    """sage_attention (causal) per device: heads over tp as the KV cache is (sharding.kv_head_axis), else
    replicated."""
    axis = sharding.kv_head_axis(cfg, jax.sharding.get_abstract_mesh())
    heads = P(None, axis, None) if axis else P()
    return sharding.per_device(functools.partial(pallas_kernels.sage_attention, causal=True,
                                                 sm_scale=cfg.head_dim**-0.5), (heads, heads, heads, P(), P()), heads)


def text_step(params, cfg: TextConfig, embeds, positions, cache, start, visual_mask=None, deepstack=(),
              impl: str = "xla"):
    """One cached step for a batch: embeds [B, T, D] at cache rows start[b] ..., positions [3, B, T] (MRoPE).
    DeepStack (prefill): after decoder layer i, hidden[visual_mask] += deepstack[i] (rows in visual-token order).
    impl "pallas" needs start == 0 (no history). Returns (hidden after the final norm [B, T, D], cache)."""
    cos, sin = mrope_cos_sin(cfg, positions, embeds.dtype)
    x = embeds
    if deepstack:
        flat_idx = jnp.nonzero(visual_mask.reshape(-1), size=deepstack[0].shape[0])[0]
    ks, vs = [], []
    for i, lp in enumerate(params["layers"]):
        a, k_i, v_i = _attention(lp, cfg, rms_norm(x, lp["input_norm"], cfg.rms_norm_eps), cos, sin,
                                 cache["k"][i], cache["v"][i], start, impl)
        ks.append(k_i)
        vs.append(v_i)
        x = x + a
        h = rms_norm(x, lp["post_norm"], cfg.rms_norm_eps)
        x = x + (jax.nn.silu(h @ lp["gate_w"]) * (h @ lp["up_w"])) @ lp["down_w"]
        if i < len(deepstack):
            x = x.reshape(-1, x.shape[-1]).at[flat_idx].add(deepstack[i].astype(x.dtype)).reshape(x.shape)
    return rms_norm(x, params["norm"], cfg.rms_norm_eps), {"k": ks, "v": vs}


def lm_head(params, cfg: TextConfig, hidden):
    head = params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]
    return (hidden @ head).astype(jnp.float32)


def text_forward(params, cfg: TextConfig, embeds, positions, visual_mask=None, deepstack=(), impl: str = "xla"):
    """Full sequences without a kept cache: embeds [B, T, D], positions [3, B, T] -> logits [B, T, V] (float32)."""
    b, t, _ = embeds.shape
    cache = init_cache(cfg, b, t, embeds.dtype)
    hidden, _ = text_step(params, cfg, embeds, positions, cache, jnp.zeros((b,), jnp.int32), visual_mask, deepstack,
                          impl)
    return lm_head(params, cfg, hidden)
