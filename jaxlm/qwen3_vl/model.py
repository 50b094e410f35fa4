"""Qwen3-VL model: config, loading, and the full-sequence forward (vision encoder + text decoder)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.qwen3_vl.text import TextConfig, rope_index, text_forward
from jaxlm.qwen3_vl.vision import VisionConfig, vision_forward, vision_metadata


@dataclasses.dataclass(frozen=True)
class Qwen3VLConfig:
    text: TextConfig
    vision: VisionConfig
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "Qwen3VLConfig":
        if hf.get("model_type") != "qwen3_vl":
            raise ValueError(f"unknown model_type {hf.get('model_type')!r}: jaxlm.qwen3_vl reads 'qwen3_vl' checkpoints")
        text = hf["text_config"]
        tie = hf.get("tie_word_embeddings", text.get("tie_word_embeddings", True))
        return cls(text=TextConfig.from_hf(text, bool(tie)), vision=VisionConfig.from_hf(hf["vision_config"]),
                   image_token_id=hf["image_token_id"], video_token_id=hf["video_token_id"],
                   vision_start_token_id=hf["vision_start_token_id"], vision_end_token_id=hf["vision_end_token_id"])


@dataclasses.dataclass
class Qwen3VL:
    config: Qwen3VLConfig
    params: dict

    def forward(self, input_ids, pixel_values=None, image_grid_thw=None) -> jax.Array:
        """Logits [B, T, vocab] over full sequences (no cache), HF's layout of pixel_values / image_grid_thw."""
        cfg = self.config
        input_ids = np.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, tokens], got shape {input_ids.shape}")
        embeds = self.params["text"]["embed"][jnp.asarray(input_ids)]
        visual_mask = input_ids == cfg.image_token_id
        deepstack = ()
        if pixel_values is not None:
            if image_grid_thw is None:
                raise ValueError("pixel_values needs image_grid_thw")
            merged, deepstack, _ = vision_forward(self.params["vision"], cfg.vision, jnp.asarray(pixel_values),
                                                  vision_metadata(cfg.vision, image_grid_thw))
            if merged.shape[0] != int(visual_mask.sum()):
                raise ValueError(f"{int(visual_mask.sum())} image tokens in input_ids but the images give "
                                 f"{merged.shape[0]} merged patches")
            idx = jnp.asarray(np.flatnonzero(visual_mask.reshape(-1)))
            embeds = embeds.reshape(-1, embeds.shape[-1]).at[idx].set(merged.astype(embeds.dtype)).reshape(embeds.shape)
        elif visual_mask.any():
            raise ValueError("input_ids hold image tokens but no pixel_values were given")
        positions, _ = rope_index(cfg.vision.spatial_merge_size, input_ids, cfg.image_token_id, cfg.video_token_id,
                                  image_grid_thw)
        return text_forward(self.params["text"], cfg.text, embeds, jnp.asarray(positions),
                            jnp.asarray(visual_mask), tuple(deepstack))


def load(path, dtype=None) -> Qwen3VL:
    """An HF Qwen3-VL directory (safetensors) -> Qwen3VL with `.config` and `.params` (dtype: checkpoint's float
    dtype by default)."""
    from convert import qwen3_vl as conv  # the layout mapping lives in the converter

    return conv.load_hf(Path(path), dtype=dtype)
