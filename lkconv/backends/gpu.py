"""What the GPU backends (triton, cuda) both ask: can the device run them (sm_80 or newer), and may fp32 convs use
TF32 (PyTorch's setting)."""

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


def conv_allows_tf32() -> bool:
    """PyTorch's TF32 setting for convolutions, resolved the way cuDNN convs resolve it."""
    getter = getattr(torch._C, "_get_fp32_precision_getter", None)
    if getter is None:
        return bool(torch.backends.cudnn.allow_tf32)
    for backend, op in (("cuda", "conv"), ("cuda", "all"), ("generic", "all")):
        precision = getter(backend, op)
        if precision != "none":
            return precision == "tf32"
    return False
