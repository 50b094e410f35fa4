"""DeepSeek-V2/V3/R1 multi-head latent attention (MLA) with a compressed `kv_cache` and a decoupled-RoPE `pe_cache`.

Math follows HF transformers 5.x `DeepseekV3Attention` (and `DeepseekV2Attention`); the absorbed form follows
DeepSeek-V3 `inference/model.py` (`attn_impl="absorb"`): W_UK is folded into the query, attention runs over
[latent | pe] (one shared KV head, L + R wide), W_UV maps the L-wide result to each head, then `o_proj`.
The naive mode up-projects the cached latent to per-head K/V; it is the internal reference for the tests.

Params (our layout, written by `convert`; rope rows already in half-split order):
  q_a_proj [D, Q], q_a_layernorm [Q], q_b_proj [Q, N, P+R]   (or q_proj [D, N, P+R] when q_lora_rank is None)
  kv_a_proj_with_mqa [D, L+R], kv_a_layernorm [L], w_uk [N, P, L], w_uv [N, L, V], o_proj [N, V, D]
  optional: q_a_proj_bias [Q], kv_a_proj_with_mqa_bias [L+R], o_proj_bias [D], gate_proj [D, N, V] (gated attention)
FP8 params (`load_layer(..., keep_fp8=True)`, `quantize_fp8`): q_a_proj, q_b_proj / q_proj, kv_a_proj_with_mqa,
o_proj as `Fp8Weight` (e4m3 [out, in] + float32 scales per 128x128 block, as DeepSeek ships them), W_UK [N, P, L] and
W_UV [N, V, L] as the per-head row blocks of kv_b_proj; every projection then runs through `fp8_matmul`
(`jaxlm.mla_projections`; the config is `jaxlm.mla_config.MLAConfig`, both re-exported here).
Cache: `MLACache(kv_cache [slots, S, L], pe_cache [slots, S, R])`, request i in slot i; with
`init_cache(..., int8_latent=True)` the latent is stored as int8 rows with one float32 scale per row (`kv_scale`
[slots, S]) and the RoPE part stays 16-bit: 644 instead of 1152 bytes per token at R1 sizes.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

import pallas_kernels
from jaxlm import batching, sharding
from jaxlm.sharding import DP, MLA_CACHE, MLA_CACHE_SCALE, TP
from jaxlm.layers import apply_rope, rope_cos_sin
from jaxlm.mla_config import MLAConfig
from jaxlm.mla_projections import (FP8_ACTIVATIONS, Params, absorb_uk, dequantize_fp8, expand_uv, fp8_together,
                                   k_nope_of, linear, linears_of_x, quantize_fp8, up_project)
from pallas_kernels.common import resolve_attention_impl
from pallas_kernels.mla_decode import dequantize_rows

__all__ = ["CACHE_ALIGN", "DECODE_UNROLL", "FP8_ACTIVATIONS", "MLACache", "MLAConfig", "MODES", "Params",
           "decode_steps", "dequantize_fp8", "forward", "init_cache", "init_params", "load_layer", "quantize_fp8"]
MODES = ("absorbed", "naive")
CACHE_ALIGN = 64  # cache positions are allocated in multiples of this, so kernels read whole blocks


class MLACache(NamedTuple):
    kv_cache: jax.Array  # [slots, S, L]: kv_a_layernorm(latent); int8 when kv_scale is set
    pe_cache: jax.Array  # [slots, S, R]: k_pe after RoPE (half-split layout)
    kv_scale: jax.Array | None = None  # [slots, S] float32: row scales of an int8 kv_cache

    def latent(self, index, dtype) -> jax.Array:
        """The cached latent rows kv_cache[index] as `dtype` (int8 rows times their scales)."""
        kv = self.kv_cache[index]
        if self.kv_scale is None:
            return kv.astype(dtype)
        return dequantize_rows(kv, self.kv_scale[index]).astype(dtype)


def init_cache(cfg: MLAConfig, num_requests: int, max_len: int, dtype=jnp.bfloat16, *, mesh=None,
               int8_latent: bool = False) -> MLACache:
    """Zeroed caches for `num_requests` slots of at least `max_len` positions (rounded up to a multiple of 64).
    With a `mesh` (jaxlm.sharding.make_mesh) the slots are split over its `dp` axis, replicated over `tp`.
    int8_latent: the latent cache as int8 with per-row float32 scales (quantised as it is written; the RoPE cache
    stays `dtype`)."""
    if num_requests < 1 or max_len < 1:
        raise ValueError(f"init_cache needs num_requests >= 1 and max_len >= 1, got {num_requests}, {max_len}")
    dp = sharding.axis_size(mesh, DP)
    if num_requests % dp:
        raise ValueError(f"{num_requests} cache slots do not split over dp={dp}: use a multiple of {dp} slots")
    max_len = -(-max_len // CACHE_ALIGN) * CACHE_ALIGN
    device = (lambda spec: None) if mesh is None else (lambda spec: jax.sharding.NamedSharding(mesh, spec))
    zeros = lambda width, dt: jnp.zeros((num_requests, max_len, width), dt, device=device(MLA_CACHE))  # noqa: E731
    scale = jnp.zeros((num_requests, max_len), jnp.float32, device=device(MLA_CACHE_SCALE)) if int8_latent else None
    return MLACache(zeros(cfg.kv_lora_rank, jnp.int8 if int8_latent else dtype), zeros(cfg.qk_rope_head_dim, dtype),
                    scale)


def init_params(cfg: MLAConfig, key: jax.Array, dtype=jnp.bfloat16, *, gate: bool = False) -> Params:
    """Random weights (std 1/sqrt(fan_in)) in our layout, for benchmarks and the demo."""
    n, p, r, v, l, d = (cfg.num_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim,
                        cfg.kv_lora_rank, cfg.hidden_size)
    shapes = {"kv_a_proj_with_mqa": ((d, l + r), d), "w_uk": ((n, p, l), l), "w_uv": ((n, l, v), l),
              "o_proj": ((n, v, d), n * v)}
    if cfg.q_lora_rank is None:
        shapes["q_proj"] = ((d, n, p + r), d)
    else:
        shapes["q_a_proj"] = ((d, cfg.q_lora_rank), d)
        shapes["q_b_proj"] = ((cfg.q_lora_rank, n, p + r), cfg.q_lora_rank)
    if gate:
        shapes["gate_proj"] = ((d, n, v), d)
    keys = jax.random.split(key, len(shapes))
    params = {name: (jax.random.normal(k, shape, jnp.float32) / math.sqrt(fan_in)).astype(dtype)
              for k, (name, (shape, fan_in)) in zip(keys, sorted(shapes.items()))}
    params["kv_a_layernorm"] = jnp.ones((l,), dtype)
    if cfg.q_lora_rank is not None:
        params["q_a_layernorm"] = jnp.ones((cfg.q_lora_rank,), dtype)
    return params




def _first_projections(params: Params, cfg: MLAConfig, x: jax.Array, impl: str, after=None):
    """x [T, D] -> (qa, ckv, dtype): q_a's product [T, Q] (q_proj's [T, N, P + R] without q-LoRA), kv_a's [T, L + R]
    and the products' dtype. On the Pallas path with FP8 weights at decode sizes q_a's and kv_a's products come
    from one weight-only launch as its split-K partial sums side by side, [S, T, Q + L + R], given as both: the
    cache write adds them as it reads them (no pass of their own). `after`: an array computed before x is read
    (the previous decode step's output): an operand of that launch, else tied to x by `_after`."""
    first = ("q_proj", "td,dnh->tnh") if cfg.q_lora_rank is None else ("q_a_proj", "td,dq->tq")
    names_specs = [first, ("kv_a_proj_with_mqa", "td,de->te")]
    ws = [params[name] for name, _ in names_specs]
    if (cfg.q_lora_rank is not None and fp8_together(params, names_specs, impl)
            and not any(name + "_bias" in params for name, _ in names_specs)):  # a bias: added to the sum
        parts = pallas_kernels.fp8_matmuls_side_by_side(x, [w.w for w in ws], [w.scale for w in ws],
                                                        block=ws[0].block, after=after)
        if parts is not None:
            return parts, parts, x.dtype
    x = x if after is None else _after(x, after)
    qa, ckv = linears_of_x(x, params, names_specs, impl)  # one FP8 launch where the Mosaic kernel takes both
    return qa, ckv, ckv.dtype


def _project_q(params: Params, cfg: MLAConfig, qa: jax.Array, positions: jax.Array, impl: str, rope=None,
               rotate: bool = True):
    """q_a's normalised product (q_proj's without q-LoRA) -> q [T, N, P + R] as projected (q_nope is its leading P
    columns; its rope part unrotated) and q_pe [T, N, R] (roped; None without `rotate`: the decode kernel rotates
    q's rope part itself). rope: (cos, sin) [T, R] of the positions when the caller has them already."""
    n = cfg.num_heads
    if cfg.q_lora_rank is None:
        q = qa.reshape(qa.shape[0], n, -1)
    else:
        q = linear(qa, params, "q_b_proj", "tq,qnh->tnh", impl, heads=n)
    if not rotate:
        return q, None
    q_pe = q[..., cfg.qk_nope_head_dim :]
    cos, sin = rope if rope is not None else _rope_of(cfg, positions, qa.dtype)  # [T, R]
    return q, apply_rope(q_pe, cos[:, None], sin[:, None])


def _rope_of(cfg: MLAConfig, positions: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """The layer's RoPE (cos, sin) [..., R] for integer positions of any shape (yarn's factor folded in)."""
    inv_freq, attention_factor = cfg.rope()
    return rope_cos_sin(positions, inv_freq, attention_factor, dtype)


def _write_cache(params, cfg: MLAConfig, cache: MLACache, meta: batching.RaggedMeta, qa, ckv, dtype,
                 impl: str, rope_out: bool = False) -> tuple[MLACache, jax.Array, jax.Array | None]:
    """kv_a's product ckv (see `_first_projections`) into both caches at each token's (slot, position): the latent
    through kv_a_layernorm, k_pe rotated at its position; one Pallas launch (`update_mla_cache`, which computes the
    RoPE angles itself: no table operands), or its jnp reference with impl "xla". Padding tokens carry position
    max_len (out of range): dropped. With q-LoRA the same launch normalises q_a's product qa (q_a_layernorm).
    Returns (cache, qa normalised [T, Q], or qa as given without q-LoRA, and with rope_out the tokens' [cos | sin]
    [T, R] float32, the rotation their k_pe got, else None)."""
    inv_freq, attention_factor = cfg.rope()
    scales = () if cache.kv_scale is None else (cache.kv_scale,)
    q_args = () if cfg.q_lora_rank is None else (qa, params["q_a_layernorm"])
    args = (cache.kv_cache, cache.pe_cache, ckv, meta.tok_slot, meta.tok_pos, params["kv_a_layernorm"],
            jnp.asarray(inv_freq), *q_args)
    opts = dict(eps=cfg.norm_eps, rope_scale=attention_factor, dtype=dtype, rope_out=rope_out)
    fn = pallas_kernels.update_mla_cache if impl == "pallas" else pallas_kernels.update_mla_cache_reference

    def local(kv, pe, ckv, slots, positions, weight, inv_freq, *rest):  # this device's slots: others are skipped
        q_opts = dict(zip(("q", "q_norm_weight"), rest[:len(q_args)]))
        scale = rest[len(q_args):]
        slots = slots - sharding.axis_index(DP) * kv.shape[0]
        return fn(kv, pe, ckv, slots, positions, weight, inv_freq, **opts, kv_scale=scale[0] if scale else None,
                  **q_opts)

    cache_specs = (MLA_CACHE, MLA_CACHE) + (MLA_CACHE_SCALE,) * len(scales)
    in_specs = cache_specs[:2] + (P(),) * (5 + len(q_args)) + cache_specs[2:]
    out = sharding.per_device(local, in_specs, cache_specs + (P(),) * (bool(q_args) + rope_out))(*args, *scales)
    rest = out[len(cache_specs):]  # [the normalised qa][, every token's rope table: each device computes them all]
    return MLACache(*out[:len(cache_specs)]), rest[0] if q_args else qa, rest[-1] if rope_out else None


def _softmax(scores: jax.Array, meta: batching.RaggedMeta, kv_len: int) -> jax.Array:
    """Bottom-right causal softmax over [NB, N, Qb, S] float32 scores: row at position p sees keys 0..p."""
    keys = jnp.arange(kv_len, dtype=jnp.int32)
    mask = (keys[None, None, :] <= meta.blk_pos[:, :, None]) & meta.blk_valid[:, :, None]  # [NB, Qb, S]
    scores = jnp.where(mask[:, None], scores, -jnp.inf)
    scores = jnp.where(meta.blk_valid[:, None, :, None], scores, 0.0)  # padding rows: finite, ignored later
    return jax.nn.softmax(scores, axis=-1)


def _to_blocks(x: jax.Array, meta: batching.RaggedMeta) -> jax.Array:
    return x[meta.blk_tok]  # [T, ...] -> [NB, Qb, ...]


def _from_blocks(o: jax.Array, meta: batching.RaggedMeta) -> jax.Array:
    return o.reshape(-1, *o.shape[2:])[meta.tok_block]  # [NB, Qb, ...] -> [T, ...]


def _attend_absorbed(params, cfg, q_nope, q_pe, cache, meta, kv_len, impl):
    """MQA over [latent | pe] with W_UK folded into q and W_UV applied after: returns [T, N, V]."""
    q_lat = absorb_uk(q_nope, params, impl)
    pe = cache.pe_cache[meta.blk_slot, :kv_len]  # [NB, S, R]
    kv = cache.latent((meta.blk_slot, slice(None, kv_len)), pe.dtype)  # [NB, S, L]
    f32 = jnp.float32
    scores = (jnp.einsum("bqnl,bsl->bnqs", _to_blocks(q_lat, meta).astype(kv.dtype), kv).astype(f32)
              + jnp.einsum("bqnr,bsr->bnqs", _to_blocks(q_pe, meta).astype(pe.dtype), pe).astype(f32))
    probs = _softmax(scores * cfg.softmax_scale, meta, kv_len).astype(kv.dtype)
    o_lat = jnp.einsum("bnqs,bsl->bqnl", probs, kv).astype(q_nope.dtype)
    return expand_uv(_from_blocks(o_lat, meta), params, impl)


def _attend_decode_kernel(params, cfg, q, q_rope, cache, meta):
    """Decode steps through the Pallas flash-decoding kernel, token by token: token t reads its request's cache slot
    (a one-page block table over the [slots, max_len, ...] caches), positions 0 .. its own; padding tokens read
    nothing. No gathers to or from slot order. q as projected: the kernel reads its rope part in place and rotates
    it by q_rope ([T, R] [cos | sin] from the cache write) as it loads it (no pass of its own). With slots split over
    dp, each device attends the tokens of its slots and the others' rows (zeros) are summed in. Returns [T, N, V]."""
    max_len = cache.kv_cache.shape[1]
    dtype = cache.pe_cache.dtype
    q_lat = absorb_uk(q, params, "pallas").astype(dtype)  # q_nope: q's leading columns
    lengths = jnp.where(meta.tok_pos < max_len, meta.tok_pos + 1, 0)
    scales = () if cache.kv_scale is None else (cache.kv_scale,)

    def local(q_lat, q, q_rope, kv, pe, slots, lengths, *scales):
        slot = slots - sharding.axis_index(DP) * kv.shape[0]  # this device's slots; others' tokens: length 0 here
        mine = (slot >= 0) & (slot < kv.shape[0])
        o = pallas_kernels.mla_decode(q_lat, q, kv, pe, jnp.where(mine, lengths, 0), sm_scale=cfg.softmax_scale,
                                      kv_scale=scales[0] if scales else None, q_pe_rope=q_rope,
                                      block_table=jnp.clip(slot, 0, kv.shape[0] - 1)[:, None])
        return sharding.sum_over(o, DP)

    heads = P(None, TP, None)
    specs = (heads, heads, P(), MLA_CACHE, MLA_CACHE, P(), P()) + (MLA_CACHE_SCALE,) * len(scales)
    decode = sharding.per_device(local, specs, heads)
    o_lat = decode(q_lat, q.astype(dtype), q_rope, cache.kv_cache, cache.pe_cache, meta.tok_slot, lengths, *scales)
    return expand_uv(o_lat.astype(q.dtype), params, "pallas")


def _attend_prefill_kernel(params, cfg, q, q_pe, cache, seq_lens, past_lens, kv_tokens):
    """Multi-token steps through `sage_attention` in the up-projected form (vLLM's prefill choice): each request's
    cached latent, history and new tokens alike, is gathered into packed keys and up-projected to per-head K [P+R]
    and V; queries are [q_nope | q_pe] (q as projected, whose leading P columns are q_nope, and the roped q_pe, as
    parts). Bottom-right causal per request. Returns [T, N, V]."""
    total = past_lens + seq_lens
    cu_q = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(seq_lens)])
    cu_k = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(total)])
    k_slot, k_pos = pallas_kernels.sage_attention_segments(cu_k, kv_tokens)
    kv = cache.latent((k_slot, k_pos), q.dtype)  # [Tk, L]; rows past cu_k[-1] are never read
    pe = cache.pe_cache[k_slot, k_pos].astype(q.dtype)  # [Tk, R]
    k_nope, v = up_project(kv, params, "pallas")
    # Q = [q_nope | q_pe] and K = [k_nope | pe] go in as parts, pe as one head that every head shares, q_nope as the
    # leading columns of q (k_nope's width): no sliced, concatenated or broadcast copies
    k = (k_nope, pe[:, None, :])
    q = (q, q_pe.astype(q.dtype))

    def attend(q, k, v, cu_q, cu_k, kv, w_uk):  # on each device's heads
        # K's smoothing means from the latent: mean(latent) W_UK^T is k_nope's mean (linear), a [B, L] product instead
        # of a pass over the [Tk, N, P] keys (12 us less per FP8 seed prefill on an H100); any shift per request and
        # head would serve (sage_attention undoes it)
        (lat_mean, pe_mean), _ = pallas_kernels.sage_attention_request_means((kv[:, None], k[1]), cu_k)
        k_mean = (k_nope_of(lat_mean[:, 0].astype(kv.dtype), w_uk, "pallas"), pe_mean)
        return pallas_kernels.sage_attention(q, k, v, cu_q, cu_k, k_mean=k_mean, causal=True,
                                             sm_scale=cfg.softmax_scale)

    heads, head_rows = P(None, TP, None), P(TP, None, None)
    attend = sharding.per_device(  # pe: every device's heads share it
        attend, (heads, (heads, P()), heads, P(), P(), P(), jax.tree.map(lambda _: head_rows, params["w_uk"])),
        heads)
    # rows past cu_q[-1] (padding tokens, no request's) stay as the kernel leaves them: every later op is row-wise
    # and forward() drops those rows (a mask here would cost a pass over o before o_proj's quantisation kernel)
    return attend(q, k, v, cu_q, cu_k, kv, params["w_uk"])


