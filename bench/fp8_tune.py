"""Block-size sweep of fp8_matmul's weight-only (decode) path at R1's projection shapes, 16 tokens, timed inside one
jitted program over distinct weight copies (larger than the L2 together), so that neither the host's dispatch nor
the L2 flatters a configuration. Prints the best configurations per projection with their TB/s of FP8 weight bytes.

    PYTHONPATH=. python bench/fp8_tune.py [--shapes o_proj,q_b_proj] [--grid wide|mosaic] [--mosaic]
        [--out bench/results/fp8_tune.json]

--grid mosaic sweeps the Mosaic weight-only kernel (2-D HF-layout weights) beside the Triton kernel's default.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp

from bench.kernels import timed_in_graph
from pallas_kernels.fp8_matmul import BlockSizes, fp8_matmul, fp8_matmul_reference, quantize
from pallas_kernels.fp8_matmul_mgpu import MosaicBlockSizes

M = 16
SHAPES = {  # name: (w shape, transpose_w, x shape)
    "q_a_proj": ((1536, 7168), True, (M, 7168)),
    "kv_a_proj_with_mqa": ((576, 7168), True, (M, 7168)),
    "q_b_proj": ((24576, 1536), True, (M, 1536)),
    "w_uk": ((128, 128, 512), False, (M, 128, 128)),
    "w_uv": ((128, 128, 512), True, (M, 128, 512)),
    "o_proj": ((7168, 16384), True, (M, 16384)),
}
GRIDS = {  # block_n, k_splits, warps, stages
    "default": list(itertools.product((64, 128), (None, 2, 4, 8, 16), (4,), (3, 5))),
    "wide": list(itertools.product((32, 64), (None, 4, 8, 16), (4, 8), (4, 6, 8))),
    "mosaic": [(64, None, 4, 3)],  # the Triton default, beside MOSAIC_GRID
}
MOSAIC_GRID = list(itertools.product((None, 1, 2, 4, 8, 16), (3, 4, 6)))  # weight-only: k_splits, stages


MOSAIC_SHAPES = {"o_proj": (7168, 16384), "q_b_proj": (24576, 1536)}  # FP8 x FP8 at prefill sizes


def mosaic_sweep(m: int = 704) -> dict:
    """The Mosaic FP8 x FP8 kernel's block sizes at prefill token counts (whole-call timing: these calls are long)."""
    from bench.kernels import timed

    out = {}
    for name, (n, k) in MOSAIC_SHAPES.items():
        w, s = quantize(jax.random.normal(jax.random.key(n), (n, k), jnp.float32) / k**0.5, 128)
        x = jax.random.normal(jax.random.key(m), (m, k), jnp.bfloat16)
        rows = []
        for bm, stages in itertools.product((64, 128), (2, 3, 4, 6)):
            bs = MosaicBlockSizes(block_m=bm, stages=stages)
            try:
                ms = timed(jax.jit(lambda x, w, s, bs=bs: fp8_matmul(x, w, s, activations="fp8", block_sizes=bs)),
                           x, w, s)
            except Exception as e:  # noqa: BLE001
                print(f"  mosaic {name} {bs}: failed {str(e)[:150]}")
                continue
            rows.append({"us": ms * 1e3, "TFLOPs": 2 * m * n * k / ms / 1e9, "block_m": bm, "stages": stages})
            print(f"  mosaic {name} M={m} block_m={bm} stages={stages}: {ms * 1e3:.1f} us "
                  f"{rows[-1]['TFLOPs']:.0f} TF/s", flush=True)
        out[name] = sorted(rows, key=lambda r: r["us"])
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--out", default="bench/results/fp8_tune.json")
    ap.add_argument("--grid", default="default", choices=sorted(GRIDS))
    ap.add_argument("--mosaic", action="store_true", help="also sweep the Mosaic FP8 x FP8 kernel at 704 tokens")
    args = ap.parse_args()
    res = {"card": jax.devices()[0].device_kind, "m": M, "shapes": {}}
    if args.mosaic:
        res["mosaic_704"] = mosaic_sweep()
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1))
    for name in filter(None, args.shapes.split(",")):
        w_shape, transpose_w, x_shape = SHAPES[name]
        nbytes = math.prod(w_shape)
        copies = max(2, math.ceil(256e6 / nbytes))
        sets = []
        for i in range(copies):
            w, s = quantize(jax.random.normal(jax.random.key(i), w_shape, jnp.float32) / w_shape[-1] ** 0.5, 128)
            sets.append((jax.random.normal(jax.random.key(100 + i), x_shape, jnp.bfloat16), w, s))
        configs = [(BlockSizes(block_m=16, block_n=bn, k_splits=splits, num_warps=warps, num_stages=stages),
                    {"backend": "triton", "block_n": bn, "k_splits": splits, "num_warps": warps, "num_stages": stages})
                   for bn, splits, warps, stages in GRIDS[args.grid]]
        if args.grid == "mosaic" and len(w_shape) == 2:
            configs += [(MosaicBlockSizes(k_splits=splits, stages=stages),
                         {"backend": "mosaic", "k_splits": splits, "num_stages": stages})
                        for splits, stages in MOSAIC_GRID]
        want = fp8_matmul_reference(*sets[0], transpose_w=transpose_w).astype(jnp.float32)
        rows = []
        for bs, row in configs:
            fn = lambda x, w, s, bs=bs: fp8_matmul(x, w, s, transpose_w=transpose_w, block_sizes=bs)  # noqa: E731
            try:
                got = jax.jit(fn)(*sets[0]).astype(jnp.float32)
                ms = timed_in_graph(fn, sets)
            except Exception as e:  # noqa: BLE001 - a configuration that does not compile is skipped
                print(f"  {name} {bs}: failed {str(e)[:100]}")
                continue
            err = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
            rows.append({"us": ms * 1e3, "TBps": (nbytes + sets[0][2].nbytes) / ms / 1e9, "rel_err": err, **row})
        rows.sort(key=lambda r: r["us"])
        res["shapes"][name] = rows
        print(f"{name} {w_shape} M={M}; best:", flush=True)
        for r in rows[:6]:
            print(f"    {r['us']:.1f} us {r['TBps']:.2f} TB/s err {r['rel_err']:.1e} "
                  + " ".join(f"{k}={v}" for k, v in r.items() if k not in ("us", "TBps", "rel_err")))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
