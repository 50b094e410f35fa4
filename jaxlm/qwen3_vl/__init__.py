"""Qwen3-VL-2B-Instruct in JAX: preprocessing, vision encoder, text decoder, jitted prefill/decode steps, generation."""

from jaxlm.qwen3_vl.model import Qwen3VL, Qwen3VLConfig, decode_step, load, prefill_step
from jaxlm.qwen3_vl.processor import ImageError, load_image, preprocess_image, smart_resize

__all__ = ["ImageError", "Qwen3VL", "Qwen3VLConfig", "decode_step", "load", "load_image", "prefill_step",
           "preprocess_image", "smart_resize"]
