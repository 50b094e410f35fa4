"""fp8_matmul's FP8-activation path for Hopper on the Mosaic GPU backend: e4m3 x e4m3 warpgroup MMAs with
DeepSeek's per-128-K promotion (as in DeepGEMM): each 128-wide K step multiplies one [64, K-block] tile of the
quantised activations with one [128, K-block] tile of the weight into a fresh float32 accumulator, which is scaled
by the token's activation scale times the weight block's scale and added to the running float32 sum. Operand tiles
arrive by TMA through `stages` shared-memory buffers while the previous step multiplies. One warpgroup per
[64, 128] output tile.

Both operands are K-major, as FP8 wgmma requires: x [M, K] and w in HF row layout [N, K].
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.common import smem

BLOCK = 128  # DeepSeek's scale block: one weight scale per 128 x 128, one activation scale per token per 128 K


@dataclasses.dataclass(frozen=True)
class MosaicBlockSizes:
    block_m: int = 64  # token rows per program (one warpgroup MMA tile)
    stages: int = 3  # K steps in flight


def matmul(xq, xs_t, w, ws, *, out_dtype, block_sizes: MosaicBlockSizes = MosaicBlockSizes(), interpret=False):
    """xq [M, K] e4m3 with M a multiple of block_m, K of 128; xs_t [K/128, M] float32 activation scales; w [N, K]
    e4m3 with N a multiple of 128; ws [N/128, K/128] float32. Returns x @ dequant(w)^T [M, N] in `out_dtype`."""
    bm, stages = block_sizes.block_m, block_sizes.stages
    m, k = xq.shape
    n = w.shape[0]
    k_steps = k // BLOCK
    layout = plgpu.Layout.WGMMA

    def body(x_ref, xs_ref, w_ref, ws_ref, o_ref, x_smem, w_smem, xs_smem, o_smem, bar):
        mi, ni = lax.axis_index("m"), lax.axis_index("n")
        m0, n0 = pl.multiple_of(mi * bm, bm), pl.multiple_of(ni * BLOCK, BLOCK)

        def fetch(j, slot):
            k0 = j * BLOCK if isinstance(j, int) else pl.multiple_of(j * BLOCK, BLOCK)
            plgpu.copy_gmem_to_smem(x_ref.at[pl.ds(m0, bm), pl.ds(k0, BLOCK)], x_smem.at[slot], bar.at[slot])
            plgpu.copy_gmem_to_smem(w_ref.at[pl.ds(n0, BLOCK), pl.ds(k0, BLOCK)], w_smem.at[slot], bar.at[slot])
            plgpu.copy_gmem_to_smem(xs_ref.at[j, pl.ds(m0, bm)], xs_smem.at[slot], bar.at[slot])

        for s in range(min(stages, k_steps)):
            fetch(s, s)

        def step(j, acc):
            slot = lax.rem(j, jnp.int32(stages))
            plgpu.barrier_wait(bar.at[slot])

            def mma(acc_ref):
                plgpu.wgmma(acc_ref, x_smem.at[slot], w_smem.at[slot].transpose((1, 0)))
                return acc_ref[...]

            part = pl.run_scoped(mma, plgpu.ACC((bm, BLOCK), jnp.float32))
            xs = plgpu.load(xs_smem.at[slot], layout=layout.reduce(1), optimized=False)
            acc = acc + part * lax.broadcast_in_dim(xs * ws_ref[ni, j], (bm, BLOCK), [0])
            pl.when(j + stages < k_steps)(lambda: fetch(j + stages, slot))  # the slot's operands are consumed
            return acc

        acc = lax.fori_loop(0, k_steps, step, plgpu.layout_cast(jnp.zeros((bm, BLOCK), jnp.float32), layout))
        o_smem[...] = acc.astype(out_dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_ref.at[pl.ds(m0, bm), pl.ds(n0, BLOCK)])
        plgpu.wait_smem_to_gmem(0)

    return plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((m, n), out_dtype),
        scratch_types=[smem((stages, bm, BLOCK), xq.dtype), smem((stages, BLOCK, BLOCK), w.dtype),
                       plgpu.SMEM((stages, bm), jnp.float32), smem((bm, BLOCK), out_dtype),
                       plgpu.Barrier(num_arrivals=3, num_barriers=stages)],
        grid=(m // bm, n // BLOCK),
        grid_names=("m", "n"),
        interpret=plgpu.InterpretGPUParams() if interpret else False,
    )(xq, xs_t, w, ws)
