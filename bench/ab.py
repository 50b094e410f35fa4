"""A/B of the MLA layer's seed cases between two source trees, in one device call: child processes alternate
between the trees (PYTHONPATH), so both sides see the same machine, clocks and host; each child prints one JSON
line, and the parent a table of every round.

    git archive <base rev> pallas_kernels jaxlm bench | tar -x -C build/base   # on the workstation, then carry build
    PYTHONPATH=. python bench/ab.py --base build/base [--new .] [--rounds 2] [--cases prefill,decode,loop]
        [--weights fp8|bf16] [--env NAME=VALUE ...]

Cases (R1 sizes, random weights, FP8 by default): "prefill" the seed prefill per synchronous `forward()` call
(median of 60) and its GPU busy time per call (5 traced calls); "decode" a decode step per `forward()` call and
"loop" per step inside one `decode_steps()` call (`seed.decode`: 100 steps). Each child also prints a checksum of
its outputs, so that a change meant to keep them bit for bit shows it. --env sets variables in the new tree's
children only (a knob such as FP8_PROBE for prototypes). --tiny runs a tiny layer (a CPU smoke test of the harness).
"""

from __future__ import annotations

import argparse
import json


def child(cases: list[str], weights: str, tiny: bool) -> dict:
    """One side's measurements in this process (PYTHONPATH picks the tree)."""
    import jax
    import jax.numpy as jnp

    from bench.common import gpu_kernel_times
    from jaxlm import mla, seed
    from jaxlm.seed import median_ms

    cfg = mla.MLAConfig.tiny() if tiny else mla.MLAConfig.r1()
    params = mla.init_params(cfg, jax.random.key(0), jnp.float32 if tiny else jnp.bfloat16)
    if weights == "fp8":
        params = mla.quantize_fp8(params, cfg)
    out = {}
    if "prefill" in cases:
        call = seed.prefill_call(params, cfg, dtype=params["kv_a_layernorm"].dtype)[0]
        run = lambda: call().block_until_ready()  # noqa: E731
        wall = median_ms(run, 10, 60)
        busy = gpu_kernel_times(run, 5)["busy_ms"]
        y = run()
        out.update(prefill_ms=wall, prefill_busy_ms=busy,
                   prefill_sum=float(jnp.abs(y.astype(jnp.float32)).sum()))
    if "decode" in cases or "loop" in cases:
        r = seed.decode(params, cfg, dtype=params["kv_a_layernorm"].dtype, steps=8 if tiny else seed.DECODE_STEPS,
                        runs=5, attention_impl="pallas")
        out.update(decode_ms=r["step_ms"], loop_ms=r["loop_step_ms"],
                   decode_sum=float(jnp.abs(r["ys"].astype(jnp.float32)).sum()))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", help="the base tree (a directory holding pallas_kernels, jaxlm, bench)")
    ap.add_argument("--new", default=".")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--cases", default="prefill,decode,loop")
    ap.add_argument("--weights", default="fp8", choices=("fp8", "bf16"))
    ap.add_argument("--env", nargs="*", default=[], help="NAME=VALUE for the new tree's children")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    cases = args.cases.split(",")
    if args.child:
        print("AB " + json.dumps(child(cases, args.weights, args.tiny)), flush=True)
        return
    if not args.base:
        ap.error("--base is required")
    from bench.common import run_in_tree  # here, not at the top: the children import the other tree's bench, if any
    rows = []
    for r in range(args.rounds):
        for side, tree in (("base", args.base), ("new", args.new)):
            argv = ["--child", "--cases", args.cases, "--weights", args.weights] + (["--tiny"] if args.tiny else [])
            env = dict(kv.split("=", 1) for kv in args.env) if side == "new" else {}
            got, err = run_in_tree(__file__, tree, argv, "AB", env)
            if got is None:
                print(f"round {r} {side}: failed {err}", flush=True)
                continue
            rows.append({"round": r, "side": side, **got})
            print(json.dumps(rows[-1]), flush=True)
    keys = [k for k in ("prefill_ms", "prefill_busy_ms", "decode_ms", "loop_ms", "prefill_sum", "decode_sum")
            if any(k in row for row in rows)]
    print("\n| round | side | " + " | ".join(keys) + " |\n|---|---|" + "---|" * len(keys))
    for row in rows:
        cells = [("-" if row.get(k) is None else f"{row[k]:.4f}" if k.endswith("ms") else f"{row[k]:.3f}")
                 for k in keys]
        print(f"| {row['round']} | {row['side']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