def _attend_naive(params, cfg, q_nope, q_pe, cache, meta, kv_len, impl):
    """Reference: up-project the cached latent to per-head K_nope and V, then ordinary attention: [T, N, V]."""
    kv = cache.latent((meta.blk_slot, slice(None, kv_len)), q_nope.dtype)
    pe = cache.pe_cache[meta.blk_slot, :kv_len].astype(q_nope.dtype)
    k_nope, v = up_project(kv, params, impl)
    f32 = jnp.float32
    scores = (jnp.einsum("bqnp,bsnp->bnqs", _to_blocks(q_nope, meta), k_nope).astype(f32)
              + jnp.einsum("bqnr,bsr->bnqs", _to_blocks(q_pe, meta), pe).astype(f32))
    probs = _softmax(scores * cfg.softmax_scale, meta, kv_len).astype(v.dtype)
    return _from_blocks(jnp.einsum("bnqs,bsnv->bqnv", probs, v), meta)


def _uses_decode_kernel(mode: str, impl: str, block_q: int) -> bool:
    """Whether a step attends through the absorbed flash-decoding kernel (which also rotates q's rope part)."""
    return mode != "naive" and impl == "pallas" and block_q == 1


def _step(params, cfg, x, cache, seq_lens, past_lens, sizes: batching.StepSizes, mode: str, impl: str, rope=None,
          after=None):
    """One ragged step on padded shapes: x [sizes.num_tokens, D] -> (y [num_tokens, D], cache, done). rope: the
    tokens' (cos, sin) when the caller computed them (decode_steps, for all its steps at once); after: an array the
    step's reads of x wait for (decode_steps: the previous step's `done`; see `_first_projections`); done: what the
    step's last launch wrote (`mla_projections.linear`'s with_done: o_proj's parts).

    The one place that picks the kernels: with impl == "pallas" the caches are written by the in-place Pallas
    kernel, one-token steps attend through the absorbed flash-decoding kernel and multi-token steps through the
    INT8 varlen attention kernel (up-projected form); otherwise XLA scatters and the XLA absorbed/naive forms.
    """
    meta = batching.ragged_metadata(seq_lens, past_lens, sizes, cache.kv_cache.shape[1])
    decode_kernel = _uses_decode_kernel(mode, impl, sizes.block_q)
    qa, ckv, dtype = _first_projections(params, cfg, x, impl, after)
    # normalises q_a's product too; for the decode kernel, which rotates q's rope part itself, gives the RoPE table
    cache, qa, q_rope = _write_cache(params, cfg, cache, meta, qa, ckv, dtype, impl, rope_out=decode_kernel)
    q, q_pe = _project_q(params, cfg, qa, meta.tok_pos, impl, rope, rotate=not decode_kernel)
    q_nope = q[..., : cfg.qk_nope_head_dim]  # a copy only where used (the Pallas paths take q whole)
    if mode == "naive":
        o = _attend_naive(params, cfg, q_nope, q_pe, cache, meta, sizes.kv_len, impl)
    elif decode_kernel:
        o = _attend_decode_kernel(params, cfg, q, q_rope, cache, meta)
    elif impl == "pallas":
        o = _attend_prefill_kernel(params, cfg, q, q_pe, cache, seq_lens, past_lens, sizes.kv_tokens)
    else:
        o = _attend_absorbed(params, cfg, q_nope, q_pe, cache, meta, sizes.kv_len, impl)  # [T, N, V]
    if "gate_proj" in params:  # gated attention: o * sigmoid(x W_g), per head and channel
        gate_x = x if after is None else _after(x, after)
        o = o * jax.nn.sigmoid(jnp.einsum("td,dnv->tnv", gate_x, params["gate_proj"]))
    y, done = linear(o, params, "o_proj", "tnv,nvd->td", impl, with_done=True)
    return y, cache, done


