"""The cases `bench/ncu.sh` profiled in the twenty-fourth session (bench/RESULTS.md), at R1's sizes: the seed
prefill's two big FP8 GEMMs at 768 tokens (o_proj FP8 x FP8: act_quant + the Mosaic kernel; q_b through the
dequantising kernel) and mla_decode at B=64, L=4096 and at the seed's decode case (16 requests, 50-400 cached).
Inputs are made on the host, so that the kernels launched are the measured ones; each call runs twice.

    PYTHONPATH=. bash bench/ncu.sh bench/ncu_cases.py 60 "mosaic|merge|act_quant"
"""

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.seed import DECODE_PAST
from pallas_kernels import fp8_matmul, mla_decode

rng = np.random.default_rng(0)


def fp8_weight(n: int, k: int):
    bits = rng.integers(0, 256, (n, k), dtype=np.uint8)
    bits[(bits & 0x7F) == 0x7F] = 0x10  # no NaN codes
    scale = rng.uniform(1e-4, 1e-3, (n // 128, k // 128)).astype(np.float32)
    return jax.device_put(bits.view(jnp.float8_e4m3fn)), jax.device_put(scale)


def bf16(*shape):
    return jax.device_put(rng.standard_normal(shape).astype(jnp.bfloat16))


o_proj, q_b = fp8_weight(7168, 16384), fp8_weight(24576, 1536)
x_o, x_q = bf16(768, 16384), bf16(768, 1536)
fp8_act = jax.jit(lambda x, w, s: fp8_matmul(x, w, s, activations="auto"))  # 768 tokens: FP8 x FP8
dequant = jax.jit(lambda x, w, s: fp8_matmul(x, w, s, activations="bf16"))  # the dequantising kernel
decode = jax.jit(lambda *a: mla_decode(*a, sm_scale=0.135))
big = (bf16(64, 128, 512), bf16(64, 128, 64), bf16(64, 4096, 512), bf16(64, 4096, 64),
       jax.device_put(np.full(64, 4096, np.int32)))
seed = (bf16(16, 128, 512), bf16(16, 128, 64), bf16(16, 448, 512), bf16(16, 448, 64),
        jax.device_put(np.asarray(DECODE_PAST, np.int32)))
for _ in range(2):
    fp8_act(x_o, *o_proj).block_until_ready()
    dequant(x_q, *q_b).block_until_ready()
    decode(*big).block_until_ready()
    decode(*seed).block_until_ready()
