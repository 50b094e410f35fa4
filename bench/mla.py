"""MLA layer at DeepSeek-R1 sizes on the GPU: the seed's prefill and decode cases, HF transformers on the same
GPU and weights (padded batch), and the floor. Writes bench/results/mla.json (or --out) and prints a table.

    PYTHONPATH=. python bench/mla.py [--runs 100] [--out bench/results/mla.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import commit, copy_bandwidth, read_bandwidth
from jaxlm import mla, seed
from pallas_kernels.common import quantize_rows_int8

R1_HF = dict(hidden_size=7168, num_attention_heads=128, num_key_value_heads=128, q_lora_rank=1536, kv_lora_rank=512,
             qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, max_position_embeddings=163840,
             num_hidden_layers=1, vocab_size=1024, intermediate_size=1024, first_k_dense_replace=1,
             rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                              "original_max_position_embeddings": 4096, "beta_fast": 32.0, "beta_slow": 1.0,
                              "mscale": 1.0, "mscale_all_dim": 1.0})


def matmul_rate() -> float:
    """bf16 matmul FLOP/s (8192^3)."""
    a = jnp.ones((8192, 8192), jnp.bfloat16) * 0.01
    f = jax.jit(lambda a, b: a @ b)
    f(a, a).block_until_ready()
    t = seed.median_ms(lambda: f(a, a).block_until_ready(), 3, 20) / 1e3
    return 2 * 8192**3 / t


def hf_layer(tmp: Path):
    """Random bf16 HF DeepseekV3Attention at R1 sizes on the GPU, also saved as a 1-layer checkpoint in `tmp`."""
    import torch
    from safetensors.torch import save_file
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding

    config = DeepseekV3Config(**R1_HF)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    attn = DeepseekV3Attention(config, 0)
    with torch.no_grad():
        for name, p in attn.named_parameters():
            p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5 if p.ndim == 2 else 1 + 0.1 * torch.randn_like(p))
    attn = attn.to("cuda", torch.bfloat16).eval()
    save_file({f"model.layers.0.self_attn.{k}": v.contiguous() for k, v in attn.state_dict().items()},
              tmp / "model.safetensors")
    (tmp / "config.json").write_text(json.dumps({**config.to_dict(), "model_type": "deepseek_v3"}))
    return attn, DeepseekV3RotaryEmbedding(config).to("cuda"), config


def cuda_ms(fn, warmup, runs):
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _hf_padded(config, past, seq, g):
    """An HF cache holding random histories right-aligned in max(past) slots, the padding mask and positions."""
    import torch
    from transformers import DynamicCache

    dev, bf16 = "cuda", torch.bfloat16
    b, p_max, s_max = len(past), max(past), max(seq)
    cache = DynamicCache(config=config)
    cache.update(torch.randn(b, 1, p_max, 512, device=dev, dtype=bf16, generator=g),
                 torch.randn(b, 1, p_max, 64, device=dev, dtype=bf16, generator=g), 0)
    keys = torch.arange(p_max + s_max, device=dev)
    mask = torch.zeros(b, 1, s_max, p_max + s_max, device=dev, dtype=bf16)
    pos = torch.zeros(b, s_max, dtype=torch.long, device=dev)
    for i, (p, s) in enumerate(zip(past, seq)):
        q = p_max + torch.arange(s_max, device=dev)
        visible = ((keys[None] >= p_max - p) & (keys[None] <= q[:, None]))
        mask[i, 0] = torch.where(visible, 0.0, float("-inf"))
        pos[i] = p + torch.arange(s_max, device=dev)
    return cache, mask, pos


def hf_decode_ms(attn, rotary, config, past, steps) -> float:
    """HF ms per one-token step for requests with histories `past` (padded batch, growing mask)."""
    import torch

    g = torch.Generator(device="cuda").manual_seed(1)
    with torch.no_grad():
        cache, mask, pos = _hf_padded(config, past, [1] * len(past), g)
        xd = torch.randn(len(past), 1, config.hidden_size, device="cuda", dtype=torch.bfloat16, generator=g)
        d_max = max(past)

        def decode_run(n):
            cache.crop(d_max)
            m = mask
            for i in range(n):
                attn(xd, position_embeddings=rotary(xd, pos + i), attention_mask=m, past_key_values=cache)
                m = torch.cat([m, torch.zeros_like(m[..., :1])], dim=-1)

        decode_run(3)
        return cuda_ms(lambda: decode_run(steps), 1, 3) / steps


def hf_cases(attn, rotary, config, x_new: np.ndarray, warmup, runs):
    """HF on the seed cases as a padded batch; returns (prefill ms, decode ms/step, prefill outputs per request)."""
    import torch

    dev, bf16 = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    padded = lambda past, seq: _hf_padded(config, past, seq, g)  # noqa: E731

    seq, past = seed.PREFILL_SEQ, seed.PREFILL_PAST
    cache, mask, pos = padded(past, seq)
    x = torch.zeros(len(seq), max(seq), config.hidden_size, device=dev, dtype=bf16)
    starts = np.concatenate([[0], np.cumsum(seq)])
    for i, s in enumerate(seq):
        x[i, :s] = torch.from_numpy(x_new[starts[i] : starts[i + 1]].astype(np.float32)).to(dev, bf16)
    emb = rotary(x, pos)
    p_max = max(past)

    def prefill():
        cache.crop(p_max)
        return attn(x, position_embeddings=emb, attention_mask=mask, past_key_values=cache)[0]

    with torch.no_grad():
        out = prefill()
        prefill_ms = cuda_ms(prefill, warmup, runs)
        outs = [out[i, :s].float().cpu().numpy() for i, s in enumerate(seq)]
    return prefill_ms, hf_decode_ms(attn, rotary, config, seed.DECODE_PAST, seed.DECODE_STEPS), outs


SWEEP_BATCH = [(b, 1024) for b in (1, 4, 16, 64)]
SWEEP_HISTORY = [(16, n) for n in (128, 512, 2048, 8192)]


def our_decode_ms(params, cfg, past, steps, impl, int8_latent=False) -> float:
    """ms per decode step inside one decode_steps() call, B = len(past) requests, caches filled at random."""
    b, key = len(past), jax.random.key(2)
    cache = mla.init_cache(cfg, b, max(past) + steps, jnp.bfloat16)
    cache = mla.MLACache(*(jax.random.normal(key, c.shape, c.dtype) for c in cache[:2]))
    if int8_latent:
        kv8, kv_scale = quantize_rows_int8(cache.kv_cache)
        cache = mla.MLACache(kv8, cache.pe_cache, kv_scale)
    xs = jax.random.normal(key, (steps, b, cfg.hidden_size), jnp.bfloat16)
    state = {"cache": cache}

    def run():
        ys, state["cache"] = mla.decode_steps(params, cfg, xs, state["cache"], past, attention_impl=impl)
        ys.block_until_ready()

    return seed.median_ms(run, 2, 5) / steps


def sweep(params, cfg, hf, bw, steps=20) -> list[dict]:
    """Decode ms/step over batch sizes and history lengths: jaxlm (Pallas kernels; XLA attention as the JAX peer),
    HF transformers (same weights, padded batch) and the floor (weights + cache bytes at read bandwidth); the
    int8-latent cache (Pallas) beside them."""
    rows = []
    weight_bytes = sum(v.nbytes for v in params.values())
    for b, n in SWEEP_BATCH + SWEEP_HISTORY:
        past = [n] * b
        row = {"B": b, "history": n, "pallas_ms": our_decode_ms(params, cfg, past, steps, "pallas"),
               "xla_ms": our_decode_ms(params, cfg, past, steps, "xla"),
               "int8_cache_ms": our_decode_ms(params, cfg, past, steps, "pallas", int8_latent=True),
               "floor_ms": 1e3 * (weight_bytes + cfg.cache_bytes_per_token() * b * n) / bw}
        if hf is not None:
            row["hf_ms"] = hf_decode_ms(*hf, past, steps)
        print(f"  sweep B={b:3d} history={n:5d}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items() if k.endswith("ms")))
        rows.append(row)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--out", default="bench/results/mla.json")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--no-sweep", action="store_true", help="skip the batch / history sweep")
    args = ap.parse_args()

    dev = jax.devices()[0]
    card = getattr(dev, "device_kind", dev.platform)
    copy_bw, bw, rate = copy_bandwidth(), read_bandwidth(), matmul_rate()  # bw: the decode floors' (read-only) rate
    with tempfile.TemporaryDirectory() as tmp:
        if args.no_hf:
            cfg = mla.MLAConfig.r1()
            params = mla.init_params(cfg, jax.random.key(0), jnp.bfloat16)
        else:
            attn, rotary, config = hf_layer(Path(tmp))
            cfg, params = mla.load_layer(tmp, 0, dtype="bfloat16")
    weight_bytes = sum(v.nbytes for v in params.values())
    pre = seed.prefill(params, cfg, warmup=args.warmup, runs=args.runs)
    dec = seed.decode(params, cfg, attention_impl="pallas")
    dec_xla = seed.decode(params, cfg, attention_impl="xla")
    naive = seed.prefill(params, cfg, warmup=1, runs=3, mode="naive")
    y = np.asarray(pre["y"], np.float32)
    cos = lambda a, b: float((a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b))
    res = {
        "date": str(date.today()), "card": card, "commit": commit(), "command": " ".join(sys.argv),
        "prefill_batch_ms": pre["batch_ms"], "prefill_ttft_ms": pre["ttft_ms"], "prefill_naive_ms": naive["batch_ms"],
        "decode_step_ms": dec["step_ms"], "decode_loop_step_ms": dec["loop_step_ms"],
        "decode_tokens_per_s": dec["tokens_per_s"], "decode_loop_tokens_per_s": dec["loop_tokens_per_s"],
        "decode_step_ms_xla": dec_xla["step_ms"], "decode_loop_step_ms_xla": dec_xla["loop_step_ms"],
        "decode_pallas_vs_xla_cos": cos(np.asarray(dec["ys"], np.float32), np.asarray(dec_xla["ys"], np.float32)),
        "weight_bytes": weight_bytes, "copy_TBps": copy_bw / 1e12, "read_TBps": bw / 1e12,
        "matmul_TFLOPs": rate / 1e12,
        "floor_decode_ms": 1e3 * (weight_bytes + 1152 * sum(seed.DECODE_PAST)) / bw,
        "floor_prefill_ms": 1e3 * 2 * (weight_bytes / 2) * sum(seed.PREFILL_SEQ) / rate,
        "absorbed_vs_naive_cos": cos(y, np.asarray(naive["y"], np.float32)),
    }
    # the same layer on FP8 weights (block-quantised from the bf16 ones): projections through fp8_matmul
    p8 = mla.quantize_fp8(params, cfg)
    pre8 = seed.prefill(p8, cfg, warmup=args.warmup, runs=args.runs)
    dec8 = seed.decode(p8, cfg, attention_impl="pallas")
    fp8_bytes = sum(v.nbytes for v in p8.values())
    res.update(fp8_prefill_batch_ms=pre8["batch_ms"], fp8_decode_step_ms=dec8["step_ms"],
               fp8_decode_loop_step_ms=dec8["loop_step_ms"], fp8_weight_bytes=fp8_bytes,
               floor_fp8_decode_ms=1e3 * (fp8_bytes + 1152 * sum(seed.DECODE_PAST)) / bw,
               fp8_vs_bf16_cos_prefill=cos(np.asarray(pre8["y"], np.float32), y),
               fp8_vs_bf16_cos_decode=cos(np.asarray(dec8["ys"], np.float32), np.asarray(dec["ys"], np.float32)))
    if not args.no_hf:
        x_new = np.asarray(jax.random.normal(jax.random.key(1), (sum(seed.PREFILL_SEQ), cfg.hidden_size)), np.float32)
        hf_pre, hf_dec, hf_out = hf_cases(attn, rotary, config, x_new, args.warmup, args.runs)
        res.update(hf_prefill_batch_ms=hf_pre, hf_decode_step_ms=hf_dec)
        # same weights, same new tokens, but HF's history is its own random latent: compare the no-history requests
        cache = mla.init_cache(cfg, 4, 1024, jnp.bfloat16)
        ours, _ = mla.forward(params, cfg, jnp.asarray(x_new, jnp.bfloat16), cache, seed.PREFILL_SEQ, [0] * 4)
        ours = np.asarray(ours, np.float32)
        starts = np.concatenate([[0], np.cumsum(seed.PREFILL_SEQ)])
        res["vs_hf_cos_no_history"] = min(cos(ours[starts[i]:starts[i + 1]], hf_out[i]) for i in (1, 2))
    if not args.no_sweep:
        res["decode_sweep"] = sweep(params, cfg, None if args.no_hf else (attn, rotary, config), bw)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"\nMLA layer, R1 sizes, bf16, {card}; read {bw / 1e12:.2f} TB/s (copy {copy_bw / 1e12:.2f}), "
          f"matmul {rate / 1e12:.0f} TFLOP/s")
    rows = [("prefill batch [64,128,256,256]/[512,0,0,256]", "prefill_batch_ms", "hf_prefill_batch_ms", "floor_prefill_ms"),
            ("prefill avg TTFT (sequential)", "prefill_ttft_ms", None, None),
            ("decode step, per forward() call", "decode_step_ms", "hf_decode_step_ms", "floor_decode_ms"),
            ("decode step, inside decode_steps()", "decode_loop_step_ms", "hf_decode_step_ms", "floor_decode_ms"),
            ("decode step, per call, XLA attention", "decode_step_ms_xla", "hf_decode_step_ms", "floor_decode_ms"),
            ("decode step, decode_steps(), XLA attention", "decode_loop_step_ms_xla", "hf_decode_step_ms", "floor_decode_ms"),
            ("FP8 prefill batch", "fp8_prefill_batch_ms", "hf_prefill_batch_ms", "floor_prefill_ms"),
            ("FP8 decode step, per forward() call", "fp8_decode_step_ms", "hf_decode_step_ms", "floor_fp8_decode_ms"),
            ("FP8 decode step, inside decode_steps()", "fp8_decode_loop_step_ms", "hf_decode_step_ms",
             "floor_fp8_decode_ms")]
    print(f"{'case':<46} {'jaxlm ms':>9} {'HF ms':>8} {'HF/jaxlm':>9} {'floor ms':>9}")
    for name, k, hk, fk in rows:
        h = res.get(hk) if hk else None
        print(f"{name:<46} {res[k]:9.3f} {h if h is None else round(h, 3)!s:>8} "
              f"{'' if h is None else f'{h / res[k]:.1f}x':>9} {'' if fk is None else f'{res[fk]:.3f}':>9}")
    print(f"decode tokens/s: {res['decode_tokens_per_s']:,.0f} per call, {res['decode_loop_tokens_per_s']:,.0f} in loop; "
          f"absorbed vs naive cos {res['absorbed_vs_naive_cos']:.6f}; vs HF cos {res.get('vs_hf_cos_no_history')}; "
          f"decode pallas vs xla cos {res['decode_pallas_vs_xla_cos']:.6f}; FP8 vs bf16 cos prefill "
          f"{res['fp8_vs_bf16_cos_prefill']:.5f} decode {res['fp8_vs_bf16_cos_decode']:.5f}")


if __name__ == "__main__":
    main()
