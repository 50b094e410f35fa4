"""Helpers for the MLA parity tests: tiny random HF DeepSeek checkpoints and HF's attention run live."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

TINY = dict(vocab_size=64, hidden_size=96, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=24, v_head_dim=20,
            first_k_dense_replace=2, max_position_embeddings=512)


def rope_parameters(kind: str) -> dict:
    if kind == "default":
        return {"rope_type": "default", "rope_theta": 10000.0}
    # yarn with both mscale fields set (as R1 does), so HF's attention factor and mscale**2 both apply
    return {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "original_max_position_embeddings": 64,
            "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.9, "mscale_all_dim": 0.7}


def build_hf_model(path: Path, *, q_lora_rank=48, rope="yarn", seed=0, gate=False, model_type="deepseek_v3",
                   rope_interleave=True, **sizes):
    """A tiny random HF model saved with save_pretrained (float32, safetensors); returns the torch model.
    `sizes` override TINY's (e.g. qk_nope_head_dim=32)."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    if model_type == "deepseek_v3":
        config = DeepseekV3Config(**{**TINY, **sizes}, q_lora_rank=q_lora_rank, rope_parameters=rope_parameters(rope),
                                  n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
                                  rope_interleave=rope_interleave)
        model = DeepseekV3ForCausalLM(config)
    else:
        tiny = {k: v for k, v in {**TINY, **sizes}.items() if k != "first_k_dense_replace"}
        config = DeepseekV2Config(**tiny, q_lora_rank=q_lora_rank, rope_parameters=rope_parameters(rope),
                                  first_k_dense_replace=2, n_routed_experts=4, num_experts_per_tok=2)
        model = DeepseekV2ForCausalLM(config)
    with torch.no_grad():  # layernorm weights start at ones; make them matter
        for name, p in model.named_parameters():
            if "layernorm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
    model.config._attn_implementation = "eager"
    model.eval()
    model.save_pretrained(path, safe_serialization=True)
    if gate:
        add_gate(path, model)
    return model


def add_gate(path: Path, model) -> None:
    """Append a random `self_attn.gate_proj.weight` to every layer of a saved checkpoint."""
    from safetensors.torch import load_file, save_file

    cfg = model.config
    files = sorted(path.glob("*.safetensors"))
    assert len(files) == 1
    tensors = load_file(files[0])
    g = torch.Generator().manual_seed(7)
    for i in range(cfg.num_hidden_layers):
        tensors[f"model.layers.{i}.self_attn.gate_proj.weight"] = torch.randn(
            cfg.num_attention_heads * cfg.v_head_dim, cfg.hidden_size, generator=g) / cfg.hidden_size**0.5
    save_file(tensors, files[0], metadata={"format": "pt"})


def hf_attention(model, layer: int, hidden: np.ndarray, past: int) -> np.ndarray:
    """HF attention of `layer` over a full sequence [S, D] (history + new), causal; the last S - past rows."""
    attn = model.model.layers[layer].self_attn
    x = torch.from_numpy(np.asarray(hidden, np.float32))[None]
    s = x.shape[1]
    pos = torch.arange(s)[None]
    mask = torch.full((s, s), float("-inf")).triu(1)[None, None]
    with torch.no_grad():  # V3 passes (cos, sin); V2 passes complex freqs_cis
        out = attn(x, position_embeddings=model.model.rotary_emb(x, pos), attention_mask=mask)[0]
    return out[0, past:].numpy()


def quantize_fp8_checkpoint(path: Path, model, block=(128, 128)) -> None:
    """Store every 2-D attention weight of the saved checkpoint as e4m3 + float32 weight_scale_inv per block,
    and load the dequantised values back into `model`, so HF computes with exactly what FP8 represents."""
    from safetensors.torch import load_file, save_file

    files = sorted(path.glob("*.safetensors"))
    tensors = load_file(files[0])
    bm, bn = block
    out = {}
    state = dict(model.named_parameters())
    for name, w in tensors.items():
        if ".self_attn." in name and name.endswith("proj.weight") or name.endswith("proj_with_mqa.weight"):
            m, n = w.shape
            gm, gn = -(-m // bm), -(-n // bn)
            padded = torch.zeros(gm * bm, gn * bn)
            padded[:m, :n] = w
            blocks = padded.view(gm, bm, gn, bn)
            scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
            q = (blocks / scale[:, None, :, None]).view(gm * bm, gn * bn)[:m, :n].to(torch.float8_e4m3fn)
            out[name] = q
            out[name + "_scale_inv"] = scale.float()
            deq = (q.float().view(m, n) * scale.repeat_interleave(bm, 0).repeat_interleave(bn, 1)[:m, :n])
            with torch.no_grad():
                state[name].copy_(deq)
        else:
            out[name] = w
    save_file(out, files[0], metadata={"format": "pt"})
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                  "weight_block_size": list(block)}
    (path / "config.json").write_text(json.dumps(cfg, indent=1))
