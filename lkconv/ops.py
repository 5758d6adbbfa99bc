"""The lkconv custom ops (forward, input grad, weight grad) with fake kernels and autograd, and the functional API.

Whichever backend runs, autograd, torch.func, torch.compile and opcheck see these three `torch.ops.lkconv` ops.
The derivatives of each op, reverse and forward mode, call the ops again, so backward passes and tangents dispatch
to a backend too and can be differentiated again.
Op arguments are ints, padding as (top, left, bottom, right). `depthwise_conv2d` turns user input into them with
full error messages; the ops themselves re-check shapes cheaply, since they can be called directly.
"""

import contextlib
import functools
import math
import operator
from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from . import arguments, backends, op_registration
from .backends import autotune, torch_backend


def _backend(tensor: Tensor, kernel, stride, padding, dilation, input_hw,
             problem: Optional[autotune.Problem] = None) -> backends.Choice:
    """The backend for one pass; every pass of a conv sees the same shape class (dy takes x's layout), so all three
    pick alike. The forward hands in its `problem`, for LKCONV_AUTOTUNE to time."""
    return backends.choose_for_conv(tensor, kernel, stride, padding, dilation, input_hw, problem)


def _in_layout_of(output: Tensor, like: Tensor) -> Tensor:
    """`output` with exactly the strides torch.empty gives it in `like`'s layout (what the fake kernels promise)."""
    memory_format = arguments.output_memory_format(like)
    if output.numel() > 0 and output.stride() == arguments.layout_strides(output.shape, memory_format):
        return output
    return torch.empty(output.shape, dtype=output.dtype, device=output.device, memory_format=memory_format).copy_(output)


def _layout_for(tensor: Tensor, memory_format: torch.memory_format) -> torch.memory_format:
    """`memory_format`, or NCHW under vmap: a batched tensor has only its logical layout."""
    if memory_format != torch.contiguous_format and op_registration.batched_by_vmap(tensor):
        return torch.contiguous_format
    return memory_format


def _empty_in_layout_of(shape, like: Tensor) -> Tensor:
    return torch.empty(tuple(shape), dtype=like.dtype, device=like.device,
                       memory_format=arguments.output_memory_format(like))


def _forward(
    input: Tensor, weight: Tensor, bias: Optional[Tensor],
    stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
) -> Tensor:
    """y = conv2d(input, weight, bias, groups=C) on a validated (N, C, H, W) input."""
    _check_forward(input, weight, bias, stride, padding, dilation)
    problem = autotune.Problem(input, weight, bias, tuple(stride), tuple(padding), tuple(dilation))
    choice = _backend(input, weight.shape[2:], stride, padding, dilation, input.shape[2:], problem)
    output = backends.run_pass(choice, "forward", input, weight, bias, stride, padding, dilation)
    return _in_layout_of(output, input)


def _check_forward(input, weight, bias, stride, padding, dilation) -> tuple:
    op = "lkconv::depthwise_conv2d"
    shape = arguments.check_op(op, input.shape, weight.shape, None, stride, padding, dilation)
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{op}: bias must have shape ({weight.shape[0]},); got {tuple(bias.shape)}")
    others = [("weight", weight)] + ([("bias", bias)] if bias is not None else [])
    arguments.check_operands(op, ("input", input), *others)
    return shape


def _forward_fake(input, weight, bias, stride, padding, dilation):
    shape = _check_forward(input, weight, bias, stride, padding, dilation)
    return _empty_in_layout_of(shape, input)


def _input_grad(
    grad_output: Tensor, weight: Tensor, input_shape: Sequence[int],
    stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
) -> Tensor:
    """dL/dinput of the forward op, for an input of `input_shape` (N, C, H, W)."""
    _check_input_grad(grad_output, weight, input_shape, stride, padding, dilation)
    choice = _backend(grad_output, weight.shape[2:], stride, padding, dilation, input_shape[2:])
    grad_input = backends.run_pass(choice, "input_grad", grad_output, weight, input_shape, stride, padding, dilation)
    return _in_layout_of(grad_input, grad_output)


