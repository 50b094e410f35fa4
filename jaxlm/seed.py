"""The seed's MLA cases (InfiniLM attention-test constants) and their timing, shared by `jaxlm demo` and bench/.

Prefill: seq_lens [64, 128, 256, 256] on past_lens [512, 0, 0, 256]. Decode: 16 one-token requests on
past_lens 50/100/200/400 (x4 each), 100 steps. Both InfiniLM timing conventions are reported: the whole batch
in one step, and the upstream "average TTFT" where requests run one after another and each is timed from the
start of the batch ((4 t1 + 3 t2 + 2 t3 + t4) / 4 for four requests).
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import mla

PREFILL_SEQ = [64, 128, 256, 256]
PREFILL_PAST = [512, 0, 0, 256]
DECODE_PAST = [50] * 4 + [100] * 4 + [200] * 4 + [400] * 4
DECODE_STEPS = 100


def median_ms(fn, warmup: int, runs: int) -> float:
    """Median wall time of `fn()` in ms; `fn` must block until its device work is done."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _filled_cache(params, cfg, past, max_len, dtype, rng):
    cache = mla.init_cache(cfg, len(past), max_len, dtype)
    x = jnp.asarray(rng.standard_normal((sum(past), cfg.hidden_size)), dtype)
    return mla.forward(params, cfg, x, cache, past, [0] * len(past))[1]


def prefill_inputs(params, cfg, *, dtype=jnp.bfloat16, seed=0):
    """The seed prefill case's inputs: hidden states x [sum(PREFILL_SEQ), hidden] and a cache holding the histories."""
    rng = np.random.default_rng(seed)
    max_len = max(p + s for p, s in zip(PREFILL_PAST, PREFILL_SEQ))
    cache = _filled_cache(params, cfg, PREFILL_PAST, max_len, dtype, rng)
    return jnp.asarray(rng.standard_normal((sum(PREFILL_SEQ), cfg.hidden_size)), dtype), cache


def prefill_call(params, cfg, *, dtype=jnp.bfloat16, seed=0, mode="absorbed"):
    """The seed prefill case as a function: (call, x, state); call() runs the batched `forward` once and returns y
    without waiting for it. The cache is donated, so it lives in state["cache"], carried from call to call."""
    x, cache = prefill_inputs(params, cfg, dtype=dtype, seed=seed)
    state = {"cache": cache}

    def call():
        y, state["cache"] = mla.forward(params, cfg, x, state["cache"], PREFILL_SEQ, PREFILL_PAST, mode=mode)
        return y

    return call, x, state


def prefill(params, cfg, *, dtype=jnp.bfloat16, warmup=10, runs=100, seed=0, mode="absorbed") -> dict:
    """Time the seed prefill case; returns batch_ms, ttft_ms, compile_s and the output of the batched call."""
    call, x, state = prefill_call(params, cfg, dtype=dtype, seed=seed, mode=mode)

    def batch():
        return call().block_until_ready()

    t0 = time.perf_counter()
    y = batch()
    compile_s = time.perf_counter() - t0
    batch_ms = median_ms(batch, warmup, runs)

    starts = np.concatenate([[0], np.cumsum(PREFILL_SEQ)])
    n = len(PREFILL_SEQ)

    def one(i):  # request i alone, in its own slot
        seq = [0] * n
        seq[i] = PREFILL_SEQ[i]
        out, state["cache"] = mla.forward(params, cfg, x[starts[i] : starts[i + 1]], state["cache"], seq,
                                          PREFILL_PAST, mode=mode)
        out.block_until_ready()

    for i in range(n):
        one(i)  # compile
    ttfts = []
    for r in range(warmup + runs):
        t0 = time.perf_counter()
        done = []
        for i in range(n):
            one(i)
            done.append(time.perf_counter() - t0)
        if r >= warmup:
            ttfts.append(sum(done) / n)
    return {"batch_ms": batch_ms, "ttft_ms": 1e3 * statistics.median(ttfts), "compile_s": compile_s,
            "tokens": int(sum(PREFILL_SEQ)), "y": y}


def decode(params, cfg, *, dtype=jnp.bfloat16, steps=DECODE_STEPS, runs=5, seed=0, mode="absorbed",
           attention_impl=None) -> dict:
    """Time the seed decode case: `steps` calls of `forward` (per jitted call, as a user makes it) and the
    same steps inside one `decode_steps` call; returns step_ms, loop_step_ms and tokens/s."""
    rng = np.random.default_rng(seed)
    b = len(DECODE_PAST)
    max_len = max(DECODE_PAST) + steps
    xs = jnp.asarray(rng.standard_normal((steps, b, cfg.hidden_size)), dtype)
    x_steps = list(xs)  # split once, outside the timed loop: each step's input is its own array
    base = _filled_cache(params, cfg, DECODE_PAST, max_len, dtype, rng)
    state = {}

    def per_call():
        cache = jax.tree.map(jnp.copy, base)
        jax.block_until_ready(cache)
        t0 = time.perf_counter()
        for i in range(steps):
            y, cache = mla.forward(params, cfg, x_steps[i], cache, [1] * b, [p + i for p in DECODE_PAST], mode=mode,
                                   attention_impl=attention_impl)
        y.block_until_ready()
        return time.perf_counter() - t0

    def in_loop():
        cache = jax.tree.map(jnp.copy, base)
        jax.block_until_ready(cache)
        t0 = time.perf_counter()
        ys, cache = mla.decode_steps(params, cfg, xs, cache, DECODE_PAST, mode=mode, attention_impl=attention_impl)
        ys.block_until_ready()
        state["ys"] = ys
        return time.perf_counter() - t0

    t0 = time.perf_counter()
    per_call(), in_loop()
    compile_s = time.perf_counter() - t0
    call_s = statistics.median(per_call() for _ in range(runs))
    loop_s = statistics.median(in_loop() for _ in range(runs))
    return {"step_ms": 1e3 * call_s / steps, "loop_step_ms": 1e3 * loop_s / steps,
            "tokens_per_s": b * steps / call_s, "loop_tokens_per_s": b * steps / loop_s,
            "compile_s": compile_s, "ys": state["ys"]}