@functools.partial(jax.jit, static_argnames=("cfg", "sizes", "mode", "impl"), donate_argnames=("cache",))
def _step_jit(params, cfg, x, cache, lengths, sizes, mode, impl):
    """(y, cache, the lengths the requests reach: past_lens + seq_lens, for the next call's `on_device`)."""
    y, cache = _step(params, cfg, x, cache, lengths[0], lengths[1], sizes, mode, impl)[:2]
    return y, cache, _advanced(lengths)


def _advanced(lengths):
    """[seq_lens, past_lens] -> [seq_lens, past_lens + seq_lens] (numpy or jnp): the next decode step's lengths."""
    if isinstance(lengths, np.ndarray):  # on the host: two small ops (np.stack costs ~8 us on the CI host)
        out = lengths.copy()
        out[1] += lengths[0]
        return out
    return jnp.stack([lengths[0], lengths[1] + lengths[0]])


def _cache_shape(cache: MLACache) -> tuple[int, int]:
    """(slots, max_len) of a cache, or a clear error for a cache whose buffers an earlier step took (donated) or
    for a length `init_cache` would not allocate."""
    kv = cache.kv_cache  # the steps donate every array of the cache together: one tells (a tracer in a user's jit)
    if isinstance(kv, jax.Array) and not isinstance(kv, jax.core.Tracer) and kv.is_deleted():
        raise ValueError("this cache was donated to an earlier forward() / decode_steps() call and its buffers are "
                         "gone: pass the cache that call returned")
    slots, max_len = cache.kv_cache.shape[:2]
    if max_len % CACHE_ALIGN:
        raise ValueError(f"cache length {max_len} is not a multiple of {CACHE_ALIGN} (the kernels read whole "
                         f"{CACHE_ALIGN}-position blocks): build the cache with mla.init_cache")
    return slots, max_len


