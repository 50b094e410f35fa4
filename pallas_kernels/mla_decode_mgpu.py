"""mla_decode's kernel for Hopper on the Mosaic GPU backend (`plgpu.kernel`, TMA, `plgpu.wgmma`), after the shape of
DeepSeek's FlashMLA: one program per (request, 64-head block, sequence split); a TMA warpgroup streams [block_k,
512] latent and [block_k, 64] rope tiles through `stages` shared-memory buffers; two compute warpgroups each
compute the scores of all 64 heads (Q.K^T over 512 + 64 as wgmma with K = V = the latent tile) and the online
softmax, and each multiplies P with its half of the latent columns (a [64, 256] float32 accumulator per
warpgroup: the whole [64, 512] one would not fit one warpgroup's registers). Scores are computed twice, once per
warpgroup. Measured on an H100 (bench/RESULTS.md): 0.72 TB/s at B=64, L=4096, 0.91x the Triton kernel - not
bound by the cache reads; computing the scores once and sharing P through shared memory (FlashMLA) is the step
this kernel lacks.

Each split writes its normalised output in 16 bits (staged in Q's shared-memory buffer once both warpgroups are
past their last read of Q: 64-row key tiles then fit) and its base-2 LSE; `mla_decode` merges the splits in XLA.
16-bit caches with contiguous slots; the int8 latent cache, paged caches and qk_int8 stay on the Triton kernel.

The Mosaic GPU interpreter runs every warpgroup as its own XLA CPU computation; with a single host device it can
stall waiting for one of them (the tests run with 8 host devices, tests/conftest.py).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.common import cdiv, smem

HEADS = 64  # query heads per program: one wgmma M tile


@dataclasses.dataclass(frozen=True)
class MosaicBlockSizes:
    block_k: int = 64  # cache rows per step (shared memory: Q 72 KB + stages x block_k x 1152 B; the output reuses Q's)
    stages: int = 2
    k_splits: int | None = None  # sequence splits per request; None: enough programs to fill an H100


def unsupported(lat: int, rope: int, dtype, kv_dtype) -> str | None:
    sixteen = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if jnp.dtype(dtype) not in sixteen or jnp.dtype(kv_dtype) != jnp.dtype(dtype):
        return f"queries and caches must share a 16-bit dtype, got {jnp.dtype(dtype)} / {jnp.dtype(kv_dtype)}"
    if lat % 128 or rope % 64 or lat > 1024:
        return f"latent width must be a multiple of 128 (<= 1024) and rope width a multiple of 64, got {lat} / {rope}"
    return None


def decode(q_latent, q_pe, kv_cache, pe_cache, lengths, *, scale_log2: float, block_sizes: MosaicBlockSizes,
           k_splits: int, interpret: bool = False):
    """q_latent [B, Hp, L], q_pe [B, Hp, R] (Hp a multiple of 64), kv_cache [B, S, L], pe_cache [B, S, R] (S a
    multiple of block_k), lengths [B] int32; scale_log2 = sm_scale * log2(e). Returns per split
    (o [B, splits, Hp, L] normalised, in the caches' dtype; lse2 [B, splits, Hp] base 2, -inf where empty)."""
    bs = block_sizes
    bk, stages = bs.block_k, bs.stages
    b, hp, lat = q_latent.shape
    s_len, rope = kv_cache.shape[1], pe_cache.shape[2]
    dt = kv_cache.dtype
    half = lat // 2
    head_blocks = hp // HEADS
    split_len = cdiv(cdiv(s_len, k_splits), bk) * bk
    wgmma = plgpu.Layout.WGMMA

    def body(ql_ref, qp_ref, kv_ref, pe_ref, len_ref, o_ref, lse_ref):
        prog, wg = lax.axis_index("p"), lax.axis_index("wg")  # programs numbered (request, head block, split)
        req = lax.div(prog, jnp.int32(head_blocks * k_splits))
        hb = lax.rem(lax.div(prog, jnp.int32(k_splits)), jnp.int32(head_blocks))
        split = lax.rem(prog, jnp.int32(k_splits))
        length = len_ref[req]
        start = split * split_len
        steps = jnp.maximum(lax.div(jnp.minimum(start + split_len, length) - start + (bk - 1), jnp.int32(bk)), 0)
        h0 = hb * HEADS

        def scoped(ql_smem, qp_smem, kv_smem, pe_smem, lse_smem, p_smem, q_bar, kv_bar, kv_free, q_done, o_done,
                   turn):
            def fetch(j, slot):
                k0 = pl.multiple_of(start + j * bk, bk)
                plgpu.copy_gmem_to_smem(kv_ref.at[req, pl.ds(k0, bk)], kv_smem.at[slot], kv_bar.at[slot])
                plgpu.copy_gmem_to_smem(pe_ref.at[req, pl.ds(k0, bk)], pe_smem.at[slot], kv_bar.at[slot])

            @pl.when(wg == 2)
            def _memory():
                plgpu.set_max_registers(40, action="decrease")
                for s in range(stages):
                    pl.when(s < steps)(lambda s=s: fetch(s, s))

                @pl.loop(stages, steps + stages)
                def _(j):  # step j reuses step j - stages's slot once both compute groups freed it; then drain
                    slot = lax.rem(j, jnp.int32(stages))
                    pl.when(j - stages < steps)(lambda: plgpu.barrier_wait(kv_free.at[slot]))
                    pl.when(j < steps)(lambda: fetch(j, slot))

            def take_turn():  # the two compute warpgroups alternate on the tensor cores (JAX's attention_mgpu)
                plgpu.barrier_arrive(turn)
                plgpu.barrier_wait(turn)

            @pl.when(wg < 2)
            def _compute():
                plgpu.set_max_registers(232, action="increase")

                @pl.when(wg == 0)
                def _():
                    plgpu.copy_gmem_to_smem(ql_ref.at[req, pl.ds(h0, HEADS)], ql_smem, q_bar.at[0])
                    plgpu.copy_gmem_to_smem(qp_ref.at[req, pl.ds(h0, HEADS)], qp_smem, q_bar.at[0])
                plgpu.barrier_wait(q_bar.at[0])
                cols0 = plgpu.broadcasted_iota(jnp.int32, (HEADS, bk), 1, layout=wgmma)

                def step(j, carry):
                    acc, m, l = carry
                    slot = lax.rem(j, jnp.int32(stages))

                    def qk(acc_ref):  # the tile has landed (waited before the loop or in the previous P.V)
                        plgpu.wgmma(acc_ref, ql_smem, kv_smem.at[slot].transpose((1, 0)))
                        plgpu.wgmma(acc_ref, qp_smem, pe_smem.at[slot].transpose((1, 0)))
                        take_turn()
                        return acc_ref[...]

                    s = pl.run_scoped(qk, plgpu.ACC((HEADS, bk), jnp.float32)) * scale_log2
                    s = jnp.where(cols0 + (start + j * bk) < length, s, -jnp.inf)
                    m_new = jnp.maximum(m, s.max(axis=1))
                    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
                    p = jnp.exp2(s - lax.broadcast_in_dim(m_safe, (HEADS, bk), [0]))
                    corr = jnp.exp2(m - m_safe)
                    acc = acc * lax.broadcast_in_dim(corr, (HEADS, half), [0])
                    l = l * corr + p.sum(axis=1)

                    if interpret:  # the interpreter's wgmma reads its left operand from shared memory only
                        p_smem.at[wg][...] = p.astype(dt)
                        plgpu.commit_smem()
                        p_op = p_smem.at[wg]
                    else:  # on the GPU P stays in registers
                        p_op = p.astype(dt)
                    plgpu.barrier_arrive(turn)  # softmax done: the other group's Q.K^T goes; then our MMA turn
                    plgpu.barrier_wait(turn)

                    def pv(acc_ref):  # this warpgroup's half of the latent columns
                        plgpu.wgmma(acc_ref, p_op, kv_smem.at[slot, :, pl.ds(wg * half, half)])
                        nxt = j + 1  # wait for the next tile while the MMA runs

                        @pl.when(nxt < steps)
                        def _():
                            plgpu.barrier_wait(kv_bar.at[lax.rem(nxt, jnp.int32(stages))])

                    if interpret:  # the interpreter cannot run an MMA into an initialised accumulator: add after
                        acc = acc + pl.run_scoped(lambda r: (pv(r), r[...])[1], plgpu.ACC((HEADS, half), jnp.float32))
                    else:  # on the GPU P.V accumulates into the running output
                        acc = pl.run_state(pv)(plgpu.ACC.init(acc))
                    plgpu.barrier_arrive(kv_free.at[slot])
                    return acc, m_new, l

                init = (plgpu.layout_cast(jnp.zeros((HEADS, half), jnp.float32), wgmma),
                        plgpu.layout_cast(jnp.full((HEADS,), -jnp.inf, jnp.float32), wgmma.reduce(1)),
                        plgpu.layout_cast(jnp.zeros((HEADS,), jnp.float32), wgmma.reduce(1)))
                pl.when(steps > 0)(lambda: plgpu.barrier_wait(kv_bar.at[0]))
                pl.when(wg == 1)(take_turn)  # the second group starts half a step behind
                acc, m, l = lax.fori_loop(0, steps, step, init)
                pl.when(wg == 0)(take_turn)  # match the second group's extra turn
                has = l > 0
                l_safe = jnp.where(has, l, 1.0)
                plgpu.barrier_arrive(q_done.at[0])  # both groups are past their last read of Q: its buffer is free
                plgpu.barrier_wait(q_done.at[0])
                # the output [64, L] takes Q's place, a half per group, and leaves in one copy once both are in
                ql_smem.at[:, pl.ds(wg * half, half)][...] = (
                    acc / lax.broadcast_in_dim(l_safe, (HEADS, half), [0])).astype(dt)
                plgpu.commit_smem()
                plgpu.barrier_arrive(o_done.at[0])
                plgpu.barrier_wait(o_done.at[0])
                pl.when(wg == 0)(lambda: plgpu.copy_smem_to_gmem(ql_smem, o_ref.at[req, split, pl.ds(h0, HEADS)]))

                @pl.when(wg == 0)
                def _():
                    lse_smem[...] = jnp.where(has, m + jnp.log2(l_safe), -jnp.inf)
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[req, split, pl.ds(h0, HEADS)])

                plgpu.wait_smem_to_gmem(0)

        pl.run_scoped(
            scoped,
            smem((HEADS, lat), dt), smem((HEADS, rope), dt), smem((stages, bk, lat), dt), smem((stages, bk, rope), dt),
            plgpu.SMEM((HEADS,), jnp.float32),
            smem((2, HEADS, bk), dt) if interpret else None,
            plgpu.Barrier(num_arrivals=2, num_barriers=1), plgpu.Barrier(num_arrivals=2, num_barriers=stages),
            plgpu.Barrier(num_arrivals=2, num_barriers=stages), plgpu.Barrier(num_arrivals=2, num_barriers=1),
            plgpu.Barrier(num_arrivals=2, num_barriers=1),
            plgpu.Barrier(num_arrivals=2),  # the compute warpgroups' turns
            collective_axes="wg",
        )

    return plgpu.kernel(
        body,
        out_type=(jax.ShapeDtypeStruct((b, k_splits, hp, lat), dt),
                  jax.ShapeDtypeStruct((b, k_splits, hp), jnp.float32)),
        grid=(b * head_blocks * k_splits,),
        grid_names=("p",),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=plgpu.InterpretGPUParams() if interpret else False,
    )(q_latent, q_pe, kv_cache, pe_cache, lengths)
