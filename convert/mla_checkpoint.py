"""Writing and reading converted MLA checkpoints.

Layout of OUT_DIR: `jaxlm_config.json` (our config, the source config.json and the layers held) and one orbax
checkpoint per decoder layer under `layers/<i>`. Conversion streams one tensor at a time from memory-mapped
safetensors and writes each layer as soon as it is read, so peak memory stays near one layer's attention weights
(374 MB at R1 sizes in bf16), whatever the size of the whole checkpoint. It writes into a temporary sibling
directory and renames it into place at the end: an interrupted run leaves no half-written OUT_DIR.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from convert import deepseek
from convert.safetensors_io import CheckpointError, atomic_output_dir
from jaxlm.mla import MLAConfig
from pallas_kernels.fp8_matmul import Fp8Weight

FORMAT = "jaxlm-mla-v1"


def _checkpointer():
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer()


def _to_tree(params: dict) -> dict:
    """Fp8Weight -> {"w", "scale"} for orbax (block size goes to jaxlm_config.json)."""
    return {k: ({"w": v.w, "scale": v.scale} if isinstance(v, Fp8Weight) else v) for k, v in params.items()}


def _from_tree(tree: dict, block: int | None) -> dict:
    return {k: (Fp8Weight(jnp.asarray(v["w"]), jnp.asarray(v["scale"]), block=block) if isinstance(v, dict)
                else jnp.asarray(v)) for k, v in tree.items()}


def convert_mla(hf_dir, out_dir, *, layers=None, dtype="bfloat16", keep_fp8: bool = False, overwrite: bool = False,
                progress: bool = True) -> Path:
    """Convert the attention weights of `layers` (default: every decoder layer) to an orbax checkpoint;
    `keep_fp8` stores the projections as e4m3 with their block scales (see convert.deepseek.fp8_layer_params)."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    hf_config, cfg, ckpt = deepseek.open_checkpoint(hf_dir)
    num_layers = int(hf_config.get("num_hidden_layers", 0))
    layers = list(range(num_layers)) if layers is None else sorted(set(int(i) for i in layers))
    if not layers:
        raise ValueError("no layers to convert")
    for i in layers:
        deepseek.check_layer(hf_config, i)
    dt = deepseek.resolve_dtype(dtype) or deepseek.default_dtype(ckpt, cfg, layers[0])
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists: choose another OUT_DIR or pass --overwrite")
    with atomic_output_dir(out_dir) as tmp:
        checkpointer = _checkpointer()
        for i in tqdm(layers, desc=f"converting {hf_dir.name}", unit="layer", disable=not progress):
            if keep_fp8:
                params = _to_tree(deepseek.fp8_layer_params(ckpt, hf_config, cfg, i, dt))
            else:
                params = deepseek.layer_params(ckpt, hf_config, cfg, i, dt)
            checkpointer.save((tmp / "layers" / str(i)).absolute(), params)
            checkpointer.wait_until_finished()
            del params
        meta = {"format": FORMAT, "config": dataclasses.asdict(cfg), "layers": layers, "dtype": np.dtype(dt).name,
                "fp8_block": deepseek.fp8_block(hf_config) if keep_fp8 else None, "source": str(hf_dir),
                "hf_config": hf_config}
        (tmp / "jaxlm_config.json").write_text(json.dumps(meta, indent=1))
    return out_dir


def load(out_dir, *, layers=None) -> tuple[MLAConfig, dict[int, dict]]:
    """(cfg, {layer: params}) from a directory written by `convert_mla` (jax arrays, the dtype it was written in)."""
    out_dir = Path(out_dir)
    meta_path = out_dir / "jaxlm_config.json"
    if not meta_path.is_file():
        raise CheckpointError(f"{out_dir}: not a converted jaxlm checkpoint (no jaxlm_config.json); run python -m convert first")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path}: format {meta.get('format')!r}, this jaxlm reads {FORMAT!r}")
    cfg = MLAConfig(**meta["config"])
    wanted = meta["layers"] if layers is None else list(layers)
    absent = [i for i in wanted if i not in meta["layers"]]
    if absent:
        raise CheckpointError(f"{out_dir}: layers {absent} were not converted (it holds {meta['layers']})")
    checkpointer = _checkpointer()
    params = {}
    for i in wanted:
        tree = checkpointer.restore((out_dir / "layers" / str(i)).absolute())
        params[i] = _from_tree(tree, meta.get("fp8_block"))
    return cfg, params