def _check_options(mode: str, attention_impl: str | None) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return resolve_attention_impl(attention_impl)


def forward(params: Params, cfg: MLAConfig, x: jax.Array, cache: MLACache, seq_lens, past_lens, *,
            mode: str = "absorbed", attention_impl: str | None = None) -> tuple[jax.Array, MLACache]:
    """One ragged MLA step.

    x: [sum(seq_lens), D] new tokens in request order; request i uses cache slot i, its tokens at positions
    past_lens[i] ... past_lens[i] + seq_lens[i] - 1, seeing its whole history plus its own earlier new tokens.
    Returns (y [sum(seq_lens), D], cache); `cache` is donated (do not reuse the one passed in). Lengths are
    concrete (host) values; shapes are bucketed so that varying lengths reuse a handful of compiled programs.
    attention_impl: "pallas" (default on GPU; interpret mode on CPU) or "xla" (default on CPU).
    Sharded: with params from `jaxlm.sharding.shard_mla` and a cache from `init_cache(..., mesh=)` the step runs
    over their mesh (heads over tp, slots over dp; kernels per device).
    """
    impl = _check_options(mode, attention_impl)
    if not hasattr(x, "ndim"):
        x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] != cfg.hidden_size:
        raise ValueError(f"x must be [sum(seq_lens), {cfg.hidden_size}], got {tuple(x.shape)}")
    slots, max_len = _cache_shape(cache)
    num_tokens = x.shape[0]
    lengths, sizes = batching.plan(seq_lens, past_lens, num_tokens=num_tokens, num_slots=slots, max_len=max_len)
    x = batching.pad_rows(x, sizes.num_tokens)  # on the host when x is there: no extra device op per call
    with sharding.use(sharding.mesh_of((params, cache))):
        y, cache, reached = _step_jit(params, cfg, x, cache, batching.on_device(lengths, cache.kv_cache), sizes,
                                      mode, impl)
    batching.keep_step(lengths, _advanced(lengths), reached, cache.kv_cache)
    return batching.take_rows(y, num_tokens), cache


