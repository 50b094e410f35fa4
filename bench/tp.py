"""Tensor parallelism on several GPUs: the MLA layer at R1 sizes for tp = 1, 2, 4, 8 (as many as there are devices)
and Qwen3-VL-2B at tp = 1 and 2, checked against tp = 1 and timed. Writes bench/results/tp.json.

    PYTHONPATH=. python bench/tp.py [--out bench/results/tp.json]
    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu PYTHONPATH=. python bench/tp.py --tiny
        (a smoke run on simulated CPU devices with small models: checks only, the timings mean nothing)

MLA: the seed's prefill (batch [64,128,256,256] on [512,0,0,256]) and decode (16 requests on 50-400, steps inside
one decode_steps() call) on one random bf16 layer, heads split over tp (jaxlm/sharding.py); outputs compared with
tp = 1 by cosine (goal >= 0.9999). Qwen3-VL-2B (random bf16 weights): greedy tokens at tp = 2 equal to tp = 1, and
decode ms/step at batch 1 and 16 (bench/qwen3_vl.py's timing rule). NVLink multicast stays off (XLA's default).
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import date
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import commit
from jaxlm import mla, seed, sharding


def cos(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def mla_case(cfg, params, tp: int, runs: int, dtype) -> dict:
    mesh = sharding.make_mesh(tp=tp, dp=1)
    placed = sharding.shard_mla(params, cfg, mesh) if tp > 1 else params
    pre = seed.prefill(placed, cfg, dtype=dtype, warmup=3, runs=runs)
    dec = seed.decode(placed, cfg, dtype=dtype, steps=32, runs=3)
    return {"tp": tp, "prefill_batch_ms": pre["batch_ms"], "decode_step_ms": dec["step_ms"],
            "decode_loop_step_ms": dec["loop_step_ms"], "y": np.asarray(pre["y"], np.float32),
            "ys": np.asarray(dec["ys"], np.float32),
            "param_bytes_per_device": sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(placed))}


def qwen_case(model, tp: int, steps: int) -> dict:
    from bench.qwen3_vl import per_step_ms

    m = model.shard(sharding.make_mesh(tp=tp, dp=1)) if tp > 1 else model
    rng = np.random.default_rng(0)
    out = {"tp": tp, "tokens": m.generate_tokens([list(rng.integers(1000, 5000, 64))], max_new_tokens=16,
                                                 stop_tokens=())[0]}
    for b in (1, 16):
        prompts = [list(rng.integers(1000, 5000, 128)) for _ in range(b)]
        out[f"decode_ms_per_step_b{b}"], _ = per_step_ms(
            lambda n: m.generate_tokens(prompts, max_new_tokens=n, stop_tokens=()), steps)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/tp.json")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--tiny", action="store_true", help="small models (a CPU smoke run of the script)")
    args = ap.parse_args()
    n_dev = len(jax.devices())
    tps = [t for t in (1, 2, 4, 8) if t <= n_dev]
    dev = jax.devices()[0]
    res = {"date": str(date.today()), "card": getattr(dev, "device_kind", dev.platform), "gpus": n_dev,
           "commit": commit(), "command": " ".join(sys.argv), "mla": [], "qwen3_vl": []}
    if args.tiny:
        from jaxlm.demo import demo_config

        cfg, dtype = demo_config(), jnp.float32
    else:
        cfg, dtype = mla.MLAConfig.r1(), jnp.bfloat16
    params = mla.init_params(cfg, jax.random.key(0), dtype)
    base = None
    for tp in tps:
        row = mla_case(cfg, params, tp, args.runs, dtype)
        y, ys = row.pop("y"), row.pop("ys")
        if base is None:
            base = (y, ys)
        row.update(cos_prefill_vs_tp1=cos(y, base[0]), cos_decode_vs_tp1=cos(ys, base[1]))
        res["mla"].append(row)
        print(f"MLA tp={tp}: prefill {row['prefill_batch_ms']:.3f} ms, decode {row['decode_step_ms']:.3f} ms/call, "
              f"{row['decode_loop_step_ms']:.3f} ms/step in loop; cos vs tp=1 {row['cos_prefill_vs_tp1']:.6f} / "
              f"{row['cos_decode_vs_tp1']:.6f}; params/device {row['param_bytes_per_device'] / 1e6:.1f} MB")
    one = res["mla"][0]
    for row in res["mla"]:
        row.update(prefill_speedup=one["prefill_batch_ms"] / row["prefill_batch_ms"],
                   decode_loop_speedup=one["decode_loop_step_ms"] / row["decode_loop_step_ms"])
    if n_dev >= 2:
        model = _qwen(args.tiny)
        for tp in (1, 2):
            res["qwen3_vl"].append(qwen_case(model, tp, 8 if args.tiny else 64))
        same = res["qwen3_vl"][1]["tokens"] == res["qwen3_vl"][0]["tokens"]
        res["qwen3_vl_same_tokens_tp2"] = same
        for r in res["qwen3_vl"]:
            print(f"Qwen3-VL tp={r['tp']}: decode {r['decode_ms_per_step_b1']:.3f} / {r['decode_ms_per_step_b16']:.3f} "
                  f"ms/step (b1 / b16)")
        print(f"Qwen3-VL tp=2 greedy tokens equal tp=1: {same}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))


def _qwen(tiny: bool):
    from bench.qwen3_vl import CONFIG_2B
    from convert.qwen3_vl import text_params, vision_params
    from jaxlm.qwen3_vl import Qwen3VL, Qwen3VLConfig
    from jaxlm.qwen3_vl.demo_checkpoint import DEMO_CONFIG, random_hf_tensors

    hf = DEMO_CONFIG if tiny else CONFIG_2B
    cfg = Qwen3VLConfig.from_hf(hf)
    tensors = random_hf_tensors(hf, 0)
    get = lambda n: tensors[n]  # noqa: E731
    params = {"vision": vision_params(get, cfg.vision), "text": text_params(get, cfg.text, True)}
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32 if tiny else jnp.bfloat16), params)
    return Qwen3VL(cfg, params)


if __name__ == "__main__":
    main()
