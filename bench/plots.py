"""bench/results/*.json -> PNG plots beside their peers, shown in bench/RESULTS.md.

    python bench/plots.py [--results bench/results] [--out bench]

mla.png: the MLA layer at R1 sizes, decode ms/step against batch and against history length, and the seed cases;
jaxlm (Pallas kernels), jaxlm with XLA attention (the JAX peer), HF transformers and the floor on the same axes.
kernels.png: sage_attention TFLOP/s (Triton and Mosaic GPU backends) against sequence length beside cuDNN, XLA
(and JAX's Mosaic-GPU attention when measured), under the measured bf16 matmul rate; mla_decode effective TB/s
(both backends) beside XLA under the measured read bandwidth (the copy's in older results).
qwen3_vl.png: Qwen3-VL-2B decode ms/step at batch 1 and 16 for jaxlm, HF transformers and the floor.
Needs matplotlib (the `notebooks` extra). A missing results file or field just leaves its series out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STYLE = {  # one look per series across all plots
    "jaxlm": dict(color="#1f6feb", marker="o", label="jaxlm (Pallas)"),
    "jaxlm_mosaic": dict(color="#1a7f37", marker="P", label="jaxlm (Pallas, Mosaic GPU backend)"),
    "jaxlm_triton": dict(color="#1f6feb", marker="o", label="jaxlm (Pallas, Triton backend)"),
    "jaxlm_default": dict(color="#0a3069", marker="*", ms=11, ls="none", label="jaxlm default call (backend auto)"),
    "jax_peer": dict(color="#8250df", marker="s", ls="--", label="jaxlm, XLA attention (JAX peer)"),
    "hf": dict(color="#cf222e", marker="^", label="HF transformers"),
    "cudnn": dict(color="#cf222e", marker="^", label="cuDNN (jax.nn.dot_product_attention)"),
    "mgpu": dict(color="#bf8700", marker="D", ls="--", label="JAX Pallas attention_mgpu"),
    "xla": dict(color="#8250df", marker="s", ls="--", label="XLA"),
    "floor": dict(color="#57606a", ls=":", label="floor (bytes / bandwidth)"),
}


def _load(results: Path, name: str) -> dict:
    path = results / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _caption(fig, res: dict):
    fig.text(0.01, 0.005, f"{res.get('card', '?')} · commit {res.get('commit', '?')} · {res.get('date', '?')}",
             fontsize=7, color="#57606a")


def _save(fig, res: dict, path: Path) -> Path:
    _caption(fig, res)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _ceiling_axes(ax, ceiling, ceiling_label, xlabel, ylabel, title):
    """Log2 x axis, labels, a dotted measured ceiling when known, grid and legend."""
    if ceiling:
        ax.axhline(ceiling, **{**STYLE["floor"], "label": ceiling_label})
    ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)


def _series(ax, xs, ys, key):
    pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
    if pts:
        ax.plot(*zip(*pts), **STYLE[key])


def plot_mla(res: dict, out: Path) -> Path | None:
    if not res:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.4), gridspec_kw={"width_ratios": [1, 1, 1.5]})
    sweep = res.get("decode_sweep", [])
    for ax, (vary, fixed, label) in zip(axes[:2], [("B", "history", "requests (batch)"),
                                                  ("history", "B", "history length (tokens)")]):
        rows = [r for r in sweep if r[fixed] == (1024 if fixed == "history" else 16)]
        rows = sorted(rows, key=lambda r: r[vary])
        xs = [r[vary] for r in rows]
        for key, field in (("jaxlm", "pallas_ms"), ("jax_peer", "xla_ms"), ("hf", "hf_ms"), ("floor", "floor_ms")):
            _series(ax, xs, [r.get(field) for r in rows], key)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("decode ms / step")
        ax.set_title(f"decode vs {'batch (history 1024)' if vary == 'B' else 'history (16 requests)'}")
        ax.grid(alpha=0.3, which="both")
        if not rows:
            ax.text(0.5, 0.5, "no sweep in mla.json yet", ha="center", transform=ax.transAxes)
    ax = axes[2]
    cases = [("prefill\n(seed batch)", "prefill_batch_ms", "hf_prefill_batch_ms", "floor_prefill_ms", None),
             ("decode step\n(per call)", "decode_step_ms", "hf_decode_step_ms", "floor_decode_ms", "decode_step_ms_xla"),
             ("decode step\n(decode_steps)", "decode_loop_step_ms", "hf_decode_step_ms", "floor_decode_ms",
              "decode_loop_step_ms_xla"),
             ("FP8 prefill", "fp8_prefill_batch_ms", "hf_prefill_batch_ms", "floor_prefill_ms", None),
             ("FP8 decode\n(decode_steps)", "fp8_decode_loop_step_ms", "hf_decode_step_ms", "floor_fp8_decode_ms", None)]
    width = 0.2
    for i, (key, pick) in enumerate([("jaxlm", 1), ("jax_peer", 4), ("hf", 2), ("floor", 3)]):
        vals = [c[pick] and res.get(c[pick]) for c in cases]
        pos = [j + (i - 1.5) * width for j, v in enumerate(vals) if v]
        if pos:
            ax.bar(pos, [v for v in vals if v], width, color=STYLE[key]["color"], label=STYLE[key]["label"],
                   alpha=0.5 if key == "floor" else 1)
    ax.set_xticks(range(len(cases)), [c[0] for c in cases], fontsize=8)
    ax.set_ylabel("ms")
    ax.set_title("seed cases (InfiniLM)")
    ax.grid(alpha=0.3, axis="y")
    handles, labels = axes[0].get_legend_handles_labels()
    (ax if not handles else axes[0]).legend(fontsize=8)
    fig.suptitle("DeepSeek-R1 MLA layer, bf16, random weights")
    return _save(fig, res, out / "mla.png")


def plot_kernels(res: dict, mla_res: dict, out: Path) -> Path | None:
    if not res:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    ax = axes[0]
    rows = sorted(res.get("sage_attention", []), key=lambda r: r["S"])
    xs = [r["S"] for r in rows]
    _series(ax, xs, [r.get("sage_TFLOPs") if "triton_ms" in r else None for r in rows], "jaxlm_default")
    _series(ax, xs, [r.get("triton_TFLOPs", r.get("sage_TFLOPs")) for r in rows], "jaxlm_triton")  # older: sage = Triton
    _series(ax, xs, [r.get("mosaic_TFLOPs") for r in rows], "jaxlm_mosaic")
    _series(ax, xs, [r.get("cudnn_TFLOPs") for r in rows], "cudnn")
    _series(ax, xs, [r.get("mgpu_TFLOPs") for r in rows], "mgpu")
    _series(ax, xs, [r.get("xla_TFLOPs") for r in rows], "xla")
    _ceiling_axes(ax, mla_res.get("matmul_TFLOPs"), "bf16 matmul rate (measured)",
                  "sequence length (causal, D=128, 16 heads)", "TFLOP/s", "attention: sage_attention (INT8 Q·Kᵀ)")
    ax = axes[1]
    dec = res.get("mla_decode", [])
    for b, alpha in ((16, 0.55), (64, 1.0)):
        rows = sorted([r for r in dec if r["B"] == b and not r.get("seed")], key=lambda r: r["L"])
        xs = [r["L"] for r in rows]
        # the default backend ("pallas") is the Mosaic kernel from 6ae80e9; older results name it mosaic_TBps
        mosaic = "mosaic_TBps" if any("mosaic_TBps" in r for r in rows) else "pallas_TBps"
        triton = "pallas_TBps" if mosaic == "mosaic_TBps" else "triton_TBps"
        for key, field in (("jaxlm_triton", triton), ("jaxlm_mosaic", mosaic), ("xla", "xla_TBps")):
            pts = [(x, r.get(field)) for x, r in zip(xs, rows) if r.get(field)]
            if pts:
                ax.plot(*zip(*pts), **{**STYLE[key], "alpha": alpha, "label": f"{STYLE[key]['label']}, B={b}"})
    read = mla_res.get("read_TBps")  # older results measured the copy only
    _ceiling_axes(ax, read or mla_res.get("copy_TBps"), f"{'read' if read else 'copy'} bandwidth (measured)",
                  "history length L (128 heads, latent 512 + rope 64)", "effective cache read TB/s",
                  "mla_decode (absorbed, flash-decoding)")
    return _save(fig, res, out / "kernels.png")


def plot_qwen3_vl(res: dict, out: Path) -> Path | None:
    if not res:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.25
    for i, (key, fmt) in enumerate([("jaxlm", "decode_ms_per_step_b{}"), ("hf", "hf_decode_ms_per_step_b{}"),
                                    ("floor", "floor_decode_ms")]):
        vals = [res.get(fmt.format(b)) for b in (1, 16)]
        pos = [j + (i - 1) * width for j, v in enumerate(vals) if v]
        if pos:
            label = "jaxlm (XLA attention)" if key == "jaxlm" else STYLE[key]["label"]
            bars = ax.bar(pos, [v for v in vals if v], width, color=STYLE[key]["color"], label=label,
                          alpha=0.5 if key == "floor" else 1)
            ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks([0, 1], ["batch 1", "batch 16"])
    ax.set_ylabel("decode ms / step")
    ax.set_title("Qwen3-VL-2B decode (random bf16 weights, 128-token prompts)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    return _save(fig, res, out / "qwen3_vl.png")


def main(argv=None) -> list[Path]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--out", default=str(Path(__file__).parent))
    args = ap.parse_args(argv)
    results, out = Path(args.results), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    mla_res = _load(results, "mla")
    made = [p for p in (plot_mla(mla_res, out), plot_kernels(_load(results, "kernels"), mla_res, out),
                        plot_qwen3_vl(_load(results, "qwen3_vl"), out)) if p]
    for p in made:
        print("wrote", p)
    return made


if __name__ == "__main__":
    main()
