"""What the GPU backends (triton, cuda) both require of a device: an NVIDIA GPU of sm_80 or newer."""

import functools
from typing import Optional

import torch


@functools.lru_cache(maxsize=None)
def unsupported_gpu_reason(index: int, backend: str) -> Optional[str]:
    """Why cuda:`index` cannot run `backend`'s kernels (bf16 and TF32 tensor cores need sm_80), or None."""
    if torch.version.hip:
        return f"the {backend} kernels are built and tested for NVIDIA GPUs only; this is a ROCm build of PyTorch"
    major, minor = torch.cuda.get_device_capability(index)
    if major < 8:
        return f"the {backend} kernels need an sm_80 or newer GPU; cuda:{index} is sm_{major}{minor}"
    return None
