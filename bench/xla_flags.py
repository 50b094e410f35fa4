"""Where the MLA layer's seed cases lose wall time outside the GPU's kernels, and whether XLA's command buffers (CUDA
graphs) win it back: each XLA_FLAGS variant runs in its own process (flags are read once, at backend start) and
reports, for bf16 and FP8 weights at R1 sizes, the prefill call (wall, host dispatch, GPU busy / idle from a trace)
and the decode step inside `decode_steps()` (wall per step, GPU busy per step). Writes bench/results/xla_flags.json
(or --out) and prints a table.

    PYTHONPATH=. python bench/xla_flags.py [--variants default,while] [--out bench/results/xla_flags.json]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

VARIANTS = {  # name -> XLA_FLAGS added to the environment's
    "default": "",
    "no_graphs": "--xla_gpu_enable_command_buffer=",  # every thunk launched one by one
    "while": "--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL",  # scan loops captured whole
    "while_min1": "--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL --xla_gpu_graph_min_graph_size=1",
    "custom_calls": "--xla_gpu_enable_command_buffer=+CUSTOM_CALL",  # the Pallas kernels' custom calls captured too
    # the graphs' buffer addresses kept stable by virtual-address remapping, so that a call need not update them
    "skip_temp": "--xla_gpu_command_buffer_update_mode=SKIP_TEMP",  # temporaries
    "skip_profiled": "--xla_gpu_command_buffer_update_mode=SKIP_PROFILED",  # + arguments seen stable at first calls
    # no GEMM autotuning: the same algorithms in every process, so outputs repeat bit for bit across processes
    "no_autotune": "--xla_gpu_autotune_level=0",
}
STEPS = 20
PER_CALL = ("wall_ms", "busy_ms", "span_ms", "kernels", "idle_in_call_ms")  # divided by STEPS for decode


def _host_ms(call, state) -> tuple[float, float]:
    """Medians over 30 calls of call() (the cache in state["cache"] ready before each): ms until it returns (the
    host's dispatch) and until its result is ready."""
    import jax
    import numpy as np

    t_ret, t_all = [], []
    for _ in range(30):
        jax.block_until_ready(state["cache"])
        t0 = time.perf_counter()
        y = call()
        t_ret.append(time.perf_counter() - t0)
        jax.block_until_ready(y)
        t_all.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(t_ret)), 1e3 * float(np.median(t_all))


def host_parts(p, x, state) -> dict:
    """The prefill call's host side in pieces (ms, medians): forward() until it returns, planning, and the jitted
    step alone (x padded and lengths on the device beforehand, or lengths from the host) until it returns and until
    its result is ready."""
    import jax.numpy as jnp

    from jaxlm import batching, mla, seed

    cfg = mla.MLAConfig.r1()
    slots, max_len = state["cache"].kv_cache.shape[:2]

    def forward():
        y, state["cache"] = mla.forward(p, cfg, x, state["cache"], seed.PREFILL_SEQ, seed.PREFILL_PAST)
        return y

    def plan():
        return batching.plan(seed.PREFILL_SEQ, seed.PREFILL_PAST, num_tokens=x.shape[0], num_slots=slots,
                             max_len=max_len)

    lengths, sizes = plan()
    xp = batching.pad_rows(x, sizes.num_tokens)
    impl = mla._check_options("absorbed", None)  # what forward() runs
    out = {"dispatch_ms": _host_ms(forward, state)[0], "plan_ms": seed.median_ms(plan, 5, 50)}
    for key, lens in (("step", jnp.asarray(lengths)), ("step_host_lengths", lengths)):
        def step(lens=lens):
            y, state["cache"], _ = mla._step_jit(p, cfg, xp, state["cache"], lens, sizes, "absorbed", impl)
            return y

        out[f"{key}_dispatch_ms"], out[f"{key}_wall_ms"] = _host_ms(step, state)
    return out


def child(fp8_kernels_only: bool) -> dict:
    import jax
    import jax.numpy as jnp

    from bench.common import traced_case
    from jaxlm import mla, seed
    fp8_module = importlib.import_module("pallas_kernels.fp8_matmul")  # the module (the package exports the function)

    cfg = mla.MLAConfig.r1()
    params = mla.init_params(cfg, jax.random.key(0), jnp.bfloat16)
    out = {}
    for name, p in (("bf16", params), ("fp8", mla.quantize_fp8(params, cfg))):
        prefill, x, state = seed.prefill_call(p, cfg)
        variants = [("", None)] + ([("_kernels_only", 1 << 30)] if name == "fp8" and fp8_kernels_only else [])
        for suffix, min_m in variants:  # FP8: also with the bf16-activation projections on the weight-only kernel
            if min_m is not None:
                fp8_module.DEQUANTIZE_MIN_M = min_m
                jax.clear_caches()
            case = traced_case(f"{name}_prefill{suffix}", prefill)
            out[f"{name}_prefill{suffix}"] = {**case, **host_parts(p, x, state)}

        b = len(seed.DECODE_PAST)
        xs = jax.random.normal(jax.random.key(1), (STEPS, b, cfg.hidden_size), jnp.bfloat16)
        dstate = {"cache": mla.init_cache(cfg, b, max(seed.DECODE_PAST) + STEPS + 1, jnp.bfloat16)}

        def steps(p=p, xs=xs, dstate=dstate):
            ys, dstate["cache"] = mla.decode_steps(p, cfg, xs, dstate["cache"], seed.DECODE_PAST)
            return ys

        case = traced_case(f"{name}_decode_step ({STEPS} steps per call)", steps, calls=3)
        out[f"{name}_decode_step"] = {k: (v / STEPS if k in PER_CALL and v else v) for k, v in case.items()}
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", default="bench/results/xla_flags.json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        res = child(fp8_kernels_only=args.child == "default")
        print("RESULT " + json.dumps(res))
        return

    from bench.common import commit

    res = {"date": str(date.today()), "commit": commit(), "command": " ".join(sys.argv), "variants": {}}
    for name in args.variants.split(","):
        flags = (os.environ.get("XLA_FLAGS", "") + " " + VARIANTS[name]).strip()
        print(f"{name}: XLA_FLAGS={flags!r}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-u", __file__, "--child", name], env={**os.environ, "XLA_FLAGS": flags},
                              capture_output=True, text=True, timeout=600)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        print("\n".join(ln for ln in proc.stdout.splitlines() if not ln.startswith("RESULT ")))
        if proc.returncode or not lines:
            res["variants"][name] = {"flags": flags, "failed": proc.stderr[-1500:]}
            print(f"{name}: failed\n{proc.stderr[-1500:]}")
            continue
        res["variants"][name] = {"flags": flags, "seconds": time.perf_counter() - t0, **json.loads(lines[-1][7:])}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1))
    try:
        import jax

        res["card"] = jax.devices()[0].device_kind
    except Exception:  # noqa: BLE001 - the card name is a label only
        pass
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"\n{'variant':<12} {'case':<22} {'wall ms':>8} {'busy ms':>8} {'idle ms':>8} {'kernels':>8}")
    for name, v in res["variants"].items():
        for case, r in v.items():
            if isinstance(r, dict):
                f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
                print(f"{name:<12} {case:<22} {f(r['wall_ms']):>8} {f(r['busy_ms']):>8} {f(r['idle_in_call_ms']):>8} "
                      f"{f(r['kernels']):>8}")


if __name__ == "__main__":
    main()
