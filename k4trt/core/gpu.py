"""Which GPU this process would build for or run on; engines are only valid on the GPU model they were built for.

Read through torch.cuda, which every backend already imports, so no CUDA binding is needed to ask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: FP8 tensor cores: Ada (8.9) and Hopper (9.0) and later; TensorRT builds FP8 GEMMs only there
FP8_COMPUTE_CAPABILITY = (8, 9)


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: tuple[int, int]
    memory_bytes: int

    def describe(self) -> str:
        major, minor = self.compute_capability
        return f"{self.name} (compute capability {major}.{minor})"

    @property
    def has_fp8(self) -> bool:
        return self.compute_capability >= FP8_COMPUTE_CAPABILITY

    def same_model(self, other: GpuInfo) -> bool:
        """TensorRT picks kernels per GPU model: same name and compute capability, whatever the memory in use."""
        return self.name == other.name and self.compute_capability == other.compute_capability


def current_gpu(device: torch.device | str | int | None = None) -> GpuInfo | None:
    """The CUDA GPU `device` names (the current one by default), or None without a usable CUDA GPU."""
    try:
        if not torch.cuda.is_available():
            return None
        props = torch.cuda.get_device_properties(device)
    except (RuntimeError, AssertionError, ValueError):
        return None
    return GpuInfo(props.name, (props.major, props.minor), props.total_memory)
