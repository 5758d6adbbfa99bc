"""The `triton` backend: launches the lkconv.kernels implicit-GEMM kernels with block sizes per shape class.

Everything shape-dependent is decided here on the host, with integer arithmetic only: which kernel form runs
(row band or whole map), its block sizes, and how the weight-grad reduction is split. `kernel_configs()` lists
every configuration these choices can produce on a GPU, so a CPU test can compile all of them ahead of time.
"""

import contextlib
import functools
import os
from typing import NamedTuple, Optional, Sequence

import torch

from ..arguments import output_memory_format

name = "triton"

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class RowsConfig(NamedTuple):
    block_m: int
    block_w: int
    block_j: int
    num_warps: int = 4
    num_stages: int = 2


class WholeMapConfig(NamedTuple):
    block_n: int
    block_p: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 2


class WeightGradConfig(NamedTuple):
    block_r: int
    block_q: int
    block_rows: int
    block_iw: int
    num_warps: int = 4
    num_stages: int = 2


def interpreting() -> bool:
    """True under the Triton interpreter (TRITON_INTERPRET=1), which runs the kernels on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def unavailable_reason() -> Optional[str]:
    if (reason := _import_failure()) is not None:
        return reason
    if not interpreting() and not torch.cuda.is_available():
        return "no CUDA GPU is visible (set TRITON_INTERPRET=1 to run the kernels on CPU, slowly, for testing)"
    return None


@functools.lru_cache(maxsize=None)
def _import_failure() -> Optional[str]:
    try:
        import triton  # noqa: F401
    except ImportError as error:
        return f"triton is not importable ({error}); install it with pip install 'triton>=3.6'"
    return None


def unsupported_reason(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    if dtype not in DTYPES:
        return f"the triton kernels take float16, bfloat16 and float32 tensors, not {dtype}"
    if device.type == "cuda" or interpreting():
        return None
    return f"triton runs on CUDA tensors (or any tensor under TRITON_INTERPRET=1); got a {device.type} tensor"


@functools.lru_cache(maxsize=None)
def _kernels():
    # Imported on first use: TRITON_INTERPRET is read when the kernels are decorated.
    from lkconv import kernels

    return kernels


def _next_pow2(n: int, low: int, high: int) -> int:
    return max(low, min(high, 1 << max(0, int(n) - 1).bit_length()))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


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


def _dot_options(dtype: torch.dtype) -> tuple[str, bool]:
    """(tl.dot input_precision, widen operands to fp32) for a tensor dtype."""
    if dtype == torch.float32:
        return ("tf32" if conv_allows_tf32() else "ieee"), False
    return "tf32", interpreting() and dtype == torch.bfloat16


# --- shape classes -------------------------------------------------------------------------------------------


class _Pass(NamedTuple):
    """One forward-shaped pass: `src` maps of (src_h, src_w) into `dst` maps of (dst_h, dst_w)."""

    transposed: bool
    batch: int
    dst_h: int
    dst_w: int
    src_h: int
    src_w: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]


def _source_span(p: _Pass, block_w: int) -> int:
    """Source columns one block of `block_w` destination columns reads."""
    reach = (p.kernel[1] - 1) * p.dilation[1]
    if p.transposed:
        return (block_w - 1 + reach) // p.stride[1] + 1
    return (block_w - 1) * p.stride[1] + reach + 1


def _kernel_rows_reached(p: _Pass) -> int:
    """Kernel rows one destination row multiplies at most (the rest fall in the padding)."""
    if p.transposed:
        return min(p.kernel[0], _cdiv(p.src_h * p.stride[0], p.dilation[0]))
    return min(p.kernel[0], _cdiv(p.src_h, p.dilation[0]))


def rows_config(p: _Pass) -> RowsConfig:
    if interpreting():
        # The interpreter pays per operation, not per element: few, large programs.
        block_w = _next_pow2(p.dst_w, 16, 64)
        return RowsConfig(_next_pow2(p.batch * p.dst_h, 16, 128), block_w, _next_pow2(_source_span(p, block_w), 16, 256))
    block_w = 32 if p.dst_w > 16 else 16
    return RowsConfig(64, block_w, 64 if _source_span(p, block_w) > 32 else 32)


def whole_map_config(p: _Pass) -> WholeMapConfig:
    if interpreting():
        return WholeMapConfig(
            _next_pow2(p.batch, 16, 64), _next_pow2(p.dst_h * p.dst_w, 16, 256), _next_pow2(p.src_h * p.src_w, 16, 256)
        )
    return WholeMapConfig(64 if p.batch > 16 else 16, 64, 32, num_warps=8)


def weight_grad_config(kernel: Sequence[int], in_width: int, total_rows: int) -> WeightGradConfig:
    if interpreting():
        block_iw = _next_pow2(in_width, 16, 64)
        return WeightGradConfig(
            _next_pow2(kernel[0], 16, 64), _next_pow2(kernel[1], 16, 64), _next_pow2(total_rows, 1, 256 // block_iw), block_iw
        )
    block_iw = 32 if in_width > 16 else 16
    return WeightGradConfig(
        16 if kernel[0] <= 16 else 32, 16 if kernel[1] <= 16 else 32, 128 // block_iw, block_iw, num_warps=8
    )


def kernel_configs() -> dict[str, list]:
    """Every GPU configuration the choices above can return, per kernel (for ahead-of-time compile checks).

    Block sizes and warps keep ptxas register spills at a few dozen bytes at most (tests/compile_kernels.py
    reports registers and spills per configuration); speed tuning on a GPU is still owed.
    """
    return {
        "rows": [RowsConfig(64, w, j) for w in (16, 32) for j in (32, 64)],
        "whole_map": [WholeMapConfig(n, 64, 32, num_warps=8) for n in (16, 64)],
        "weight_grad": [
            WeightGradConfig(r, q, 128 // iw, iw, num_warps=8) for r in (16, 32) for q in (16, 32) for iw in (16, 32)
        ],
    }


def choose_form(p: _Pass) -> str:
    """'whole_map' when one dense GEMM over the map costs fewer multiplies than the row bands, else 'rows'."""
    src_pixels = p.src_h * p.src_w
    if src_pixels > 4096:
        return "rows"
    config = rows_config(p)
    rows_cost = _kernel_rows_reached(p) * _cdiv(_source_span(p, config.block_w), config.block_j) * config.block_j
    whole_cost = _cdiv(src_pixels, 32) * 32 * max(1.0, 16 / max(p.batch, 1))
    return "whole_map" if whole_cost < rows_cost else "rows"


def _forward_pass(input_shape, out_hw, kernel, stride, dilation) -> _Pass:
    return _Pass(False, input_shape[0], out_hw[0], out_hw[1], input_shape[2], input_shape[3], tuple(kernel), tuple(stride), tuple(dilation))


def _input_grad_pass(grad_shape, input_hw, kernel, stride, dilation) -> _Pass:
    return _Pass(True, grad_shape[0], input_hw[0], input_hw[1], grad_shape[2], grad_shape[3], tuple(kernel), tuple(stride), tuple(dilation))


def describe(pass_name: str, input_shape, weight_shape, output_hw, stride, dilation) -> str:
    """The kernel and block sizes that `pass_name` would launch, in words."""
    kernel = weight_shape[2:]
    if pass_name == "weight_grad":
        config = weight_grad_config(kernel, input_shape[3], input_shape[0] * output_hw[0])
        return f"weight_grad (deterministic split reduction) {config}"
    if pass_name == "forward":
        p = _forward_pass(input_shape, output_hw, kernel, stride, dilation)
    else:
        p = _input_grad_pass((input_shape[0], weight_shape[0], *output_hw), input_shape[2:], kernel, stride, dilation)
    form = choose_form(p)
    config = rows_config(p) if form == "rows" else whole_map_config(p)
    return f"{form} {config}"


# --- launches ------------------------------------------------------------------------------------------------


def new_buffer(shape, dtype, device, memory_format=torch.contiguous_format) -> torch.Tensor:
    """Uninitialised memory for a kernel to fill completely (tests swap in NaN-filled buffers to prove it)."""
    return torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)


def _launch_conv(p: _Pass, src, weight, bias, dst, padding, multiplier, form: Optional[str]):
    form = form or choose_form(p)
    kernels = _kernels()
    precision, operands_fp32 = _dot_options(src.dtype)
    args = (
        src, weight, bias if bias is not None else weight, dst,
        p.batch, p.dst_h, p.dst_w, p.src_h, p.src_w,
        p.kernel[0], p.kernel[1], p.stride[0], p.stride[1], padding[0], padding[1], p.dilation[0], p.dilation[1],
        multiplier,
        *src.stride(), weight.stride(0), weight.stride(2), weight.stride(3), *dst.stride(),
    )
    flags = dict(TRANSPOSED=p.transposed, HAS_BIAS=bias is not None, PRECISION=precision, OPERANDS_FP32=operands_fp32)
    channels = dst.shape[1]
    with torch.cuda.device(dst.device) if dst.is_cuda else contextlib.nullcontext():
        if form == "rows":
            c = rows_config(p)
            grid = (channels * _cdiv(p.batch * p.dst_h, c.block_m) * _cdiv(p.dst_w, c.block_w),)
            kernels.depthwise_rows_kernel[grid](
                *args, **flags, BLOCK_M=c.block_m, BLOCK_W=c.block_w, BLOCK_J=c.block_j,
                num_warps=c.num_warps, num_stages=c.num_stages,
            )
        elif form == "whole_map":
            c = whole_map_config(p)
            grid = (channels * _cdiv(p.batch, c.block_n) * _cdiv(p.dst_h * p.dst_w, c.block_p),)
            kernels.depthwise_whole_map_kernel[grid](
                *args, **flags, BLOCK_N=c.block_n, BLOCK_P=c.block_p, BLOCK_K=c.block_k,
                num_warps=c.num_warps, num_stages=c.num_stages,
            )
        else:
            raise ValueError(f"form must be 'rows' or 'whole_map'; got {form!r}")
    return dst


def forward(input, weight, bias, stride, padding, dilation, form: Optional[str] = None):
    batch, channels = input.shape[:2]
    out_channels, _, kernel_h, kernel_w = weight.shape
    out_h = (input.shape[2] + padding[0] + padding[2] - dilation[0] * (kernel_h - 1) - 1) // stride[0] + 1
    out_w = (input.shape[3] + padding[1] + padding[3] - dilation[1] * (kernel_w - 1) - 1) // stride[1] + 1
    output = new_buffer((batch, out_channels, out_h, out_w), input.dtype, input.device, output_memory_format(input))
    if output.numel() == 0:
        return output
    p = _forward_pass(input.shape, (out_h, out_w), (kernel_h, kernel_w), stride, dilation)
    # The kernel reads bias[channel] at unit stride; autograd may hand in an expanded (stride-0) bias.
    bias = bias.contiguous() if bias is not None else None
    return _launch_conv(p, input, weight, bias, output, padding, out_channels // channels, form)


def input_grad(grad_output, weight, input_shape, stride, padding, dilation, form: Optional[str] = None):
    batch, channels, height, width = input_shape
    grad_input = new_buffer((batch, channels, height, width), grad_output.dtype, grad_output.device,
                            output_memory_format(grad_output))
    if grad_input.numel() == 0:
        return grad_input
    p = _input_grad_pass(grad_output.shape, (height, width), weight.shape[2:], stride, dilation)
    return _launch_conv(p, grad_output, weight, None, grad_input, padding, weight.shape[0] // channels, form)


@functools.lru_cache(maxsize=None)
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def weight_grad(grad_output, input, kernel_size, stride, padding, dilation, with_bias, splits: Optional[int] = None):
    """Weight grad (and bias grad) from fixed-order fp32 partials: bit-identical run to run.

    `splits` (the number of partial sums along N*OH) is chosen to fill the GPU unless given.
    """
    batch, channels = input.shape[:2]
    out_channels, out_h, out_w = grad_output.shape[1:]
    kernel_h, kernel_w = kernel_size
    total_rows = batch * out_h
    if total_rows == 0:
        grad_weight = grad_output.new_zeros(out_channels, 1, kernel_h, kernel_w)
        return grad_weight, grad_output.new_zeros(out_channels if with_bias else 0)
    c = weight_grad_config(kernel_size, input.shape[3], total_rows)
    tiles = out_channels * _cdiv(kernel_h, c.block_r) * _cdiv(kernel_w, c.block_q)
    if splits is None:
        splits = 1 if not input.is_cuda else _cdiv(4 * _multiprocessors(input.device.index or 0), tiles)
    splits = max(1, min(splits, _cdiv(total_rows, c.block_rows)))
    rows_per_split = _cdiv(_cdiv(total_rows, splits), c.block_rows) * c.block_rows
    splits = _cdiv(total_rows, rows_per_split)

    weight_partials = new_buffer((splits, out_channels, kernel_h, kernel_w), torch.float32, input.device)
    bias_partials = new_buffer((splits, out_channels) if with_bias else (0,), torch.float32, input.device)
    precision, operands_fp32 = _dot_options(input.dtype)
    with torch.cuda.device(input.device) if input.is_cuda else contextlib.nullcontext():
        _kernels().depthwise_weight_grad_kernel[(tiles * splits,)](
            grad_output, input, weight_partials, bias_partials,
            batch, out_channels, out_h, out_w, input.shape[2], input.shape[3],
            kernel_h, kernel_w, stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
            out_channels // channels, rows_per_split,
            *grad_output.stride(), *input.stride(),
            HAS_BIAS=with_bias, PRECISION=precision, OPERANDS_FP32=operands_fp32,
            BLOCK_R=c.block_r, BLOCK_Q=c.block_q, BLOCK_ROWS=c.block_rows, BLOCK_IW=c.block_iw,
            num_warps=c.num_warps, num_stages=c.num_stages,
        )
    grad_weight = weight_partials.sum(0).unsqueeze(1).to(input.dtype)
    grad_bias = bias_partials.sum(0).to(input.dtype) if with_bias else grad_output.new_empty(0)
    return grad_weight, grad_bias
