"""Pallas kernels on the GPU beside their peers, in one run. Writes bench/results/kernels.json and prints a table.

    PYTHONPATH=. python bench/kernels.py [--out bench/results/kernels.json] [--parts sage,mla,fp8] [--quick]

(--parts: which kernels; --quick: sage_attention at the fastest block sizes of the full sweeps only.)

sage_attention: D=128, causal, 16 heads, S in {1k, 4k, 16k} with B = 16, 4, 1 requests of length S: the default
call (backend "auto", which picks the kernel by request length: "sage" columns), and each backend over its block
sizes ("triton", "mosaic"), against `jax.nn.dot_product_attention` with cuDNN and with XLA (same bf16 inputs,
[B, S, H, D]) and JAX's attention_mgpu. TFLOP/s count the causal half: 2 * B * S^2 * H * D.

mla_decode: 128 heads, latent 512 + rope 64, bf16 caches, B in {16, 64}, L in {400, 4096, 32768} (every request at
length L): the default backend ("pallas" columns; Mosaic on a GPU) and backend="triton" ("triton" columns), against
the XLA einsum reference (`mla_decode_reference` jitted). Effective bandwidth counts the cache
rows read once (L * 1152 B per request) plus q and o. The int8-latent cache columns (`update_cache(..., scales=)`
layout: int8 latent + float32 row scale + bf16 rope, 644 B per token) count the bytes that layout reads.
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
import numpy as np

from bench.common import commit, copy_bandwidth, gpu_kernel_times, read_bandwidth
from jaxlm.seed import DECODE_PAST, median_ms
from pallas_kernels import mla_decode, mla_decode_reference
from pallas_kernels.common import DEFAULT_BACKEND, quantize_rows_int8
from pallas_kernels.sage_attention import (BlockSizes, MosaicBlockSizes, auto_backend, sage_attention,
                                          sage_attention_reference)


def timed(fn, *args, calls=20):
    """Mean ms per call over `calls` back-to-back asynchronous calls (median of 10 such batches): kernel time
    without the host's per-call synchronisation, which costs about 0.1 ms on its own."""
    jax.block_until_ready(fn(*args))

    def batch():
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)

    return median_ms(batch, 2, 10) / calls


def timed_in_graph(fn, sets, calls=20):
    """ms per call of fn when all of `sets` (argument tuples with distinct data, together larger than the L2) run in
    one jitted program: the kernel's cost inside a model's jitted step, without the host's per-call dispatch (about
    0.05-0.08 ms on the GPU machine's host, which dominates `timed` for kernels shorter than that)."""
    many = jax.jit(lambda sets: [fn(*s) for s in sets])
    return timed(many, sets, calls=calls) / len(sets)


def fresh_copies(args, n: int, seed: int = 0) -> list[tuple]:
    """`n` argument tuples like `args` with fresh random floating-point arrays (integer arrays, e.g. lengths, kept):
    distinct data for `timed_in_graph`."""
    def fresh(i, j, x):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            return x
        return jax.random.normal(jax.random.fold_in(jax.random.key(seed + i), j), x.shape, x.dtype)

    return [tuple(fresh(i, j, x) for j, x in enumerate(args)) for i in range(n)]


def gpu_ms(fn, *args, calls=20) -> float | None:
    """GPU kernel time per call of fn(*args) from a profiler trace (None without a GPU): the kernels' own cost, without
    the host's dispatch, which on the GPU machine's host exceeds a short kernel's time."""
    run = lambda: jax.block_until_ready(fn(*args))  # noqa: E731
    run()
    return gpu_kernel_times(run, calls)["busy_ms"]


def _try_ms(key, fn, *args) -> dict:
    """{key: ms per call}, or {key without _ms: "failed: ..."} when the kernel does not compile or run on the card."""
    try:
        return {key: timed(fn, *args)}
    except Exception as e:
        return {key[:-3]: f"failed: {str(e)[:200]}"}


