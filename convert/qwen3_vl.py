"""Qwen3-VL: HF tensor names -> jaxlm layouts (vision encoder so far). Linear kernels become `W.T` ([in, out]);
the Conv3d patch embedding becomes one [C*T*P*P, D] matrix, its inner order being the processor's row order."""

from __future__ import annotations

import numpy as np

from jaxlm.qwen3_vl.vision import VisionConfig


def _merger(get, prefix):
    return {"norm_w": get(prefix + "norm.weight"), "norm_b": get(prefix + "norm.bias"),
            "fc1_w": get(prefix + "linear_fc1.weight").T, "fc1_b": get(prefix + "linear_fc1.bias"),
            "fc2_w": get(prefix + "linear_fc2.weight").T, "fc2_b": get(prefix + "linear_fc2.bias")}


def vision_params(get, cfg: VisionConfig, prefix: str = "model.visual.") -> dict:
    """`get(name) -> float32 numpy array` for HF tensor names; returns the vision params pytree (numpy)."""
    p = lambda name: get(prefix + name)
    w = p("patch_embed.proj.weight")
    blocks = []
    for i in range(cfg.depth):
        b = f"blocks.{i}."
        blocks.append({
            "norm1_w": p(b + "norm1.weight"), "norm1_b": p(b + "norm1.bias"),
            "norm2_w": p(b + "norm2.weight"), "norm2_b": p(b + "norm2.bias"),
            "qkv_w": p(b + "attn.qkv.weight").T, "qkv_b": p(b + "attn.qkv.bias"),
            "proj_w": p(b + "attn.proj.weight").T, "proj_b": p(b + "attn.proj.bias"),
            "fc1_w": p(b + "mlp.linear_fc1.weight").T, "fc1_b": p(b + "mlp.linear_fc1.bias"),
            "fc2_w": p(b + "mlp.linear_fc2.weight").T, "fc2_b": p(b + "mlp.linear_fc2.bias"),
        })
    return {
        "patch_embed": {"w": np.ascontiguousarray(w.reshape(w.shape[0], -1).T), "b": p("patch_embed.proj.bias")},
        "pos_embed": p("pos_embed.weight"),
        "blocks": blocks,
        "merger": _merger(get, prefix + "merger."),
        "deepstack": [_merger(get, f"{prefix}deepstack_merger_list.{j}.") for j in range(len(cfg.deepstack_visual_indexes))],
    }


def text_params(get, cfg, tied: bool, prefix: str = "model.language_model.") -> dict:
    p = lambda name: get(prefix + name)
    layers = []
    for i in range(cfg.num_layers):
        b = f"layers.{i}."
        layers.append({
            "input_norm": p(b + "input_layernorm.weight"), "post_norm": p(b + "post_attention_layernorm.weight"),
            "q_w": p(b + "self_attn.q_proj.weight").T, "k_w": p(b + "self_attn.k_proj.weight").T,
            "v_w": p(b + "self_attn.v_proj.weight").T, "o_w": p(b + "self_attn.o_proj.weight").T,
            "q_norm": p(b + "self_attn.q_norm.weight"), "k_norm": p(b + "self_attn.k_norm.weight"),
            "gate_w": p(b + "mlp.gate_proj.weight").T, "up_w": p(b + "mlp.up_proj.weight").T,
            "down_w": p(b + "mlp.down_proj.weight").T,
        })
    out = {"embed": p("embed_tokens.weight"), "layers": layers, "norm": p("norm.weight")}
    if not tied:
        out["lm_head"] = get("lm_head.weight").T
    return out


def load_hf(path, dtype=None):
    """(Qwen3VL) from an HF directory (config.json + safetensors, single or sharded) or a converted one."""
    if (path / "jaxlm_config.json").is_file():
        return load_converted(path, dtype)
    import jax
    import jax.numpy as jnp

    from convert.safetensors_io import SafetensorsCheckpoint, read_config
    from jaxlm.qwen3_vl.model import Qwen3VL, Qwen3VLConfig
    from jaxlm.qwen3_vl.tokenizer import load_tokenizer

    hf = read_config(path)
    cfg = Qwen3VLConfig.from_hf(hf)
    ckpt = SafetensorsCheckpoint(path)
    first = "model.language_model.embed_tokens.weight"
    dt = jnp.dtype(dtype) if dtype is not None else jnp.dtype(ckpt.dtype(first))
    get = lambda name: ckpt.read_float(name)
    params = {"vision": vision_params(get, cfg.vision), "text": text_params(get, cfg.text, cfg.text.tie_word_embeddings)}
    params = jax.tree.map(lambda a: jnp.asarray(np.ascontiguousarray(a), dt), params)
    return Qwen3VL(cfg, params, load_tokenizer(path))


FORMAT = "jaxlm-qwen3vl-v1"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "chat_template.json",
                   "preprocessor_config.json", "generation_config.json")


def convert_qwen3_vl(hf_dir, out_dir, *, dtype="bfloat16", overwrite: bool = False, progress: bool = True):
    """HF Qwen3-VL directory -> OUT_DIR with jaxlm_config.json, an orbax checkpoint of the params under `params/`
    and the tokenizer files; written to a temporary sibling and renamed at the end."""
    import json
    import shutil
    from pathlib import Path

    import orbax.checkpoint as ocp
    from tqdm import tqdm

    from convert.safetensors_io import SafetensorsCheckpoint, atomic_output_dir, read_config
    from jaxlm.qwen3_vl.model import Qwen3VLConfig

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    hf = read_config(hf_dir)
    cfg = Qwen3VLConfig.from_hf(hf)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists: choose another OUT_DIR or pass --overwrite")
    ckpt = SafetensorsCheckpoint(hf_dir)
    import jax.numpy as jnp

    dt = np.dtype(jnp.dtype(dtype))
    names = []
    bar = tqdm(total=len(ckpt.keys()), desc=f"converting {hf_dir.name}", unit="tensor", disable=not progress)

    def get(name):
        names.append(name)
        bar.update(1)
        return ckpt.read_float(name).astype(dt)

    params = {"vision": vision_params(get, cfg.vision), "text": text_params(get, cfg.text, cfg.text.tie_word_embeddings)}
    bar.close()
    with atomic_output_dir(out_dir) as tmp:
        ck = ocp.StandardCheckpointer()
        ck.save((tmp / "params").absolute(), params)
        ck.wait_until_finished()
        for f in TOKENIZER_FILES:
            if (hf_dir / f).is_file():
                shutil.copy(hf_dir / f, tmp / f)
        (tmp / "jaxlm_config.json").write_text(json.dumps({"format": FORMAT, "dtype": dt.name, "hf_config": hf}, indent=1))
    return out_dir


def load_converted(path, dtype=None):
    import json

    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    from jaxlm.qwen3_vl.model import Qwen3VL, Qwen3VLConfig
    from jaxlm.qwen3_vl.tokenizer import load_tokenizer

    meta = json.loads((path / "jaxlm_config.json").read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    cfg = Qwen3VLConfig.from_hf(meta["hf_config"])
    params = ocp.StandardCheckpointer().restore((path / "params").absolute())
    dt = jnp.dtype(dtype) if dtype is not None else None
    params = jax.tree.map(lambda a: jnp.asarray(a, dt), params)
    return Qwen3VL(cfg, params, load_tokenizer(path))
