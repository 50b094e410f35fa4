"""sage_attention's inner kernel for Hopper on the Mosaic GPU backend (`plgpu.kernel`, TMA copies, `plgpu.wgmma`).

The same computation as the Triton kernel in sage_attention.py (which prepares the int8 Q / K, their row scales
and the request-aligned query blocks). Each program takes `compute_wgs` x `block_q` query rows of one request and
one head: a TMA warpgroup streams K (int8), K's row scales and V through `stages` shared-memory buffers, and each
compute warpgroup (64 query rows) runs Q.K^T as int8 x int8 -> int32 warpgroup MMAs (a head dim that is not a
power of two, MLA's 192, as 128 + 64 chunks accumulating into one int32 tile), rescales by the outer product of
the row scales, runs the online softmax in base 2 and multiplies P (in registers; through shared memory in the
interpreter) with V in a 16-bit MMA that accumulates into the running float32 output. A slot is refilled once
every compute warpgroup has freed it (barriers); in causal blocks the earlier warpgroup frees the tiles it does
not need unread. Key tiles that every row of a warpgroup sees whole run without the mask; with two compute
warpgroups a shared barrier alternates them (one's softmax runs while the other's MMAs do, as in JAX's
attention_mgpu), and the wait for the next K tile overlaps the P.V MMA.

TMA wants tile offsets it can prove aligned (Mosaic GPU's layout inference checks that a copy's dynamic row index
is a multiple of the shared-memory tiling), so each request's rows are first moved to a multiple of the block
(`aligned_rows`: one gather that XLA fuses into the quantisation pass for Q and K; V is copied) and every program
writes its own output tile, which a gather maps back to the packed rows (the tail of a request's last block
belongs to no request and is dropped, so no program writes rows another one owns).

On CPU it runs in the Mosaic GPU interpreter (`plgpu.InterpretGPUParams`), which the tests use; lowering for an
H100 needs the `jax_cuda13_plugin` package (the CPU CI installs it without its CUDA runtime).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.common import cdiv, pow2_chunks, smem


@dataclasses.dataclass(frozen=True)
class MosaicBlockSizes:
    block_q: int = 64  # query rows per compute warpgroup (one wgmma M tile)
    block_k: int = 64  # keys per step
    stages: int = 2  # K / V tiles in flight
    compute_wgs: int = 2  # compute warpgroups per program, sharing every K / V tile (plus one TMA warpgroup)

    @property
    def program_rows(self) -> int:
        return self.block_q * self.compute_wgs


def unsupported(dqk: int, dv: int, v_dtype) -> str | None:
    """Why this kernel cannot take these sizes (None when it can). dqk: the int8 width (a multiple of 32)."""
    if jnp.dtype(v_dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"V must be bfloat16 or float16 for the 16-bit P.V MMA, got {jnp.dtype(v_dtype)}"
    if dqk % 32:
        return f"the int8 head dim must be a multiple of 32, got {dqk}"
    if dv < 16 or dv & (dv - 1) or dv > 256:
        return f"the V head dim must be a power of two in [16, 256], got {dv}"
    return None


def aligned_rows(cu, total: int, align: int):
    """Each request's packed rows moved to start at a multiple of `align`: (base [B] int32 row of each request,
    src [size] int32 packed row of each padded row, -1 where none). `size` is a static bound with `align` rows of
    headroom, so a tile starting inside a request never reads past the buffer."""
    nb = cu.shape[0] - 1
    lens = cu[1:] - cu[:-1]
    base = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(cdiv(lens, align) * align)])[:-1].astype(jnp.int32)
    size = cdiv(total + nb * (align - 1), align) * align + align
    r = jnp.arange(size, dtype=jnp.int32)
    seg = jnp.clip(jnp.searchsorted(base, r, side="right") - 1, 0, nb - 1)
    off = r - base[seg]
    return base, jnp.where(off < lens[seg], cu[seg] + off, -1).astype(jnp.int32)


def gather_rows(x, src):
    """x[src] along axis 0 with zeros where src < 0."""
    keep = (src >= 0).reshape(-1, *([1] * (x.ndim - 1)))
    return jnp.where(keep, x[jnp.maximum(src, 0)], 0).astype(x.dtype)


def attention(q_i8, k_i8, v, q_scale, k_scale, cu_q, cu_k, blk_req, blk_idx, cu_qb, *, group: int, causal: bool,
              block_sizes: MosaicBlockSizes = MosaicBlockSizes(), interpret: bool = False):
    """q_i8 [Tq, Hq, D] / k_i8 [Tk, Hk, D] int8 with row scales q_scale [Tq, Hq] (sm_scale * log2(e) folded in) /
    k_scale [Tk, Hk]; v [Tk, Hk, Dv] 16-bit; cu_q / cu_k [B+1]; the query blocks of `block_sizes.program_rows` rows
    (blk_req, blk_idx [NQB], cu_qb [B+1]) as sage_attention plans them. Returns (o [Tq, Hq, Dv] in v's dtype,
    lse2 [Tq, Hq] base-2 LSE)."""
    bs = block_sizes
    bq, bk, stages, wgs = bs.block_q, bs.block_k, bs.stages, bs.compute_wgs
    rows_per_blk = bs.program_rows
    tq, hq, d = q_i8.shape
    dv, vdt = v.shape[2], v.dtype
    why = unsupported(d, dv, vdt)
    if why:
        raise ValueError(f"sage_attention backend='mosaic': {why}; use backend='triton'")
    nqb = blk_req.shape[0]
    chunks = pow2_chunks(d)
    n_chunks = len(chunks)
    base_q, src_q = aligned_rows(cu_q, tq, rows_per_blk)
    base_k, src_k = aligned_rows(cu_k, k_i8.shape[0], bk)
    q_i8, q_scale = gather_rows(q_i8, src_q), gather_rows(q_scale, src_q)
    k_i8, k_scale, v = gather_rows(k_i8, src_k), gather_rows(k_scale, src_k), gather_rows(v, src_k)
    qs_t, ks_t = q_scale.T, k_scale.T  # [H, rows]: each tile's scales contiguous for TMA
    split = lambda x: [x[..., off:off + w] for off, w in chunks]  # noqa: E731  (TMA rows of one chunk each)
    wgmma = plgpu.Layout.WGMMA

    def body(blk_req_ref, blk_idx_ref, cu_q_ref, cu_k_ref, base_q_ref, base_k_ref, *refs):
        q_refs, k_refs = refs[:n_chunks], refs[n_chunks:2 * n_chunks]
        v_ref, qs_ref, ks_ref, o_ref, lse_ref = refs[2 * n_chunks:]
        blk, h, wg = lax.axis_index("qb"), lax.axis_index("h"), lax.axis_index("wg")
        kv_head = lax.div(h, jnp.int32(group))
        req, i = blk_req_ref[blk], blk_idx_ref[blk]
        len_q = cu_q_ref[req + 1] - cu_q_ref[req]
        len_k = cu_k_ref[req + 1] - cu_k_ref[req]
        live = i * rows_per_blk < len_q  # blocks past the plan's end: read row 0, compute nothing
        blk_q0 = pl.multiple_of(jnp.where(live, base_q_ref[req] + i * rows_per_blk, 0), rows_per_blk)
        k_start = base_k_ref[req]
        diag = len_k - len_q  # bottom-right causal alignment

        def steps_until(row_end):  # key tiles that rows < row_end (request-local) can see
            k_end = jnp.minimum(len_k, row_end + diag) if causal else len_k
            return jnp.where(live, jnp.maximum(lax.div(k_end + (bk - 1), jnp.int32(bk)), 0), 0)

        blk_steps = steps_until((i + 1) * rows_per_blk)  # what the program's last warpgroup needs

        def scoped(q_smem, k_smem, v_smem, ks_smem, o_smem, lse_smem, p_smem, q_bar, k_bar, v_bar, k_free, v_free,
                   turn):
            def fetch(j, slot):
                k0 = pl.multiple_of(k_start + j * bk, bk)
                for c in range(n_chunks):
                    plgpu.copy_gmem_to_smem(k_refs[c].at[pl.ds(k0, bk), kv_head], k_smem[c].at[slot], k_bar.at[slot])
                plgpu.copy_gmem_to_smem(ks_ref.at[kv_head, pl.ds(k0, bk)], ks_smem.at[slot], k_bar.at[slot])
                plgpu.copy_gmem_to_smem(v_ref.at[pl.ds(k0, bk), kv_head], v_smem.at[slot], v_bar.at[slot])

            def take_turn():  # two compute warpgroups alternate on the tensor cores (a no-op with one)
                if wgs == 2:
                    plgpu.barrier_arrive(turn)
                    plgpu.barrier_wait(turn)

            @pl.when(wg == wgs)
            def _memory():  # the TMA warpgroup: fills the stages, refills a slot once every compute group freed it
                plgpu.set_max_registers(40, action="decrease")
                for s in range(stages):
                    pl.when(s < blk_steps)(lambda s=s: fetch(s, s))

                @pl.loop(stages, blk_steps + stages)
                def _(j):  # step j reuses the slot of step j - stages once both are free; past the end: drain
                    slot = lax.rem(j, jnp.int32(stages))

                    @pl.when(j - stages < blk_steps)
                    def _():
                        plgpu.barrier_wait(k_free.at[slot])
                        plgpu.barrier_wait(v_free.at[slot])

                    pl.when(j < blk_steps)(lambda: fetch(j, slot))

            @pl.when(wg < wgs)
            def _compute():
                plgpu.set_max_registers(232 if wgs == 2 else 240, action="increase")
                q0 = blk_q0 + wg * bq
                for c in range(n_chunks):
                    plgpu.copy_gmem_to_smem(q_refs[c].at[pl.ds(q0, bq), h], q_smem[c].at[wg], q_bar.at[wg])
                qs = plgpu.load(qs_ref.at[h, pl.ds(q0, bq)], layout=wgmma.reduce(1), optimized=False)
                plgpu.barrier_wait(q_bar.at[wg])
                row_base = i * rows_per_blk + wg * bq
                rows = row_base + plgpu.broadcasted_iota(jnp.int32, (bq, bk), 0, layout=wgmma)
                cols0 = plgpu.broadcasted_iota(jnp.int32, (bq, bk), 1, layout=wgmma)
                my_steps = jnp.where(row_base < len_q, steps_until(row_base + bq), 0)
                # tiles every row of this warpgroup sees whole (no mask): keys < min(len_k, row_base + diag + 1)
                seen = jnp.minimum(len_k, row_base + diag + 1) if causal else len_k
                full_steps = jnp.minimum(my_steps, lax.div(jnp.maximum(seen, 0), jnp.int32(bk)))

                def step(j, carry, masked):
                    acc, m, l = carry
                    slot = lax.rem(j, jnp.int32(stages))

                    def qk(acc_ref):  # K's tile has landed (waited before the loop or in the previous P.V)
                        for c in range(n_chunks):
                            plgpu.wgmma(acc_ref, q_smem[c].at[wg], k_smem[c].at[slot].transpose((1, 0)))
                        take_turn()
                        return acc_ref[...]

                    s_int = pl.run_scoped(qk, plgpu.ACC((bq, bk), jnp.int32))
                    ks = plgpu.load(ks_smem.at[slot], layout=wgmma.reduce(0), optimized=False)
                    plgpu.barrier_arrive(k_free.at[slot])
                    s = (s_int.astype(jnp.float32) * lax.broadcast_in_dim(qs, (bq, bk), [0])
                         * lax.broadcast_in_dim(ks, (bq, bk), [1]))  # base-2 logits
                    if masked:
                        cols = cols0 + j * bk
                        ok = cols < len_k
                        if causal:
                            ok = ok & (cols <= rows + diag)
                        s = jnp.where(ok, s, -jnp.inf)
                    m_new = jnp.maximum(m, s.max(axis=1))
                    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
                    p = jnp.exp2(s - lax.broadcast_in_dim(m_safe, (bq, bk), [0]))
                    corr = jnp.exp2(m - m_safe)
                    acc = acc * lax.broadcast_in_dim(corr, (bq, dv), [0])
                    l = l * corr + p.sum(axis=1)
                    if interpret:  # the interpreter's wgmma reads its left operand from shared memory only
                        p_smem.at[wg][...] = p.astype(vdt)
                        plgpu.commit_smem()
                        p_op = p_smem.at[wg]
                    else:  # on the GPU P stays in registers (wgmma's register A operand)
                        p_op = p.astype(vdt)
                    if wgs == 2:  # softmax done: let the other warpgroup's Q.K^T go, then wait for the MMA turn
                        plgpu.barrier_arrive(turn)
                        plgpu.barrier_wait(v_bar.at[slot])
                        plgpu.barrier_wait(turn)
                    else:
                        plgpu.barrier_wait(v_bar.at[slot])

                    def pv(acc_ref):
                        plgpu.wgmma(acc_ref, p_op, v_smem.at[slot])
                        nxt = j + 1  # wait for the next K tile while the MMA runs

                        @pl.when(nxt < my_steps)
                        def _():
                            plgpu.barrier_wait(k_bar.at[lax.rem(nxt, jnp.int32(stages))])

                    if interpret:  # the interpreter cannot run an MMA into an initialised accumulator: add after
                        acc = acc + pl.run_scoped(lambda r: (pv(r), r[...])[1], plgpu.ACC((bq, dv), jnp.float32))
                    else:  # on the GPU P.V accumulates into the running output (no second accumulator)
                        acc = pl.run_state(pv)(plgpu.ACC.init(acc))
                    plgpu.barrier_arrive(v_free.at[slot])
                    return acc, m_new, l

                init = (plgpu.layout_cast(jnp.zeros((bq, dv), jnp.float32), wgmma),
                        plgpu.layout_cast(jnp.full((bq,), -jnp.inf, jnp.float32), wgmma.reduce(1)),
                        plgpu.layout_cast(jnp.zeros((bq,), jnp.float32), wgmma.reduce(1)))
                pl.when(my_steps > 0)(lambda: plgpu.barrier_wait(k_bar.at[0]))
                if wgs == 2:
                    pl.when(wg == 1)(take_turn)  # the second warpgroup starts half a step behind
                carry = lax.fori_loop(0, full_steps, lambda j, c: step(j, c, False), init)
                acc, m, l = lax.fori_loop(full_steps, my_steps, lambda j, c: step(j, c, True), carry)

                @pl.loop(my_steps, blk_steps)
                def _(j):  # tiles only a later warpgroup needs (causal): see them land, free them unread
                    slot = lax.rem(j, jnp.int32(stages))
                    plgpu.barrier_wait(k_bar.at[slot])
                    plgpu.barrier_arrive(k_free.at[slot])
                    plgpu.barrier_wait(v_bar.at[slot])
                    plgpu.barrier_arrive(v_free.at[slot])
                    take_turn()  # keep alternating with the warpgroup that still runs
                    take_turn()

                if wgs == 2:
                    pl.when(wg == 0)(take_turn)  # match the second warpgroup's extra turn
                has = l > 0
                l_safe = jnp.where(has, l, 1.0)
                o_smem.at[wg][...] = (acc / lax.broadcast_in_dim(l_safe, (bq, dv), [0])).astype(vdt)
                lse_smem.at[wg][...] = jnp.where(has, m + jnp.log2(l_safe), -jnp.inf)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(o_smem.at[wg], o_ref.at[blk, h, pl.ds(wg * bq, bq)])
                plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[blk, h, pl.ds(wg * bq, bq)])
                plgpu.wait_smem_to_gmem(0)

        pl.run_scoped(
            scoped,
            tuple(smem((wgs, bq, w), jnp.int8) for _, w in chunks),  # Q and K per power-of-two chunk of D
            tuple(smem((stages, bk, w), jnp.int8) for _, w in chunks),
            smem((stages, bk, dv), vdt), plgpu.SMEM((stages, bk), jnp.float32), smem((wgs, bq, dv), vdt),
            plgpu.SMEM((wgs, bq), jnp.float32), smem((wgs, bq, bk), vdt) if interpret else None,
            plgpu.Barrier(num_arrivals=n_chunks, num_barriers=wgs),
            plgpu.Barrier(num_arrivals=n_chunks + 1, num_barriers=stages),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),
            plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),
            plgpu.Barrier(num_arrivals=wgs),  # the compute warpgroups' turns
            collective_axes="wg",
        )

    o_tiles, lse_tiles = plgpu.kernel(
        body,
        out_type=(jax.ShapeDtypeStruct((nqb, hq, rows_per_blk, dv), vdt),
                  jax.ShapeDtypeStruct((nqb, hq, rows_per_blk), jnp.float32)),
        grid=(nqb, hq),
        grid_names=("qb", "h"),
        num_threads=wgs + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=plgpu.InterpretGPUParams() if interpret else False,
    )(blk_req, blk_idx, cu_q, cu_k, base_q, base_k, *split(q_i8), *split(k_i8), v, qs_t, ks_t)
    # packed row t of request r (offset o) sits in tile cu_qb[r] + o // rows at row o % rows
    t = jnp.arange(tq, dtype=jnp.int32)
    seg = jnp.clip(jnp.searchsorted(cu_q, t, side="right") - 1, 0, cu_q.shape[0] - 2)
    off = t - cu_q[seg]
    tile = jnp.minimum(cu_qb[seg] + off // rows_per_blk, nqb - 1)
    return o_tiles[tile, :, off % rows_per_blk], lse_tiles[tile, :, off % rows_per_blk]
