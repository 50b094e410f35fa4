"""DeepSeek-V2/V3/R1 attention: HF tensor names -> jaxlm's MLA layout (the one mapping table for this model).

Every layout change happens here, once: transposes to `x @ W`, heads split out, the rope rows of q and k_pe
permuted from DeepSeek's interleaved pairs to the half-split order (when the checkpoint is interleaved), and
`kv_b_proj` split into the absorbed W_UK [N, P, L] and W_UV [N, L, V]. Model code never sees HF layouts.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from convert.safetensors_io import FP8_DTYPES, CheckpointError, SafetensorsCheckpoint, read_config
from jaxlm.layers import interleave_to_half_split
from jaxlm.mla import MLAConfig

PREFIX = "model.layers.{layer}.self_attn."


def _rope_perm(cfg: MLAConfig, rows: int) -> np.ndarray:
    """Row permutation for a block of `rows` rows whose last qk_rope_head_dim rows are rope dims."""
    r = cfg.qk_rope_head_dim
    perm = np.arange(rows)
    if cfg.rope_interleave:
        perm[rows - r :] = rows - r + interleave_to_half_split(r)
    return perm


def mapping(cfg: MLAConfig) -> dict[str, tuple[tuple[int, ...], Callable[[np.ndarray], dict[str, np.ndarray]]]]:
    """HF suffix -> (expected HF shape, transform to {our name: array}) for one layer's attention."""
    n, p, r, v, l, d = (cfg.num_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim,
                        cfg.kv_lora_rank, cfg.hidden_size)
    head_perm = _rope_perm(cfg, p + r)
    kv_a_perm = _rope_perm(cfg, l + r)

    def q_heads(w, fan_in):  # [N*(P+R), fan_in] -> [fan_in, N, P+R]
        return w.reshape(n, p + r, fan_in)[:, head_perm].transpose(2, 0, 1)

    def kv_b(w):
        w = w.reshape(n, p + v, l)
        return {"w_uk": w[:, :p, :], "w_uv": w[:, p:, :].transpose(0, 2, 1)}

    table = {
        "kv_a_proj_with_mqa.weight": ((l + r, d), lambda w: {"kv_a_proj_with_mqa": w[kv_a_perm].T}),
        "kv_a_layernorm.weight": ((l,), lambda w: {"kv_a_layernorm": w}),
        "kv_b_proj.weight": ((n * (p + v), l), kv_b),
        "o_proj.weight": ((d, n * v), lambda w: {"o_proj": w.T.reshape(n, v, d)}),
    }
    if cfg.q_lora_rank is None:
        table["q_proj.weight"] = ((n * (p + r), d), lambda w: {"q_proj": q_heads(w, d)})
    else:
        q = cfg.q_lora_rank
        table["q_a_proj.weight"] = ((q, d), lambda w: {"q_a_proj": w.T})
        table["q_a_layernorm.weight"] = ((q,), lambda w: {"q_a_layernorm": w})
        table["q_b_proj.weight"] = ((n * (p + r), q), lambda w: {"q_b_proj": q_heads(w, q)})
    if cfg.attention_bias:
        table["kv_a_proj_with_mqa.bias"] = ((l + r,), lambda b: {"kv_a_proj_with_mqa_bias": b[kv_a_perm]})
        table["o_proj.bias"] = ((d,), lambda b: {"o_proj_bias": b})
        if cfg.q_lora_rank is not None:
            table["q_a_proj.bias"] = ((cfg.q_lora_rank,), lambda b: {"q_a_proj_bias": b})
    return table




def _block_size(hf_config: dict) -> tuple[int, int]:
    qc = hf_config.get("quantization_config") or {}
    bm, bn = qc.get("weight_block_size") or (128, 128)
    return int(bm), int(bn)


def _check_tensors(ckpt: SafetensorsCheckpoint, cfg: MLAConfig, layer: int, table) -> None:
    """Every tensor present with the shape config.json implies; problems are collected and raised together."""
    prefix = PREFIX.format(layer=layer)
    problems = []
    for suffix, (shape, _) in table.items():
        name = prefix + suffix
        if name not in ckpt:
            problems.append(f"missing tensor {name}")
        elif ckpt.shape(name) != shape:
            problems.append(f"tensor {name} has shape {ckpt.shape(name)}, config.json implies {shape}")
        elif ckpt.dtype(name).kind not in "fV" and ckpt.dtype(name) not in FP8_DTYPES:
            problems.append(f"tensor {name} has non-float dtype {ckpt.dtype(name)}")
    gate = prefix + "gate_proj.weight"
    n_v = cfg.num_heads * cfg.v_head_dim
    if gate in ckpt and ckpt.shape(gate) != (n_v, cfg.hidden_size):
        problems.append(f"tensor {gate} has shape {ckpt.shape(gate)}, expected {(n_v, cfg.hidden_size)}")
    if problems:
        raise CheckpointError(f"{ckpt.directory}, layer {layer}:\n  " + "\n  ".join(problems))


