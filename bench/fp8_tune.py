"""Block-size sweep for fp8_matmul on the GPU at R1's projection shapes (decode and prefill token counts).

    PYTHONPATH=. python bench/fp8_tune.py
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp

from bench.kernels import timed
from pallas_kernels.fp8_matmul import BlockSizes, fp8_matmul, quantize

SHAPES = {"q_a_proj": (1536, 7168), "q_b_proj": (24576, 1536), "o_proj": (7168, 16384)}


def main():
    for name, (n, k) in SHAPES.items():
        w, s = quantize(jax.random.normal(jax.random.key(n), (n, k), jnp.float32) / k**0.5, 128)
        for m in (16, 704):
            x = jax.random.normal(jax.random.key(m), (m, k), jnp.bfloat16)
            if m == 16:
                grid = itertools.product((16,), (64, 128), (None, 4, 8, 16), (4, 8), (2, 4))
            else:
                grid = itertools.product((64, 128), (64, 128), (1,), (4, 8), (3, 4))
            results = []
            for bm, bn, splits, warps, stages in grid:
                bs = BlockSizes(block_m=bm, block_n=bn, k_splits=splits, num_warps=warps, num_stages=stages)
                try:
                    t = timed(jax.jit(lambda x, w, s, bs=bs: fp8_matmul(x, w, s, block_sizes=bs)), x, w, s)
                except Exception as e:  # noqa: BLE001
                    print(f"  {name} M={m} {bs}: failed {str(e)[:80]}")
                    continue
                results.append((t, bs))
            results.sort(key=lambda r: r[0])
            flops = 2 * m * n * k
            print(f"{name} M={m}: best {results[0][0] * 1e3:.1f} us ({flops / results[0][0] / 1e9:.0f} TF/s, "
                  f"{(w.nbytes + s.nbytes) / results[0][0] / 1e9:.2f} TB/s) {results[0][1]}")
            for t, bs in results[1:4]:
                print(f"    {t * 1e3:.1f} us {bs}")


if __name__ == "__main__":
    main()
