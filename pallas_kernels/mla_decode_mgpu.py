"""mla_decode's kernel for Hopper on the Mosaic GPU backend (`plgpu.kernel`, TMA, `plgpu.wgmma`), after the shape of
DeepSeek's FlashMLA: one program per (request, 64-head block, sequence split); a TMA warpgroup streams [block_k,
512] latent and [block_k, 64] rope tiles through `stages` shared-memory buffers. Compute warpgroup 0 runs Q.K^T
over 512 + 64 (wgmma with K = V = the latent tile) and the online softmax, hands P and the row rescale to
warpgroup 1 through shared memory, and multiplies P with the first half of the latent columns; warpgroup 1
multiplies the same P with the second half ([64, 256] float32 accumulators each: the whole [64, 512] one would not
fit one warpgroup's registers). The scores are computed once per tile (an earlier version computed them in both
warpgroups: 0.73 TB/s at B=64, L=4096 on an H100; bench/RESULTS.md has the numbers since).

Each split writes its normalised output in 16 bits (staged in Q's shared-memory buffer once warpgroup 0 is past
its last read of Q) and its base-2 LSE (an empty split writes nothing when there are several); `mla_decode`
merges the splits (a small Pallas pass). Shared memory is full to the last bytes at block_k 64 with 2 stages
(Q 64 KB + 2 x 72 KB of tiles + P 8 KB), so Q's rope part is a register operand on the GPU. 16-bit caches,
contiguous ([B, S, ...]) or paged ([pages, page_size, ...] with page_size a multiple of block_k, so that a tile
never straddles two pages: each tile's page is read from the block table as it is fetched); the int8 latent cache
and qk_int8 stay on the Triton kernel.

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

from pallas_kernels.common import online_softmax_step, rotate_half_split, smem

HEADS = 64  # query heads per program: one wgmma M tile
# Per-thread registers of the memory warpgroup and of each compute warpgroup (setmaxnreg; 128 x (2 x compute +
# memory) <= 65536). The compute warpgroups spill (ptxas: 240 bytes at 232, 136 at 240); on an H100 at the seed
# decode shape the kernel took 12.9 us at (40, 232) and 12.5 at (24, 240); at B=64, L=4096 138-139 us either way
# (bench/RESULTS.md, eighteenth session).
MEMORY_REGISTERS, COMPUTE_REGISTERS = 24, 240


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


def decode(q_latent, q_pe, kv_cache, pe_cache, lengths, *, max_len: int, scale_log2: float,
           block_sizes: MosaicBlockSizes, k_splits: int, split_len: int, block_table=None, q_pe_rope=None,
           interpret: bool = False):
    """q_latent [B, Hp, L], q_pe [B, Hp, >= R] (Hp a multiple of 64; its trailing R columns, read in place),
    kv_cache [B, S, L], pe_cache [B, S, R] (S a multiple of block_k) or, with block_table [B, n] int32, paged caches
    [pages, page_size, ...] (page_size a multiple of block_k; request b's row p is row p % page_size of page
    block_table[b, p // page_size]); lengths [B] int32, clamped here to max_len (the rows before any padding of S,
    or n * page_size); scale_log2 = sm_scale * log2(e); split s covers rows [s * split_len, (s + 1) * split_len);
    q_pe_rope: [B, R] float32 [cos | sin] that rotate q_pe (half-split RoPE, in float32) as it is loaded. Returns
    per split (o [B, splits, Hp, L] normalised, in the caches' dtype; lse2 [B, splits, Hp] base 2, -inf where
    empty)."""
    bs = block_sizes
    bk, stages = bs.block_k, bs.stages
    b, hp, lat = q_latent.shape
    rope = pe_cache.shape[2]
    pe_cols = pl.ds(q_pe.shape[2] - rope, rope)  # q_pe's trailing R columns
    rotate = q_pe_rope is not None
    dt = kv_cache.dtype
    half = lat // 2
    head_blocks = hp // HEADS
    wgmma = plgpu.Layout.WGMMA
    page_size = kv_cache.shape[1]  # paged: a multiple of bk (mla_decode's _mosaic_unsupported sees to it)

    def body(ql_ref, qp_ref, kv_ref, pe_ref, len_ref, *refs):
        rt_ref = refs[0] if rotate else None
        *bt_ref, o_ref, lse_ref = refs[rotate:]
        prog, wg = lax.axis_index("p"), lax.axis_index("wg")  # programs numbered (request, head block, split)
        req = lax.div(prog, jnp.int32(head_blocks * k_splits))
        hb = lax.rem(lax.div(prog, jnp.int32(k_splits)), jnp.int32(head_blocks))
        split = lax.rem(prog, jnp.int32(k_splits))
        length = jnp.minimum(len_ref[req], jnp.int32(max_len))
        start = split * split_len
        steps = jnp.maximum(lax.div(jnp.minimum(start + split_len, length) - start + (bk - 1), jnp.int32(bk)), 0)
        h0 = hb * HEADS
        # an empty split writes nothing when there are several: the merge reads each request's non-empty ones only
        writes = (steps > 0) if k_splits > 1 else True

        def scoped(ql_smem, qp_smem, kv_smem, pe_smem, p_smem, row_smem, q_bar, kv_bar, kv_free, p_ready, p_free,
                   q_done, o_done):
            # row_smem [64] float32 carries, in turn: each step's rescale to group 1, the final l, the LSE out
            def fetch(j, slot):
                k0 = start + j * bk
                if bt_ref:  # the tile's page (a tile lies inside one page) and its first row there
                    page = bt_ref[0][req, lax.div(k0, jnp.int32(page_size))]
                    rows = pl.ds(pl.multiple_of(lax.rem(k0, jnp.int32(page_size)), bk), bk)
                else:
                    page, rows = req, pl.ds(pl.multiple_of(k0, bk), bk)
                plgpu.copy_gmem_to_smem(kv_ref.at[page, rows], kv_smem.at[slot], kv_bar.at[slot])
                plgpu.copy_gmem_to_smem(pe_ref.at[page, rows], pe_smem.at[slot], kv_bar.at[slot])

            @pl.when(wg == 2)
            def _memory():
                plgpu.set_max_registers(MEMORY_REGISTERS, action="decrease")
                for s in range(stages):
                    pl.when(s < steps)(lambda s=s: fetch(s, s))

                @pl.loop(stages, steps + stages)
                def _(j):  # step j reuses step j - stages's slot once both compute groups freed it; then drain
                    slot = lax.rem(j, jnp.int32(stages))
                    pl.when(j - stages < steps)(lambda: plgpu.barrier_wait(kv_free.at[slot]))
                    pl.when(j < steps)(lambda: fetch(j, slot))

            def pv_into(acc, p_op, slot, cols, wait_next=None):
                """acc [64, half] + p_op . V[:, cols] (the running output; added after in the interpreter, which
                cannot run an MMA into an initialised accumulator)."""
                def pv(acc_ref):
                    plgpu.wgmma(acc_ref, p_op, kv_smem.at[slot, :, pl.ds(cols, half)])
                    if wait_next is not None:
                        wait_next()

                if interpret:
                    return acc + pl.run_scoped(lambda r: (pv(r), r[...])[1], plgpu.ACC((HEADS, half), jnp.float32))
                return pl.run_state(pv)(plgpu.ACC.init(acc))

            zeros = plgpu.layout_cast(jnp.zeros((HEADS, half), jnp.float32), wgmma)

            def finish(acc, l_safe, second=False):
                """This group's half of the normalised output into Q's buffer (free once group 0 is past its last
                step), then one copy of the whole [64, L] tile once both halves are in."""
                if not second:
                    plgpu.barrier_arrive(q_done.at[0])
                    plgpu.barrier_wait(q_done.at[0])
                ql_smem.at[:, pl.ds(half if second else 0, half)][...] = (
                    acc / lax.broadcast_in_dim(l_safe, (HEADS, half), [0])).astype(dt)
                plgpu.commit_smem()
                plgpu.barrier_arrive(o_done.at[0])
                plgpu.barrier_wait(o_done.at[0])
                if not second:
                    pl.when(writes)(lambda: plgpu.copy_smem_to_gmem(ql_smem, o_ref.at[req, split, pl.ds(h0, HEADS)]))

            @pl.when(wg == 0)
            def _scores():  # Q.K^T, the online softmax and the first half of P.V
                plgpu.set_max_registers(COMPUTE_REGISTERS, action="increase")
                @pl.when(steps > 0)  # an empty split needs no Q
                def _():
                    plgpu.copy_gmem_to_smem(ql_ref.at[req, pl.ds(h0, HEADS)], ql_smem, q_bar.at[0])
                    if interpret:  # the interpreter's wgmma reads its left operand from shared memory only
                        plgpu.copy_gmem_to_smem(qp_ref.at[req, pl.ds(h0, HEADS), pe_cols], qp_smem, q_bar.at[0])
                    plgpu.barrier_wait(q_bar.at[0])

                # Q's rope part as a register operand on the GPU: shared memory is full to the last bytes
                qp_op = qp_smem if interpret else plgpu.load(qp_ref.at[req, pl.ds(h0, HEADS), pe_cols], layout=wgmma,
                                                             optimized=False)
                if rotate:
                    qp_rot = _rotated(qp_smem[...] if interpret else qp_op, rt_ref.at[req])
                    if interpret:
                        qp_smem[...] = qp_rot
                        plgpu.commit_smem()
                    else:
                        qp_op = qp_rot
                cols0 = plgpu.broadcasted_iota(jnp.int32, (HEADS, bk), 1, layout=wgmma)

                def step(j, carry, masked):
                    acc, m, l = carry
                    slot = lax.rem(j, jnp.int32(stages))

                    def qk(acc_ref):  # the tile has landed (waited before the loop or during the previous P.V)
                        plgpu.wgmma(acc_ref, ql_smem, kv_smem.at[slot].transpose((1, 0)))
                        plgpu.wgmma(acc_ref, qp_op, pe_smem.at[slot].transpose((1, 0)))
                        return acc_ref[...]

                    s = pl.run_scoped(qk, plgpu.ACC((HEADS, bk), jnp.float32))  # base-2 logits / scale_log2
                    if masked:  # the tile that ends past the length
                        s = jnp.where(cols0 + (start + j * bk) < length, s, -jnp.inf)
                    p, m_new, l, acc, corr = online_softmax_step(s, m, l, acc, masked, scale=scale_log2)
                    p16 = p.astype(dt)
                    pl.when(j > 0)(lambda: plgpu.barrier_wait(p_free.at[0]))  # group 1 is done with the last P
                    p_smem[...] = p16  # P and the rescale for the second group
                    row_smem[...] = corr
                    plgpu.commit_smem()
                    plgpu.barrier_arrive(p_ready.at[0])

                    def wait_next():  # the next tile's wait overlaps this MMA
                        nxt = j + 1
                        pl.when(nxt < steps)(lambda: plgpu.barrier_wait(kv_bar.at[lax.rem(nxt, jnp.int32(stages))]))

                    acc = pv_into(acc, p_smem if interpret else p16, slot, 0, wait_next)  # P from registers
                    plgpu.barrier_arrive(kv_free.at[slot])
                    return acc, m_new, l

                init = (zeros, plgpu.layout_cast(jnp.full((HEADS,), -jnp.inf, jnp.float32), wgmma.reduce(1)),
                        plgpu.layout_cast(jnp.zeros((HEADS,), jnp.float32), wgmma.reduce(1)))
                pl.when(steps > 0)(lambda: plgpu.barrier_wait(kv_bar.at[0]))
                full = jnp.clip(lax.div(length - start, jnp.int32(bk)), 0, steps)  # tiles inside the length
                carry = lax.fori_loop(0, full, lambda j, c: step(j, c, False), init)
                acc, m, l = lax.fori_loop(full, steps, lambda j, c: step(j, c, True), carry)
                pl.when(steps > 0)(lambda: plgpu.barrier_wait(p_free.at[0]))  # the last P's release, observed
                has = l > 0
                l_safe = jnp.where(has, l, 1.0)
                row_smem[...] = l_safe  # group 1 has read the last rescale (p_free)
                plgpu.commit_smem()
                finish(acc, l_safe)  # past o_done group 1 has read l
                row_smem[...] = jnp.where(has, m + jnp.log2(l_safe), -jnp.inf)
                plgpu.commit_smem()
                pl.when(writes)(lambda: plgpu.copy_smem_to_gmem(row_smem, lse_ref.at[req, split, pl.ds(h0, HEADS)]))
                plgpu.wait_smem_to_gmem(0)

            @pl.when(wg == 1)
            def _second_half():  # P (from shared memory) times the other half of the latent columns
                plgpu.set_max_registers(COMPUTE_REGISTERS, action="increase")

                def step(j, acc):
                    slot = lax.rem(j, jnp.int32(stages))
                    plgpu.barrier_wait(p_ready.at[0])
                    plgpu.barrier_wait(kv_bar.at[slot])
                    corr = plgpu.load(row_smem, layout=wgmma.reduce(1), optimized=False)
                    acc = pv_into(acc * lax.broadcast_in_dim(corr, (HEADS, half), [0]), p_smem, slot, half)
                    plgpu.barrier_arrive(p_free.at[0])
                    plgpu.barrier_arrive(kv_free.at[slot])
                    return acc

                acc = lax.fori_loop(0, steps, step, zeros)
                plgpu.barrier_arrive(q_done.at[0])  # wait for group 0's l (written after its last step)
                plgpu.barrier_wait(q_done.at[0])
                finish(acc, plgpu.load(row_smem, layout=wgmma.reduce(1), optimized=False), second=True)
                plgpu.wait_smem_to_gmem(0)

        pl.run_scoped(
            scoped,
            smem((HEADS, lat), dt), smem((HEADS, rope), dt) if interpret else None, smem((stages, bk, lat), dt),
            smem((stages, bk, rope), dt),
            smem((HEADS, bk), dt), plgpu.SMEM((HEADS,), jnp.float32),  # P for group 1; per-row values
            plgpu.Barrier(num_arrivals=2 if interpret else 1, num_barriers=1),  # Q landed
            plgpu.Barrier(num_arrivals=2, num_barriers=stages), plgpu.Barrier(num_arrivals=2, num_barriers=stages),
            plgpu.Barrier(num_arrivals=1, num_barriers=1), plgpu.Barrier(num_arrivals=1, num_barriers=1),
            plgpu.Barrier(num_arrivals=2, num_barriers=1), plgpu.Barrier(num_arrivals=2, num_barriers=1),
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
    )(q_latent, q_pe, kv_cache, pe_cache, lengths, *([q_pe_rope] if rotate else []),
      *([] if block_table is None else [block_table]))


def _rotated(qp, table_ref):
    """Q's rope part [64, R] (registers in the WGMMA layout on the GPU) rotated by one request's [cos | sin] row
    table_ref [R] float32 (`rotate_half_split`)."""
    half = qp.shape[1] // 2
    wgmma = plgpu.Layout.WGMMA

    def column(off):  # table[off : off + half] as the columns of a [64, half] array: the same for every head
        v = plgpu.load(table_ref.at[pl.ds(off, half)], layout=wgmma.reduce(0), optimized=False)
        return lax.broadcast_in_dim(v, (HEADS, half), [1])

    return rotate_half_split(qp, column(0), column(half))
