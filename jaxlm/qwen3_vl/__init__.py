"""Qwen3-VL-2B-Instruct in JAX (in progress): preprocessing, vision encoder, text decoder, full-sequence forward."""

from jaxlm.qwen3_vl.model import Qwen3VL, Qwen3VLConfig, load
from jaxlm.qwen3_vl.processor import ImageError, load_image, preprocess_image, smart_resize

__all__ = ["ImageError", "Qwen3VL", "Qwen3VLConfig", "load", "load_image", "preprocess_image", "smart_resize"]