def mla_decode_cases(scale=0.1352338):
    rows = []
    kernel = jax.jit(lambda *a: mla_decode(*a, sm_scale=scale))  # the default backend (Mosaic on a GPU)
    kernel_i8 = jax.jit(lambda *a: mla_decode(*a, sm_scale=scale, qk_int8=True))
    kernel_c8 = jax.jit(lambda *a, s: mla_decode(*a, sm_scale=scale, kv_scale=s))  # int8 latent cache
    kernel_mg = jax.jit(lambda *a: mla_decode(*a, sm_scale=scale, backend="triton"))  # the other kernel
    ref = jax.jit(lambda *a: mla_decode_reference(*a, sm_scale=scale))
    for b in (16, 64):
        for length in (400, 4096, 32768):
            keys = jax.random.split(jax.random.key(b * length), 4)
            bf = jnp.bfloat16
            q = jax.random.normal(keys[0], (b, 128, 512), bf)
            qp = jax.random.normal(keys[1], (b, 128, 64), bf)
            s = -(-length // 64) * 64
            kv = jax.random.normal(keys[2], (b, s, 512), bf)
            pe = jax.random.normal(keys[3], (b, s, 64), bf)
            lens = jnp.full((b,), length, jnp.int32)
            out = np.asarray(kernel(q, qp, kv, pe, lens), np.float32)
            want = np.asarray(ref(q, qp, kv, pe, lens), np.float32)
            err = float(np.linalg.norm(out - want) / np.linalg.norm(want))
            t_k = timed(kernel, q, qp, kv, pe, lens)
            t_x = timed(ref, q, qp, kv, pe, lens)
            nbytes = b * length * 1152 + b * 128 * (576 + 512) * 2
            flops = 2 * b * 128 * length * (576 + 512)
            out8 = np.asarray(kernel_i8(q, qp, kv, pe, lens), np.float32)
            t_8 = timed(kernel_i8, q, qp, kv, pe, lens)
            kv8, kv_s = quantize_rows_int8(kv)
            c8 = functools.partial(kernel_c8, s=kv_s)
            out_c8 = np.asarray(c8(q, qp, kv8, pe, lens), np.float32)
            t_c8 = timed(c8, q, qp, kv8, pe, lens)
            try:
                out_mg = np.asarray(kernel_mg(q, qp, kv, pe, lens), np.float32)
                t_mg = timed(kernel_mg, q, qp, kv, pe, lens)
                other = {"triton_ms": t_mg, "triton_TBps": nbytes / t_mg / 1e9,
                          "triton_rel_err": float(np.linalg.norm(out_mg - want) / np.linalg.norm(want))}
            except Exception as e:  # a compile or launch failure on the card: record and go on
                other = {"triton": f"failed: {str(e)[:200]}"}
            gpu = {"pallas_gpu_ms": gpu_ms(kernel, q, qp, kv, pe, lens)} if (b, length) == (64, 4096) else {}
            rows.append({"B": b, "L": length, "pallas_ms": t_k, "xla_ms": t_x, "rel_err": err, **other, **gpu,
                         "int8_cache_ms": t_c8, "int8_cache_TBps": (nbytes - b * length * 508) / t_c8 / 1e9,
                         "int8_cache_rel_err": float(np.linalg.norm(out_c8 - want) / np.linalg.norm(want)),
                         "qk_int8_ms": t_8, "qk_int8_TBps": nbytes / t_8 / 1e9,
                         "qk_int8_rel_err": float(np.linalg.norm(out8 - want) / np.linalg.norm(want)),
                         "pallas_TBps": nbytes / t_k / 1e9, "xla_TBps": nbytes / t_x / 1e9,
                         "pallas_TFLOPs": flops / t_k / 1e9, "speedup_vs_xla": t_x / t_k})
    # the seed's decode case: 16 requests with histories 50/100/200/400 (x4) in a 448-row cache
    keys = jax.random.split(jax.random.key(7), 4)
    bf, b = jnp.bfloat16, len(DECODE_PAST)
    args = (jax.random.normal(keys[0], (b, 128, 512), bf), jax.random.normal(keys[1], (b, 128, 64), bf),
            jax.random.normal(keys[2], (b, 448, 512), bf), jax.random.normal(keys[3], (b, 448, 64), bf),
            jnp.asarray(DECODE_PAST, jnp.int32))
    t = timed(kernel, *args)
    kv8, kv_s = quantize_rows_int8(args[2])
    # the same case 8 times over inside one jitted program (8 x 8.3 MB of cache, more than the 50 MB L2)
    sets = fresh_copies(args, 8)
    in_graph = {"pallas_in_graph_ms": timed_in_graph(kernel, sets), "xla_in_graph_ms": timed_in_graph(ref, sets)}
    try:
        in_graph["triton_in_graph_ms"] = timed_in_graph(kernel_mg, sets)
    except Exception as e:  # a compile or launch failure on the card: record and go on
        in_graph["triton_in_graph"] = f"failed: {str(e)[:200]}"
    in_graph["pallas_gpu_ms"] = gpu_ms(kernel, *args)
    in_graph["triton_gpu_ms"] = gpu_ms(kernel_mg, *args)
    rows.append({"B": b, "L": "seed 50-400", "pallas_ms": t, "xla_ms": timed(ref, *args), "seed": True, **in_graph,
                 "int8_cache_ms": timed(functools.partial(kernel_c8, s=kv_s), *args[:2], kv8, *args[3:]),
                 **_try_ms("triton_ms", kernel_mg, *args),
                 "qk_int8_ms": timed(kernel_i8, *args),
                 "pallas_TBps": (sum(DECODE_PAST) * 1152 + b * 128 * 1088 * 2) / t / 1e9})
    return rows


def mgpu_attention(q, k, v) -> dict:
    """JAX's Pallas Mosaic-GPU flash attention (jax.experimental.pallas.ops.gpu.attention_mgpu), fp16, causal:
    the best block_kv of 128/64 at block_q 64; {} if it does not run here."""
    try:
        from jax.experimental.pallas.ops.gpu import attention_mgpu as am
    except ImportError:
        return {}
    q, k, v = (x.astype(jnp.float16) for x in (q, k, v))
    best = {}
    for block_kv in (128, 64):
        cfg = am.TuningConfig(block_q=64, block_kv=block_kv, max_concurrent_steps=2, causal=True)
        try:
            t = timed(jax.jit(functools.partial(am.attention, config=cfg)), q, k, v)
        except Exception as e:  # noqa: BLE001 - record why and go on
            best.setdefault("mgpu_error", str(e)[:120])
            continue
        if "mgpu_ms" not in best or t < best["mgpu_ms"]:
            best.update(mgpu_ms=t, mgpu_block_kv=block_kv)
    return best


R1_PROJECTIONS = {"q_a_proj": (1536, 7168), "q_b_proj": (24576, 1536), "kv_a_proj_with_mqa": (576, 7168),
                  "o_proj": (7168, 16384)}


def fp8_cases(read_bps: float) -> list[dict]:
    """fp8_matmul at R1's attention projections, decode (16 tokens: FP8 weights x bf16 activations) and prefill
    (704 tokens: FP8 x FP8), beside XLA's bf16 matmul on the dequantised weight; decode floor = FP8 weight bytes
    over the read bandwidth."""
    from pallas_kernels.fp8_matmul import fp8_matmul, quantize

    rows = []
    for name, (n, k) in R1_PROJECTIONS.items():
        w, s = quantize(jax.random.normal(jax.random.key(n), (n, k), jnp.float32) / k**0.5, 128)
        w16 = (w.astype(jnp.float32) * jnp.repeat(jnp.repeat(s, 128, 0), 128, 1)[:n, :k]).astype(jnp.bfloat16)
        for m in (16, 704):
            x = jax.random.normal(jax.random.key(m), (m, k), jnp.bfloat16)
            f8 = jax.jit(functools.partial(fp8_matmul, backend="triton"))  # the Mosaic kernel: its own column
            bf = jax.jit(lambda x, w: x @ w.T)
            y8, y16 = np.asarray(f8(x, w, s), np.float32), np.asarray(bf(x, w16), np.float32)
            row = {"proj": name, "M": m, "N": n, "K": k, "fp8_ms": timed(f8, x, w, s), "bf16_xla_ms": timed(bf, x, w16),
                   "cos_vs_bf16": float((y8 * y16).sum() / np.linalg.norm(y8) / np.linalg.norm(y16))}
            row["floor_ms"] = 1e3 * (w.nbytes + s.nbytes) / read_bps
            row["fp8_TBps"] = (w.nbytes + s.nbytes + x.nbytes) / row["fp8_ms"] / 1e9
            row["fp8_TFLOPs"] = 2 * m * n * k / row["fp8_ms"] / 1e9
            row["speedup_vs_bf16"] = row["bf16_xla_ms"] / row["fp8_ms"]
            if m >= 128:  # the Mosaic GPU FP8 x FP8 kernel on the same operands
                mg = jax.jit(functools.partial(fp8_matmul, backend="mosaic"))
                try:
                    ym = np.asarray(mg(x, w, s), np.float32)
                    row.update(mosaic_ms=timed(mg, x, w, s),
                               mosaic_cos_vs_bf16=float((ym * y16).sum() / np.linalg.norm(ym) / np.linalg.norm(y16)))
                    row["mosaic_TFLOPs"] = 2 * m * n * k / row["mosaic_ms"] / 1e9
                except Exception as e:  # a compile or launch failure on the card: record and go on
                    row["mosaic"] = f"failed: {str(e)[:200]}"
            rows.append(row)
    return rows


MOSAIC_SWEEP = ((64, 64, 2, 2), (64, 128, 2, 2), (64, 64, 3, 2), (64, 128, 3, 2), (64, 128, 2, 1), (64, 64, 2, 1))  # bq, bk, stages, wgs


def sage_cases(sweep=((64, 64, 4, 2), (128, 64, 8, 2), (128, 32, 4, 2), (64, 32, 4, 3), (128, 64, 4, 3)),
               mosaic_sweep=MOSAIC_SWEEP):
    rows = []
    for s, b in ((1024, 16), (4096, 4), (16384, 1)):
        h, d = 16, 128
        keys = jax.random.split(jax.random.key(s), 3)
        q, k, v = (jax.random.normal(kk, (b, s, h, d), jnp.bfloat16) for kk in keys)
        cu = jnp.arange(b + 1, dtype=jnp.int32) * s
        flat = lambda x: x.reshape(b * s, h, d)
        flops = 2 * b * s * s * h * d
        cudnn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn"))
        xla = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla"))
        want = np.asarray(cudnn(q, k, v), np.float32).reshape(b * s, h, d)
        row = {"S": s, "B": b, "H": h, "D": d, "cudnn_ms": timed(cudnn, q, k, v)}
        row["xla_ms"] = timed(xla, q, k, v) if s <= 4096 else None
        row.update(mgpu_attention(q, k, v))
        want = want.astype(np.float64)
        cos = lambda a: float((a * want).sum() / np.linalg.norm(a) / np.linalg.norm(want))  # noqa: E731
        # the default call (backend "auto": Mosaic or Triton by request length), what a user gets
        default = jax.jit(lambda q, k, v, cu: sage_attention(q, k, v, cu, cu))
        out = np.asarray(default(flat(q), flat(k), flat(v), cu), np.float64)
        row.update(sage_ms=timed(default, flat(q), flat(k), flat(v), cu), cos_vs_cudnn=cos(out),
                   sage_backend=auto_backend(b * s, b * s, b, d, d, jnp.bfloat16))
        best = None  # the Triton kernel (backend="triton") over its block sizes
        for bq, bk, w, st in sweep:
            fn = jax.jit(lambda q, k, v, cu, bs=BlockSizes(bq, bk, w, st): sage_attention(q, k, v, cu, cu, block_sizes=bs))
            try:
                t = timed(fn, flat(q), flat(k), flat(v), cu)
            except Exception as e:  # a block shape the card cannot hold: record and go on
                row[f"triton_{bq}_{bk}_{w}_{st}"] = f"failed: {str(e)[:80]}"
                continue
            row[f"triton_{bq}_{bk}_{w}_{st}_ms"] = t
            if best is None or t < best[0]:
                best = (t, (bq, bk, w, st), fn)
        row.update(triton_ms=best[0], triton_blocks=best[1],
                   triton_cos_vs_cudnn=cos(np.asarray(best[2](flat(q), flat(k), flat(v), cu), np.float64)))
        mosaic = None  # the Mosaic GPU kernel (backend="mosaic") over its block sizes
        for bq, bk, st, wgs in mosaic_sweep:
            fn = jax.jit(lambda q, k, v, cu, bs=MosaicBlockSizes(bq, bk, st, wgs): sage_attention(
                q, k, v, cu, cu, backend="mosaic", block_sizes=bs))
            try:
                t = timed(fn, flat(q), flat(k), flat(v), cu)
            except Exception as e:  # a compile or launch failure on the card: record and go on
                row[f"mosaic_{bq}_{bk}_{st}_{wgs}"] = f"failed: {str(e)[:200]}"
                continue
            row[f"mosaic_{bq}_{bk}_{st}_{wgs}_ms"] = t
            if mosaic is None or t < mosaic[0]:
                mosaic = (t, (bq, bk, st, wgs), fn)
        if mosaic is not None:
            row.update(mosaic_ms=mosaic[0], mosaic_blocks=mosaic[1],
                       mosaic_cos_vs_cudnn=cos(np.asarray(mosaic[2](flat(q), flat(k), flat(v), cu), np.float64)))
        if s == 1024:  # the dense float32 reference on the first request
            one = jnp.array([0, s], jnp.int32)
            ref = np.asarray(sage_attention_reference(q[0], k[0], v[0], one, one), np.float32)
            row["rel_l1_vs_f32_reference"] = float(np.abs(out[:s] - ref).sum() / np.abs(ref).sum())
        for name in ("sage", "triton", "mosaic", "cudnn", "xla", "mgpu"):
            if row.get(f"{name}_ms"):
                row[f"{name}_TFLOPs"] = flops / row[f"{name}_ms"] / 1e9
        row["sage_vs_cudnn"] = row["cudnn_ms"] / row["sage_ms"]
        rows.append(row)
    return rows


def sage_summary(sage: list[dict]) -> dict:
    s16k = next(r for r in sage if r["S"] == 16384)
    return dict(sage_tflops_s16k=s16k["sage_TFLOPs"], sage_backend_s16k=s16k["sage_backend"],
                cudnn_tflops_s16k=s16k["cudnn_TFLOPs"], sage_triton_tflops_s16k=s16k.get("triton_TFLOPs"),
                sage_mosaic_tflops_s16k=s16k.get("mosaic_TFLOPs"), mgpu_tflops_s16k=s16k.get("mgpu_TFLOPs"),
                sage_cosine=min(r["cos_vs_cudnn"] for r in sage))


def mla_decode_summary(rows: list[dict]) -> dict:
    b64 = next(r for r in rows if r["B"] == 64 and r["L"] == 4096)
    seed_row = next(r for r in rows if r.get("seed"))
    nbytes = 64 * 4096 * 1152 + 64 * 128 * 1088 * 2
    gpu = lambda ms, scale: None if ms is None else scale(ms)  # noqa: E731  (no trace: None)
    return dict(mla_decode_tbps_b64_l4096=b64["pallas_TBps"], mla_decode_seed_us=1e3 * seed_row["pallas_ms"],
                mla_decode_tbps_b64_l4096_gpu=gpu(b64.get("pallas_gpu_ms"), lambda ms: nbytes / ms / 1e9),
                mla_decode_seed_gpu_us=gpu(seed_row.get("pallas_gpu_ms"), lambda ms: 1e3 * ms),
                mla_decode_seed_in_graph_us=1e3 * seed_row["pallas_in_graph_ms"],
                mla_decode_int8_cache_b64_l4096_ms=b64["int8_cache_ms"],
                mla_decode_triton_tbps_b64_l4096=b64.get("triton_TBps"),
                mla_decode_triton_seed_us=1e3 * (seed_row.get("triton_ms") or float("nan")),
                mla_decode_int8_cache_seed_us=1e3 * seed_row["int8_cache_ms"])


def print_sage(sage, dev):
    print(f"\nsage_attention, causal, H=16, D=128, bf16, {dev.device_kind}; sage = the default call (its backend)")
    print(f"{'S':>6} {'B':>3} {'sage ms':>8} {'TF/s':>6} {'cudnn ms':>9} {'TF/s':>6} {'xla TF/s':>8} {'vs cudnn':>8} {'cos':>9} backend")
    for r in sage:
        xla_tf = f"{r['xla_TFLOPs']:.0f}" if r.get("xla_TFLOPs") else "-"
        print(f"{r['S']:>6} {r['B']:>3} {r['sage_ms']:>8.3f} {r['sage_TFLOPs']:>6.0f} {r['cudnn_ms']:>9.3f} "
              f"{r['cudnn_TFLOPs']:>6.0f} {xla_tf:>8} {r['sage_vs_cudnn']:>7.2f}x {r['cos_vs_cudnn']:>9.6f} {r['sage_backend']}")
        print(f"{'':>6} triton backend: {r['triton_ms']:.3f} ms, {r['triton_TFLOPs']:.0f} TF/s, "
              f"{r['cudnn_ms'] / r['triton_ms']:.2f}x cuDNN, blocks {r['triton_blocks']}")
        mosaic = (f"{r['mosaic_ms']:.3f} ms, {r['mosaic_TFLOPs']:.0f} TF/s, {r['cudnn_ms'] / r['mosaic_ms']:.2f}x cuDNN, "
                  f"cos {r['mosaic_cos_vs_cudnn']:.6f}, blocks {r['mosaic_blocks']}") if r.get("mosaic_ms") else "failed"
        print(f"{'':>6} mosaic backend: {mosaic}")


def print_mla_decode(rows, dev):
    print(f"\nmla_decode, 128 heads, bf16, {dev.device_kind}; pallas = the default backend "
          f"({DEFAULT_BACKEND['mla_decode']}), triton = backend='triton'")
    print(f"{'B':>3} {'L':>6} {'pallas ms':>10} {'TB/s':>6} {'TFLOP/s':>8} {'xla ms':>8} {'TB/s':>6} {'speedup':>8} {'rel err':>8}")
    for r in rows:
        if r.get("seed"):
            print(f"seed case (16 requests, 50-400): {r['pallas_ms'] * 1e3:.1f} us (qk_int8 {r['qk_int8_ms'] * 1e3:.1f} us, "
                  f"int8 cache {r['int8_cache_ms'] * 1e3:.1f} us, triton {1e3 * r.get('triton_ms', float('nan')):.1f} us, "
                  f"XLA {r['xla_ms'] * 1e3:.1f} us); inside one jitted program: {r['pallas_in_graph_ms'] * 1e3:.1f} us "
                  f"(triton {1e3 * r.get('triton_in_graph_ms', float('nan')):.1f} us, XLA {r['xla_in_graph_ms'] * 1e3:.1f} us)"
                  f"; GPU kernel time per call {1e3 * (r['pallas_gpu_ms'] or float('nan')):.1f} us "
                  f"(triton {1e3 * (r['triton_gpu_ms'] or float('nan')):.1f} us)")
            continue
        print(f"{r['B']:>3} {r['L']:>6} {r['pallas_ms']:>10.3f} {r['pallas_TBps']:>6.2f} {r['pallas_TFLOPs']:>8.1f} "
              f"{r['xla_ms']:>8.3f} {r['xla_TBps']:>6.2f} {r['speedup_vs_xla']:>7.1f}x {r['rel_err']:>8.1e}  "
              f"qk_int8 {r['qk_int8_ms']:.3f} ms {r['qk_int8_TBps']:.2f} TB/s err {r['qk_int8_rel_err']:.1e}  "
              f"int8 cache {r['int8_cache_ms']:.3f} ms {r['int8_cache_TBps']:.2f} TB/s err {r['int8_cache_rel_err']:.1e}  "
              + (f"triton {r['triton_ms']:.3f} ms {r['triton_TBps']:.2f} TB/s err {r['triton_rel_err']:.1e}"
                 if r.get("triton_ms") else f"triton {r.get('triton')}"))
        if r.get("pallas_gpu_ms"):
            print(f"{'':>10} GPU kernel time per call {r['pallas_gpu_ms']:.3f} ms = "
                  f"{r['pallas_TBps'] * r['pallas_ms'] / r['pallas_gpu_ms']:.2f} TB/s")


def print_fp8(fp8, dev, bw, res):
    print(f"\nfp8_matmul at R1 projections, {dev.device_kind}; read {bw / 1e12:.2f} TB/s; mgpu attention S=16k: "
          f"{res.get('mgpu_tflops_s16k')} TF/s")
    print("(fp8 ms: the Triton kernel; the Mosaic FP8 x FP8 kernel, the default from 128 tokens, on its own line)")
    print(f"{'proj':<20} {'M':>4} {'fp8 ms':>8} {'bf16 ms':>8} {'floor':>7} {'TB/s':>6} {'TF/s':>6} {'speedup':>8} {'cos':>8}")
    for r in fp8:
        print(f"{r['proj']:<20} {r['M']:>4} {r['fp8_ms']:>8.4f} {r['bf16_xla_ms']:>8.4f} {r['floor_ms']:>7.4f} "
              f"{r['fp8_TBps']:>6.2f} {r['fp8_TFLOPs']:>6.0f} {r['speedup_vs_bf16']:>7.2f}x {r['cos_vs_bf16']:>8.5f}")
        if r.get("mosaic_ms"):
            print(f"{'':<20} {'':>4} mosaic {r['mosaic_ms']:.4f} ms, {r['mosaic_TFLOPs']:.0f} TF/s, "
                  f"cos {r['mosaic_cos_vs_bf16']:.5f}")
        elif r.get("mosaic"):
            print(f"{'':<20} {'':>4} mosaic {r['mosaic']}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/kernels.json")
    ap.add_argument("--parts", default="sage,mla,fp8", help="comma-separated: sage, mla (mla_decode), fp8")
    ap.add_argument("--quick", action="store_true", help="sage: only the fastest block sizes of the full sweeps")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    dev = jax.devices()[0]
    res = {"date": str(date.today()), "card": dev.device_kind, "commit": commit(), "command": " ".join(sys.argv)}
    if "sage" in parts:
        sweeps = dict(sweep=((128, 64, 4, 3), (64, 64, 4, 2)), mosaic_sweep=((64, 128, 2, 2), (64, 128, 3, 2))) \
            if args.quick else {}
        res["sage_attention"] = sage_cases(**sweeps)
        res.update(sage_summary(res["sage_attention"]))
    if "mla" in parts:
        res["mla_decode"] = mla_decode_cases()
        res.update(mla_decode_summary(res["mla_decode"]))
    bw = read_bandwidth()
    res["copy_TBps"], res["read_TBps"] = copy_bandwidth() / 1e12, bw / 1e12
    if "fp8" in parts:
        res["fp8_matmul"] = fp8_cases(bw)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    if "sage" in parts:
        print_sage(res["sage_attention"], dev)
    if "mla" in parts:
        print_mla_decode(res["mla_decode"], dev)
    if "fp8" in parts:
        print_fp8(res["fp8_matmul"], dev, bw, res)


if __name__ == "__main__":
    main()
