"""Where a Qwen3-VL-2B decode step spends its time on the GPU: jax.profiler trace of N decode steps (batch 1),
GPU kernel time per step vs wall time per step, kernel count per step, and the top kernels.

    PYTHONPATH=. python bench/profile_qwen3_vl.py [--out DIR]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import gpu_kernel_times
from bench.qwen3_vl import CONFIG_2B
from convert.qwen3_vl import text_params
from jaxlm.qwen3_vl import Qwen3VLConfig, decode_step
from jaxlm.qwen3_vl.demo_checkpoint import random_hf_tensors
from jaxlm.qwen3_vl.text import init_cache


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/qwen_trace")
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    cfg = Qwen3VLConfig.from_hf(CONFIG_2B)
    tensors = random_hf_tensors({**CONFIG_2B, "vision_config": {**CONFIG_2B["vision_config"], "depth": 0,
                                                                "deepstack_visual_indexes": []}}, 0)
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), text_params(lambda n: tensors[n], cfg.text, True))
    tensors.clear()
    b = 1
    cache = init_cache(cfg.text, b, 256, jnp.bfloat16)
    tokens = jnp.asarray([1000] * b, jnp.int32)
    cache_len = jnp.full((b,), 128, jnp.int32)
    delta = jnp.zeros((b,), jnp.int32)
    step = jax.jit(lambda p, t, c, n, d: (lambda lg, c2: (jnp.argmax(lg, -1).astype(jnp.int32), c2))(
        *decode_step(p, cfg.text, t, c, n, d)), donate_argnums=2)
    for _ in range(3):
        tokens, cache = step(params, tokens, cache, cache_len, delta)
    jax.block_until_ready(tokens)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        tokens, cache = step(params, tokens, cache, cache_len, delta)
    jax.block_until_ready(tokens)
    async_ms = 1e3 * (time.perf_counter() - t0) / args.steps
    t0 = time.perf_counter()
    for _ in range(args.steps):
        tokens, cache = step(params, tokens, cache, cache_len, delta)
        np.asarray(tokens)
    sync_ms = 1e3 * (time.perf_counter() - t0) / args.steps

    def run():
        nonlocal tokens, cache
        tokens, cache = step(params, tokens, cache, cache_len, delta)
        jax.block_until_ready(tokens)

    prof = gpu_kernel_times(run, args.steps, args.out)
    print(f"async {async_ms:.3f} ms/step, with host sync {sync_ms:.3f} ms/step; GPU busy {prof['busy_ms']:.3f} "
          f"ms/step over a {prof['span_ms']:.3f} ms span; {prof['kernels']:.0f} GPU events per step")
    for ms, name in prof["top"]:
        print(f"  {ms:8.3f} ms/step  {name[:110]}")


if __name__ == "__main__":
    main()
