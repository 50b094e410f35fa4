"""Helpers for the Qwen3-VL tests: a tiny random HF checkpoint (save_pretrained) and prompts for it."""

from __future__ import annotations

import numpy as np
import torch

IMG, VID, VSTART, VEND = 500, 501, 502, 503


def make_checkpoint(path):
    """Save a tiny random Qwen3VLForConditionalGeneration (4 heads, 2 KV heads, 512-token vocabulary) to `path`;
    returns HF's model loaded back from it (float32, eager attention)."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    torch.manual_seed(0)
    cfg = Qwen3VLConfig(
        text_config=dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
                         pad_token_id=0, rope_parameters={"rope_type": "default", "rope_theta": 5e6,
                                                          "mrope_section": [4, 2, 2], "mrope_interleaved": True}),
        vision_config=dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64,
                           patch_size=16, temporal_patch_size=2, spatial_merge_size=2, num_position_embeddings=64,
                           deepstack_visual_indexes=[0, 2]),
        image_token_id=IMG, video_token_id=VID, vision_start_token_id=VSTART, vision_end_token_id=VEND,
        tie_word_embeddings=True)
    model = Qwen3VLForConditionalGeneration(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():  # larger than the 0.02 init so every path moves the logits
            p.copy_(torch.randn_like(p) * (0.1 if p.ndim == 1 else 1 / p.shape[-1] ** 0.5) + (1 if "norm" in name else 0))
    model.save_pretrained(path, safe_serialization=True)
    return Qwen3VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def prompt(rng, grids, text_len=5):
    """Random text tokens, then per image grid (t, h, w): <vision_start>, t*h*w/4 image tokens, <vision_end>, text."""
    ids = list(rng.integers(1, 400, text_len))
    for t, h, w in grids:
        ids += [VSTART] + [IMG] * (t * h * w // 4) + [VEND] + list(rng.integers(1, 400, 3))
    return np.array([ids])
