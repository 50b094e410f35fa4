"""Qwen3-VL-2B-Instruct in JAX (in progress): image preprocessing so far."""

from jaxlm.qwen3_vl.processor import ImageError, load_image, preprocess_image, smart_resize

__all__ = ["ImageError", "load_image", "preprocess_image", "smart_resize"]
