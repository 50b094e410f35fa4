"""Scratch probe (not committed): HLO of the FP8 decode loop, MLA prefill with the Mosaic sage backend."""
import glob, os, re, sys, time
import jax, jax.numpy as jnp, numpy as np
from bench.common import gpu_kernel_times
from jaxlm import mla, seed
from pallas_kernels import common

cfg = mla.MLAConfig.r1()
params = mla.init_params(cfg, jax.random.key(0), jnp.bfloat16)
p8 = mla.quantize_fp8(params, cfg)
part = sys.argv[1]
if part == "dump":
    b = len(seed.DECODE_PAST)
    xs = jax.random.normal(jax.random.key(1), (4, b, cfg.hidden_size), jnp.bfloat16)
    cache = mla.init_cache(cfg, b, 448, jnp.bfloat16)
    ys, cache = mla.decode_steps(p8, cfg, xs, cache, seed.DECODE_PAST)
    jax.block_until_ready(ys)
    files = sorted(glob.glob(os.environ["DUMPDIR"] + "/*decode_steps*after_optimizations.txt"))
    print(files)
    text = open(files[-1]).read()
    for line in text.splitlines():
        if re.search(r"= .*\b(copy|copy-start|scatter)\(", line) or ("fusion" in line and "kind=kLoop" in line and "copy" in line):
            print(line.strip()[:400])
    print("while bodies:", len(re.findall(r"while\(", text)))
else:
    for backend in ("triton", "mosaic"):
        common.DEFAULT_BACKEND["sage_attention"] = backend
        jax.clear_caches()
        for name, p in (("bf16", params), ("fp8", p8)):
            r = seed.prefill(p, cfg, warmup=5, runs=50)
            x, c = seed.prefill_inputs(p, cfg)
            st = {"c": c}
            def call(p=p, x=x, st=st):
                y, st["c"] = mla.forward(p, cfg, x, st["c"], seed.PREFILL_SEQ, seed.PREFILL_PAST)
                return jax.block_until_ready(y)
            call()
            prof = gpu_kernel_times(call, 10)
            print(f"sage {backend} {name} prefill: batch {r['batch_ms']:.3f} ms, ttft {r['ttft_ms']:.3f}, busy {prof['busy_ms']:.3f}, "
                  f"top {[(round(a, 4), b[:30]) for a, b in prof['top'][:6]]}", flush=True)
