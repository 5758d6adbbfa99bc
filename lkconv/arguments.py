"""Checks and normalises the arguments of a depthwise conv before any kernel runs.

One place turns what a user may pass (ints, pairs, 'same', 'valid', unbatched input) into the exact ints the
ops take, and rejects everything else with an error that names the argument, the expected and the received
value.
"""

import functools
import numbers
import operator
from typing import Callable, NamedTuple, Optional, Sequence, Union

import torch
from torch.fx.experimental.symbolic_shapes import guard_or_false

IntPair = Union[int, Sequence[int]]
Padding = Union[str, int, Sequence[int]]

# The dtypes the ops compute in. A complex conv is computed from real ones (see ops.depthwise_conv2d), in the real
# dtype of its parts: complex32 in float16, complex64 in float32, complex128 in float64.
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
COMPLEX_DTYPES = (torch.complex32, torch.complex64, torch.complex128)


def _require(condition, message: Callable[[], str]) -> None:
    """Raises ValueError(message()) unless `condition`. Under torch.compile or torch.export a size may be symbolic, and
    one computed from data (unbacked) cannot be decided while tracing: torch._check_value then makes it a check the
    graph runs, as F.conv2d's own checks do. Under Dynamo a symbolic condition's type reads as bool, and a message
    built from symbolic sizes cannot be carried, hence its own branch. A passed eager check returns at once
    (_check_value costs about a microsecond, and a call makes a dozen checks)."""
    if condition is True:
        return
    if torch.compiler.is_compiling():
        if condition is False:
            raise ValueError(message())
        torch._check_value(condition)
    elif not isinstance(condition, bool):
        torch._check_value(condition, message)
    elif not condition:
        raise ValueError(message())


class ConvArgs(NamedTuple):
    """A depthwise conv after validation: stride and dilation as (h, w), padding as (top, left, bottom, right)."""

    stride: tuple[int, int]
    padding: tuple[int, int, int, int]
    dilation: tuple[int, int]


def _int(value) -> int:
    """Any integer, Python or NumPy, or an integer tensor of one element (F.conv2d takes those too); not a bool,
    a bool tensor or a float."""
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        raise TypeError
    return operator.index(value)


def whole_number(value, name: str, minimum: int = 1) -> int:
    """`value` as a Python int >= `minimum`: ints and NumPy or integer-tensor scalars (anything with __index__), not
    bools or floats; else a ValueError naming the argument. (Plain ints, because NumPy scalars would multiply in
    their own, overflowing, types.)"""
    try:
        if isinstance(value, bool):
            raise TypeError
        number = operator.index(value)
    except TypeError:
        number = minimum - 1
    if number < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {value!r}")
    return number


def positive_number(value, name: str) -> float:
    """`value` as a finite float > 0 (an int or a float, not a bool); else a ValueError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ValueError(f"{name} must be a number > 0; got {value!r}")
    return float(value)


def probability(value, name: str) -> float:
    """`value` as a float in [0, 1) (a real number, not a bool), as drop-path rates are; else a ValueError naming the
    argument."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1); got {value!r}")
    return float(value)


def pair(value: IntPair, name: str, minimum: int) -> tuple[int, int]:
    """An int or a 1- or 2-element sequence of ints as (h, w), as F.conv2d reads stride/padding/dilation."""
    # The common cases first, cheaply: an exact int, or a tuple of two (nn.Conv2d's attributes). A bool, an int
    # subclass, takes the general path.
    if type(value) is int:
        pair = (value, value)
    elif type(value) is tuple and len(value) == 2 and type(value[0]) is int and type(value[1]) is int:
        pair = value
    else:
        try:
            if isinstance(value, (tuple, list, torch.Size)):
                if len(value) not in (1, 2):
                    raise TypeError
                pair = (_int(value[0]), _int(value[-1]))
            else:
                pair = (_int(value), _int(value))
        except TypeError:
            raise TypeError(f"{name} must be an int or a pair of ints; got {value!r}") from None
    if min(pair) < minimum:
        raise ValueError(f"{name} must be >= {minimum} in both dimensions; got {value!r}")
    return pair


