"""The `torch` backend: reference and fallback, built from PyTorch's own convolutions on any device and dtype.

The weight grad is computed as a grouped forward conv (input as the map, dy as the filter) rather than through
aten's convolution backward: PyTorch 2.13's CPU weight grad corrupts memory for a single-channel conv whose
non-square kernel is taller than the input (e.g. 31x5 on 12x9). The forward-conv form is correct everywhere.

On the CPU, bfloat16 is computed in float32 and rounded back: PyTorch 2.13's CPU bfloat16 depthwise conv returns
wrong values for some strided convs (stride 2 along W), crashes on some dilated ones, and gets the weight grad's
conv (kernel width 1, dilation 2 along W) wrong. bfloat16 values are exact in float32, so only the final rounding
remains.
"""

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

name = "torch"


def unavailable_reason() -> Optional[str]:
    """Always None: PyTorch is always there."""
    return None  # PyTorch is always there


def unsupported_reason(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Always None: whatever F.conv2d runs, this backend runs."""
    return None  # whatever F.conv2d runs, this backend runs


def describe(pass_name: str, **_shape) -> str:
    """The PyTorch call that `pass_name` makes, in words."""
    kernels = {
        "forward": "F.conv2d",
        "input_grad": "F.conv_transpose2d",
        "weight_grad": "grouped F.conv2d over the batch (dy as the filter)",
    }
    return kernels[pass_name]


def _symmetric_padding(padding: Sequence[int]) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """Splits (top, left, bottom, right) into a symmetric part F.conv2d takes and the rest for F.pad."""
    top, left, bottom, right = padding
    both = (min(top, bottom), min(left, right))
    rest = (left - both[1], right - both[1], top - both[0], bottom - both[0])
    return both, rest


def _cpu_bfloat16(tensor: torch.Tensor) -> bool:
    """Whether a pass on `tensor` must run in float32 (see the module docstring)."""
    return tensor.device.type == "cpu" and tensor.dtype == torch.bfloat16


def _float32(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if tensor is None else tensor.float()


def forward(input, weight, bias, stride, padding, dilation):
    """F.conv2d; an asymmetric padding part (from 'same' with an even kernel) is applied with F.pad."""
    if _cpu_bfloat16(input):
        return forward(input.float(), weight.float(), _float32(bias), stride, padding, dilation).bfloat16()
    both, rest = _symmetric_padding(padding)
    if any(rest):
        input = F.pad(input, rest)
    return F.conv2d(input, weight, bias, tuple(stride), both, tuple(dilation), groups=input.shape[1])


def input_grad(grad_output, weight, input_shape, stride, padding, dilation):
    """dx = conv_transpose2d(dy, w) cropped to the input; depth multipliers sum through groups=C."""
    if _cpu_bfloat16(grad_output):
        return input_grad(grad_output.float(), weight.float(), input_shape, stride, padding, dilation).bfloat16()
    _, channels, height, width = input_shape
    both, (left_rest, right_rest, top_rest, bottom_rest) = _symmetric_padding(padding)
    # conv_transpose2d answers for the input padded by the asymmetric rest; its output_padding restores the
    # rows/columns that the strided forward never reached.
    rest_size = (height + top_rest + bottom_rest, width + left_rest + right_rest)
    output_padding = tuple(
        rest_size[i] - ((grad_output.shape[2 + i] - 1) * stride[i] - 2 * both[i] + dilation[i] * (weight.shape[2 + i] - 1) + 1)
        for i in range(2)
    )
    grad_input = F.conv_transpose2d(
        grad_output, weight, None, tuple(stride), both, output_padding, groups=channels, dilation=tuple(dilation)
    )
    return grad_input[:, :, top_rest : top_rest + height, left_rest : left_rest + width]


def weight_grad(grad_output, input, kernel_size, stride, padding, dilation, with_bias):
    """(dW, db) with dW from one grouped forward conv (see the module docstring for why not aten's backward)."""
    if _cpu_bfloat16(grad_output):
        grads = weight_grad(grad_output.float(), input.float(), kernel_size, stride, padding, dilation, with_bias)
        return tuple(grad.bfloat16() for grad in grads)
    batch, channels = input.shape[:2]
    out_channels = grad_output.shape[1]
    grad_bias = grad_output.sum((0, 2, 3)) if with_bias else grad_output.new_empty(0)
    if batch == 0:
        return grad_output.new_zeros(out_channels, 1, *kernel_size), grad_bias
    top, left, bottom, right = padding
    padded = F.pad(input, (left, right, top, bottom))
    # dW[o, r, q] = sum_{n, oh, ow} x_pad[n, o // m, oh*s + r*d, ow*s + q*d] * dy[n, o, oh, ow]: a conv of the
    # padded maps (batch moved into channels) with dy as the filter, stride and dilation swapped.
    maps = padded.transpose(0, 1).reshape(1, channels * batch, padded.shape[2], padded.shape[3])
    grad_weight = F.conv2d(
        maps, grad_output.transpose(0, 1), None, stride=tuple(dilation), dilation=tuple(stride), groups=channels
    )
    return grad_weight[0, :, : kernel_size[0], : kernel_size[1]].unsqueeze(1), grad_bias
