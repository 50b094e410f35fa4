"""The `jaxlm` command."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="jaxlm", description="JAX/Pallas inference: DeepSeek-R1 MLA and Qwen3-VL.")
    sub = ap.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the embedded demo (tiny random Qwen3-VL, then the MLA seed cases)")
    demo.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    demo.add_argument("--runs", type=int, default=5, help="timed runs per case")
    gen = sub.add_parser("generate", help="generate text from a Qwen3-VL checkpoint, an optional image and a prompt")
    gen.add_argument("--model", required=True, help="HF Qwen3-VL directory (config.json, safetensors)")
    gen.add_argument("--image", action="append", default=[], help="image file (repeat for several)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: the checkpoint's)")
    gen.add_argument("--tp", type=int, default=1, help="tensor-parallel degree: shard the model over this many devices")
    args = ap.parse_args(argv)
    if args.command == "generate":
        return _generate(args)
    if args.command == "demo":
        import jax.numpy as jnp

        from jaxlm import demo as demo_mod

        ok = demo_mod.run_qwen3_vl()
        print()
        return 0 if demo_mod.run_mla(jnp.dtype(args.dtype), runs=args.runs) and ok else 1
    return 2


def _generate(args) -> int:
    from jaxlm import qwen3_vl

    try:
        model = qwen3_vl.load(args.model, dtype=args.dtype)
    except (ValueError, OSError) as e:
        print(f"jaxlm generate: cannot load {args.model}: {e}", file=sys.stderr)
        return 2
    if args.tp != 1:
        from jaxlm import sharding

        try:
            model = model.shard(sharding.make_mesh(tp=args.tp, dp=1))
        except ValueError as e:
            print(f"jaxlm generate: --tp {args.tp}: {e}", file=sys.stderr)
            return 2
    printed = [0]

    def stream(_row, text):
        sys.stdout.write(text[printed[0]:])
        sys.stdout.flush()
        printed[0] = len(text)

    try:
        model.generate([args.prompt], [args.image or None], max_new_tokens=args.max_new_tokens,
                       temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, on_token=stream)
    except ValueError as e:
        print(f"\njaxlm generate: {e}", file=sys.stderr)
        return 2
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
