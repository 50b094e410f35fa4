"""The FP8 weight-only kernel with 64 (the default) vs 128 weight rows per program (`MosaicBlockSizes.weight_rows`).

Why: each program fetches its [tokens, 128] x tile once per K step for one 64-row weight tile, so at R1's o_proj
(16 tokens) x is a third of what the programs move from L2 to shared memory (57 of 174 MB); 128-row programs halve
it. o_proj's kernel did not speed up with up to 48 MB of its weight in L2 (twenty-first session), so its limit may be
that L2-to-SM traffic rather than DRAM.

    PYTHONPATH=. python bench/proto_wo_rows.py kernels          # in-graph us per call, rows 64 / 128
    PYTHONPATH=. python bench/proto_wo_rows.py decode 64|128     # FP8 seed decode_steps ms per step (one process
                                                                # per setting; alternate them)
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp

from bench.kernels import timed_in_graph
from pallas_kernels import fp8_matmul_mgpu
from pallas_kernels.fp8_matmul import fp8_matmul, fp8_matmuls, quantize
from pallas_kernels.fp8_matmul_mgpu import MosaicBlockSizes

SHAPES = {"o_proj": [(7168, 16384)], "q_b": [(24576, 1536)], "q_a+kv_a": [(1536, 7168), (576, 7168)]}


def kernels(copies: int = 4, m: int = 16):
    for name, ws in SHAPES.items():
        k = ws[0][1]
        sets = []
        for c in range(copies):
            qs = [quantize(jax.random.normal(jax.random.key(100 * c + i), w, jnp.float32) / k**0.5, 128)
                  for i, w in enumerate(ws)]
            sets.append((jax.random.normal(jax.random.key(c), (m, k), jnp.bfloat16), *[a for q in qs for a in q]))
        nbytes = sum(n * kk for n, kk in ws)
        for rows in (64, 128):
            bs = MosaicBlockSizes(weight_rows=rows)

            def f(x, *wss, bs=bs):
                return fp8_matmuls(x, wss[0::2], wss[1::2], activations="bf16", block_sizes=bs) if len(wss) > 2 \
                    else fp8_matmul(x, *wss, activations="bf16", block_sizes=bs)
            us = 1e3 * timed_in_graph(f, sets, calls=10)
            print(f"{name:10s} rows {rows:3d}: {us:6.1f} us  {nbytes / us / 1e6:.2f} TB/s of FP8 weight", flush=True)


def decode(rows: int):
    from jaxlm import mla, seed

    d = list(fp8_matmul_mgpu.MosaicBlockSizes.__init__.__defaults__)
    d[-1] = rows  # weight_rows, the last field: the default every call site takes
    fp8_matmul_mgpu.MosaicBlockSizes.__init__.__defaults__ = tuple(d)
    cfg = mla.MLAConfig.r1()
    p8 = mla.quantize_fp8(mla.init_params(cfg, jax.random.key(0), jnp.bfloat16), cfg)
    r = seed.decode(p8, cfg, attention_impl="pallas", runs=5)
    print(f"decode rows {rows}: decode_steps {r['loop_step_ms']:.4f} ms/step, forward() {r['step_ms']:.4f} ms/step "
          f"checksum {float(jnp.abs(r['ys'].astype(jnp.float32)).sum()):.3f}", flush=True)


if __name__ == "__main__":
    kernels() if sys.argv[1] == "kernels" else decode(int(sys.argv[2]))
