"""Lower a kernel for an H100 on a machine without one, so that CI catches what interpret mode does not enforce
(Triton's power-of-two block shapes, dot operand rules, unsupported primitives; Mosaic GPU's layouts and TMA
alignment, which need the jax_cuda13_plugin package installed)."""

from __future__ import annotations

import jax
from jax import export
from jax._src.mesh import AbstractDevice
from jax.experimental.pallas import triton as pltriton
from jax.sharding import AbstractMesh

from pallas_kernels.common import H100_SMS

KERNEL_CALLS = (pltriton.CUSTOM_CALL_TARGET_NAME, "mosaic_gpu_v2")  # Pallas Triton and Mosaic GPU kernels
H100 = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=H100_SMS, platform="gpu")


def export_for_h100(fn, *args) -> str:
    """StableHLO text of `fn(*args)` (args may be ShapeDtypeStructs) lowered for CUDA with compiled Pallas kernels."""
    with jax.sharding.use_abstract_mesh(AbstractMesh((), (), abstract_device=H100)):
        exported = export.export(
            jax.jit(fn), platforms=["cuda"],
            disabled_checks=[export.DisabledSafetyCheck.custom_call(name) for name in KERNEL_CALLS],
        )(*args)
    return exported.mlir_module()
