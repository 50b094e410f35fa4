"""HF safetensors checkpoints -> jaxlm params (orbax on disk). `python -m convert HF_DIR OUT_DIR`, `convert.load(OUT_DIR)`."""

from convert.mla_checkpoint import convert_mla, load

__all__ = ["convert_mla", "load"]
