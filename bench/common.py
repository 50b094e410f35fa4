"""Shared by the benchmark scripts: the commit a run measured and the copy-bandwidth ceiling."""

from __future__ import annotations

import os
import subprocess

import jax
import jax.numpy as jnp

from jaxlm.seed import median_ms


def commit() -> str:
    """$JAXLM_COMMIT (set it on the device, which gets no .git), else `git rev-parse --short HEAD`."""
    if os.environ.get("JAXLM_COMMIT"):
        return os.environ["JAXLM_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def copy_bandwidth() -> float:
    """Device-to-device copy rate in bytes/s (read + write) over a 2 GiB buffer."""
    x = jnp.ones((1 << 30,), jnp.bfloat16)
    f = jax.jit(lambda a: a * 1)
    f(x).block_until_ready()
    return 2 * x.nbytes / (median_ms(lambda: f(x).block_until_ready(), 3, 20) / 1e3)
