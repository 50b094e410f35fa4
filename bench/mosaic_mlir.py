"""Whether two source trees hand the GPU the same Mosaic GPU kernels, checked on a machine without one: each tree
lowers the project's Mosaic kernels at R1's sizes for an H100 (`pallas_kernels.lowering.export_for_h100`, which
needs jax_cuda13_plugin, as the CI's test environment has), the kernels' MLIR is captured as Mosaic GPU serialises
it (printed without source locations, which move with every edit) and the two sets are compared per case. Equal
MLIR means the same compiled kernels: a refactor of a kernel's code, or a new option whose default must not change
what runs, is then proven on the CPU, before any device time.

    PYTHONPATH=. .venv/bin/python bench/mosaic_mlir.py --base DIR [--new .] [--dump OUT_DIR]

DIR: a tree holding pallas_kernels (`git archive <rev> pallas_kernels | tar -x -C DIR`). Exit status 1 when a case
differs. Relies on jax 0.11.2's `jax.experimental.mosaic.gpu.core._run_serde_pass` (a private function: the pinned
version's).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path


def cases():
    """(name, fn, abstract args): the kernels' calls at R1's prefill / decode sizes, default block sizes."""
    import jax.numpy as jnp
    from jax import ShapeDtypeStruct as S

    import pallas_kernels as pk  # functions looked up at call time: an older tree may lack one (that case errors)

    bf, f8, f32, i32 = jnp.bfloat16, jnp.float8_e4m3fn, jnp.float32, jnp.int32
    mosaic = lambda *a: pk.fp8_matmul(*a, backend="mosaic", interpret=False)  # noqa: E731  (route by size)
    deq = lambda *a: pk.fp8_matmul(*a, activations="bf16", backend="mosaic", interpret=False)  # noqa: E731
    side = lambda x, w1, s1, w2, s2: pk.fp8_matmuls_side_by_side(x, [w1, w2], [s1, s2], interpret=False)  # noqa: E731
    dec = lambda *a: pk.mla_decode(*a, sm_scale=0.1352, interpret=False)  # noqa: E731
    sage = lambda q, k, v, cq, ck: pk.sage_attention(q, k, v, cq, ck, backend="mosaic", interpret=False)  # noqa: E731
    parts = lambda t, h: (S((t, h, 128), bf), S((t, h, 64), bf))  # noqa: E731
    return [
        ("fp8 weight-only o_proj, 16 tokens", mosaic, (S((16, 16384), bf), S((7168, 16384), f8), S((56, 128), f32))),
        ("fp8 weight-only q_b, 16 tokens", mosaic, (S((16, 1536), bf), S((24576, 1536), f8), S((192, 12), f32))),
        ("fp8 weight-only W_UV per head", mosaic, (S((16, 128, 512), bf), S((128, 128, 512), f8), S((128, 1, 4), f32))),
        ("fp8 weight-only q_a + kv_a side by side", side, (S((16, 7168), bf), S((1536, 7168), f8), S((12, 56), f32),
                                                           S((576, 7168), f8), S((5, 56), f32))),
        ("fp8 x fp8 o_proj, 768 tokens", mosaic, (S((768, 16384), bf), S((7168, 16384), f8), S((56, 128), f32))),
        ("fp8 dequantising q_b, 768 tokens", deq, (S((768, 1536), bf), S((24576, 1536), f8), S((192, 12), f32))),
        ("fp8 dequantising W_UK, 1536 keys", deq, (S((1536, 512), bf), S((128, 128, 512), f8), S((128, 1, 4), f32))),
        ("mla_decode, 16 x 512", dec, (S((16, 128, 512), bf), S((16, 128, 64), bf), S((16, 512, 512), bf),
                                       S((16, 512, 64), bf), S((16,), i32))),
        ("sage_attention, MLA parts", sage, (parts(704, 128), (S((1472, 128, 128), bf), S((1472, 1, 64), bf)),
                                             S((1472, 128, 128), bf), S((5,), i32), S((5,), i32))),
        ("sage_attention, D 128, 4 x 4096", sage, (S((16384, 16, 128), bf), S((16384, 16, 128), bf),
                                                   S((16384, 16, 128), bf), S((5,), i32), S((5,), i32))),
    ]


def lower_all(dump: str | None) -> dict:
    """{case: [sha1 of each Mosaic kernel's MLIR]} for the tree on PYTHONPATH; the MLIR texts into `dump`."""
    from jax.experimental.mosaic.gpu import core

    from pallas_kernels.lowering import export_for_h100

    captured = []
    serde = core._run_serde_pass

    def capture(module, *, serialize, ir_version=None):
        if serialize:
            captured.append(module.operation.get_asm(enable_debug_info=False))
        return serde(module, serialize=serialize, ir_version=ir_version)

    core._run_serde_pass = capture
    out = {}
    for i, (name, fn, args) in enumerate(cases()):
        first = len(captured)
        try:
            export_for_h100(fn, *args)
        except Exception as e:  # noqa: BLE001  (a case one tree cannot lower is reported, not fatal)
            out[name] = [f"error: {type(e).__name__}: {str(e)[:200]}"]
            continue
        texts = captured[first:]
        out[name] = [hashlib.sha1(t.encode()).hexdigest()[:16] for t in texts]
        if dump:
            Path(dump).mkdir(parents=True, exist_ok=True)
            Path(dump, f"{i:02d}.mlir").write_text("\n\n".join(texts))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", help="the base tree (holding pallas_kernels)")
    ap.add_argument("--new", default=".")
    ap.add_argument("--dump", help="write each tree's MLIR under DIR/base, DIR/new (one file per case)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("MLIR " + json.dumps(lower_all(args.dump)), flush=True)
        return
    if not args.base:
        ap.error("--base is required")
    from bench.common import run_in_tree  # here, not at the top: the children import the other tree's bench, if any
    res = {}
    for side, tree in (("base", args.base), ("new", args.new)):
        argv = ["--child"] + (["--dump", os.path.join(args.dump, side)] if args.dump else [])
        got, err = run_in_tree(__file__, tree, argv, "MLIR", {"JAX_PLATFORMS": "cpu"})
        if got is None:
            sys.exit(f"{side} tree ({tree}) failed to lower {err}")
        res[side] = got
    differ = 0
    for name in res["new"]:
        a, b = res["base"].get(name), res["new"][name]
        same = a == b and not any(h.startswith("error") for h in b)
        differ += not same
        print(f"{'same     ' if same else 'DIFFERENT'}  {name}  ({len(b)} kernel{'s' * (len(b) != 1)})"
              + ("" if same else f"\n    base {a}\n    new  {b}"))
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
