"""The `cuda` backend: lkconv._C's hand-written CUDA kernels (csrc/), compiled by pip install when nvcc is found.

This module allocates every output and workspace with PyTorch's allocator (NCHW; the op restores the caller's
layout) and calls the extension's ops (`torch.ops.lkconv.cuda_*`), which check their arguments and launch on the
device's current stream. If the
extension is missing or fails to import, the backend reports why, and `auto` carries on with the others.
"""

import functools
import importlib.util
import warnings
from pathlib import Path
from typing import Optional

import torch

from ..arguments import output_size
from .gpu import conv_allows_tf32, unsupported_gpu_reason

name = "cuda"

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SUMMANDS_PER_SPLIT = 16384


def reinstall_command(package: Path) -> str:
    """The command that rebuilds lkconv._C for the lkconv at `package`: an editable install from its own source
    folder, which it names; an install from a wheel from the sources the user has (a folder or an sdist)."""
    source = package.parent
    if (source / "setup.py").is_file() and (source / "csrc").is_dir():
        target = f"-e {source}"
    else:
        target = "<lkconv's source folder or sdist>"
    return (f"pip install -v --no-build-isolation --force-reinstall --no-deps {target} (with nvcc on PATH; -v shows "
            "the build's own messages)")


REINSTALL = reinstall_command(Path(__file__).resolve().parent.parent)


@functools.lru_cache(maxsize=None)
def _import_failure() -> Optional[str]:
    """None once lkconv._C is loaded; otherwise why not. A broken build warns once, a skipped one stays quiet.

    A skipped build is told apart by the missing file: `from lkconv import _C` raises a plain ImportError
    ("cannot import name") for a missing module as well as for a library that fails to load.
    """
    if importlib.util.find_spec("lkconv._C") is None:
        return ("lkconv was installed without its CUDA extension lkconv._C (no nvcc, LKCONV_SKIP_CUDA_BUILD=1, no "
                "sm_80+ architecture in TORCH_CUDA_ARCH_LIST, or a failed build: `pip install -v` shows which)")
    try:
        from lkconv import _C  # noqa: F401  (loading the library registers the ops)
    except ImportError as error:  # built, but cannot load here: say how to fix it, once
        warnings.warn(f"lkconv._C failed to import ({error}); the cuda backend is off. Reinstall with: {REINSTALL}",
                      RuntimeWarning, stacklevel=3)
        return f"lkconv._C failed to import ({error}); reinstall with: {REINSTALL}"
    return None


def extension_loaded() -> bool:
    """Whether lkconv._C imported (it may still have no GPU to run on)."""
    return _import_failure() is None


def _cuda_version(version: int) -> str:
    """CUDA's integer version as people write it: 12080 -> '12.8'."""
    return f"{version // 1000}.{version % 1000 // 10}"


def extension_cuda_runtime() -> Optional[str]:
    """The CUDA runtime lkconv._C links, as '13.0' (benchmark provenance); None without the extension."""
    return _cuda_version(torch.ops.lkconv.cuda_versions()[0]) if extension_loaded() else None


@functools.lru_cache(maxsize=None)
def _driver_too_old() -> Optional[str]:
    """Why the GPU driver cannot run the CUDA runtime lkconv._C links (statically, from the nvcc that built it), or
    None. torch may run on such a driver, being built for an older CUDA, while every launch of ours would fail. Within
    one major version CUDA's minor-version compatibility lets an older driver run the kernels' machine code (not their
    PTX, which a GPU newer than the built architectures needs: its launch fails, and `auto` falls back with the advice
    to rebuild). A driver version of 0 (no driver found) leaves the verdict to torch, which found one."""
    runtime, driver = torch.ops.lkconv.cuda_versions()
    if driver == 0 or driver // 1000 >= runtime // 1000:
        return None
    return (f"lkconv._C was built with CUDA {_cuda_version(runtime)}, but this GPU driver supports CUDA up to "
            f"{_cuda_version(driver)}: update the driver, or rebuild lkconv with the nvcc of a CUDA toolkit up to "
            f"{_cuda_version(driver)} (CUDA_HOME names it): {REINSTALL}")


def unavailable_reason() -> Optional[str]:
    """Why the cuda backend cannot run at all here (no extension, no GPU, a driver older than the extension's CUDA
    runtime), or None."""
    if (reason := _import_failure()) is not None:
        return reason
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    return _driver_too_old()