def layer_params(ckpt: SafetensorsCheckpoint, hf_config: dict, cfg: MLAConfig, layer: int, dtype) -> dict[str, np.ndarray]:
    """Read, dequantise, check and re-lay-out one layer's attention tensors; errors are collected and raised together."""
    prefix = PREFIX.format(layer=layer)
    block = _block_size(hf_config)
    table = mapping(cfg)
    _check_tensors(ckpt, cfg, layer, table)
    gate = prefix + "gate_proj.weight"
    out: dict[str, np.ndarray] = {}
    for suffix, (_, transform) in table.items():
        for key, value in transform(ckpt.read_float(prefix + suffix, block)).items():
            out[key] = np.ascontiguousarray(value).astype(dtype)
    if gate in ckpt:
        w = ckpt.read_float(gate, block)
        out["gate_proj"] = np.ascontiguousarray(w.T.reshape(cfg.hidden_size, cfg.num_heads, cfg.v_head_dim)).astype(dtype)
    return out


def fp8_block(hf_config: dict) -> int:
    """The square weight block of an FP8 checkpoint (128 for DeepSeek); keep_fp8 needs square blocks."""
    bm, bn = _block_size(hf_config)
    if bm != bn or bm < 16 or bm & (bm - 1):
        raise CheckpointError(f"keep_fp8 needs square power-of-two weight blocks >= 16, config.json has {bm}x{bn}; "
                              "load without keep_fp8 to dequantise")
    return bm


FP8_PROJECTIONS = {"q_proj.weight": "q_proj", "q_a_proj.weight": "q_a_proj", "q_b_proj.weight": "q_b_proj",
                   "kv_a_proj_with_mqa.weight": "kv_a_proj_with_mqa", "o_proj.weight": "o_proj"}


