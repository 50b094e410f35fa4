"""Vision encoder against HF transformers' Qwen3VLVisionModel on a tiny random config (float32, eager)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

from convert.qwen3_vl import vision_params
from jaxlm.qwen3_vl.vision import VisionConfig, vision_forward, vision_metadata

TINY = dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=48, patch_size=16,
            temporal_patch_size=2, spatial_merge_size=2, num_position_embeddings=64, deepstack_visual_indexes=[0, 2])


@pytest.fixture(scope="module")
def hf_vision():
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

    torch.manual_seed(0)
    config = Qwen3VLVisionConfig(**TINY)
    config._attn_implementation = "eager"
    model = Qwen3VLVisionModel(config).eval()
    with torch.no_grad():  # default init leaves norms at 1/0 and small weights: make every tensor matter
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.2 if p.ndim == 1 else 1 / p.shape[-1] ** 0.5) + (1 if "norm" in name and name.endswith("weight") else 0))
    state = {"model.visual." + k: v.detach().numpy() for k, v in model.state_dict().items()}
    cfg = VisionConfig.from_hf(config.to_dict())
    params = jax.tree.map(jax.numpy.asarray, vision_params(lambda n: state[n].astype(np.float32), cfg))
    return model, cfg, params


@pytest.mark.parametrize("grids", [[(1, 6, 4)], [(1, 4, 4), (1, 8, 10)], [(2, 4, 6)]], ids=["one", "two-images", "video"])
def test_matches_hf(hf_vision, grids):
    model, cfg, params = hf_vision
    n = sum(t * h * w for t, h, w in grids)
    pixels = np.random.default_rng(n).standard_normal((n, 3 * 2 * 16 * 16)).astype(np.float32)
    with torch.no_grad():
        out = model(torch.from_numpy(pixels), grid_thw=torch.tensor(grids))
    merged, deepstack, last = vision_forward(params, cfg, jax.numpy.asarray(pixels), vision_metadata(cfg, grids))
    for ours, ref in [(last, out.last_hidden_state), (merged, out.pooler_output)] + list(zip(deepstack, out.deepstack_features)):
        ref = ref.numpy()
        assert np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max() <= 1e-4
    assert len(deepstack) == len(cfg.deepstack_visual_indexes) == len(out.deepstack_features)