def _check_input_grad(grad_output, weight, input_shape, stride, padding, dilation):
    op = "lkconv::depthwise_conv2d_input_grad"
    arguments.check_op(op, input_shape, weight.shape, grad_output.shape, stride, padding, dilation)
    arguments.check_operands(op, ("grad_output", grad_output), ("weight", weight))


def _input_grad_fake(grad_output, weight, input_shape, stride, padding, dilation):
    _check_input_grad(grad_output, weight, input_shape, stride, padding, dilation)
    return _empty_in_layout_of(input_shape, grad_output)


def _weight_grad(
    grad_output: Tensor, input: Tensor, kernel_size: Sequence[int],
    stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], with_bias: bool,
) -> tuple[Tensor, Tensor]:
    """(dL/dweight, dL/dbias) of the forward op; dL/dbias is empty when `with_bias` is False."""
    _check_weight_grad(grad_output, input, kernel_size, stride, padding, dilation)
    choice = _backend(grad_output, kernel_size, stride, padding, dilation, input.shape[2:])
    grad_weight, grad_bias = backends.run_pass(choice, "weight_grad", grad_output, input, kernel_size, stride, padding,
                                               dilation, with_bias)
    return grad_weight.contiguous(), grad_bias.contiguous()


def _check_weight_grad(grad_output, input, kernel_size, stride, padding, dilation):
    op = "lkconv::depthwise_conv2d_weight_grad"
    if len(kernel_size) != 2:
        raise ValueError(f"{op}: kernel_size must be 2 ints; got {list(kernel_size)}")
    if grad_output.dim() != 4:
        raise ValueError(f"{op}: grad_output must be (N, C*m, OH, OW); got {tuple(grad_output.shape)}")
    weight_shape = (grad_output.shape[1], 1, *kernel_size)
    arguments.check_op(op, input.shape, weight_shape, grad_output.shape, stride, padding, dilation)
    arguments.check_operands(op, ("grad_output", grad_output), ("input", input))


def _weight_grad_fake(grad_output, input, kernel_size, stride, padding, dilation, with_bias):
    _check_weight_grad(grad_output, input, kernel_size, stride, padding, dilation)
    out_channels = grad_output.shape[1]
    return (
        grad_output.new_empty((out_channels, 1, *kernel_size)),
        grad_output.new_empty((out_channels,) if with_bias else (0,)),
    )


# --- derivatives: every backward and jvp is made of the ops above -----------------------------------------------------


def _save_forward(ctx, inputs, output):
    ctx.backend_scope = backends.scoped_request()
    input, weight, bias, stride, padding, dilation = inputs
    ctx.has_bias = bias is not None
    ctx.conv = (stride, padding, dilation)
    ctx.output_shape = output.shape
    return input, weight


def _forward_backward(ctx, grad_output):
    input, weight = ctx.saved_tensors
    stride, padding, dilation = ctx.conv
    # The backward kernels read dy best in x's layout (vector loads, channels_last channel blocks); autograd may hand
    # in another one, e.g. the stride-0 expansion y.sum().backward() gives. One copy of dy puts it there, so each
    # pass runs the kernel `lkconv.explain` names.
    memory_format = _layout_for(grad_output, arguments.output_memory_format(input))
    grad_output = grad_output.contiguous(memory_format=memory_format)
    needs_input, needs_weight, needs_bias = ctx.needs_input_grad[:3]
    grad_input = grad_weight = grad_bias = None
    if needs_input:
        grad_input = depthwise_conv2d_input_grad_op(grad_output, weight, list(input.shape), stride, padding, dilation)
        # dx takes dy's layout, and a (N, C, 1, 1) dy is contiguous in both: then dx is NCHW where F.conv2d gives x's.
        grad_input = grad_input.contiguous(memory_format=memory_format)
    if needs_weight:
        grad_weight, grad_bias = depthwise_conv2d_weight_grad_op(
            grad_output, input, list(weight.shape[2:]), stride, padding, dilation, bool(needs_bias and ctx.has_bias)
        )
        if grad_weight.stride() != weight.stride() and not op_registration.batched_by_vmap(grad_weight):
            # The parameter's own strides, as nn.Conv2d's grad has them (a channels_last model's weight is
            # (kh·kw, 1, kw, 1)): DDP's buckets otherwise warn and copy. The filter is small.
            grad_weight = torch.empty_like(weight).copy_(grad_weight)
    if needs_bias and ctx.has_bias and not needs_weight:
        grad_bias = grad_output.sum((0, 2, 3))
    return grad_input, grad_weight, (grad_bias if needs_bias else None), None, None, None