# decode_steps' scan runs this many steps per loop iteration: the loop's per-iteration costs on an H100 (a ~3.6 us
# idle gap at each iteration's start, the counter's kernel, the carried output's copy) are paid once per
# DECODE_UNROLL steps. FP8 seed decode, 100 steps, each step after the one before (`_after`): 0.1234-0.1258 ms per
# step unrolled 1, 0.1199-0.1212 at 2, 0.1205-0.1206 at 4, 0.1218-0.1237 at 8 (bench/RESULTS.md, eighteenth session).
DECODE_UNROLL = 4


def _after(x: jax.Array, prev: jax.Array) -> jax.Array:
    """x computed after prev: x + 0 * (prev's first element, or 0 where it is not finite), equal to x (a -0.0 of x
    may become +0.0). A data dependency: an optimization barrier on (x, prev) kept XLA's program in order but not the CUDA
    graph's kernels, which follow the buffers they read; on an H100 the unrolled steps' q_a / kv_a launches (which
    read their x only) ran at the start of each loop iteration, ahead of the steps before them, and found their
    weights in L2 (seen in profiles, eighteenth session). Where the step's first launch is a Pallas kernel it takes
    prev as an operand instead (`_first_projections`): no add of its own."""
    first = prev.reshape(-1)[:1].astype(jnp.float32)
    return x + (jnp.where(jnp.isfinite(first), first, 0.0) * 0.0).astype(x.dtype)


