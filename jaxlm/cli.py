"""The `jaxlm` command."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="jaxlm", description="JAX/Pallas inference: DeepSeek-R1 MLA and Qwen3-VL.")
    sub = ap.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the embedded demo (MLA seed cases on random weights)")
    demo.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    demo.add_argument("--runs", type=int, default=5, help="timed runs per case")
    args = ap.parse_args(argv)
    if args.command == "demo":
        import jax.numpy as jnp

        from jaxlm import demo as demo_mod

        return 0 if demo_mod.run_mla(jnp.dtype(args.dtype), runs=args.runs) else 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
