"""fp8_matmul's kernels for Hopper on the Mosaic GPU backend.

`matmul`, the FP8-activation path: e4m3 x e4m3 warpgroup MMAs with
DeepSeek's per-128-K promotion (as in DeepGEMM): each 128-wide K step multiplies one [64, K-block] tile of the
quantised activations with one [128, K-block] tile of the weight into a fresh float32 accumulator, which is scaled
by the token's activation scale times the weight block's scale and added to the running float32 sum. A TMA
warpgroup streams the operand tiles through `stages` shared-memory buffers; each program's [block_m, 128] output
tile is split between block_m / 64 compute warpgroups that share the weight tile (one promotes while the other's
MMA runs).

Both operands are K-major, as FP8 wgmma requires: x [M, K] and w in HF row layout [N, K].

`weight_only`, the memory-bound decode path (16-bit activations, a few tokens): the product is computed transposed,
y^T = W x^T, so that the weight is the MMA's left operand and the tokens its narrow right one (wgmma's N may be
8..256: no padding of the tokens to 64). Each program streams [64, 128] e4m3 tiles of its 64 weight rows by TMA
through `stages` buffers, widens each tile in registers to x's dtype (exact: e4m3 fits bf16 / f16), multiplies it
with the [128, tokens] x tile into a fresh float32 accumulator and adds that times the tile's block scale to the
running sum (the block-scale promotion of the Triton kernel). The K loop is split across programs (split-K); each
program transposes its [64, tokens] result in registers and TMA-stores it token-major: float32 partial sums
[splits, tokens, N], added in XLA by elementwise adds that fuse into the consumer (a norm, RoPE, the output
write), or, unsplit (q_b, W_UV at R1's decode sizes), y [tokens, N] in x's dtype itself.

`dequant_matmul`, the dequantised prefill path (16-bit activations, many tokens): the same transposed product with
the weight widened in registers, scaled by its block scale before the MMA (the XLA path's dequantised weight, bit
for bit) and accumulated in one float32 tile; persistent programs over [128 weight rows, block_m tokens] tiles.

The last section is what fp8_matmul's Mosaic routes do around these kernels: the block scales' rows padded for TMA
(`scale_rows`), tokens and weight rows padded to the tiles, the weight-only launch's K split count
(`weight_only_parts`), and the partial sums added (`sum_parts`, `weight_only_products`); fp8_matmul.py decides
which route a call takes.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import operator

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.common import H100_SMS, cdiv, pad_to, smem

BLOCK = 128  # DeepSeek's scale block: one weight scale per 128 x 128, one activation scale per token per 128 K


@dataclasses.dataclass(frozen=True)
class MosaicBlockSizes:
    block_m: int = 128  # FP8-activation path: token rows per program, 64 per compute warpgroup (64 or 128)
    stages: int = 4  # K steps in flight (from bench/fp8_tune.py: best for both paths at R1's sizes)
    k_splits: int | None = None  # weight-only path: K splits; None: enough programs to fill an H100 a few times


WEIGHT_ROWS = 64  # one warpgroup MMA's M: weight rows per program (weight-only), token rows per warpgroup (FP8 x FP8)


def matmul(xq, xs_t, w, ws, *, out_dtype, block_sizes: MosaicBlockSizes = MosaicBlockSizes(), interpret=False):
    """xq [M, K] e4m3 with M a multiple of block_m (64 or 128), K of 128; xs_t [K/128, M] float32 activation scales;
    w [N, K] e4m3 with N a multiple of 128; ws [N/128, >= K/128] float32 (columns padded to a multiple of 4 for
    TMA). Returns x @ dequant(w)^T [M, N] in `out_dtype`. One program per [block_m, 128] output tile: a TMA
    warpgroup streams the K steps' operand tiles through `stages` buffers; block_m / 64 compute warpgroups share each
    weight tile, one 64-row block of x each (one warpgroup's promotion runs while the other's MMA is on the tensor
    cores); the weight rows' block scales are copied to shared memory once."""
    bm, stages = block_sizes.block_m, block_sizes.stages
    wgs = bm // WEIGHT_ROWS  # compute warpgroups, 64 token rows each
    if bm not in (64, 128) or stages < 2:
        raise ValueError(f"fp8_matmul (mosaic): block_m must be 64 or 128 and stages >= 2, got {block_sizes}")
    m, k = xq.shape
    n = w.shape[0]
    k_steps = k // BLOCK
    layout = plgpu.Layout.WGMMA

    def body(x_ref, xs_ref, w_ref, ws_ref, o_ref):
        mi, ni, wg = lax.axis_index("m"), lax.axis_index("n"), lax.axis_index("wg")
        m0, n0 = pl.multiple_of(mi * bm, bm), pl.multiple_of(ni * BLOCK, BLOCK)

        def scoped(x_smem, w_smem, xs_smem, o_smem, ws_smem, full, free, ws_bar):
            def fetch(j, slot):
                k0 = pl.multiple_of(j * BLOCK, BLOCK)
                plgpu.copy_gmem_to_smem(w_ref.at[pl.ds(n0, BLOCK), pl.ds(k0, BLOCK)], w_smem.at[slot], full.at[slot])
                for g in range(wgs):
                    rows = pl.ds(m0 + g * WEIGHT_ROWS, WEIGHT_ROWS)
                    plgpu.copy_gmem_to_smem(x_ref.at[rows, pl.ds(k0, BLOCK)], x_smem.at[slot, g], full.at[slot])
                    plgpu.copy_gmem_to_smem(xs_ref.at[j, rows], xs_smem.at[slot, g], full.at[slot])

            @pl.when(wg == wgs)
            def _memory():  # refills a slot once every compute warpgroup freed it
                plgpu.set_max_registers(40, action="decrease")
                plgpu.copy_gmem_to_smem(ws_ref.at[ni], ws_smem, ws_bar.at[0])  # the weight rows' block scales

                @pl.loop(0, k_steps)
                def _(j):
                    slot = lax.rem(j, jnp.int32(stages))
                    pl.when(j >= stages)(lambda: plgpu.barrier_wait(free.at[slot]))
                    fetch(j, slot)

                @pl.loop(max(k_steps - stages, 0), k_steps)
                def _(j):  # the last steps' releases, observed
                    plgpu.barrier_wait(free.at[lax.rem(j, jnp.int32(stages))])

            @pl.when(wg < wgs)
            def _compute():
                plgpu.set_max_registers(232 if wgs > 1 else 240, action="increase")

                def step(j, acc):
                    slot = lax.rem(j, jnp.int32(stages))
                    plgpu.barrier_wait(full.at[slot])

                    def mma(acc_ref):
                        plgpu.wgmma(acc_ref, x_smem.at[slot, wg], w_smem.at[slot].transpose((1, 0)))
                        return acc_ref[...]

                    part = pl.run_scoped(mma, plgpu.ACC((WEIGHT_ROWS, BLOCK), jnp.float32))
                    xs = plgpu.load(xs_smem.at[slot, wg], layout=layout.reduce(1), optimized=False)
                    plgpu.barrier_arrive(free.at[slot])  # this group's operands of the slot are consumed
                    return acc + part * lax.broadcast_in_dim(xs * ws_smem[j], (WEIGHT_ROWS, BLOCK), [0])

                plgpu.barrier_wait(ws_bar.at[0])
                zeros = plgpu.layout_cast(jnp.zeros((WEIGHT_ROWS, BLOCK), jnp.float32), layout)
                acc = lax.fori_loop(0, k_steps, step, zeros)
                o_smem.at[wg][...] = acc.astype(out_dtype)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(o_smem.at[wg],
                                        o_ref.at[pl.ds(m0 + wg * WEIGHT_ROWS, WEIGHT_ROWS), pl.ds(n0, BLOCK)])
                plgpu.wait_smem_to_gmem(0)

        pl.run_scoped(
            scoped,
            smem((stages, wgs, WEIGHT_ROWS, BLOCK), xq.dtype), smem((stages, BLOCK, BLOCK), w.dtype),
            plgpu.SMEM((stages, wgs, WEIGHT_ROWS), jnp.float32), smem((wgs, WEIGHT_ROWS, BLOCK), out_dtype),
            plgpu.SMEM((ws.shape[1],), jnp.float32),
            plgpu.Barrier(num_arrivals=1 + 2 * wgs, num_barriers=stages),
            plgpu.Barrier(num_arrivals=wgs, num_barriers=stages), plgpu.Barrier(num_arrivals=1, num_barriers=1),
            collective_axes="wg",
        )

    return plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((m, n), out_dtype),
        # the last grid axis is the launch's fastest: the token tiles of one weight tile run side by side and
        # share it through the L2, so each weight tile comes from DRAM once per call (R1's o_proj at 768 tokens on
        # an H100, ncu: DRAM throughput 60% -> 28% of peak, kernel 189 -> 176 us)
        grid=(n // BLOCK, m // bm),
        grid_names=("n", "m"),
        num_threads=wgs + 1,
        thread_name="wg",
        interpret=plgpu.InterpretGPUParams() if interpret else False,
    )(xq, xs_t, w, ws)