def fp8_layer_params(ckpt: SafetensorsCheckpoint, hf_config: dict, cfg: MLAConfig, layer: int, dtype) -> dict:
    """One layer with its projections kept FP8 (`Fp8Weight`: e4m3 rows [out, in] + float32 block scales), in the
    layout `jaxlm.mla` runs on FP8: the checkpoint's bytes as stored, except
    - rope rows of q_b / q_proj / kv_a go to half-split order. A row that stays inside its 128-row scale block
      (every DeepSeek V2/V3/R1 size: each head's 64 rope rows and kv_a's rows 512-575 sit in one block) keeps its
      bytes and scale; a layout where a move would cross a block (only small test sizes) is re-quantised from the
      dequantised values on the same block grid;
    - kv_b_proj is split per head into W_UK [N, P, L] and W_UV [N, V, L]. With P and V multiples of the block
      (R1: 128 and 128) the scales split with them, exactly; otherwise each head part is re-quantised on its own
      head-aligned blocks.
    kv_a's 576 rows end in a partial block (rows 512-575 share scale row 4): kept as is, the kernel reads the
    partial block's scale like any other. Norms, biases and the gate come in `dtype`."""
    from pallas_kernels.fp8_matmul import Fp8Weight, dequantize, quantize

    prefix = PREFIX.format(layer=layer)
    block = fp8_block(hf_config)
    table = mapping(cfg)
    _check_tensors(ckpt, cfg, layer, table)

    def raw(suffix):
        name = prefix + suffix
        if ckpt.dtype(name) != np.dtype(ml_dtypes.float8_e4m3fn):
            raise CheckpointError(f"{name} is {ckpt.dtype(name)}, not float8_e4m3fn: keep_fp8 needs an FP8 e4m3 "
                                  "checkpoint (load without it to use this one)")
        if name + "_scale_inv" not in ckpt:
            raise CheckpointError(f"{ckpt.directory}: FP8 tensor {name!r} has no weight_scale_inv")
        w, s = np.asarray(ckpt.read(name)), np.asarray(ckpt.read(name + "_scale_inv"), np.float32)
        grid = (-(-w.shape[0] // block), -(-w.shape[1] // block))
        if s.shape != grid:
            raise CheckpointError(f"{name}: weight {w.shape} with {block}x{block} blocks needs weight_scale_inv of "
                                  f"shape {grid}, got {s.shape}")
        return w, s

    def fp8(w, s):
        return Fp8Weight(jnp.asarray(w), jnp.asarray(s, jnp.float32), block=block)

    def requantized(wf):
        q, s = quantize(wf, block)
        return fp8(np.asarray(q), np.asarray(s))

    def permuted_rows(w, s, perm):
        rows = np.arange(len(perm))
        if (perm // block == rows // block).all():  # stays in its scale block: bytes and scales unchanged
            return fp8(w[perm], s)
        return requantized(np.asarray(dequantize(w, s, block))[perm])

    n, p, r, v, l = cfg.num_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    head_perm = _rope_perm(cfg, p + r)
    q_perm = (np.arange(n)[:, None] * (p + r) + head_perm[None]).reshape(-1)
    out: dict = {}
    for suffix, name in FP8_PROJECTIONS.items():
        if suffix not in table:
            continue
        w, s = raw(suffix)
        perm = {"q_proj": q_perm, "q_b_proj": q_perm, "kv_a_proj_with_mqa": _rope_perm(cfg, l + r)}.get(name)
        out[name] = fp8(w, s) if perm is None else permuted_rows(w, s, perm)
    w, s = raw("kv_b_proj.weight")
    if p % block == 0 and v % block == 0:
        w3, s3 = w.reshape(n, p + v, l), s.reshape(n, (p + v) // block, -1)
        out["w_uk"], out["w_uv"] = fp8(w3[:, :p], s3[:, : p // block]), fp8(w3[:, p:], s3[:, p // block :])
    else:
        wf = np.asarray(dequantize(w, s, block)).reshape(n, p + v, l)
        out["w_uk"], out["w_uv"] = requantized(wf[:, :p]), requantized(wf[:, p:])
    for suffix, (_, transform) in table.items():  # the float tensors: norms and biases
        if suffix in FP8_PROJECTIONS or suffix == "kv_b_proj.weight":
            continue
        for key, value in transform(ckpt.read_float(prefix + suffix)).items():
            out[key] = jnp.asarray(np.ascontiguousarray(value).astype(dtype))
    gate = prefix + "gate_proj.weight"
    if gate in ckpt:
        g = ckpt.read_float(gate, (block, block)).T.reshape(cfg.hidden_size, n, v)
        out["gate_proj"] = jnp.asarray(np.ascontiguousarray(g).astype(dtype))
    return out


def default_dtype(ckpt: SafetensorsCheckpoint, cfg: MLAConfig, layer: int) -> np.dtype:
    """The checkpoint's float dtype; bfloat16 for FP8 checkpoints."""
    dt = ckpt.dtype(PREFIX.format(layer=layer) + "o_proj.weight")
    if dt in FP8_DTYPES:
        return np.dtype(ml_dtypes.bfloat16)
    return dt


def resolve_dtype(dtype) -> np.dtype | None:
    if dtype is None:
        return None
    try:
        return np.dtype(jnp.dtype(dtype))
    except TypeError as e:
        raise ValueError(f"unknown dtype {dtype!r}: use float32, bfloat16 or float16") from e


def open_checkpoint(hf_dir) -> tuple[dict, MLAConfig, SafetensorsCheckpoint]:
    hf_config = read_config(hf_dir)
    cfg = MLAConfig.from_hf(hf_config)
    return hf_config, cfg, SafetensorsCheckpoint(hf_dir)


def check_layer(hf_config: dict, layer: int) -> None:
    num_layers = hf_config.get("num_hidden_layers")
    if not isinstance(layer, int) or layer < 0 or (num_layers is not None and layer >= num_layers):
        raise ValueError(f"layer {layer!r} out of range: the checkpoint has decoder layers 0..{num_layers - 1}")


def load_layer(hf_dir, layer: int, *, dtype=None, keep_fp8: bool = False) -> tuple[MLAConfig, dict]:
    """`jaxlm.mla.load_layer`: (cfg, params as jax arrays) for decoder layer `layer` of an HF directory."""
    hf_config, cfg, ckpt = open_checkpoint(Path(hf_dir))
    check_layer(hf_config, layer)
    dt = resolve_dtype(dtype) or default_dtype(ckpt, cfg, layer)
    if keep_fp8:
        return cfg, fp8_layer_params(ckpt, hf_config, cfg, layer, dt)
    params = layer_params(ckpt, hf_config, cfg, layer, dt)
    return cfg, {k: jnp.asarray(v) for k, v in params.items()}
