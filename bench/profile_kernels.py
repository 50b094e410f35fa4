"""Where the kernels' calls and the MLA layer's seed prefill spend their GPU time: a jax.profiler trace of each case,
GPU kernel time per call beside the wall time per call, and the largest kernels (the Pallas kernel itself vs the
XLA passes around it). Writes bench/results/profile_kernels.json (or --out) and prints a table.

    PYTHONPATH=. python bench/profile_kernels.py [--out bench/results/profile_kernels.json]

Cases: sage_attention (Triton and Mosaic backends) at S = 1k (B = 16) and 16k (B = 1), 16 heads, D = 128, causal;
mla_decode (Triton, Mosaic, the XLA reference) on the seed's decode case (16 requests, histories 50-400) and on
B = 64, L = 4096 (the seed case also timed as 8 calls inside one jitted program); the MLA layer's seed prefill at R1
sizes in bf16 and on FP8 weights, with the host / GPU timeline of a call (`bench.common.call_timeline`: when the GPU
starts and ends, the host's events).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from datetime import date
from pathlib import Path

import jax
import jax.numpy as jnp

from bench.common import call_timeline, commit, traced_case
from bench.kernels import fresh_copies, timed_in_graph
from jaxlm import mla, seed
from jaxlm.seed import DECODE_PAST
from pallas_kernels import mla_decode, mla_decode_reference
from pallas_kernels.mla_decode import BlockSizes
from pallas_kernels.sage_attention import MosaicBlockSizes, sage_attention

CALLS = 10
case = functools.partial(traced_case, calls=CALLS)


def sage_cases() -> list[dict]:
    rows = []
    for s, b in ((1024, 16), (16384, 1)):
        h, d = 16, 128
        keys = jax.random.split(jax.random.key(s), 3)
        q, k, v = (jax.random.normal(kk, (b * s, h, d), jnp.bfloat16) for kk in keys)
        cu = jnp.arange(b + 1, dtype=jnp.int32) * s
        for backend, bs in (("triton", None), ("mosaic", MosaicBlockSizes(64, 128, 2, 2))):
            fn = jax.jit(functools.partial(sage_attention, backend=backend, block_sizes=bs))
            rows.append(case(f"sage_attention {backend} S={s} B={b}", fn, q, k, v, cu, cu))
    return rows


def mla_decode_cases(scale=0.1352338) -> list[dict]:
    rows = []
    bf = jnp.bfloat16
    for label, b, s, lengths in (("seed 16 x 50-400", 16, 448, DECODE_PAST), ("B=64 L=4096", 64, 4096, [4096] * 64)):
        keys = jax.random.split(jax.random.key(b), 4)
        args = (jax.random.normal(keys[0], (b, 128, 512), bf), jax.random.normal(keys[1], (b, 128, 64), bf),
                jax.random.normal(keys[2], (b, s, 512), bf), jax.random.normal(keys[3], (b, s, 64), bf),
                jnp.asarray(lengths, jnp.int32))
        sets = fresh_copies(args, 8, seed=100)
        for name, fn in (("triton", functools.partial(mla_decode, sm_scale=scale, backend="triton")),
                         ("mosaic", functools.partial(mla_decode, sm_scale=scale, backend="mosaic")),
                         ("xla", functools.partial(mla_decode_reference, sm_scale=scale))):
            row = case(f"mla_decode {name} {label}", jax.jit(fn), *args)
            if b == 16:  # small enough for the host's dispatch to matter: also 8 calls inside one jitted program
                row["in_graph_ms"] = timed_in_graph(jax.jit(fn), sets)
                print(f"  inside one jitted program (8 calls on distinct data): {row['in_graph_ms'] * 1e3:.1f} us/call")
            rows.append(row)
        if b == 16:  # the Triton kernel's block sizes on the small case, in-graph
            for bh, ks in ((32, 1), (32, 2), (32, 7), (64, 2), (16, 4)):
                fn = jax.jit(functools.partial(mla_decode, sm_scale=scale, backend="triton",
                                               block_sizes=BlockSizes(block_h=bh, k_splits=ks)))
                ms = timed_in_graph(fn, sets)
                rows.append({"case": f"mla_decode triton {label} block_h={bh} k_splits={ks}", "in_graph_ms": ms})
                print(f"mla_decode triton {label} block_h={bh} k_splits={ks}: {ms * 1e3:.1f} us/call in-graph")
    return rows


def layer_cases() -> list[dict]:
    """The seed prefill per call: GPU kernels, and where the call's wall time goes besides them (`call_timeline`)."""
    cfg = mla.MLAConfig.r1()
    params = mla.init_params(cfg, jax.random.key(0), jnp.bfloat16)
    rows = []
    for name, p in (("bf16", params), ("fp8", mla.quantize_fp8(params, cfg))):
        call = seed.prefill_call(p, cfg)[0]
        row = case(f"MLA layer seed prefill, {name} weights", call)
        tl = call_timeline(lambda: call().block_until_ready(), CALLS)
        print(f"  timeline (traced, us from the call's start): first kernel {tl['first_kernel_us']}, last kernel ends "
              f"{tl['last_kernel_end_us']}, returns {tl['call_us']}; host events of >= 20 us in the last call:")
        for t, dur, what in tl["host"]:
            if dur >= 20:
                print(f"    {t:8.1f} {dur:8.1f}  {what[:90]}")
        rows.append({**row, "timeline": tl})
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/profile_kernels.json")
    args = ap.parse_args()
    res = {"date": str(date.today()), "card": jax.devices()[0].device_kind, "commit": commit(),
           "command": " ".join(sys.argv), "calls_traced": CALLS}
    for key, fn in (("sage_attention", sage_cases), ("mla_decode", mla_decode_cases), ("mla_layer", layer_cases)):
        try:
            res[key] = fn()
        except Exception as e:  # one failing group must not lose the others' numbers
            res[key] = f"failed: {str(e)[:300]}"
            print(f"{key}: failed: {e}")
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
