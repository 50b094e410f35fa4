"""Shared by the benchmark scripts: the commit a run measured, the copy and read bandwidth ceilings, GPU kernel times
and a call's host / GPU timeline from a jax.profiler trace."""

from __future__ import annotations

import collections
import gzip
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxlm.seed import median_ms


def commit() -> str:
    """$JAXLM_COMMIT (set it on the device, which gets no .git), else `git rev-parse --short HEAD`."""
    if os.environ.get("JAXLM_COMMIT"):
        return os.environ["JAXLM_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def run_in_tree(script: str, tree: str, argv: list[str], tag: str, env: dict | None = None) -> tuple[dict | None, str]:
    """Run `script` (with `argv`) in a child process whose PYTHONPATH is `tree`, so that it imports that tree's code;
    return (the JSON of its stdout line that starts with `tag` + " ", or None; the end of its stderr). The A/B scripts
    (`bench/ab.py`, `bench/mosaic_mlir.py`) run both trees this way."""
    proc = subprocess.run([sys.executable, os.path.abspath(script), *argv], capture_output=True, text=True,
                          env={**os.environ, **(env or {}), "PYTHONPATH": os.path.abspath(tree)})
    line = next((x for x in proc.stdout.splitlines() if x.startswith(tag + " ")), None)
    return (None if line is None else json.loads(line[len(tag) + 1:])), f"(rc {proc.returncode})\n{proc.stderr[-3000:]}"


def copy_bandwidth() -> float:
    """Device-to-device copy rate in bytes/s (read + write) over a 2 GiB buffer."""
    x = jnp.ones((1 << 30,), jnp.bfloat16)
    f = jax.jit(lambda a: a * 1)
    f(x).block_until_ready()
    return 2 * x.nbytes / (median_ms(lambda: f(x).block_until_ready(), 3, 20) / 1e3)


def read_bandwidth() -> float:
    """Read rate in bytes/s: XLA's max-reduction over a 2 GiB int32 buffer (rows of 1024: one kernel, a 2 MB result
    written) by its GPU kernel time, the ceiling of a read-only stream such as a decode step's weights and cache. On an
    H100 80GB HBM3 3.14 TB/s, where the copy's wall-clock rate is 2.5-2.7 and a whole-array reduction reaches less
    (twenty-third session); wall-clock rate without a GPU profile."""
    x = jnp.arange(1 << 29, dtype=jnp.int32).reshape(-1, 1024)
    f = jax.jit(lambda a: jnp.max(a, axis=1))
    run = lambda: f(x).block_until_ready()  # noqa: E731
    run()
    busy = gpu_kernel_times(run, 5)["busy_ms"] or median_ms(run, 3, 20)
    return x.nbytes / (busy / 1e3)


def traced_case(name: str, fn, *args, calls: int = 10) -> dict:
    """Wall ms per synchronous call of fn(*args) (or of fn() when it takes none) and `gpu_kernel_times` of `calls`
    calls; prints a summary and the largest kernels."""
    run = lambda: jax.block_until_ready(fn(*args))  # noqa: E731
    run()
    wall = median_ms(run, 3, 20)
    prof = gpu_kernel_times(run, calls)
    f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731  (no GPU: no kernel times)
    print(f"\n{name}: wall {wall:.3f} ms/call, GPU busy {f(prof['busy_ms'])} ms/call over a {f(prof['span_ms'])} ms "
          f"span, {prof['kernels']:.0f} kernels/call")
    for ms, kname in prof["top"][:8]:
        print(f"  {ms:8.4f} ms  {kname[:100]}")
    return {"case": name, "wall_ms": wall, **prof}


def _trace_events(run, calls: int, out_dir: str | None = None, annotate: str | None = None):
    """Trace `calls` calls of `run()` (each inside a TraceAnnotation named `annotate`, if given); (events, process
    names by pid) of the perfetto JSON that jax.profiler writes."""
    out = out_dir or tempfile.mkdtemp(prefix="jaxlm_trace_")
    jax.profiler.start_trace(out)
    for _ in range(calls):
        if annotate:
            with jax.profiler.TraceAnnotation(annotate):
                run()
        else:
            run()
    jax.profiler.stop_trace()
    trace = max(Path(out).rglob("*.trace.json.gz"), key=lambda f: f.stat().st_mtime)
    events = json.loads(gzip.open(trace).read())["traceEvents"]
    pids = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    return events, pids


CALL = "jaxlm_call"


def call_timeline(run, calls: int = 5, min_us: float = 3.0, out_dir: str | None = None) -> dict:
    """Where one synchronous call's wall time goes, host and GPU: `calls` traced calls of `run()` (which must block
    until its device work is done; warm it up first), each from its start: {"call_us" (the call returns),
    "first_kernel_us" (the GPU's first kernel starts), "last_kernel_end_us" (its last kernel ends) as medians over
    the calls, and "host": [(start us, duration us, name), ...] of the last call's host events of at least `min_us`
    (Python functions, jit dispatch, XLA's thunks, CUDA graph launches), in order}. On a machine without a GPU the
    kernel times are None. Tracing inflates host times; compare calls traced alike."""
    events, pids = _trace_events(run, calls, out_dir, annotate=CALL)
    spans = sorted((e for e in events if e.get("ph") == "X" and e.get("name") == CALL), key=lambda e: e["ts"])
    gpu = sorted((e for e in events if e.get("ph") == "X" and "/device:GPU" in pids.get(e.get("pid"), "")),
                 key=lambda e: e["ts"])
    rows = []
    for c in spans:
        t0, t1 = c["ts"], c["ts"] + c["dur"]
        mine = [e for e in gpu if t0 <= e["ts"] <= t1]
        rows.append((c["dur"], mine[0]["ts"] - t0 if mine else None,
                     max(e["ts"] + e["dur"] for e in mine) - t0 if mine else None))
    med = lambda xs: None if any(x is None for x in xs) else sorted(xs)[len(xs) // 2]  # noqa: E731
    last = spans[-1]
    host = sorted((e for e in events if e.get("ph") == "X" and e.get("dur", 0) >= min_us and e is not last
                   and "/device:GPU" not in pids.get(e.get("pid"), "")
                   and last["ts"] <= e["ts"] <= last["ts"] + last["dur"]), key=lambda e: e["ts"])
    return {"call_us": med([r[0] for r in rows]), "first_kernel_us": med([r[1] for r in rows]),
            "last_kernel_end_us": med([r[2] for r in rows]),
            "host": [(round(e["ts"] - last["ts"], 1), round(e["dur"], 1), e["name"][:100]) for e in host]}


def gpu_kernel_times(run, calls: int, out_dir: str | None = None) -> dict:
    """Trace `calls` calls of `run()` (which must block until its device work is done) with jax.profiler and read the
    GPU events back: {"busy_ms": GPU kernel time per call, "span_ms": first kernel start to last kernel end per call,
    "kernels": kernels per call, "idle_in_call_ms": GPU idle time per call between its kernels (the largest
    calls - 1 gaps, the host's waits between calls, left out), "gaps_us": the largest idle gaps, each with the kernel
    that follows it, "gap_sizes_us": {"<hi": (gaps per call, their us per call)} by size, "top": [(ms per call,
    kernel name), ...] largest first}. Warm `run` up first."""
    events, pids = _trace_events(run, calls, out_dir)
    gpu = [e for e in events if e.get("ph") == "X" and "/device:GPU" in pids.get(e.get("pid"), "")]
    if not gpu:
        return {"busy_ms": None, "span_ms": None, "kernels": 0, "idle_in_call_ms": None, "gaps_us": [],
                "gap_sizes_us": {}, "top": []}
    per_name = collections.Counter()
    for e in gpu:
        per_name[e["name"]] += e["dur"]
    gpu.sort(key=lambda e: e["ts"])
    span = max(e["ts"] + e["dur"] for e in gpu) - gpu[0]["ts"]
    gaps, end = [], gpu[0]["ts"] + gpu[0]["dur"]  # idle stretches of the GPU, each named by the kernel after it
    for e in gpu[1:]:
        if e["ts"] > end:
            gaps.append((e["ts"] - end, e["name"]))
        end = max(end, e["ts"] + e["dur"])
    gaps.sort(reverse=True)
    inner = gaps[calls - 1:]  # the calls - 1 largest gaps are mostly the host's waits between synchronous calls
    return {"busy_ms": sum(per_name.values()) / 1e3 / calls, "span_ms": span / 1e3 / calls,
            "kernels": len(gpu) / calls,
            "idle_in_call_ms": sum(g for g, _ in inner) / 1e3 / calls,
            "gaps_us": [(round(g, 1), name[:80]) for g, name in gaps[:8]],
            "gap_sizes_us": {f"<{hi}": (sum(1 for g, _ in gaps if lo <= g < hi) / calls,
                                        round(sum(g for g, _ in gaps if lo <= g < hi) / calls, 1))
                             for lo, hi in ((0, 5), (5, 20), (20, 100), (100, 1e9))},
            "top": [(d / 1e3 / calls, name[:120]) for name, d in per_name.most_common(20)]}
