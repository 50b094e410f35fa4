"""Qwen3-VL-2B-Instruct at real size with random bf16 weights on the GPU: decode ms/step at batch 1 and 16.

    PYTHONPATH=. python bench/qwen3_vl.py [--out bench/results/qwen3_vl.json]

Decode ms/step = (time of generate with 1 + N new tokens - time with 1) / N, prompts of 128 text tokens, greedy,
no stop tokens; it includes our per-step host round trip (the sampled token is read back to check stops). The floor
is the text decoder's weight bytes (tied embedding read once as the LM head) over the measured read bandwidth.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import date
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import commit, copy_bandwidth, read_bandwidth
from convert.qwen3_vl import text_params, vision_params
from jaxlm.qwen3_vl import Qwen3VL, Qwen3VLConfig
from jaxlm.qwen3_vl.demo_checkpoint import random_hf_tensors

CONFIG_2B = {
    "model_type": "qwen3_vl", "tie_word_embeddings": True, "image_token_id": 151655, "video_token_id": 151656,
    "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "text_config": {"vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 28,
                    "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128, "rms_norm_eps": 1e-6,
                    "max_position_embeddings": 262144,
                    "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20],
                                        "mrope_interleaved": True}},
    "vision_config": {"depth": 24, "hidden_size": 1024, "intermediate_size": 4096, "num_heads": 16,
                      "out_hidden_size": 2048, "patch_size": 16, "temporal_patch_size": 2, "spatial_merge_size": 2,
                      "num_position_embeddings": 2304, "deepstack_visual_indexes": [5, 11, 17],
                      "hidden_act": "gelu_pytorch_tanh"},
}


def per_step_ms(generate, steps: int) -> tuple[float, float]:
    """(ms per decode step, ms for prefill + first token): generate(n) timed at n = 1 and n = 1 + steps."""
    def run(n):
        t0 = time.perf_counter()
        generate(n)
        return time.perf_counter() - t0

    run(1), run(steps + 1)  # compile / warm up
    one = min(run(1) for _ in range(3))
    full = min(run(steps + 1) for _ in range(3))
    return 1e3 * (full - one) / steps, 1e3 * one


def hf_decode(steps: int) -> dict:
    """HF transformers' Qwen3VLForConditionalGeneration at the same size (random bf16 weights, sdpa attention,
    its default dynamic cache) on the same GPU, same prompts and timing; freed before jaxlm runs."""
    import torch
    from transformers import Qwen3VLConfig as HFConfig, Qwen3VLForConditionalGeneration

    hf_cfg = HFConfig(text_config=CONFIG_2B["text_config"], vision_config=CONFIG_2B["vision_config"],
                      tie_word_embeddings=True, **{k: CONFIG_2B[k] for k in ("image_token_id", "video_token_id",
                                                                             "vision_start_token_id", "vision_end_token_id")})
    hf_cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen3VLForConditionalGeneration._from_config(hf_cfg, dtype=torch.bfloat16).eval()
    out = _hf_time(model, steps)
    del model
    torch.cuda.empty_cache()
    return out


def _hf_time(model, steps: int) -> dict:
    import torch

    rng = np.random.default_rng(0)
    out = {}
    for b in (1, 16):
        ids = torch.from_numpy(rng.integers(1000, 100000, (b, 128))).cuda()

        def generate(n):
            with torch.no_grad():
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, pad_token_id=0)
            torch.cuda.synchronize()

        out[f"hf_decode_ms_per_step_b{b}"], out[f"hf_prefill_and_first_token_ms_b{b}"] = per_step_ms(generate, steps)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/qwen3_vl.json")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--no-hf", action="store_true")
    args = ap.parse_args()
    hf = {} if args.no_hf else hf_decode(args.steps)
    cfg = Qwen3VLConfig.from_hf(CONFIG_2B)
    tensors = random_hf_tensors(CONFIG_2B, 0)
    get = lambda n: tensors[n]
    params = {"vision": vision_params(get, cfg.vision), "text": text_params(get, cfg.text, True)}
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), params)
    tensors.clear()  # free the host copies
    model = Qwen3VL(cfg, params)  # token-level generation: no tokenizer needed
    text_bytes = sum(x.nbytes for x in jax.tree.leaves(params["text"]))
    bw = read_bandwidth()
    rng = np.random.default_rng(0)
    res = {"date": str(date.today()), "card": jax.devices()[0].device_kind, "command": " ".join(sys.argv),
           "commit": commit(), "text_weight_bytes": text_bytes, "read_TBps": bw / 1e12,
           "copy_TBps": copy_bandwidth() / 1e12, "floor_decode_ms": 1e3 * text_bytes / bw}
    for b in (1, 16):
        prompts = [list(rng.integers(1000, 100000, 128)) for _ in range(b)]

        step, first = per_step_ms(lambda n: model.generate_tokens(prompts, max_new_tokens=n, stop_tokens=()), args.steps)
        res[f"decode_ms_per_step_b{b}"], res[f"prefill_and_first_token_ms_b{b}"] = step, first
    res.update(hf)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"\nQwen3-VL-2B (random bf16 weights), {res['card']}; read {res['read_TBps']:.2f} TB/s; "
          f"floor {res['floor_decode_ms']:.3f} ms/step (text weights {text_bytes / 1e9:.2f} GB)")
    for b in (1, 16):
        hf_step = res.get(f"hf_decode_ms_per_step_b{b}")
        print(f"batch {b:>2}: decode {res[f'decode_ms_per_step_b{b}']:.3f} ms/step (HF {hf_step}), prefill(128 tok) + "
              f"first token {res[f'prefill_and_first_token_ms_b{b}']:.1f} ms (HF {res.get(f'hf_prefill_and_first_token_ms_b{b}')})")


if __name__ == "__main__":
    main()
