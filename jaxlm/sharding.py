"""Tensor and data parallelism on JAX's own SPMD machinery: a (dp, tp) mesh, one partition table per model, and
`per_device` for running Pallas kernels inside `shard_map`.

The tables below are the single statement of how every parameter and cache is laid out over the mesh:

MLA (DeepSeek-R1 attention): the 128 heads are split over `tp` for q_b (or q_proj), W_UK, W_UV, the gate and o_proj
(row-parallel: one reduction over `tp` after o_proj); the latent projections q_a / kv_a and their norms are
replicated (every head needs the whole latent); kv_cache and pe_cache are shared by all heads, so replicated over
`tp` and split over `dp` by request slot.

Qwen3-VL: attention heads (q/o) and KV heads (k/v, replicated when tp does not divide their count, e.g. tp > 8 for
the 2B model's 8 KV heads) over `tp`; MLP gate/up columns and down rows over `tp`; the embedding and lm_head over the
vocabulary; the KV cache over `dp` (batch) and `tp` (KV heads, as k/v); the vision encoder replicated.

Anything sharded is split only where the size divides the axis; otherwise that dimension stays replicated, so
every (tp, dp) runs and the tables never produce an uneven layout. jit (GSPMD) inserts the collectives the layout
implies; Pallas kernels are not partitioned by XLA and run per device through `per_device`.

Multi-host: call `jax.distributed.initialize()` in each process (one per host) before anything else; `make_mesh`
then spans `jax.devices()`, all hosts' GPUs, and the same code path runs.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, Callable

import jax
import jax.extend.backend
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DP, TP = "dp", "tp"


def make_mesh(tp: int = 1, dp: int | None = None, devices=None) -> Mesh:
    """A (dp, tp) mesh: `tp` devices share each model copy (tensor parallel), `dp` copies take different requests.
    `dp` defaults to the devices left over (len(devices) // tp)."""
    devices = list(jax.devices() if devices is None else devices)
    if tp < 1 or (dp is not None and dp < 1):
        raise ValueError(f"tp and dp must be >= 1, got tp={tp}, dp={dp}")
    dp = len(devices) // tp if dp is None else dp
    if dp < 1 or dp * tp > len(devices):
        raise ValueError(f"a mesh of dp={dp} x tp={tp} needs {max(dp, 1) * tp} devices, but {len(devices)} are "
                         f"visible ({jax.default_backend()}); lower --tp, or on CPU set "
                         "XLA_FLAGS=--xla_force_host_platform_device_count=N before JAX starts")
    return jax.make_mesh((dp, tp), (DP, TP), axis_types=(AxisType.Auto, AxisType.Auto), devices=devices[: dp * tp])


def fit_spec(spec: P, shape, mesh) -> P:
    """`spec` with axes the mesh lacks, or that do not divide their dimension, replaced by None (replicated)."""
    sizes = {} if mesh is None or mesh.empty else dict(zip(mesh.axis_names, mesh.axis_sizes))
    out = []
    for dim, axis in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        out.append(axis if axis in sizes and dim % sizes[axis] == 0 else None)
    return P(*out)


# ---------------------------------------------------------------------------------------------------------- tables
def mla_param_specs(cfg) -> dict[str, P]:
    """MLA parameter name -> PartitionSpec (our layout, jaxlm/mla.py)."""
    heads = P(None, TP, None)  # [in, N, out]
    return {
        "q_proj": heads, "q_a_proj": P(), "q_a_proj_bias": P(), "q_a_layernorm": P(), "q_b_proj": heads,
        "kv_a_proj_with_mqa": P(), "kv_a_proj_with_mqa_bias": P(), "kv_a_layernorm": P(),
        "w_uk": P(TP, None, None), "w_uv": P(TP, None, None), "gate_proj": heads,
        "o_proj": P(TP, None, None), "o_proj_bias": P(),
    }


MLA_CACHE = P(DP, None, None)  # kv_cache [slots, S, L], pe_cache [slots, S, R]
MLA_CACHE_SCALE = P(DP, None)  # kv_scale [slots, S] of an int8 kv_cache


def qwen3_vl_text_specs(cfg, mesh) -> dict[str, Any]:
    """Qwen3-VL text parameter tree -> PartitionSpecs (q/k/v columns are heads x head_dim; k/v split only when tp
    divides the KV heads, so no device holds part of a head)."""
    kv = kv_head_axis(cfg, mesh)
    layer = {"input_norm": P(), "post_norm": P(), "q_norm": P(), "k_norm": P(),
             "q_w": P(None, TP), "k_w": P(None, kv), "v_w": P(None, kv), "o_w": P(TP, None),
             "gate_w": P(None, TP), "up_w": P(None, TP), "down_w": P(TP, None)}
    return {"embed": P(TP, None), "lm_head": P(None, TP), "norm": P(), "layers": [layer] * cfg.num_layers}


def qwen3_vl_cache_spec(cfg, mesh) -> P:
    """Each layer's k / v cache [B, S, K, H]: batch over dp, KV heads over tp when tp divides them."""
    return P(DP, None, kv_head_axis(cfg, mesh), None)


def kv_head_axis(cfg, mesh) -> str | None:
    """TP when tp divides the KV heads (each device then holds whole KV heads and their query heads), else None
    (KV heads replicated): the one rule behind Qwen3-VL's k/v weights, its KV cache and its attention kernel."""
    return TP if cfg.num_kv_heads % axis_size(mesh, TP) == 0 else None


def qwen3_vl_specs(cfg, mesh) -> dict[str, Any]:
    """The whole Qwen3-VL parameter tree ({"text", "vision"}): the vision encoder replicated."""
    return {"text": qwen3_vl_text_specs(cfg.text, mesh), "vision": P()}


def axis_size(mesh, name: str) -> int:
    """Size of mesh axis `name` (1 when the mesh is None or lacks it)."""
    if mesh is None or mesh.empty:  # no mesh, or an empty context mesh
        return 1
    return dict(zip(mesh.axis_names, mesh.axis_sizes)).get(name, 1)


# ------------------------------------------------------------------------------------------------------ placement
def shard(tree, specs, mesh: Mesh):
    """Place every array of `tree` on `mesh` by the matching PartitionSpec of `specs` (same structure, or a dict with
    at least `tree`'s keys). Works single- and multi-process: each process supplies its addressable shards."""
    def place(x, spec):
        spec = fit_spec(spec, x.shape, mesh)
        sharding = NamedSharding(mesh, spec)
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    def walk(x, spec, path):
        if isinstance(spec, P):  # one spec for a whole subtree (e.g. the replicated vision encoder)
            return jax.tree.map(lambda leaf: place(leaf, spec), x)
        if isinstance(x, dict):
            unknown = sorted(set(x) - set(spec))
            if unknown:
                raise ValueError(f"no partition rule for parameter(s) {[path + k for k in unknown]}: add them to the "
                                 "tables in jaxlm/sharding.py")
            return {k: walk(v, spec[k], f"{path}{k}.") for k, v in x.items()}
        return [walk(v, s, f"{path}{i}.") for i, (v, s) in enumerate(zip(x, spec))]

    return walk(tree, specs, "")


def shard_mla(params, cfg, mesh: Mesh):
    """MLA params (jaxlm.mla layout) placed on `mesh` by `mla_param_specs`; the heads must divide over tp."""
    if any(not hasattr(v, "ndim") for v in params.values()):
        raise ValueError("FP8 (Fp8Weight) MLA params are not sharded yet: load with keep_fp8=False for tp/dp > 1")
    if cfg.num_heads % axis_size(mesh, TP):
        raise ValueError(f"tp={axis_size(mesh, TP)} does not divide the {cfg.num_heads} attention heads: pick a tp "
                         "that does (R1's 128 heads: 1, 2, 4, 8, ...)")
    return shard(params, mla_param_specs(cfg), mesh)


def cache_sharding(spec: P, shape, mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, fit_spec(spec, shape, mesh))


@functools.cache
def _one_device_per_backend() -> bool:
    """Whether every backend of this process has a single device: then no array lies on a multi-device mesh."""
    return all(backend.device_count() == 1 for backend in jax.extend.backend.backends().values())


def mesh_of(tree) -> Mesh | None:
    """The mesh the arrays of `tree` are laid out on (the first NamedSharding found), or None. On a one-device
    machine none without looking (every step asks: walking a layer's leaves costs ~35 us on an H100 machine's host)."""
    if _one_device_per_backend():
        return None
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding) and math.prod(sharding.mesh.axis_sizes) > 1:
            return sharding.mesh
    return None


