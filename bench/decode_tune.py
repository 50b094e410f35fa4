"""Block-size sweep of mla_decode (Triton and Mosaic kernels) on the seed decode case (16 requests, histories
50-400) and at B=64, L=4096, timed inside one jitted program over distinct copies (larger than the L2 together), so
that neither the host's dispatch nor the L2 flatters a configuration. Prints the best configurations per case.

    PYTHONPATH=. python bench/decode_tune.py [--cases seed,b64_l4096] [--backends triton,mosaic]
        [--out bench/results/decode_tune.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from bench.kernels import fresh_copies, timed_in_graph
from jaxlm.seed import DECODE_PAST
from pallas_kernels import mla_decode, mla_decode_reference
from pallas_kernels.mla_decode import BlockSizes, MosaicBlockSizes

SCALE = 0.1352338
CASES = {"seed": (DECODE_PAST, 448), "b64_l4096": ([4096] * 64, 4096)}  # lengths, cache rows
TRITON = [BlockSizes(block_h=h, block_k=k, k_splits=s, num_warps=w)
          for (h, w), k, s in itertools.product(((32, 4), (32, 8), (64, 8)), (32, 64), (None, 2, 4, 8))]
TRITON += [BlockSizes(block_h=32, block_k=k, num_stages=st) for k, st in ((32, 3), (32, 4), (64, 1))]
MOSAIC = [MosaicBlockSizes(k_splits=s) for s in (None, 1, 2, 3, 4, 6)]  # block_k 64, 2 stages: what fits


def case_args(lengths, rows):
    b = len(lengths)
    keys = jax.random.split(jax.random.key(b * rows), 4)
    bf = jnp.bfloat16
    return (jax.random.normal(keys[0], (b, 128, 512), bf), jax.random.normal(keys[1], (b, 128, 64), bf),
            jax.random.normal(keys[2], (b, rows, 512), bf), jax.random.normal(keys[3], (b, rows, 64), bf),
            jnp.asarray(lengths, jnp.int32))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--backends", default="triton,mosaic")
    ap.add_argument("--out", default="bench/results/decode_tune.json")
    args = ap.parse_args()
    res = {"card": jax.devices()[0].device_kind, "cases": {}}
    for name in filter(None, args.cases.split(",")):
        lengths, rows = CASES[name]
        a = case_args(lengths, rows)
        nbytes = sum(lengths) * 1152 + len(lengths) * 128 * 1088 * 2
        sets = fresh_copies(a, max(2, math.ceil(200e6 / a[2].nbytes)))
        want = np.asarray(mla_decode_reference(*a, sm_scale=SCALE), np.float32)
        out = []
        backends = args.backends.split(",")
        for bs in (TRITON if "triton" in backends else []) + (MOSAIC if "mosaic" in backends else []):
            fn = lambda *x, bs=bs: mla_decode(*x, sm_scale=SCALE, block_sizes=bs)  # noqa: E731
            try:
                got = np.asarray(jax.jit(fn)(*a), np.float32)
                ms = timed_in_graph(fn, sets)
            except Exception as e:  # noqa: BLE001 - a configuration that does not compile is skipped
                print(f"  {name} {bs}: failed {str(e)[:120]}", flush=True)
                continue
            err = float(np.linalg.norm(got - want) / np.linalg.norm(want))
            out.append({"us": ms * 1e3, "TBps": nbytes / ms / 1e9, "rel_err": err, "backend":
                        "mosaic" if isinstance(bs, MosaicBlockSizes) else "triton", **vars(bs)})
        out.sort(key=lambda r: r["us"])
        res["cases"][name] = out
        for backend, default in (("triton", BlockSizes()), ("mosaic", MosaicBlockSizes())):
            if backend not in backends:
                continue
            d = next((r for r in out if r["backend"] == backend and r == {**r, **vars(default)}), None)
            print(f"{name} {backend}: default {d and round(d['us'], 1)} us; best:", flush=True)
            for r in [r for r in out if r["backend"] == backend][:5]:
                print(f"    {r['us']:.1f} us {r['TBps']:.2f} TB/s err {r['rel_err']:.1e}  "
                      + " ".join(f"{k}={v}" for k, v in r.items() if k not in ("us", "TBps", "rel_err", "backend")))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