@functools.partial(jax.jit, static_argnames=("cfg", "kv_len", "mode", "impl"), donate_argnames=("cache",))
def _decode_steps_jit(params, cfg, xs, cache, past_lens, kv_len, mode, impl):
    num_req = xs.shape[1]
    sizes = batching.StepSizes(num_tokens=num_req, num_blocks=num_req, block_q=1, kv_len=kv_len)
    ones = jnp.ones((num_req,), jnp.int32)
    past_lens = jnp.asarray(past_lens, jnp.int32)

    steps = jnp.arange(xs.shape[0], dtype=jnp.int32)
    # where XLA rotates q: every step's RoPE tables in one pass before the loop (each step reads its rows where it
    # applies them); the decode kernel rotates q itself with the cache write's table
    rope = (None if _uses_decode_kernel(mode, impl, sizes.block_q)
            else _rope_of(cfg, past_lens[None, :] + steps[:, None], xs.dtype))  # (cos, sin) [steps, B, R]

    # step i's histories come from the loop index (a carried lengths vector was copied on the device at every step).
    # Each step's reads of its input wait for the previous step's output, as in a real decode, where the input is
    # computed from that output (`_step`'s after: an operand of the step's first launch, or `_after`): with all
    # inputs given up front and the loop unrolled, XLA would otherwise batch the unrolled steps' projections into
    # one GEMM, or the GPU would run a later step's first projection early.
    def step(cache, x, i, rope, prev):
        return _step(params, cfg, x, cache, ones, past_lens + i, sizes, mode, impl, rope, after=prev)

    def body(carry, step_inputs):
        cache, prev = carry
        x, i, rope = step_inputs
        y, cache, done = step(cache, x, i, rope, prev)
        return (cache, done), y

    # the carry's `done` (o_proj's parts on the FP8 Pallas path, else y): its shape from the step itself, traced only
    # (on one step's shapes: there may be no steps)
    one = lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype)  # noqa: E731
    first = jnp.zeros_like(jax.eval_shape(step, cache, one(xs), one(steps), jax.tree.map(one, rope), None)[2])
    (cache, _), ys = jax.lax.scan(body, (cache, first), (xs, steps, rope),
                                  unroll=max(1, min(DECODE_UNROLL, xs.shape[0])))
    return ys, cache, past_lens + xs.shape[0]