def _save_input_grad(ctx, inputs, output):
    ctx.backend_scope = backends.scoped_request()
    grad_output, weight, input_shape, stride, padding, dilation = inputs
    ctx.conv = (stride, padding, dilation)
    ctx.input_shape = input_shape
    return grad_output, weight


def _input_grad_backward(ctx, grad):
    # input_grad is bilinear in (grad_output, weight): its adjoint in grad_output is the forward conv, in weight
    # the weight grad with `grad` playing the input.
    grad_output, weight = ctx.saved_tensors
    stride, padding, dilation = ctx.conv
    grad_grad_output = grad_weight = None
    if ctx.needs_input_grad[0]:
        grad_grad_output = depthwise_conv2d_op(grad, weight, None, stride, padding, dilation)
    if ctx.needs_input_grad[1]:
        grad_weight = depthwise_conv2d_weight_grad_op(grad_output, grad, list(weight.shape[2:]), stride, padding,
                                                      dilation, False)[0]
    return grad_grad_output, grad_weight, None, None, None, None


def _save_weight_grad(ctx, inputs, output):
    ctx.backend_scope = backends.scoped_request()
    grad_output, input, kernel_size, stride, padding, dilation, with_bias = inputs
    ctx.conv = (kernel_size, stride, padding, dilation)
    ctx.has_bias = with_bias
    return grad_output, input


def _weight_grad_backward(ctx, grad_weight, grad_bias):
    # The adjoint of (dy -> (dW, db)) is a forward conv with (grad_weight, grad_bias) as the filter and bias;
    # the adjoint in the input is the input grad with grad_weight as the filter.
    grad_output, input = ctx.saved_tensors
    kernel_size, stride, padding, dilation = ctx.conv
    if grad_weight is None:
        grad_weight = grad_output.new_zeros((grad_output.shape[1], 1, *kernel_size))
    bias = grad_bias if ctx.has_bias and grad_bias is not None else None
    grad_grad_output = grad_input = None
    if ctx.needs_input_grad[0]:
        grad_grad_output = depthwise_conv2d_op(input, grad_weight, bias, stride, padding, dilation)
    if ctx.needs_input_grad[1]:
        grad_input = depthwise_conv2d_input_grad_op(grad_output, grad_weight, list(input.shape), stride, padding,
                                                    dilation)
    return grad_grad_output, grad_input, None, None, None, None, None


def _sum(*terms: Optional[Tensor]) -> Optional[Tensor]:
    """The sum of the terms that are not None (None if all are)."""
    present = [term for term in terms if term is not None]
    return functools.reduce(operator.add, present) if present else None


def _forward_jvp(ctx, input_tangent, weight_tangent, bias_tangent, *_):
    # The conv is linear in the input and in (weight, bias) together: the tangent is conv(tx, w) + conv(x, tw) + tb.
    input, weight = ctx.saved_tensors
    stride, padding, dilation = ctx.conv
    from_input = from_filter = None
    if input_tangent is not None:
        from_input = depthwise_conv2d_op(input_tangent, weight, None, stride, padding, dilation)
    if weight_tangent is not None:
        from_filter = depthwise_conv2d_op(input, weight_tangent, bias_tangent, stride, padding, dilation)
    elif bias_tangent is not None:
        from_filter = bias_tangent.view(-1, 1, 1).expand(ctx.output_shape).clone(
            memory_format=_layout_for(bias_tangent, arguments.output_memory_format(input)))
    return _sum(from_input, from_filter)


