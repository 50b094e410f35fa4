"""Pallas GPU kernels, each beside its pure-jnp reference. Compiled (Triton) on GPU, interpreted on CPU."""

from pallas_kernels.cache_update import update_cache, update_cache_reference
from pallas_kernels.common import on_gpu
from pallas_kernels.mla_decode import BlockSizes as MLADecodeBlockSizes
from pallas_kernels.mla_decode import mla_decode, mla_decode_reference

__all__ = ["on_gpu", "update_cache", "update_cache_reference", "mla_decode", "mla_decode_reference", "MLADecodeBlockSizes"]
