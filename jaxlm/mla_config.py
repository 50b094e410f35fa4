"""The MLA layer's configuration: `MLAConfig`, a frozen dataclass (static under jit) read from an HF `config.json`
(`deepseek_v3` / `deepseek_v2`), with R1's sizes and a tiny one for tests as presets."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxlm.layers import rope_frequencies, yarn_get_mscale


@dataclasses.dataclass(frozen=True)
class MLAConfig:
    hidden_size: int
    num_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float | None = None
    original_max_position_embeddings: int | None = None
    max_position_embeddings: int = 4096
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    rope_truncate: bool = True
    attention_bias: bool = False
    rope_interleave: bool = True  # checkpoint rope rows are interleaved pairs (permuted at conversion)
    norm_eps: float = 1e-6  # HF builds q_a/kv_a layernorms with the default eps, not rms_norm_eps
    model_type: str = "deepseek_v3"

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim**-0.5, times mscale(factor, mscale_all_dim)**2 for scaled RoPE (HF `yarn_apply_mscale`)."""
        scale = self.qk_head_dim**-0.5
        if self.rope_type != "default" and self.mscale_all_dim:
            m = yarn_get_mscale(self._factor, self.mscale_all_dim)
            scale *= m * m
        return scale

    @property
    def _factor(self) -> float:
        if self.rope_factor is not None:
            return self.rope_factor
        return self.max_position_embeddings / self.original_max_position_embeddings

    def rope(self) -> tuple[np.ndarray, float]:
        return rope_frequencies(
            self.qk_rope_head_dim, self.rope_theta, self.rope_type, factor=self.rope_factor,
            original_max_position_embeddings=self.original_max_position_embeddings,
            max_position_embeddings=self.max_position_embeddings, beta_fast=self.beta_fast,
            beta_slow=self.beta_slow, mscale=self.mscale, mscale_all_dim=self.mscale_all_dim,
            attention_factor=self.attention_factor, truncate=self.rope_truncate,
        )

    def cache_bytes_per_token(self, dtype=jnp.bfloat16, int8_latent: bool = False) -> int:
        rope = self.qk_rope_head_dim * jnp.dtype(dtype).itemsize
        return rope + (self.kv_lora_rank + 4 if int8_latent else self.kv_lora_rank * jnp.dtype(dtype).itemsize)

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "MLAConfig":
        """From an HF `config.json` dict (`deepseek_v3` or `deepseek_v2`; `rope_scaling` or `rope_parameters`)."""
        model_type = hf.get("model_type")
        if model_type not in ("deepseek_v3", "deepseek_v2"):
            raise ValueError(f"unknown model_type {model_type!r} for the MLA layer: expected 'deepseek_v3' (V3/R1) or "
                             f"'deepseek_v2' (V2/V2-Lite)")
        missing = [k for k in ("hidden_size", "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim",
                               "qk_rope_head_dim", "v_head_dim") if hf.get(k) is None]
        if missing:
            raise ValueError(f"config.json lacks the MLA field(s) {missing}")
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
        theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        if rope_type not in ("default", "yarn"):
            raise ValueError(f"unsupported rope type {rope_type!r} in config.json: jaxlm implements 'default' and "
                             f"'yarn'")
        yarn = rope_type == "yarn"
        if yarn and rope.get("original_max_position_embeddings") is None:
            raise ValueError("yarn rope needs 'original_max_position_embeddings' in config.json")
        return cls(
            hidden_size=hf["hidden_size"],
            num_heads=hf["num_attention_heads"],
            q_lora_rank=hf.get("q_lora_rank"),
            kv_lora_rank=hf["kv_lora_rank"],
            qk_nope_head_dim=hf["qk_nope_head_dim"],
            qk_rope_head_dim=hf["qk_rope_head_dim"],
            v_head_dim=hf["v_head_dim"],
            rope_theta=float(theta),
            rope_type=rope_type,
            rope_factor=rope.get("factor") if yarn else None,
            original_max_position_embeddings=rope.get("original_max_position_embeddings") if yarn else None,
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            beta_fast=rope.get("beta_fast") if yarn else None,
            beta_slow=rope.get("beta_slow") if yarn else None,
            mscale=rope.get("mscale") if yarn else None,
            mscale_all_dim=rope.get("mscale_all_dim") if yarn else None,
            attention_factor=rope.get("attention_factor") if yarn else None,
            rope_truncate=rope.get("truncate", True),
            attention_bias=bool(hf.get("attention_bias", False)),
            rope_interleave=bool(hf.get("rope_interleave", True)) if model_type == "deepseek_v3" else True,
            model_type=model_type,
        )

    @classmethod
    def r1(cls) -> "MLAConfig":
        """DeepSeek-R1 / V3 attention sizes with R1's YaRN settings."""
        return cls(hidden_size=7168, num_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                   qk_rope_head_dim=64, v_head_dim=128, rope_type="yarn", rope_factor=40.0,
                   original_max_position_embeddings=4096, max_position_embeddings=163840, beta_fast=32,
                   beta_slow=1, mscale=1.0, mscale_all_dim=1.0)

    @classmethod
    def tiny(cls, q_lora: bool = True) -> "MLAConfig":
        return cls(hidden_size=64, num_heads=4, q_lora_rank=32 if q_lora else None, kv_lora_rank=32,
                   qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, rope_type="yarn", rope_factor=8.0,
                   original_max_position_embeddings=64, max_position_embeddings=512, mscale=0.7,
                   mscale_all_dim=0.7)