def unsupported_reason(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Why the cuda backend cannot run tensors of this device and dtype, or None."""
    if dtype not in DTYPES:
        return f"the CUDA kernels take float16, bfloat16 and float32 tensors, not {dtype}"
    if device.type != "cuda":
        return f"the CUDA kernels run on CUDA tensors; got a {device.type} tensor"
    return unsupported_gpu_reason(device.index if device.index is not None else torch.cuda.current_device(), "cuda")


def describe(pass_name: str, input, weight, output_hw, stride, padding, dilation) -> str:
    """The kernel the extension launches for `pass_name`, decided from the dtype, PyTorch's conv TF32 setting, the
    kernel size, stride, dilation and the batch and map sizes."""
    return torch.ops.lkconv.cuda_kernel_name(pass_name, input.dtype, conv_allows_tf32(), list(input.shape),
                                             list(output_hw), list(weight.shape[2:]), list(stride), list(dilation))


def new_buffer(shape, dtype, device, memory_format=torch.contiguous_format) -> torch.Tensor:
    """Uninitialised memory for a kernel to fill completely (tests swap in NaN-filled buffers to prove it)."""
    return torch.empty(tuple(shape), dtype=dtype, device=device, memory_format=memory_format)


@functools.lru_cache(maxsize=None)
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _rows_contiguous(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` with unit stride along W (NCHW): the kernels read and write along rows.

    A channels_last map keeps a row's neighbours C elements apart, so reading it in place would fetch a 32-byte
    sector per element for every tap; copying streams it once (the op restores the caller's layout at the end).
    """
    return tensor if tensor.shape[3] <= 1 or tensor.stride(3) == 1 else tensor.contiguous()


def forward(input, weight, bias, stride, padding, dilation):
    """y = depthwise conv of `input` by the extension's forward kernel, on the input's current stream."""
    out_hw = [output_size(input.shape[2 + i], weight.shape[2 + i], stride[i], padding[i], padding[2 + i], dilation[i])
              for i in range(2)]
    output = new_buffer((input.shape[0], weight.shape[0], *out_hw), input.dtype, input.device)
    bias = bias.contiguous() if bias is not None else None  # autograd may hand in an expanded (stride-0) bias
    torch.ops.lkconv.cuda_forward(_rows_contiguous(input), weight.contiguous(), bias, list(stride), list(padding),
                                  list(dilation), conv_allows_tf32(), output)
    return output


def input_grad(grad_output, weight, input_shape, stride, padding, dilation):
    """dx of the forward by the extension's input-grad kernel."""
    grad_input = new_buffer(input_shape, grad_output.dtype, grad_output.device)
    torch.ops.lkconv.cuda_input_grad(_rows_contiguous(grad_output), weight.contiguous(), list(stride), list(padding),
                                     list(dilation), conv_allows_tf32(), grad_input)
    return grad_input


def weight_grad(grad_output, input, kernel_size, stride, padding, dilation, with_bias, splits: Optional[int] = None):
    """Weight grad (and bias grad) from fixed-order fp32 partial sums: bit-identical run to run.

    `splits` cuts the N*OH reduction into that many row ranges. By default: enough to give each SM 4 blocks, and
    enough that no fp32 accumulator sums more than SUMMANDS_PER_SPLIT products (long sequential fp32 sums drift
    past the fp32 tolerance: 131072 terms lose about 7e-6 relative). The Gram-matrix form (small maps on tensor
    cores) splits by images instead and takes at most one split per chunk of 64 images (32 in TF32): each split
    repeats its whole gather, and its sums are short whatever the batch.
    """
    out_channels = grad_output.shape[1]
    taps = kernel_size[0] * kernel_size[1]
    rows = grad_output.shape[0] * grad_output.shape[2]
    if splits is None:
        device = grad_output.device.index if grad_output.device.index is not None else torch.cuda.current_device()
        splits = max(-(-4 * _multiprocessors(device) // max(out_channels, 1)),
                     -(-rows * grad_output.shape[3] // SUMMANDS_PER_SPLIT))
    splits = max(1, min(splits, rows, 65535))
    workspace = new_buffer((splits * out_channels * (taps + 1),), torch.float32, grad_output.device)
    grad_weight = new_buffer((out_channels, 1, *kernel_size), grad_output.dtype, grad_output.device)
    grad_bias = new_buffer((out_channels if with_bias else 0,), grad_output.dtype, grad_output.device)
    torch.ops.lkconv.cuda_weight_grad(_rows_contiguous(grad_output), _rows_contiguous(input), list(stride),
                                      list(padding), list(dilation), conv_allows_tf32(), workspace, grad_weight,
                                      grad_bias if with_bias else None)
    return grad_weight, grad_bias
