"""Layers shared by the models: RMSNorm and rotary position embeddings (default and YaRN).

Numerics follow HF transformers 5.x (`DeepseekV3RMSNorm`, `DeepseekV3RotaryEmbedding`,
`modeling_rope_utils._compute_yarn_parameters`): normalise in float32, cast back to the input dtype, then
multiply by the weight; cos/sin computed in float32 and scaled by the YaRN attention factor.

Axis legend used across jaxlm: B batch/requests, T query tokens, S cached tokens, N query heads, K kv heads,
H head dim, D model, L kv_lora, R rope, Q q_lora, P qk_nope, V v_head.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """HF RMSNorm: float32 statistics, cast to x's dtype, then scale by `weight`."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (weight * x32.astype(x.dtype)).astype(x.dtype)


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN magnitude correction 0.1 * mscale * ln(scale) + 1 (1 for scale <= 1)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def rope_frequencies(
    dim: int,
    theta: float,
    rope_type: str = "default",
    *,
    factor: float | None = None,
    original_max_position_embeddings: int | None = None,
    max_position_embeddings: int | None = None,
    beta_fast: float | None = None,
    beta_slow: float | None = None,
    mscale: float | None = None,
    mscale_all_dim: float | None = None,
    attention_factor: float | None = None,
    truncate: bool = True,
) -> tuple[np.ndarray, float]:
    """Inverse frequencies [dim // 2] (float32) and the cos/sin attention factor, as HF computes them."""
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    pos_freqs = np.float32(theta) ** exponents
    if rope_type == "default":
        return (1.0 / pos_freqs).astype(np.float32), 1.0
    if rope_type != "yarn":
        raise ValueError(f"unsupported rope type {rope_type!r}: jaxlm implements 'default' and 'yarn'")
    if factor is None:
        factor = max_position_embeddings / original_max_position_embeddings
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_get_mscale(factor)
    beta_fast = beta_fast or 32
    beta_slow = beta_slow or 1

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(original_max_position_embeddings / (num_rotations * 2 * math.pi))) / (
            2 * math.log(theta)
        )

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / np.float32(high - low), 0, 1)
    extrapolation_factor = (1 - ramp).astype(np.float32)
    inv_extra = (1.0 / pos_freqs).astype(np.float32)
    inv_inter = (1.0 / (np.float32(factor) * pos_freqs)).astype(np.float32)
    inv_freq = inv_inter * (1 - extrapolation_factor) + inv_extra * extrapolation_factor
    return inv_freq.astype(np.float32), float(attention_factor)


def rope_cos_sin(positions: jax.Array, inv_freq: np.ndarray, attention_factor: float, dtype) -> tuple:
    """cos, sin of shape [..., 2 * len(inv_freq)] for integer `positions`, in `dtype` (HF's half-split layout).
    Both come from one array [cos | sin] of the frequencies, so that XLA computes them in one pass (two otherwise)."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    cs = (jnp.concatenate([jnp.cos(freqs), jnp.sin(freqs)], axis=-1) * attention_factor).astype(dtype)
    cos, sin = jnp.split(cs, 2, axis=-1)
    return jnp.concatenate([cos, cos], axis=-1), jnp.concatenate([sin, sin], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Half-split (`rotate_half`) rotation. `cos`/`sin` broadcast against x's leading axes."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x * cos + rotated * sin).astype(x.dtype)


def interleave_to_half_split(dim: int) -> np.ndarray:
    """Permutation [0, 2, ..., dim-2, 1, 3, ..., dim-1]: DeepSeek's interleaved RoPE pairs to HF's half-split layout.

    Applied once at conversion to the rope rows of the q and k projections, so that model code only ever uses
    `apply_rope`; the scores are identical and `pe_cache` holds the same values as HF's cached `k_rot`.
    """
    return np.concatenate([np.arange(0, dim, 2), np.arange(1, dim, 2)])