def decode_steps(params: Params, cfg: MLAConfig, xs: jax.Array, cache: MLACache, past_lens, *,
                 mode: str = "absorbed", attention_impl: str | None = None) -> tuple[jax.Array, MLACache]:
    """`steps` one-token decode steps for B requests inside one jitted call (a `lax.scan`).

    xs: [steps, B, D], the new token of each request at each step; request i (slot i) starts at past_lens[i].
    Returns (ys [steps, B, D], cache). Equal to `steps` calls of `forward` with seq_lens = 1.
    """
    impl = _check_options(mode, attention_impl)
    xs = jnp.asarray(xs)
    if xs.ndim != 3 or xs.shape[2] != cfg.hidden_size:
        raise ValueError(f"xs must be [steps, requests, {cfg.hidden_size}], got {tuple(xs.shape)}")
    steps, num_req = xs.shape[:2]
    if np.ndim(past_lens) != 1 or np.size(past_lens) != num_req:
        raise ValueError(f"xs holds {num_req} requests per step but past_lens is {np.asarray(past_lens).tolist()}: "
                         "one entry per request")
    slots, max_len = _cache_shape(cache)
    lengths, _ = batching.plan([steps] * num_req, past_lens, num_tokens=steps * num_req, num_slots=slots,
                               max_len=max_len)
    past = lengths[1, :num_req]  # checked, int32
    kv_len = min(batching.bucket(int(past.max()) + steps, 16), max_len)
    with sharding.use(sharding.mesh_of((params, cache))):
        ys, cache, reached = _decode_steps_jit(params, cfg, xs, cache, batching.on_device(past, cache.kv_cache),
                                               kv_len, mode, impl)
    batching.keep_step(past, past + steps, reached, cache.kv_cache)
    return ys, cache


def load_layer(hf_dir, layer: int, *, dtype=None, keep_fp8: bool = False) -> tuple[MLAConfig, Params]:
    """The attention weights of decoder layer `layer` of an HF checkpoint directory, in our layout.

    Single or sharded safetensors; float32, bfloat16, or FP8 e4m3 with `weight_scale_inv` (dequantised, unless
    `keep_fp8`: then the projections stay FP8 with their block scales, see the module docstring).
    `dtype` defaults to the checkpoint's float dtype (bfloat16 for FP8 checkpoints; norms and biases with keep_fp8).
    """
    from convert import deepseek  # the layout mapping lives in one place, the converter

    return deepseek.load_layer(hf_dir, layer, dtype=dtype, keep_fp8=keep_fp8)