def _input_grad_jvp(ctx, grad_output_tangent, weight_tangent, *_):
    # Bilinear in (grad_output, weight).
    grad_output, weight = ctx.saved_tensors
    stride, padding, dilation = ctx.conv
    pairs = ((grad_output_tangent, weight), (grad_output, weight_tangent))
    terms = [depthwise_conv2d_input_grad_op(dy, w, ctx.input_shape, stride, padding, dilation)
             for dy, w in pairs if dy is not None and w is not None]
    return _sum(*terms)


def _weight_grad_jvp(ctx, grad_output_tangent, input_tangent, *_):
    # Bilinear in (grad_output, input); the bias grad, a sum of grad_output, is linear in grad_output alone.
    grad_output, input = ctx.saved_tensors
    kernel_size, stride, padding, dilation = ctx.conv
    weight_terms, bias_tangent = [], None
    if grad_output_tangent is not None:
        weight_tangent, bias_tangent = depthwise_conv2d_weight_grad_op(
            grad_output_tangent, input, kernel_size, stride, padding, dilation, ctx.has_bias)
        weight_terms.append(weight_tangent)
    if input_tangent is not None:
        weight_terms.append(depthwise_conv2d_weight_grad_op(grad_output, input_tangent, kernel_size, stride, padding,
                                                            dilation, False)[0])
    if bias_tangent is None:
        bias_tangent = grad_output.new_zeros((grad_output.shape[1],) if ctx.has_bias else (0,))
    return _sum(*weight_terms), bias_tangent


def _in_forward_scope(backward):
    """Runs `backward` under the use_backend request its forward saw, if any (autograd may run it on another
    thread)."""

    @functools.wraps(backward)
    def run(ctx, *grads):
        if ctx.backend_scope is None:
            return backward(ctx, *grads)
        with backends.scope(ctx.backend_scope):
            return backward(ctx, *grads)

    return run


depthwise_conv2d_op = op_registration.define(
    "depthwise_conv2d(Tensor input, Tensor weight, Tensor? bias, SymInt[] stride, SymInt[] padding, "
    "SymInt[] dilation) -> Tensor",
    _forward, _forward_fake, _save_forward, _in_forward_scope(_forward_backward), _forward_jvp)
depthwise_conv2d_input_grad_op = op_registration.define(
    "depthwise_conv2d_input_grad(Tensor grad_output, Tensor weight, SymInt[] input_shape, SymInt[] stride, "
    "SymInt[] padding, SymInt[] dilation) -> Tensor",
    _input_grad, _input_grad_fake, _save_input_grad, _in_forward_scope(_input_grad_backward), _input_grad_jvp)
depthwise_conv2d_weight_grad_op = op_registration.define(
    "depthwise_conv2d_weight_grad(Tensor grad_output, Tensor input, SymInt[] kernel_size, SymInt[] stride, "
    "SymInt[] padding, SymInt[] dilation, bool with_bias) -> (Tensor, Tensor)",
    _weight_grad, _weight_grad_fake, _save_weight_grad, _in_forward_scope(_weight_grad_backward), _weight_grad_jvp)


# --- vmap: each op runs once for the whole vmapped batch -----------------------------------------------------------
# Members of a batch that share the filter fold into the images; members that share the map fold into the depth
# multiplier (forward); otherwise (an ensemble's filters on their own maps, or per-sample weight grads) members fold
# into the channels, member b's channels after member b - 1's, which is again a depthwise conv because channel c of
# member b only ever meets filter c of member b.


def _per_member(info, tensor: Tensor, dim: Optional[int]) -> Tensor:
    """A vmapped argument with its members first (an unbatched one repeated for each)."""
    return tensor.movedim(dim, 0) if dim is not None else tensor.expand(info.batch_size, *tensor.shape)


def _members_in_channels(info, maps: Tensor, dim: Optional[int]) -> Tensor:
    """Vmapped (N, C, H, W) maps as (N, B·C, H, W), member b's channels after member b - 1's."""
    return _per_member(info, maps, dim).transpose(0, 1).flatten(1, 2)


