"""Pallas GPU kernels, each beside its pure-jnp reference. Compiled (Triton) on GPU, interpreted on CPU."""

from pallas_kernels.cache_update import (update_cache, update_cache_reference, update_mla_cache,
                                         update_mla_cache_reference)
from pallas_kernels.common import on_gpu
from pallas_kernels.fp8_matmul import (Fp8Weight, fp8_matmul, fp8_matmul_parts, fp8_matmul_reference, fp8_matmuls,
                                       fp8_matmuls_side_by_side)
from pallas_kernels.fp8_matmul_mgpu import sum_parts
from pallas_kernels.mla_decode import BlockSizes as MLADecodeBlockSizes
from pallas_kernels.mla_decode import mla_decode, mla_decode_reference
from pallas_kernels.sage_attention import BlockSizes as SageBlockSizes
from pallas_kernels.sage_attention import request_means as sage_attention_request_means
from pallas_kernels.sage_attention import sage_attention, sage_attention_reference
from pallas_kernels.common import segments as sage_attention_segments

__all__ = ["Fp8Weight", "MLADecodeBlockSizes", "SageBlockSizes", "fp8_matmul", "fp8_matmul_parts",
           "fp8_matmul_reference", "fp8_matmuls", "fp8_matmuls_side_by_side", "sum_parts",
           "mla_decode", "mla_decode_reference", "on_gpu", "sage_attention", "sage_attention_reference",
           "sage_attention_request_means", "sage_attention_segments", "update_cache", "update_cache_reference",
           "update_mla_cache", "update_mla_cache_reference"]
