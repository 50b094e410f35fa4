"""The MLA layer's projections: each weight as a float einsum in our layout, or as an `Fp8Weight` (e4m3 HF rows
[out, in] with float32 scales per 128 x 128 block) through the FP8 kernels (`pallas_kernels.fp8_matmul` on the Pallas
path, its jnp reference with impl "xla"), and the conversions between the two parameter forms (`quantize_fp8`,
`dequantize_fp8`). Shapes: T tokens, D model, N heads, P nope, V value, L kv_lora.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import pallas_kernels
from jaxlm.mla_config import MLAConfig
from pallas_kernels.fp8_matmul import Fp8Weight

Params = dict[str, jax.Array]


# Projections whose activations are also quantised to FP8 at prefill sizes (>= 128 tokens; below that every FP8
# weight is multiplied with bf16 activations). Each FP8-activation stage costs about 5e-4 of output cosine against
# the dequantised bf16 layer (measured on Gaussian inputs: all four projections 0.9980, o_proj alone 0.9994, none
# 0.9998), so only o_proj, the largest GEMM (69% of the projection FLOPs at R1 sizes), runs FP8 x FP8; W_UK / W_UV
# stay bf16 x FP8-weight as in DeepSeek's reference, which dequantises wkv_b for the absorbed path.
FP8_ACTIVATIONS = ("o_proj",)


def quantize_fp8(params: Params, cfg: MLAConfig, block: int = 128) -> Params:
    """Float params (our layout) -> the FP8 layout that `load_layer(..., keep_fp8=True)` reads from a checkpoint:
    each projection as an Fp8Weight in HF row order [out, in] (per head for W_UK [N, P, L] / W_UV [N, V, L]), one
    float32 scale per `block` x `block` block; norms, biases and the gate stay as they are. For benchmarks and for
    running a bf16 layer in FP8."""
    from pallas_kernels.fp8_matmul import quantize

    n = cfg.num_heads
    rows = {  # our layout -> HF rows [out, in]
        "q_proj": lambda w: w.reshape(w.shape[0], -1).T, "q_a_proj": lambda w: w.T,
        "q_b_proj": lambda w: w.reshape(w.shape[0], -1).T, "kv_a_proj_with_mqa": lambda w: w.T,
        "w_uk": lambda w: w, "w_uv": lambda w: w.transpose(0, 2, 1),
        "o_proj": lambda w: w.reshape(n * cfg.v_head_dim, -1).T,
    }
    out = dict(params)
    for name, to_rows in rows.items():
        if name in params and not isinstance(params[name], Fp8Weight):
            out[name] = Fp8Weight(*quantize(to_rows(params[name]), block), block=block)
    return out


def dequantize_fp8(params: Params, cfg: MLAConfig, dtype=jnp.bfloat16) -> Params:
    """FP8 params -> float params in our layout holding exactly the dequantised values (what `load_layer` without
    keep_fp8 gives for the same checkpoint)."""
    from pallas_kernels.fp8_matmul import dequantize

    n, p, r, v = cfg.num_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    layout = {  # HF rows [out, in] -> our layout
        "q_proj": lambda w: w.T.reshape(w.shape[1], n, p + r), "q_a_proj": lambda w: w.T,
        "q_b_proj": lambda w: w.T.reshape(w.shape[1], n, p + r), "kv_a_proj_with_mqa": lambda w: w.T,
        "w_uk": lambda w: w, "w_uv": lambda w: w.transpose(0, 2, 1), "o_proj": lambda w: w.T.reshape(n, v, -1),
    }
    return {k: (layout[k](dequantize(w.w, w.scale, w.block)).astype(dtype) if isinstance(w, Fp8Weight) else w)
            for k, w in params.items()}


def _fp8(x, w: Fp8Weight, impl: str, transpose_w: bool = True, activations: str = "auto"):
    """The block-scaled FP8 matmul: the Pallas kernel, or with impl == "xla" its jnp reference (dequantises)."""
    fn = pallas_kernels.fp8_matmul if impl == "pallas" else pallas_kernels.fp8_matmul_reference
    return fn(x, w.w, w.scale, block=w.block, transpose_w=transpose_w, activations=activations)


def linear(x, params, name, spec, impl, heads: int | None = None, with_done: bool = False):
    """x [T, ...] through weight `name` (+ its bias): einsum `spec` for a float weight in our layout; for an
    Fp8Weight (HF rows [out, in]) the FP8 kernel on x flattened to [T, in], output split into `heads` if given.
    with_done: returns (y, done), done what the launch wrote (an FP8 weight on the Pallas path: its split-K parts,
    `fp8_matmul_parts`, which y adds up; else y): a later launch that takes `done` as an operand runs after this one,
    and y's sum is computed only by y's own consumers, not once more to be carried (decode_steps' o_proj)."""
    w = params[name]
    done = None
    if isinstance(w, Fp8Weight):
        x2, act = x.reshape(x.shape[0], -1), "auto" if name in FP8_ACTIVATIONS else "bf16"
        if with_done and impl == "pallas":
            done = pallas_kernels.fp8_matmul_parts(x2, w.w, w.scale, block=w.block, activations=act)
            y = pallas_kernels.sum_parts(done, x.dtype)
        else:
            y = _fp8(x2, w, impl, activations=act)
        y = y if heads is None else y.reshape(y.shape[0], heads, -1)
    else:
        y = jnp.einsum(spec, x, w)
    bias = params.get(name + "_bias")
    y = y if bias is None else y + bias
    return (y, y if done is None else done) if with_done else y


def fp8_together(params, names_specs, impl) -> bool:
    """Whether weights that share x ((name, einsum spec), ...) can go to the FP8 kernels as one call: the Pallas
    path, every weight FP8 with one block size, bf16 activations for all."""
    ws = [params[name] for name, _ in names_specs]
    return (impl == "pallas" and all(isinstance(w, Fp8Weight) and w.block == ws[0].block for w in ws)
            and not any(name in FP8_ACTIVATIONS for name, _ in names_specs))


def linears_of_x(x, params, names_specs, impl):
    """x [T, D] through several weights that all take it ((name, einsum spec), ...): with FP8 weights on the Pallas
    path one fp8_matmuls call (a single weight-only launch at decode sizes), else `linear` each. XLA's dot merger
    would run those GEMMs as one on the weights concatenated anew at every call (a copy of both: 19 us at the seed
    prefill on an H100, more than the launch it saves), so each GEMM after the first gets x through an optimization
    barrier."""
    ws = [params[name] for name, _ in names_specs]
    if fp8_together(params, names_specs, impl):
        ys = pallas_kernels.fp8_matmuls(x, [w.w for w in ws], [w.scale for w in ws], block=ws[0].block,
                                        activations="bf16")
        return [y if params.get(name + "_bias") is None else y + params[name + "_bias"]
                for y, (name, _) in zip(ys, names_specs)]
    return [linear(x if i == 0 else jax.lax.optimization_barrier(x), params, name, spec, impl)
            for i, (name, spec) in enumerate(names_specs)]


def absorb_uk(q, params, impl):
    """q_nope [T, N, P] (or the leading P columns of a wider q) -> q_latent [T, N, L] = q_nope . W_UK per head."""
    w = params["w_uk"]
    if isinstance(w, Fp8Weight):  # rows [N, P, L]: contract the P rows (the FP8 kernel reads q's window in place)
        return _fp8(q, w, impl, transpose_w=False, activations="bf16")
    return jnp.einsum("tnp,npl->tnl", q[..., : w.shape[1]], w)


def expand_uv(o_lat, params, impl):
    """o_latent [T, N, L] -> [T, N, V] through W_UV per head."""
    w = params["w_uv"]
    if isinstance(w, Fp8Weight):  # rows [N, V, L]
        return _fp8(o_lat, w, impl, activations="bf16")
    return jnp.einsum("tnl,nlv->tnv", o_lat, w)


def _from_latent(kv, w, spec: str, impl):
    """Latent rows [..., L] -> per head [..., N, X] through W_UK [N, P, L] or W_UV [N, L, V] (`spec`, the einsum of
    a float weight in our layout); an Fp8Weight (HF rows [N, X, L]) through the FP8 kernel on the rows flattened."""
    if isinstance(w, Fp8Weight):
        y = _fp8(kv.reshape(-1, kv.shape[-1]), w, impl, activations="bf16")
        return y.reshape(*kv.shape[:-1], *y.shape[1:])
    return jnp.einsum(spec, kv, w)


_UK, _UV = "...l,npl->...np", "...l,nlv->...nv"  # W_UK / W_UV einsums of a latent row (float weights)


def k_nope_of(kv, w_uk, impl):
    """Latent rows [..., L] -> per-head K_nope [..., N, P] through W_UK."""
    return _from_latent(kv, w_uk, _UK, impl)


def up_project(kv, params, impl):
    """Cached latent [..., L] -> per-head K_nope [..., N, P] and V [..., N, V] (the naive / prefill form).
    The two GEMMs share their input; XLA's dot merger would run them as one GEMM whose output halves it then copies
    out (0.07 ms at the seed prefill on an H100): V's input goes through an optimization barrier, so each GEMM
    writes its own buffer."""
    return (k_nope_of(kv, params["w_uk"], impl),
            _from_latent(jax.lax.optimization_barrier(kv), params["w_uv"], _UV, impl))