def _batched_forward(info, in_dims, input, weight, bias, stride, padding, dilation):
    input_dim, weight_dim, bias_dim = in_dims[:3]
    if weight_dim is None and bias_dim is None:
        maps = input.movedim(input_dim, 0)
        output = depthwise_conv2d_op(maps.flatten(0, 1), weight, bias, stride, padding, dilation)
        return output.unflatten(0, maps.shape[:2]), 0

    if input_dim is None:
        # One map through each member's filters (an ensemble on one batch, jacfwd in the weight): the members fold
        # into the depth multiplier, so the map is read once instead of copied per member.
        channels = input.shape[1]

        def per_channel(tensor, dim):  # (B, C·m, ...) -> (C·B·m, ...)
            return _per_member(info, tensor, dim).unflatten(1, (channels, -1)).transpose(0, 1).flatten(0, 2)

        biases = None if bias is None else per_channel(bias, bias_dim)
        output = depthwise_conv2d_op(input, per_channel(weight, weight_dim), biases, stride, padding, dilation)
        # (N, C·B·m, OH, OW) -> (B, N, C·m, OH, OW): a view for m = 1, a copy of the output otherwise.
        return output.unflatten(1, (channels, info.batch_size, -1)).movedim(2, 0).flatten(2, 3), 0

    filters = _per_member(info, weight, weight_dim).flatten(0, 1)  # (B·C·m, 1, kh, kw)
    biases = None if bias is None else _per_member(info, bias, bias_dim).flatten()
    output = depthwise_conv2d_op(_members_in_channels(info, input, input_dim), filters, biases, stride, padding,
                                 dilation)
    return output.unflatten(1, (info.batch_size, -1)), 1


def _batched_input_grad(info, in_dims, grad_output, weight, input_shape, stride, padding, dilation):
    grad_output_dim, weight_dim = in_dims[:2]
    images, channels, height, width = input_shape
    if weight_dim is None:
        grads = grad_output.movedim(grad_output_dim, 0)
        grad_input = depthwise_conv2d_input_grad_op(grads.flatten(0, 1), weight,
                                                    [info.batch_size * images, channels, height, width], stride,
                                                    padding, dilation)
        return grad_input.unflatten(0, grads.shape[:2]), 0

    filters = _per_member(info, weight, weight_dim).flatten(0, 1)
    grad_input = depthwise_conv2d_input_grad_op(_members_in_channels(info, grad_output, grad_output_dim), filters,
                                                [images, info.batch_size * channels, height, width], stride, padding,
                                                dilation)
    return grad_input.unflatten(1, (info.batch_size, channels)), 1


def _batched_weight_grad(info, in_dims, grad_output, input, kernel_size, stride, padding, dilation, with_bias):
    # The weight grad sums over the images, so members fold into the channels (per-sample grads, say); or, where
    # only grad_output is batched (jacrev in the weight, batched grads), into the depth multiplier, so that the
    # input is not copied once per member: member b's grads of channel c sit between c's other members'.
    members = info.batch_size
    if in_dims[1] is None:
        grads = grad_output.movedim(in_dims[0], 0)  # (B, N, C·m, OH, OW)
        channels = input.shape[1]
        per_channel = grads.unflatten(2, (channels, -1)).permute(1, 2, 0, 3, 4, 5).flatten(1, 3)  # (N, C·B·m, ...)
        grad_weight, grad_bias = depthwise_conv2d_weight_grad_op(per_channel, input, kernel_size, stride, padding,
                                                                 dilation, with_bias)
        def per_member(grads):  # (C·B·m, ...) -> (B, C·m, ...)
            return grads.unflatten(0, (channels, members, -1)).transpose(0, 1).flatten(1, 2)

        grad_bias = per_member(grad_bias) if with_bias else grad_bias.new_empty(members, 0)
        return (per_member(grad_weight), grad_bias), (0, 0)
    grad_weight, grad_bias = depthwise_conv2d_weight_grad_op(
        _members_in_channels(info, grad_output, in_dims[0]), _members_in_channels(info, input, in_dims[1]),
        kernel_size, stride, padding, dilation, with_bias)
    return (grad_weight.unflatten(0, (members, -1)), grad_bias.reshape(members, grad_bias.shape[0] // members)), (0, 0)


torch.library.register_vmap(depthwise_conv2d_op, _batched_forward, lib=op_registration.LIBRARY)
torch.library.register_vmap(depthwise_conv2d_input_grad_op, _batched_input_grad, lib=op_registration.LIBRARY)
torch.library.register_vmap(depthwise_conv2d_weight_grad_op, _batched_weight_grad, lib=op_registration.LIBRARY)


def _register_autocast(name: str, device_type: str) -> None:
    """Under torch.autocast the op computes as nn.Conv2d would: floating tensors (float64 excepted) in the autocast
    dtype, whatever that region set, with autocast off inside, so the backend's own PyTorch calls compute in the
    dtype the op's fake kernel and autograd expect. (torch.library.register_autocast fixes one dtype per device.)"""
    key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    excluded = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))
    op = getattr(torch.ops.lkconv, name).default

    def kernel(_keyset, *args):
        args = tuple(_autocast(arg, device_type) for arg in args)
        with torch._C._ExcludeDispatchKeyGuard(excluded):
            return op(*args)

    op_registration.LIBRARY.impl(name, kernel, key, with_keyset=True)