def weight_only(x, weights, *, k_splits: int, stages: int, after=(), interpret=False):
    """x [Mp, Gx, K] bf16 / f16 with Mp a multiple of 8 (<= 128: `stages` x tiles fit shared memory), K of 128, Gx
    1 (x shared by every group) or G; weights ((w [G, N_i, K] e4m3 with N_i a multiple of 64, ws [G, ceil(N_i /
    128), >= K / 128] float32, columns padded to a multiple of 4 for TMA), ...): every weight that multiplies x, G
    groups each (MLA's heads; 1 for a plain weight), in one launch. With k_splits > 1 returns float32 partial sums
    [k_splits, Mp, G, sum N_i] (the weights' rows side by side) whose sum over the first axis is, per group g,
    x[:, g] @ [dequant(w_1[g]); dequant(w_2[g]); ...]^T; with one split the product itself, [Mp, G, sum N_i] in x's
    dtype. Each program's [64, Mp] tile is transposed in registers and stored through shared memory by TMA, so no
    transposing pass follows. `after`: arrays the launch waits for and does not read (operands only, so that the
    GPU runs it after their producers: a decode step's first launch after the previous step's output)."""
    mp, gx, k = x.shape
    groups = weights[0][0].shape[0]
    tiles = [w.shape[1] // WEIGHT_ROWS for w, _ in weights]
    firsts = [sum(tiles[:i]) for i in range(len(tiles))]  # each weight's first program row tile
    k_steps = k // BLOCK
    per = -(-k_steps // k_splits)  # K steps per split; the last split may have fewer (or none)
    wgmma = plgpu.Layout.WGMMA

    whole = k_splits == 1  # the kernel writes y [Mp, G, N] itself, else float32 partials [k_splits, Mp, G, N]
    y_dtype = x.dtype if whole else jnp.float32

    def body(x_ref, *refs):
        w_refs, s_refs = refs[0:2 * len(weights):2], refs[1:2 * len(weights):2]
        o_ref, x_smem, w_smem, ws_smem, bar, ws_bar, y_smem, *a_smem = refs[2 * len(weights) + len(after):]
        ni, si, g = lax.axis_index("n"), lax.axis_index("s"), lax.axis_index("g")
        xg = g if gx > 1 else 0
        # this program's weight (uniform per program) and its 64-row tile within it
        mine = [(ni >= f) & (ni < f + t) for f, t in zip(firsts, tiles)]
        local = [jnp.clip(ni - f, 0, t - 1) for f, t in zip(firsts, tiles)]
        j0 = si * per
        steps = jnp.clip(k_steps - j0, 0, per)

        def fetch(j, slot):
            k0 = pl.multiple_of((j0 + j) * BLOCK, BLOCK)
            plgpu.copy_gmem_to_smem(x_ref.at[:, xg, pl.ds(k0, BLOCK)], x_smem.at[slot], bar.at[slot])
            for w_ref, is_mine, t in zip(w_refs, mine, local):
                rows = pl.ds(pl.multiple_of(t * WEIGHT_ROWS, WEIGHT_ROWS), WEIGHT_ROWS)
                pl.when(is_mine)(lambda w_ref=w_ref, rows=rows: plgpu.copy_gmem_to_smem(
                    w_ref.at[g, rows, pl.ds(k0, BLOCK)], w_smem.at[slot], bar.at[slot]))

        for s_ref, is_mine, t in zip(s_refs, mine, local):  # the tile's row of block scales (64 | 128 rows)
            pl.when(is_mine)(lambda s_ref=s_ref, t=t: plgpu.copy_gmem_to_smem(
                s_ref.at[g, lax.div(t, jnp.int32(BLOCK // WEIGHT_ROWS))], ws_smem, ws_bar.at[0]))
        for s in range(stages):
            pl.when(s < steps)(lambda s=s: fetch(s, s))
        plgpu.barrier_wait(ws_bar.at[0])

        def step(j, acc):
            slot = lax.rem(j, jnp.int32(stages))
            plgpu.barrier_wait(bar.at[slot])
            scale = ws_smem[j0 + j]
            a = plgpu.layout_cast(plgpu.load(w_smem.at[slot], layout=plgpu.Layout.WGMMA_UPCAST_2X), wgmma)
            a = a.astype(jnp.float16).astype(x.dtype) if x.dtype != jnp.float16 else a.astype(x.dtype)
            if interpret:  # the interpreter's wgmma takes its left operand from shared memory only
                a_smem[0][...] = a
                plgpu.commit_smem()
                a = a_smem[0]

            def mma(acc_ref):
                plgpu.wgmma(acc_ref, a, x_smem.at[slot].transpose((1, 0)))
                return acc_ref[...]

            part = pl.run_scoped(mma, plgpu.ACC((WEIGHT_ROWS, mp), jnp.float32))
            pl.when(j + stages < steps)(lambda: fetch(j + stages, slot))  # the slot's operands are consumed
            return acc + part * scale

        acc = lax.fori_loop(0, steps, step, plgpu.layout_cast(jnp.zeros((WEIGHT_ROWS, mp), jnp.float32), wgmma))
        cols = pl.ds(pl.multiple_of(ni * WEIGHT_ROWS, WEIGHT_ROWS), WEIGHT_ROWS)
        # y^T tile [64, Mp] -> y [Mp, 64]: a register transpose into an untiled buffer, then one TMA store
        y_smem.T[...] = plgpu.layout_cast(acc.astype(y_dtype), plgpu.Layout.WGMMA_TRANSPOSED)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(y_smem, o_ref.at[:, g, cols] if whole else o_ref.at[si, :, g, cols])
        plgpu.wait_smem_to_gmem(0)

    w_dtype = weights[0][0].dtype
    rows = sum(tiles) * WEIGHT_ROWS
    return plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct(((mp,) if whole else (k_splits, mp)) + (groups, rows), y_dtype),
        scratch_types=[smem((stages, mp, BLOCK), x.dtype), smem((stages, WEIGHT_ROWS, BLOCK), w_dtype),
                       plgpu.SMEM((weights[0][1].shape[2],), jnp.float32),
                       plgpu.Barrier(num_arrivals=2, num_barriers=stages),
                       plgpu.Barrier(num_arrivals=1, num_barriers=1),  # the scale row landed
                       plgpu.SMEM((mp, WEIGHT_ROWS), y_dtype),
                       *([smem((WEIGHT_ROWS, BLOCK), x.dtype)] if interpret else [])],
        grid=(sum(tiles), k_splits, groups),
        grid_names=("n", "s", "g"),
        interpret=plgpu.InterpretGPUParams() if interpret else False,
    )(x, *[a for w, ws in weights for a in (w, ws)], *after)


def dequant_matmul(x, w, ws, *, block_m: int = 256, stages: int = 2, programs: int | None = None, interpret=False):
    """x [M, K] 16-bit with M a multiple of block_m and K of 128; w [N, K] e4m3 with N a multiple of 128; ws [N/128,
    >= K/128] float32 (columns padded to a multiple of 4 for TMA). Returns x @ dequant(w)^T [M, N] in x's dtype,
    the weight dequantised in registers exactly as `fp8_matmul.dequantize(...).astype(x.dtype)` does (e4m3 widened
    exactly, times its block scale in float32, rounded to x's dtype), so the product is the dequantised path's
    without its widened copy of the weight.

    The product runs transposed, y^T = W x^T, so that the weight is the MMA's register operand. Output tiles of
    128 weight rows x block_m tokens (tokens fastest, so consecutive tiles share the weight tile in L2) are dealt
    round robin to `programs` persistent programs (None: one per SM of an H100): a TMA warpgroup streams each
    tile's [128, 128] e4m3 weight tiles, [block_m, 128] x tiles and block-scale row through `stages` buffers,
    running ahead into the next tile while the current one finishes; each of two compute warpgroups widens and
    scales its 64 weight rows in registers, runs them against the shared x tile into its float32 accumulator (the
    two warpgroups' widening and MMAs interleave), then transposes its [64, block_m] result in registers and
    TMA-stores it into y."""
    bm = block_m
    if bm % 8 or not 8 <= bm <= 256 or stages < 2:
        raise ValueError(f"fp8_matmul (mosaic, dequantised): block_m must be a multiple of 8 in [8, 256] and "
                         f"stages >= 2, got block_m={bm}, stages={stages}")
    m, k = x.shape
    n = w.shape[0]
    k_steps = k // BLOCK
    m_tiles, n_tiles = m // bm, n // BLOCK
    tiles = m_tiles * n_tiles
    programs = min(programs or H100_SMS, tiles)
    wgs = BLOCK // WEIGHT_ROWS  # compute warpgroups: 64 weight rows each, one block-scale row between them
    wgmma = plgpu.Layout.WGMMA

    def body(x_ref, w_ref, ws_ref, o_ref):
        pid, wg = lax.axis_index("p"), lax.axis_index("wg")
        my_tiles = lax.div(tiles - 1 - pid, jnp.int32(programs)) + 1

        def tile_at(i):  # (token row, weight row) of this program's i-th tile
            t = pid + i * programs
            return (pl.multiple_of(lax.rem(t, jnp.int32(m_tiles)) * bm, 8),
                    pl.multiple_of(lax.div(t, jnp.int32(m_tiles)) * BLOCK, BLOCK))

        def scoped(x_smem, w_smem, ws_smem, y_smem, a_smem, full, free):
            @pl.when(wg == wgs)
            def _memory():  # refills a slot once both compute warpgroups freed it, running across tiles
                plgpu.set_max_registers(40, action="decrease")

                @pl.loop(0, my_tiles)
                def _(i):
                    m0, n0 = tile_at(i)

                    @pl.loop(0, k_steps)
                    def _(j):
                        g = i * k_steps + j
                        slot = lax.rem(g, jnp.int32(stages))
                        pl.when(g >= stages)(lambda: plgpu.barrier_wait(free.at[slot]))
                        k0 = pl.multiple_of(j * BLOCK, BLOCK)
                        plgpu.copy_gmem_to_smem(x_ref.at[pl.ds(m0, bm), pl.ds(k0, BLOCK)], x_smem.at[slot],
                                                full.at[slot])
                        for c in range(wgs):
                            plgpu.copy_gmem_to_smem(
                                w_ref.at[pl.ds(n0 + c * WEIGHT_ROWS, WEIGHT_ROWS), pl.ds(k0, BLOCK)],
                                w_smem.at[slot, c], full.at[slot])
                        plgpu.copy_gmem_to_smem(ws_ref.at[lax.div(n0, jnp.int32(BLOCK))],
                                                ws_smem.at[slot, pl.ds(0, ws.shape[1])], full.at[slot])

                @pl.loop(jnp.maximum(my_tiles * k_steps - stages, 0), my_tiles * k_steps)
                def _(g):  # the last steps' releases, observed
                    plgpu.barrier_wait(free.at[lax.rem(g, jnp.int32(stages))])

            @pl.when(wg < wgs)
            def _compute():
                plgpu.set_max_registers(232, action="increase")

                def widened(j, slot):  # this warpgroup's [64, 128] weight tile in x's dtype, scaled
                    a = plgpu.layout_cast(plgpu.load(w_smem.at[slot, wg], layout=plgpu.Layout.WGMMA_UPCAST_2X),
                                          wgmma)
                    a = (a.astype(jnp.float16).astype(jnp.float32) * ws_smem[slot, j]).astype(x.dtype)
                    if interpret:  # the interpreter's wgmma takes its left operand from shared memory only
                        a_smem.at[wg][...] = a
                        plgpu.commit_smem()
                        return a_smem.at[wg]
                    return a

                def step(g, j, acc_ref):
                    slot = lax.rem(g, jnp.int32(stages))
                    plgpu.barrier_wait(full.at[slot])
                    plgpu.wgmma(acc_ref, widened(j, slot), x_smem.at[slot].transpose((1, 0)))
                    plgpu.wgmma_wait(0)
                    plgpu.barrier_arrive(free.at[slot])  # this group's operands of the slot are consumed
                    return acc_ref

                @pl.loop(0, my_tiles)
                def _(i):
                    m0, n0 = tile_at(i)
                    if interpret:  # the interpreter cannot run an MMA into an initialised accumulator: add after
                        def step_sum(j, acc):
                            part = pl.run_scoped(lambda r: step(i * k_steps + j, j, r)[...],
                                                 plgpu.ACC((WEIGHT_ROWS, bm), jnp.float32))
                            return acc + part
                        acc = lax.fori_loop(0, k_steps, step_sum,
                                            plgpu.layout_cast(jnp.zeros((WEIGHT_ROWS, bm), jnp.float32), wgmma))
                    else:
                        def run(acc_ref):
                            lax.fori_loop(0, k_steps, lambda j, c: (step(i * k_steps + j, j, acc_ref), c)[1], 0)
                            return acc_ref[...]
                        acc = pl.run_scoped(run, plgpu.ACC((WEIGHT_ROWS, bm), jnp.float32))
                    # y^T tile [64, block_m] -> y [block_m, 64]: a register transpose into an untiled buffer (once
                    # the previous tile's store has read it), one TMA store
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                    y_smem.at[wg].T[...] = plgpu.layout_cast(acc.astype(x.dtype), plgpu.Layout.WGMMA_TRANSPOSED)
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(y_smem.at[wg],
                                            o_ref.at[pl.ds(m0, bm), pl.ds(n0 + wg * WEIGHT_ROWS, WEIGHT_ROWS)])

                plgpu.wait_smem_to_gmem(0)

        pl.run_scoped(
            scoped,
            smem((stages, bm, BLOCK), x.dtype), smem((stages, wgs, WEIGHT_ROWS, BLOCK), w.dtype),
            # each slot's scale row 128-byte aligned (TMA's shared-memory alignment)
            plgpu.SMEM((stages, cdiv(ws.shape[1], 32) * 32), jnp.float32), plgpu.SMEM((wgs, bm, WEIGHT_ROWS), x.dtype),
            smem((wgs, WEIGHT_ROWS, BLOCK), x.dtype) if interpret else None,
            plgpu.Barrier(num_arrivals=2 + wgs, num_barriers=stages),
            plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),
            collective_axes="wg",
        )

    return plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((m, n), x.dtype),
        grid=(programs,),
        grid_names=("p",),
        num_threads=wgs + 1,
        thread_name="wg",
        interpret=plgpu.InterpretGPUParams() if interpret else False,
    )(x, w, ws)


# ----------------------------------------------------------- the calls fp8_matmul's Mosaic routes make: padding,
# scale rows, the split count, the partial sums
def scale_rows(w_scale):
    """Block scales as the Mosaic kernels copy them to shared memory, one row per program: float32, the columns
    padded to a multiple of 4 (TMA moves multiples of 16 bytes; a no-op at R1's sizes)."""
    return pad_to(w_scale.astype(jnp.float32), w_scale.ndim - 1, cdiv(w_scale.shape[-1], 4) * 4)


def weight_only_parts(x, weights, *, block_sizes: MosaicBlockSizes | None, interpret, after=()):
    """The weight-only kernel for x [M, K] or [M, G, K] and one or more weights ((w, scale), ...) inside
    `fp8_matmul._mosaic_weight_only_applies`, in one launch: tokens padded to a multiple of 8; K split into the
    largest power of two that keeps the programs within two per SM and >= 4 K steps each (the best or near it at
    R1's four projections, `bench/fp8_tune.py --grid mosaic`) unless block_sizes name the splits. Returns the
    products side by side as the kernel leaves them: [S, M, G, sum N_i], float32 token-major partial sums of S > 1
    splits, or (one split: the kernel writes the product itself) [1, M, G, sum N_i] in x's dtype. `after`: arrays
    the launch waits for (see `weight_only`)."""
    block_sizes = block_sizes or MosaicBlockSizes()
    x3 = x if x.ndim == 3 else x[:, None]  # [M, 1 or G, K]
    m, _, k = x3.shape
    k_steps = k // BLOCK
    programs = sum(w.shape[-2] for w, _ in weights) // WEIGHT_ROWS * (
        weights[0][0].shape[0] if weights[0][0].ndim == 3 else 1)
    fit = min(2 * H100_SMS // programs, k_steps // 4)
    splits = min(block_sizes.k_splits or 1 << max(fit, 1).bit_length() - 1, k_steps)
    grouped = [(w if w.ndim == 3 else w[None], scale_rows(s if s.ndim == 3 else s[None])) for w, s in weights]
    out = weight_only(pad_to(x3, 0, cdiv(m, 8) * 8), grouped, k_splits=splits, stages=block_sizes.stages,
                      after=after, interpret=interpret)
    return (out if splits > 1 else out[None])[:, :m]


def sum_parts(parts, dtype):
    """The product of parts [S, ...] as the FP8 kernels leave them (`fp8_matmul_parts`): their sum over the first
    axis (elementwise adds, which XLA fuses into the consumer) in `dtype`; parts[0] itself when S = 1."""
    return functools.reduce(operator.add, list(parts)).astype(dtype) if parts.shape[0] > 1 else parts[0]


def weight_only_products(x, weights, *, block_sizes: MosaicBlockSizes | None, interpret):
    """`weight_only_parts` with the partial sums added by elementwise adds, which XLA fuses into whatever reads
    the product. Returns each weight's product [M, N_i] ([M, G, N_i] for grouped weights)."""
    y = sum_parts(weight_only_parts(x, weights, block_sizes=block_sizes, interpret=interpret), x.dtype)
    ends = list(itertools.accumulate(w.shape[-2] for w, _ in weights))
    grouped = weights[0][0].ndim == 3
    return [y[..., e - w.shape[-2]:e] if grouped else y[:, 0, e - w.shape[-2]:e] for (w, _), e in zip(weights, ends)]


def dequant_tile_m(m: int) -> int:
    """Tokens per tile of the dequantising kernel: the largest of 256 / 192 / 128 that divides M (no padding copy of
    x), else 256."""
    return next((b for b in (256, 192, 128) if m % b == 0), 256)


def dequant_product(x, w, w_scale, *, block_sizes, interpret):
    """The dequantising kernel for a call inside `fp8_matmul._mosaic_dequant_applies`: a grouped weight as one 2-D
    weight, rows padded to 128 (R1's kv_a: 576) and tokens to the tile. Block sizes: MosaicBlockSizes' block_m
    (tokens per tile) and stages when given, else `dequant_tile_m` and 2 stages (shared memory's limit at 256)."""
    m, k = x.shape
    grouped = w.ndim == 3
    w2, s2 = (w.reshape(-1, k), w_scale.reshape(-1, w_scale.shape[-1])) if grouped else (w, w_scale)
    n = w2.shape[0]
    bm, stages = (block_sizes.block_m, block_sizes.stages) if block_sizes else (dequant_tile_m(m), 2)
    n_pad, m_pad = cdiv(n, BLOCK) * BLOCK, cdiv(m, bm) * bm
    y = dequant_matmul(pad_to(x, 0, m_pad), pad_to(w2, 0, n_pad), scale_rows(s2), block_m=bm, stages=stages,
                       interpret=interpret)[:m, :n]
    return y.reshape(m, w.shape[0], -1) if grouped else y
