"""python -m convert HF_DIR OUT_DIR [--layers 3,5] [--dtype bfloat16] [--keep-fp8] [--overwrite]"""

from __future__ import annotations

import argparse
import sys

from convert.mla_checkpoint import convert_mla
from convert.qwen3_vl import convert_qwen3_vl
from convert.safetensors_io import CheckpointError, read_config


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m convert", description="Convert an HF checkpoint to jaxlm/orbax: "
                                 "DeepSeek V2/V3/R1 (MLA attention weights; fp32, bf16 or FP8 with block scales) or "
                                 "Qwen3-VL (the whole model).")
    ap.add_argument("hf_dir")
    ap.add_argument("out_dir")
    ap.add_argument("--layers", help="comma-separated decoder layers (default: all)")
    ap.add_argument("--dtype", default="bfloat16", help="float32, bfloat16 (default) or float16")
    ap.add_argument("--keep-fp8", action="store_true", help="DeepSeek FP8 checkpoints: store the projections as e4m3 "
                    "with their block scales instead of dequantising them")
    ap.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    args = ap.parse_args(argv)
    try:
        layers = None if args.layers is None else [int(s) for s in args.layers.split(",") if s.strip()]
    except ValueError:
        ap.error(f"--layers must be comma-separated integers, got {args.layers!r}")
    try:
        if read_config(args.hf_dir).get("model_type") == "qwen3_vl":
            if layers is not None or args.keep_fp8:
                ap.error("--layers and --keep-fp8 apply to DeepSeek checkpoints only")
            out = convert_qwen3_vl(args.hf_dir, args.out_dir, dtype=args.dtype, overwrite=args.overwrite)
        else:
            out = convert_mla(args.hf_dir, args.out_dir, layers=layers, dtype=args.dtype, keep_fp8=args.keep_fp8,
                              overwrite=args.overwrite)
    except (CheckpointError, ValueError, FileExistsError) as e:
        print(f"convert: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