for _device_type in ("cpu", "cuda"):
    for _name in ("depthwise_conv2d", "depthwise_conv2d_input_grad", "depthwise_conv2d_weight_grad"):
        _register_autocast(_name, _device_type)


# FLOPs for torch.utils.flop_counter.FlopCounterMode: 2 per multiply-add, as aten's forward conv is counted. Every
# pass of a depthwise conv does one multiply-add per (output element, tap), forward or backward. (torch's own formula
# for convolution_backward ignores groups and counts a depthwise weight grad C times too high; these are right.)
@register_flop_formula(torch.ops.lkconv.depthwise_conv2d)
def _forward_flops(input_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * math.prod(out_shape) * weight_shape[-2] * weight_shape[-1]


@register_flop_formula(torch.ops.lkconv.depthwise_conv2d_input_grad)
def _input_grad_flops(grad_output_shape, weight_shape, *args, **kwargs) -> int:
    return 2 * math.prod(grad_output_shape) * weight_shape[-2] * weight_shape[-1]


@register_flop_formula(torch.ops.lkconv.depthwise_conv2d_weight_grad)
def _weight_grad_flops(grad_output_shape, input_shape, kernel_size, *args, **kwargs) -> int:
    return 2 * math.prod(grad_output_shape) * kernel_size[0] * kernel_size[1]


# --- public functional API ----------------------------------------------------------------------------------------


def _autocast(tensor: Optional[Tensor], device_type: str) -> Optional[Tensor]:
    """The tensor as autocast would hand it to conv2d: floating point but float64 goes to the autocast dtype."""
    if isinstance(tensor, Tensor) and tensor.is_floating_point() and tensor.dtype != torch.float64:
        return tensor.to(torch.get_autocast_dtype(device_type))
    return tensor


@torch.compiler.assume_constant_result
def _autocast_available(device_type: str) -> bool:
    """Whether autocast exists for this device type: a constant per process, which torch.compile takes as one
    (Dynamo in PyTorch 2.11 cannot trace torch.amp.is_autocast_available itself, and would break the graph)."""
    return torch.amp.is_autocast_available(device_type)


def _prepare(input, weight, bias, stride, padding, dilation):
    """Applies autocast and validates a call, as F.conv2d would; returns the op's arguments."""
    if torch.jit.is_tracing():  # its sizes are tensors there, which no check of ours reads
        raise RuntimeError(
            "torch.jit.trace cannot trace lkconv's depthwise conv: trace lkconv.revert(model) instead (a copy with "
            "plain nn.Conv2d layers, on PyTorch's conv), or use torch.compile or torch.export, which keep lkconv's op")
    unbatched = isinstance(input, Tensor) and input.dim() == 3
    if unbatched:
        input = input.unsqueeze(0)
    if isinstance(input, Tensor):
        device_type = input.device.type
        if _autocast_available(device_type) and torch.is_autocast_enabled(device_type):
            input, weight, bias = (_autocast(t, device_type) for t in (input, weight, bias))
    args = arguments.check(input, weight, bias, stride, padding, dilation)
    return unbatched, (input, weight, bias, list(args.stride), list(args.padding), list(args.dilation))


def _complex_as_real(input: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """The one real conv whose output holds the four products of a complex conv.

    The real and imaginary parts of the input are stacked along the batch (2N images), and each channel gets its
    filter's real and imaginary parts as a doubled depth multiplier: weight (C, 2, m) per channel, real first.
    """
    channels, multiplier = input.shape[1], weight.shape[0] // input.shape[1]
    stacked_input = torch.cat([input.real, input.imag])
    filters = weight.reshape(channels, 1, multiplier, *weight.shape[2:])
    stacked_weight = torch.cat([filters.real, filters.imag], dim=1).reshape(2 * weight.shape[0], 1, *weight.shape[2:])
    return stacked_input, stacked_weight


def _complex_from_real(output: Tensor, channels: int, bias: Optional[Tensor]) -> Tensor:
    """Combines `_complex_as_real`'s output: (xr + i xi)(wr + i wi) = xr wr - xi wi + i (xr wi + xi wr), plus the
    bias (added to the real parts: PyTorch cannot sum complex32 gradients)."""
    parts = output.unflatten(0, (2, -1)).unflatten(2, (channels, 2, -1))  # (x part, N, C, w part, m, OH, OW)
    real = parts[0, :, :, 0] - parts[1, :, :, 1]
    imag = parts[0, :, :, 1] + parts[1, :, :, 0]
    if bias is not None:
        bias = bias.reshape(channels, -1, 1, 1)
        real, imag = real + bias.real, imag + bias.imag
    return torch.complex(real, imag).flatten(1, 2)


def _autocast_off(device_type: str):
    """No autocast inside calls whose operands are already as they must be: a complex conv's real parts (F.conv2d
    leaves complex tensors alone) and PyTorch's conv where transforms need it (`_pytorch_conv`)."""
    if _autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _complex_conv(input, weight, bias, stride, padding, dilation) -> Tensor:
    """A complex depthwise conv as one real one (`_complex_as_real`); autograd flows through the real and
    imaginary views, so its gradients follow PyTorch's complex conventions."""
    with _autocast_off(input.device.type):
        output = depthwise_conv2d_op(*_complex_as_real(input, weight), None, stride, padding, dilation)
    output = _complex_from_real(output, input.shape[1], bias)
    return output.contiguous(memory_format=_layout_for(output, arguments.output_memory_format(input)))


def _pytorch_must_answer(tensors) -> Optional[str]:
    """Why PyTorch's own conv must answer this call, or None.

    torch.func's transforms and forward-mode AD run lkconv's ops like any autograd (op_registration.py), except:
    - one forward-mode transform inside another (jvp of jvp, jacfwd of jacfwd): a jvp formula runs with forward
      mode off, so the outer transform would get no derivative through the ops (they refuse);
    - inside torch.compile, where forward-mode AD through the ops fails to trace (torch.func.jvp, or dual tensors),
      and Dynamo can read whether a torch.func transform is active but not which: there any transform (vmap too)
      and any forward-mode tangent take PyTorch's conv, whatever backend is forced.
    """
    if not torch.compiler.is_compiling():
        if torch._C._are_functorch_transforms_active() and op_registration.nested_forward_levels() >= 2:
            return "a torch.func forward-mode transform inside another"
        return None
    if torch._C._functorch.maybe_current_level() is not None:
        return "a torch.func transform inside torch.compile"
    if op_registration.carries_tangent(tensors):
        return "forward-mode AD (a dual tensor) inside torch.compile"
    return None


def _pytorch_conv(input, weight, bias, stride, padding, dilation) -> Tensor:
    """The conv as PyTorch's own differentiable ops, for transforms that cannot see through lkconv's ops. The
    operands are already in the autocast dtype (`_prepare`); autocast is off inside, as in the ops, so that the torch
    backend's own casts (CPU bfloat16 in float32) stand."""
    with _autocast_off(input.device.type):
        output = torch_backend.forward(input, weight, bias, stride, padding, dilation)
    return output.contiguous(memory_format=_layout_for(output, arguments.output_memory_format(input)))


def depthwise_conv2d(
    input: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    stride: arguments.IntPair = 1,
    padding: arguments.Padding = 0,
    dilation: arguments.IntPair = 1,
) -> Tensor:
    """Depthwise 2-D convolution: exactly ``F.conv2d(input, weight, bias, stride, padding, dilation, groups=C)``.

    Args:
        input: (N, C, H, W) or unbatched (C, H, W); float16, bfloat16, float32 or float64, or complex (computed
            as one real conv of the stacked real and imaginary parts); any strides (NCHW, channels_last or sliced).
        weight: (C*m, 1, kh, kw) for a depth multiplier m >= 1; any kh, kw (odd, even, non-square, larger
            than the map).
        bias: optional (C*m,).
        stride, dilation: an int or an (h, w) pair, each >= 1.
        padding: an int, an (h, w) pair, 'same' (stride 1 only; the odd element goes bottom/right) or 'valid'.

    Returns:
        (N, C*m, OH, OW), in the layout F.conv2d would give it (channels_last for a channels_last map or a view
        sliced from one). Differentiable to any order; the backend is chosen per call (see ``lkconv.explain``).
    """
    if torch.overrides.has_torch_function_variadic(input, weight, bias):
        # Tensor subclasses, torch function modes and tracers (torch.fx's Proxy) see one call, as they see F.conv2d.
        return torch.overrides.handle_torch_function(depthwise_conv2d, (input, weight, bias), input, weight, bias,
                                                     stride=stride, padding=padding, dilation=dilation)
    unbatched, op_args = _prepare(input, weight, bias, stride, padding, dilation)
    if _pytorch_must_answer(op_args[:3]) is not None:
        output = _pytorch_conv(*op_args)
    else:
        output = (_complex_conv if op_args[0].is_complex() else depthwise_conv2d_op)(*op_args)
    return output.squeeze(0) if unbatched else output


class Explanation(NamedTuple):
    """Which backend and kernels a call would use, and why; ``str()`` gives a readable summary."""

    backend: str
    reason: str
    forward: str
    input_grad: str
    weight_grad: str

    def __str__(self) -> str:
        return (
            f"backend: {self.backend} ({self.reason})\n"
            f"  forward:     {self.forward}\n"
            f"  input grad:  {self.input_grad}\n"
            f"  weight grad: {self.weight_grad}"
        )


def explain(
    input: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    stride: arguments.IntPair = 1,
    padding: arguments.Padding = 0,
    dilation: arguments.IntPair = 1,
) -> Explanation:
    """Says which backend and kernel each pass of ``depthwise_conv2d(input, weight, ...)`` would run, and why.

    Takes the same arguments as ``depthwise_conv2d``, validates them the same way and runs nothing. A forced
    backend that cannot run the call raises here as it would in the call.
    """
    _, (input, weight, bias, stride, padding, dilation) = _prepare(input, weight, bias, stride, padding, dilation)
    if (why := _pytorch_must_answer((input, weight, bias))) is not None:
        return Explanation("torch", f"{why}: PyTorch's own conv answers", forward="F.conv2d",
                           input_grad="PyTorch's derivative of F.conv2d", weight_grad="PyTorch's derivative of F.conv2d")
    is_complex = input.is_complex()
    if is_complex:
        input, weight = _complex_as_real(input, weight)
    choice = backends.choose_for_conv(input, weight.shape[2:], stride, padding, dilation, input.shape[2:])
    output_hw = tuple(
        arguments.output_size(input.shape[2 + i], weight.shape[2 + i], stride[i], padding[i], padding[2 + i], dilation[i])
        for i in range(2)
    )
    plans = {
        pass_name: choice.module.describe(
            pass_name, input=input, weight=weight, output_hw=output_hw, stride=tuple(stride), padding=tuple(padding),
            dilation=tuple(dilation),
        )
        for pass_name in ("forward", "input_grad", "weight_grad")
    }
    reason = choice.reason
    if is_complex:
        reason += f"; complex: one {input.dtype} conv of the real and imaginary parts, shape {tuple(input.shape)}"
    return Explanation(choice.module.name, reason, **plans)
