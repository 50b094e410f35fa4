"""Where a kernel's warps stall, instruction by instruction: Nsight Compute's source counters (warp stall sampling per
SASS instruction) for the first launch of a kernel whose name matches, summed over address ranges you name.

    PYTHONPATH=. python bench/ncu_source.py SCRIPT.py [--kernel REGEX] [--top N] [--range NAME:START:END ...]
    python bench/ncu_source.py --csv SOURCE.csv ...     # summarise a saved `ncu --page source --csv` export

On the GPU machine it runs `ncu --section SourceCounters` on SCRIPT.py (which should call the kernel's jitted function
a couple of times on inputs made on the host; command buffers are turned off so the kernel is launched on its own),
exports the SASS view as CSV (kept with --out) and prints: the share of samples per stall reason, the N
instructions with the most samples (offset from the kernel's start, SASS, top reasons) and, per --range (offsets in
hex, e.g. `softmax:0x9720:0xac30`), its share of all samples and its own reasons. Read the offsets of a loop's
blocks from the top list or from the saved CSV, then name them as ranges. The Mosaic GPU kernels are all named
`body_mosaic_gpu_kernel` (the default REGEX). bench/RESULTS.md (twenty-seventh session) has the sage kernel's loop
split this way.
"""

from __future__ import annotations

import argparse
import collections
import csv
import os
import shutil
import subprocess
import sys
import tempfile

SAMPLES = "Warp Stall Sampling (All Samples)"


def read_source_csv(path: str) -> list[dict]:
    """Rows of an `ncu --page source --csv --print-source sass` export: {offset, sass, samples, stalls{reason: n}}."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    head = next(i for i, r in enumerate(rows) if r and r[0] == "Address")
    names = rows[head]
    col = {n: i for i, n in enumerate(names)}
    reasons = [n for n in names if n.startswith("stall_") and "Not Issued" not in n]
    body = [r for r in rows[head + 1:] if len(r) >= len(names) and r[0].startswith("0x")]
    if not body:
        raise SystemExit(f"{path}: no SASS rows (was the kernel profiled with --section SourceCounters?)")
    base = int(body[0][0], 16)
    return [{"offset": int(r[0], 16) - base, "sass": r[col["Source"]].strip(),
             "samples": int(r[col[SAMPLES]] or 0),
             "stalls": {n[len("stall_"):]: int(r[col[n]] or 0) for n in reasons}} for r in body]


def shares(counter: collections.Counter, total: int, n: int = 6) -> str:
    return ", ".join(f"{k} {100 * v / max(total, 1):.1f}%" for k, v in counter.most_common(n) if v)


def summarise(rows: list[dict], top: int, ranges: list[tuple[str, int, int]]) -> None:
    total = sum(r["samples"] for r in rows)
    reasons = collections.Counter()
    for r in rows:
        reasons.update(r["stalls"])
    print(f"{len(rows)} instructions, {total} samples; reasons: {shares(reasons, sum(reasons.values()), 8)}")
    print(f"\ntop {top} instructions (offset, % of samples, SASS, top reasons):")
    for r in sorted(rows, key=lambda r: -r["samples"])[:top]:
        why = collections.Counter(r["stalls"])
        print(f"  {r['offset']:#07x} {100 * r['samples'] / max(total, 1):5.1f}%  {r['sass'][:58]:58}  "
              f"{shares(why, sum(why.values()), 3)}")
    for name, lo, hi in ranges:
        part = [r for r in rows if lo <= r["offset"] < hi]
        why = collections.Counter()
        for r in part:
            why.update(r["stalls"])
        n = sum(r["samples"] for r in part)
        print(f"\n{name} [{lo:#x}, {hi:#x}): {len(part)} instructions, {100 * n / max(total, 1):.1f}% of samples; "
              f"{shares(why, sum(why.values()))}")


def profile(script: str, kernel: str, out: str) -> str:
    """Runs ncu on `script`, returns the path of the SASS-view CSV of the first launch matching `kernel`."""
    ncu = os.environ.get("NCU") or shutil.which("ncu") or "/usr/local/cuda/bin/ncu"
    rep = os.path.join(out, "source")
    env = {**os.environ, "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer=",
           "XLA_PYTHON_CLIENT_MEM_FRACTION": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")}
    cmd = [ncu, "--clock-control", "none", "--target-processes", "all", "-k", f"regex:{kernel}", "--launch-count",
           "1", "--section", "SourceCounters", "--section", "WarpStateStats", "-f", "-o", rep, sys.executable, script]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if run.returncode or not os.path.exists(rep + ".ncu-rep"):
        raise SystemExit(f"ncu failed (rc {run.returncode}):\n{(run.stdout + run.stderr)[-2000:]}")
    path = os.path.join(out, "source.csv")
    with open(path, "w") as f:
        subprocess.run([ncu, "--import", rep + ".ncu-rep", "--page", "source", "--csv", "--print-source", "sass"],
                       stdout=f, check=True)
    return path


def parse_range(text: str) -> tuple[str, int, int]:
    name, lo, hi = text.rsplit(":", 2)
    return name, int(lo, 16), int(hi, 16)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("script", nargs="?", help="a script that launches the kernel (run under ncu)")
    ap.add_argument("--csv", help="summarise this saved source-page CSV instead of profiling")
    ap.add_argument("--kernel", default="body_mosaic_gpu_kernel", help="kernel name regex (first launch profiled)")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--range", action="append", default=[], type=parse_range, metavar="NAME:START:END")
    ap.add_argument("--out", help="keep the report and the CSV in this directory")
    args = ap.parse_args(argv)
    if not args.csv and not args.script:
        ap.error("give a SCRIPT to profile or --csv FILE")
    if args.csv:
        path = args.csv
    else:
        out = args.out or tempfile.mkdtemp(prefix="ncu_source_")
        os.makedirs(out, exist_ok=True)
        path = profile(args.script, args.kernel, out)
        print(f"report and CSV in {out}")
    summarise(read_source_csv(path), args.top, args.range)


if __name__ == "__main__":
    main()
