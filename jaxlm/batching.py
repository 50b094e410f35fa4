"""Ragged-batch metadata: packed new tokens of many requests, each on top of its own cached history.

A step packs the new tokens of B requests as `[sum(seq_lens), D]` in request order; request i owns cache slot i
and its new tokens sit at positions `past_lens[i] ...`. Attention groups the packed tokens into query blocks of
`block_q` tokens that never straddle two requests, so each block reads one slot's cache; requests are padded to a
multiple of `block_q` (not to the longest request). `ragged_metadata` derives every index once per step, in jnp, so
it works on concrete and traced lengths alike; `plan` picks the static sizes (bucketed, so a serving loop compiles
a handful of programs) and checks the lengths against the cache on the host.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import threading
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from pallas_kernels.common import pad_to, segment_of


def pad_rows(x, rows: int):
    """x [n, ...] zero-padded to `rows` rows: numpy on the host (travels with the call's arguments), one small
    jitted program for a device array (jnp.pad's Python wrapper costs several times its dispatch on a slow host)."""
    if x.shape[0] == rows:
        return x
    if isinstance(x, np.ndarray):
        return np.pad(x, [(0, rows - x.shape[0])] + [(0, 0)] * (x.ndim - 1))
    return _pad_rows(x, 0, rows)


def take_rows(y, rows: int):
    """The first `rows` rows of y (y itself when it has no more), through one small jitted program."""
    return y if y.shape[0] == rows else _take_rows(y, rows)


_pad_rows = jax.jit(pad_to, static_argnums=(1, 2))


@functools.partial(jax.jit, static_argnums=1)
def _take_rows(y, rows):
    return y[:rows]


# Per-request lengths kept on the device between calls, by value. A step's numpy lengths travel with its arguments,
# and its launch waits for that host-to-device copy to be confirmed (on an H100 host ~0.3-0.5 ms per call, for 64
# bytes); a copy made apart before the call costs as much. So a step returns the lengths its requests reach, computed
# on the device, and lengths that come a second time are copied after that call's launch: the next call of a decode
# loop, and further repeats of a call, find theirs here and copy nothing. Lengths seen once are not copied.
_ON_DEVICE: collections.OrderedDict = collections.OrderedDict()
_SEEN: collections.OrderedDict = collections.OrderedDict()  # keys of host lengths sent once, no copy kept
_MEMO_MAX = 64  # entries per memo (these and `plan`'s), least recently used dropped
_LOCK = threading.Lock()  # serving threads may step concurrently


def _lengths_key(lengths: np.ndarray, like):
    """(memo key, sharding, committed): lengths replicated over the mesh of `like` (an array of the step), or on its
    device, committed as `like` is (jit keeps one cache entry per committedness of its arguments); key None when
    `like` is not a device array."""
    sharding = getattr(like, "sharding", None)
    if isinstance(sharding, NamedSharding):
        sharding = NamedSharding(sharding.mesh, PartitionSpec())
    elif not isinstance(sharding, SingleDeviceSharding):
        return None, None, None
    committed = like.committed
    return (lengths.shape, lengths.dtype.str, lengths.tobytes(), sharding, committed), sharding, committed


def on_device(lengths: np.ndarray, like):
    """The device copy of `lengths` (host int32) kept for `like`'s devices, or `lengths` itself when there is none."""
    key = _lengths_key(lengths, like)[0]
    if key is None:
        return lengths
    with _LOCK:
        arr = _ON_DEVICE.get(key)
        if arr is None or arr.is_deleted():
            return lengths
        _ON_DEVICE.move_to_end(key)
        return arr


def remember(lengths: np.ndarray, like, arr: jax.Array | None = None) -> None:
    """Keep a device copy of the host values `lengths` for `on_device`: `arr` (computed on the device, placed as
    `on_device` would place them), or, without one, a copy made now if these values came before (call this after
    the step's launch)."""
    key, sharding, committed = _lengths_key(lengths, like)
    if key is None or (arr is not None and (arr.sharding != sharding or arr.committed != committed)):
        return
    with _LOCK:
        if key in _ON_DEVICE:
            return
        if arr is None:
            if _SEEN.pop(key, None) is None:
                _bounded(_SEEN, key, True)
                return
            arr = jax.device_put(lengths, sharding if committed else None)
        _bounded(_ON_DEVICE, key, arr)


def keep_step(sent: np.ndarray, reached: np.ndarray, reached_arr: jax.Array, like) -> None:
    """After a step's launch: keep the lengths its requests reach (`reached_arr`, computed on the device, whose host
    values are `reached`) for a decode loop's next call, and a copy of the lengths it was `sent` if they came before
    (for a repeat of the call)."""
    remember(reached, like, reached_arr)
    remember(sent, like)


def _bounded(memo: collections.OrderedDict, key, value) -> None:
    memo[key] = value
    while len(memo) > _MEMO_MAX:
        memo.popitem(last=False)


def bucket(n: int, minimum: int = 8) -> int:
    """Smallest m * 2**k >= n with m in {4, 5, 6, 7}: at most 25% padding, four sizes per octave."""
    n = max(int(n), minimum)
    k = max(n.bit_length() - 3, 0)
    while True:
        for m in (4, 5, 6, 7):
            if m << k >= n:
                return m << k
        k += 1


@dataclasses.dataclass(frozen=True)
class StepSizes:
    """Static shapes of one step (hashable: a jit static argument)."""

    num_tokens: int  # padded T
    num_blocks: int  # padded number of query blocks
    block_q: int  # tokens per query block
    kv_len: int  # cached positions attended (bucketed max(past + seq))
    kv_tokens: int = 0  # packed keys of all requests (bucketed sum(past + seq)); multi-token steps only


class RaggedMeta(NamedTuple):
    """Per-step indices; every array is int32 or bool and static in shape."""

    tok_slot: jax.Array  # [T] cache slot (= request index) of each packed token
    tok_pos: jax.Array  # [T] absolute position; `max_len` (out of bounds, so writes drop) for padding tokens
    tok_block: jax.Array  # [T] flat index of the token in the [num_blocks * block_q] block layout
    blk_slot: jax.Array  # [NB] slot each query block reads
    blk_tok: jax.Array  # [NB, Qb] packed-token index of each block row (0 for padding rows)
    blk_pos: jax.Array  # [NB, Qb] absolute position of each block row (causal limit)
    blk_valid: jax.Array  # [NB, Qb] row holds a real token


def ragged_metadata(seq_lens: jax.Array, past_lens: jax.Array, sizes: StepSizes, max_len: int) -> RaggedMeta:
    """Indices for packed tokens and request-aligned query blocks (see module docstring)."""
    seq_lens = jnp.asarray(seq_lens, jnp.int32)
    past_lens = jnp.asarray(past_lens, jnp.int32)
    num_req = seq_lens.shape[0]
    qb = sizes.block_q
    cu_tok = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(seq_lens)])
    t = jnp.arange(sizes.num_tokens, dtype=jnp.int32)
    # side="right" skips zero-length requests, whose start equals the next request's start.
    tok_slot = segment_of(cu_tok, t, num_req)
    tok_off = t - cu_tok[tok_slot]
    tok_valid = t < cu_tok[-1]
    tok_pos = jnp.where(tok_valid, past_lens[tok_slot] + tok_off, max_len)

    blocks = (seq_lens + qb - 1) // qb
    cu_blk = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(blocks)])
    j = jnp.arange(sizes.num_blocks, dtype=jnp.int32)
    blk_slot = segment_of(cu_blk, j, num_req)
    row_off = (j - cu_blk[blk_slot])[:, None] * qb + jnp.arange(qb, dtype=jnp.int32)[None, :]
    blk_valid = (j < cu_blk[-1])[:, None] & (row_off < seq_lens[blk_slot][:, None])
    blk_tok = jnp.where(blk_valid, cu_tok[blk_slot][:, None] + row_off, 0)
    blk_pos = jnp.where(blk_valid, past_lens[blk_slot][:, None] + row_off, 0)
    tok_block = (cu_blk[tok_slot] + tok_off // qb) * qb + tok_off % qb
    tok_block = jnp.where(tok_valid, tok_block, 0)
    return RaggedMeta(tok_slot, tok_pos, tok_block, blk_slot, blk_tok, blk_pos, blk_valid)


def _as_lengths(name: str, values) -> list[int]:
    """Host lengths as a list of Python ints, checked (a few requests: plain Python beats numpy's per-call costs)."""
    if type(values) in (list, tuple) and set(map(type, values)) <= {int}:
        vals = list(values)
    else:
        arr = np.asarray(values)
        if arr.ndim != 1:
            raise ValueError(f"{name} must be a 1-D sequence of lengths, got shape {arr.shape}")
        if arr.size and arr.dtype.kind not in "iu":
            raise ValueError(f"{name} must hold integers, got dtype {arr.dtype}")
        vals = arr.tolist()
    if vals and min(vals) < 0:
        raise ValueError(f"{name} must be >= 0, got {vals}")
    return vals


# plan()'s results by the lengths and cache sizes: a serving loop repeats a handful of shapes, and the checks and
# sizes cost ~80 us per call on an H100 machine's host (12 us on the CI host), on the critical path of every step
_PLANS: collections.OrderedDict = collections.OrderedDict()


def plan(seq_lens, past_lens, *, num_tokens: int, num_slots: int, max_len: int) -> tuple[np.ndarray, StepSizes]:
    """Validate a ragged step on the host and choose its static sizes.

    Returns `lengths` [2, num_slots] int32 (seq_lens and past_lens, padded with zero-length requests so that the
    request count never changes the compiled shape; one host-to-device copy; read-only: results are memoised by
    the lengths' values and the sizes) and the bucketed `StepSizes`.
    """
    seq, past = _as_lengths("seq_lens", seq_lens), _as_lengths("past_lens", past_lens)
    key = (tuple(seq), tuple(past), num_tokens, num_slots, max_len)
    with _LOCK:
        hit = _PLANS.get(key)
        if hit is not None:
            _PLANS.move_to_end(key)
            return hit
    planned = _plan(seq, past, num_tokens=num_tokens, num_slots=num_slots, max_len=max_len)
    planned[0].flags.writeable = False
    with _LOCK:
        _bounded(_PLANS, key, planned)
    return planned


def _plan(seq: list[int], past: list[int], *, num_tokens: int, num_slots: int,
          max_len: int) -> tuple[np.ndarray, StepSizes]:
    n = len(seq)
    if n != len(past):
        raise ValueError(f"seq_lens ({n}) and past_lens ({len(past)}) must have one entry per request")
    if n == 0:
        raise ValueError("empty batch: pass at least one request (zero-length requests are fine)")
    if n > num_slots:
        raise ValueError(
            f"{n} requests but the cache has {num_slots} slots: build it with init_cache(cfg, num_requests>={n}, ...)"
        )
    if sum(seq) != num_tokens:
        raise ValueError(f"x has {num_tokens} tokens but sum(seq_lens) = {sum(seq)}: pack the new tokens of every request in order")
    total = [s + p for s, p in zip(seq, past)]
    longest = max(total)
    if longest > max_len:
        i = next(i for i, t in enumerate(total) if t > max_len)
        raise ValueError(
            f"request {i} needs {total[i]} cache positions (past {past[i]} + new {seq[i]}) "
            f"but the cache holds {max_len}: build it with a larger max_len"
        )
    block_q = 1 if max(seq) <= 1 else 16
    num_tokens_pad = bucket(max(num_tokens, 1))
    # Rounding each request up to whole blocks adds at most one block per request, so the block count is a
    # function of the token bucket: one compiled program per (token bucket, block size, kv bucket).
    num_blocks = num_tokens_pad if block_q == 1 else -(-num_tokens_pad // block_q) + num_slots
    sizes = StepSizes(num_tokens=num_tokens_pad, num_blocks=num_blocks, block_q=block_q,
                      kv_len=min(bucket(longest, 16), max_len),
                      kv_tokens=0 if block_q == 1 else bucket(sum(total), 16))
    idle = [0] * (num_slots - n)
    return np.array([seq + idle, past + idle], np.int32), sizes