def conv_padding(
    padding: Padding, kernel_size: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int]
) -> tuple[int, int, int, int]:
    """Resolves ``padding`` to (top, left, bottom, right), the way F.conv2d does.

    'same' pads dilation*(k-1) in total per axis, the odd element at the bottom/right, and needs stride 1.
    """
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding == "same":
            if stride != (1, 1):
                raise ValueError(f"padding='same' needs stride 1; got stride={stride}")
            total = [d * (k - 1) for d, k in zip(dilation, kernel_size)]
            begin = [t // 2 for t in total]
            return (begin[0], begin[1], total[0] - begin[0], total[1] - begin[1])
        raise ValueError(f"padding must be an int, a pair of ints, 'same' or 'valid'; got {padding!r}")
    top, left = pair(padding, "padding", 0)
    return (top, left, top, left)


def output_size(size: int, kernel: int, stride: int, pad_begin: int, pad_end: int, dilation: int) -> int:
    """Output length along one axis, as F.conv2d computes it (floor division)."""
    return (size + pad_begin + pad_end - dilation * (kernel - 1) - 1) // stride + 1


GPU_GEOMETRY_LIMIT = 2**30  # the GPU kernels keep sizes, strides, paddings and dilations in 32-bit ints


def beyond_gpu_geometry(kernel, stride, padding, dilation, input_hw) -> Optional[str]:
    """Why a conv's geometry is too large for the GPU kernels' 32-bit index math (kernel sizes, kernel areas, strides,
    paddings and dilated kernel extents above 2**30, or a padded map of 2**31 rows or columns), or None. F.conv2d
    computes such convs in 64 bits, so PyTorch answers them."""
    for i, axis in enumerate(("height", "width")):
        padded = input_hw[i] + padding[i] + padding[2 + i]
        reach = dilation[i] * (kernel[i] - 1)
        if max(kernel[i], stride[i], padding[i], padding[2 + i], reach) <= GPU_GEOMETRY_LIMIT \
                and padded < 2 * GPU_GEOMETRY_LIMIT:
            continue  # every call on a GPU asks: the common answer without building messages
        values = {"kernel size": kernel[i], "stride": stride[i], "padding": max(padding[i], padding[2 + i]),
                  "dilation x (kernel size - 1)": reach}
        for name, value in values.items():
            if value > GPU_GEOMETRY_LIMIT:
                return f"the {name} along the {axis}, {value}, is beyond the 2**30 the GPU kernels index in 32 bits"
        return f"the padded {axis}, {padded}, is beyond the 2**31 the GPU kernels index in 32 bits"
    if kernel[0] * kernel[1] > GPU_GEOMETRY_LIMIT:
        return (f"the kernel's area, {kernel[0]} x {kernel[1]} = {kernel[0] * kernel[1]} taps, is beyond the 2**30 the "
                "GPU kernels index in 32 bits")
    return None


def check_tensor(name: str, tensor) -> None:
    """`tensor` is a tensor the public API takes: floating point or complex (integer and bool are refused)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(tensor).__name__}")
    if tensor.dtype not in SUPPORTED_DTYPES + COMPLEX_DTYPES:
        quantized = (" lkconv's layers are float only, and torch.ao quantization leaves them so: quantize "
                     "lkconv.revert(model) instead." if tensor.is_quantized else "")
        raise TypeError(
            f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64) or a complex one "
            f"(complex32, complex64 or complex128); got {tensor.dtype}.{quantized}"
        )


def check_input(input) -> None:
    """The input of a conv, before anything (padding included) touches it: batched (N, C, H, W) or not (C, H, W)."""
    check_tensor("input", input)
    if input.dim() not in (3, 4):
        raise ValueError(f"input must be 4-D (N, C, H, W) or 3-D (C, H, W); got {input.dim()}-D shape {tuple(input.shape)}")


def check(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    stride: IntPair,
    padding: Padding,
    dilation: IntPair,
) -> ConvArgs:
    """Validates a depthwise conv call on a batched (N, C, H, W) input; raises before any kernel runs."""
    check_input(input)
    check_tensor("weight", weight)
    if bias is not None:
        check_tensor("bias", bias)
    if input.dim() != 4:
        raise ValueError(f"input must be 4-D (N, C, H, W); got {input.dim()}-D shape {tuple(input.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"weight must be 4-D (C*m, 1, kh, kw); got {weight.dim()}-D shape {tuple(weight.shape)}")
    channels = input.shape[1]
    _require(channels != 0, lambda: f"input must have at least one channel; got shape {tuple(input.shape)}")
    out_channels, per_group, kernel_h, kernel_w = weight.shape

    def weight_message():
        return (f"weight must have shape (C*m, 1, kh, kw) with C = {channels} input channels, m >= 1 and kh, kw >= 1; "
                f"got {tuple(weight.shape)}")

    for condition in (per_group == 1, out_channels != 0, out_channels % channels == 0, kernel_h != 0, kernel_w != 0):
        if condition is not True:
            _require(condition, weight_message)
    if bias is not None and tuple(bias.shape) != (out_channels,):
        raise ValueError(f"bias must have shape ({out_channels},), one value per output channel; got {tuple(bias.shape)}")
    for name, tensor in (("weight", weight), ("bias", bias)):
        if tensor is None:
            continue
        if tensor.dtype != input.dtype:
            raise TypeError(f"{name} must have the input's dtype {input.dtype}; got {tensor.dtype}")
        if tensor.device != input.device:
            raise ValueError(f"{name} must be on the input's device {input.device}; got {tensor.device}")

    stride_pair = pair(stride, "stride", 1)
    dilation_pair = pair(dilation, "dilation", 1)
    kernel_size = (kernel_h, kernel_w)
    pads = conv_padding(padding, kernel_size, stride_pair, dilation_pair)
    in_size = (input.shape[2], input.shape[3])
    out_size = (output_size(in_size[0], kernel_h, stride_pair[0], pads[0], pads[2], dilation_pair[0]),
                output_size(in_size[1], kernel_w, stride_pair[1], pads[1], pads[3], dilation_pair[1]))
    for size in in_size:  # one size at a time: a symbolic Min would hide its bound from export
        if (positive := size >= 1) is not True:
            _require(positive, lambda: f"input must have H, W >= 1; got shape {tuple(input.shape)}")
    for size in out_size:
        if (positive := size >= 1) is not True:
            _require(positive, lambda: (
                f"the output would be empty: input (H, W) = {in_size} padded by (top, left, bottom, right) = {pads} "
                f"is smaller than the dilated kernel "
                f"{tuple(d * (k - 1) + 1 for d, k in zip(dilation_pair, kernel_size))}; got output size {out_size}"))
    return ConvArgs(stride_pair, pads, dilation_pair)


def _strides_like_channels_last(shape, strides, known=bool) -> bool:
    """PyTorch's test of a 4-d map's strides (suggest_memory_format): C, W, H, N from the fastest to the slowest, each
    stride at least the extent of the faster ones. Views sliced out of a channels_last map pass it too. `known` turns
    each comparison into a bool (guard_or_false for symbolic sizes: what tracing cannot decide does not hold)."""
    extent = 0
    if known(strides[1] == 0):
        return False
    for dim in (1, 3, 2, 0):
        if known(shape[dim] == 0) or known(strides[dim] < extent) or (dim == 0 and known(extent == strides[1])):
            return False
        extent = strides[dim] * shape[dim] if known(shape[dim] > 1) else strides[dim]
    return True


def output_memory_format(tensor: torch.Tensor) -> torch.memory_format:
    """The layout an op's output takes from its input, as F.conv2d chooses it (suggest_memory_format): channels_last
    for a map whose strides are channels_last's (a sliced view of one included, and a one-channel NHWC map, which is
    plain contiguous too); NCHW otherwise. Symbolic sizes (torch.compile, torch.export) are read without guards that
    data-dependent sizes could not meet."""
    if type(tensor) is torch.Tensor and not torch.compiler.is_dynamo_compiling():  # eager: concrete sizes
        channels_last = _strides_like_channels_last(tensor.shape, tensor.stride())
    else:  # Dynamo's and fake tensors' (compiled graphs', torch.export's) sizes may be symbolic or data-dependent
        channels_last = _strides_like_channels_last(tensor.shape, tensor.stride(), guard_or_false)
    return torch.channels_last if channels_last else torch.contiguous_format


def check_operands(op: str, first: tuple, *others: tuple) -> None:
    """The (name, tensor) `first` has a dtype the ops compute in, and every one of `others` its dtype and device.

    The ops take real tensors only: their backward formulas are those of a real conv (a complex one would need
    conjugated filters), so complex convs go through ``lkconv.depthwise_conv2d``, which builds them from real ones.
    """
    first_name, first_tensor = first
    if first_tensor.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{op}: {first_name} must be float16, bfloat16, float32 or float64 (lkconv.depthwise_conv2d computes "
            f"complex convs from real ones); got {first_tensor.dtype}"
        )
    for name, tensor in others:
        if tensor.dtype != first_tensor.dtype or tensor.device != first_tensor.device:
            raise ValueError(
                f"{op}: {name} must match {first_name} in dtype and device ({first_tensor.dtype}, {first_tensor.device}); "
                f"got ({tensor.dtype}, {tensor.device})"
            )


def check_op(op: str, in_shape: Sequence[int], weight_shape: Sequence[int], out_shape: Optional[Sequence[int]],
             stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]) -> tuple:
    """Checks the shapes the ops receive directly (their kernels would otherwise read out of bounds) and returns
    the output shape (N, C*m, OH, OW); `out_shape`, when given, must equal it."""
    if len(stride) != 2 or len(dilation) != 2 or len(padding) != 4 or min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ValueError(
            f"{op}: stride and dilation must be 2 ints >= 1 and padding 4 ints >= 0 (top, left, bottom, right); "
            f"got stride={list(stride)}, padding={list(padding)}, dilation={list(dilation)}"
        )
    in_shape, weight_shape = tuple(in_shape), tuple(weight_shape)

    def shapes_message():
        return (f"{op}: input must be (N, C, H, W) and weight (C*m, 1, kh, kw); got input {in_shape}, "
                f"weight {weight_shape}")

    def geometry():
        return (f"input {in_shape} and weight {weight_shape} with stride {list(stride)}, padding {list(padding)} and "
                f"dilation {list(dilation)}")

    def empty_message():
        return (f"{op}: the output would be empty: {geometry()} give output size {expected[2:]}; the padded input "
                "must be at least the dilated kernel, and H, W >= 1")

    def output_message():
        return f"{op}: {geometry()} give output {expected}; got {tuple(out_shape)}"

    _require(len(in_shape) == 4 and len(weight_shape) == 4, shapes_message)
    for condition in (weight_shape[1] == 1, in_shape[1] >= 1, weight_shape[0] >= 1,
                      weight_shape[0] % in_shape[1] == 0, weight_shape[2] >= 1, weight_shape[3] >= 1):
        if condition is not True:
            _require(condition, shapes_message)
    expected = (in_shape[0], weight_shape[0],
                output_size(in_shape[2], weight_shape[2], stride[0], padding[0], padding[2], dilation[0]),
                output_size(in_shape[3], weight_shape[3], stride[1], padding[1], padding[3], dilation[1]))
    for size in (*expected[2:], *in_shape[2:]):
        if (positive := size >= 1) is not True:
            _require(positive, empty_message)
    if out_shape is not None:
        _require(len(out_shape) == 4, output_message)
        for size, wanted in zip(out_shape, expected):
            if (equal := size == wanted) is not True:
                _require(equal, output_message)
    return expected


@functools.lru_cache(maxsize=4096)
def layout_strides(shape: Sequence[int], memory_format: torch.memory_format) -> tuple[int, ...]:
    """The strides torch.empty gives a non-empty `shape` in `memory_format`, size-1 dimensions included (cached:
    every call checks its output's strides).

    The ops return exactly these strides and their fake kernels promise them, so compiled graphs never disagree.
    """
    order = (1, 3, 2, 0) if memory_format == torch.channels_last else (3, 2, 1, 0)  # innermost first
    strides, step = [0] * 4, 1
    for dim in order:
        strides[dim] = step
        step *= max(int(shape[dim]), 1)
    return tuple(strides)
