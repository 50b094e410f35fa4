"""`jaxlm demo`: a tiny random Qwen3-VL end to end (image + prompt -> text, real Qwen tokenizer), then the seed's
MLA cases on a small random layer, absorbed checked against naive, with timings."""

from __future__ import annotations

import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import mla, seed


def demo_config() -> mla.MLAConfig:
    """R1's structure (q_lora, YaRN factor 40, mscale) at a size a laptop CPU runs in seconds."""
    r1 = mla.MLAConfig.r1()
    return mla.MLAConfig(**{**r1.__dict__, "hidden_size": 256, "num_heads": 8, "q_lora_rank": 96,
                            "kv_lora_rank": 64, "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32})


def run_mla(dtype=jnp.float32, runs: int = 5) -> bool:
    cfg = demo_config()
    params = mla.init_params(cfg, jax.random.key(0), dtype)
    print(f"MLA layer (random weights, {jnp.dtype(dtype).name}, device {jax.devices()[0].platform}): hidden "
          f"{cfg.hidden_size}, {cfg.num_heads} heads, q_lora {cfg.q_lora_rank}, kv_lora {cfg.kv_lora_rank}, "
          f"rope {cfg.qk_rope_head_dim}; cache {cfg.cache_bytes_per_token(dtype)} B/token "
          f"(R1 bf16: {mla.MLAConfig.r1().cache_bytes_per_token()} B)")
    pre = seed.prefill(params, cfg, dtype=dtype, warmup=1, runs=runs)
    pre_naive = seed.prefill(params, cfg, dtype=dtype, warmup=0, runs=1, mode="naive")
    dec = seed.decode(params, cfg, dtype=dtype, steps=20, runs=1)
    dec_naive = seed.decode(params, cfg, dtype=dtype, steps=20, runs=1, mode="naive")

    def rel(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return float(np.abs(a - b).max() / np.abs(b).max())

    err_p, err_d = rel(pre["y"], pre_naive["y"]), rel(dec["ys"], dec_naive["ys"])
    ok = err_p <= 1e-5 and err_d <= 1e-5
    print(f"absorbed vs naive (max relative error): prefill {err_p:.1e}, decode {err_d:.1e} -> "
          f"{'OK' if ok else 'MISMATCH'}")
    rows = [
        ("prefill [64,128,256,256] on past [512,0,0,256], whole batch", f"{pre['batch_ms']:.2f} ms",
         f"{pre['tokens'] / pre['batch_ms'] * 1e3:,.0f} tok/s"),
        ("prefill, per-request average TTFT (InfiniLM convention)", f"{pre['ttft_ms']:.2f} ms", ""),
        ("decode 16 req, past 50/100/200/400, per forward() call", f"{dec['step_ms']:.2f} ms",
         f"{dec['tokens_per_s']:,.0f} tok/s"),
        ("decode, 20 steps inside one decode_steps() call", f"{dec['loop_step_ms']:.2f} ms/step",
         f"{dec['loop_tokens_per_s']:,.0f} tok/s"),
    ]
    width = max(len(r[0]) for r in rows)
    for name, t, thr in rows:
        print(f"  {name:<{width}}  {t:>14}  {thr:>14}")
    print(f"  (compile: prefill {pre['compile_s']:.1f} s, decode {dec['compile_s']:.1f} s; R1-size GPU numbers: bench/RESULTS.md)")
    return ok


DEMO_IMAGE = Path(__file__).parent / "assets" / "demo.png"


def run_qwen3_vl(prompt: str = "Describe this image.", max_new_tokens: int = 24) -> bool:
    from jaxlm import qwen3_vl
    from jaxlm.qwen3_vl.demo_checkpoint import demo_checkpoint

    path = demo_checkpoint()
    print(f"Qwen3-VL: tiny model with RANDOM weights (HF format, {path}); the text below is nonsense by design.")
    t0 = time.perf_counter()
    model = qwen3_vl.load(path)
    load_s = time.perf_counter() - t0
    print(f"  tokenizer: {model.tokenizer.source}; image: {DEMO_IMAGE.name}; prompt: {prompt!r}")
    print("  > ", end="", flush=True)
    shown = [0]

    def stream(_row, text):
        print(text[shown[0]:], end="", flush=True)
        shown[0] = len(text)

    t0 = time.perf_counter()
    out = model.generate([prompt], [DEMO_IMAGE], max_new_tokens=max_new_tokens, on_token=stream)
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.generate([prompt], [DEMO_IMAGE], max_new_tokens=max_new_tokens)
    warm_s = time.perf_counter() - t0
    n = len(model.tokenizer.encode(out[0])) or 1
    print(f"\n  load {load_s:.1f} s; first call {first_s:.1f} s (compiles); warm call {warm_s * 1e3:.0f} ms for "
          f"about {n} tokens")
    return bool(out[0])