def use(mesh: Mesh | None):
    """Context manager: `jax.set_mesh(mesh)`, or nothing when `mesh` is None or a context mesh is already set."""
    if mesh is None or not jax.sharding.get_abstract_mesh().empty:
        return contextlib.nullcontext()
    return jax.set_mesh(mesh)


def per_device(fn: Callable, in_specs, out_specs) -> Callable:
    """`fn` run on each device's shards (`jax.shard_map` over the context mesh) when a mesh is in use, else `fn`.
    Specs name mesh axes; axes the mesh lacks are dropped. Pallas kernels go through here: XLA cannot partition
    them, so without shard_map they would run on gathered, replicated operands."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or math.prod(mesh.axis_sizes) == 1:
        return fn
    names = set(mesh.axis_names)

    def keep(spec):
        return P(*(a if a in names else None for a in spec))

    fix = lambda specs: jax.tree.map(keep, specs, is_leaf=lambda s: isinstance(s, P))  # noqa: E731
    return jax.shard_map(fn, mesh=mesh, in_specs=fix(in_specs), out_specs=fix(out_specs), check_vma=False)


def replicated(fn: Callable) -> Callable:
    """`fn` run whole on every device (replicated operands and results) when a mesh is in use: for kernels on
    replicated data, e.g. the vision encoder's attention."""
    return per_device(fn, P(), P())


def sum_over(x, name: str):
    """x summed over mesh axis `name` inside `per_device` (x itself when the mesh lacks it)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or name not in mesh.axis_names:
        return x
    return jax.lax.psum(x, name)


def axis_index(name: str):
    """This device's index along mesh axis `name` inside `per_device` (0 when the mesh lacks it)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or name not in mesh.axis_names:
        return 0
    return jax.lax.axis_index(name)
