"""Defines lkconv's ops in the dispatcher: what torch.library.custom_op registers, in fewer steps per call.

An op needs a kernel, a fake kernel for tracing, and an Autograd kernel that records its backward. custom_op
registers these through generic wrappers (pytree handling, out= and alias checks, a metadata object per call),
which cost a six-argument op ≈14 µs of host time per call, and ≈17 µs more when the call records autograd
(benchmarks/NOTES.md, "Host time per call"). lkconv calls its ops on every pass of every layer, so it registers
the same three kernels directly: the Autograd kernel redispatches below autograd, through an autograd.Function
when a gradient is needed, as custom_op's does.

Unlike custom_op's, these ops also have forward-mode formulas, and torch.func's transforms see through them.
"""

from typing import Callable

import torch
from torch._functorch.utils import enable_single_level_autograd_function
from torch.autograd import forward_ad

LIBRARY = torch.library.Library("lkconv", "FRAGMENT")
_AFTER_AUTOGRAD = torch._C._after_autograd_keyset


def define(schema: str, kernel: Callable, fake: Callable, setup_context: Callable, backward: Callable,
           jvp: Callable) -> torch._ops.OpOverload:
    """Defines `lkconv::<schema>` with `kernel` for every device, `fake` for tracing, and its derivatives:
    - `setup_context(ctx, inputs, output)` runs after the kernel when a derivative is needed, sets what the formulas
      need on `ctx` and returns the tensors to save (read back as `ctx.saved_tensors`);
    - `backward(ctx, *grads)` returns one gradient (or None) per input, as for custom_op's register_autograd;
    - `jvp(ctx, *tangents)` returns the output's tangent from one tangent (or None) per input.
    Each formula is made of ops, so derivatives of any order, in either mode, dispatch to a backend again.

    `kernel` must return fresh tensors: custom_op checked at run time that no output aliases an input or another
    output, and this registration does not (opcheck does, in the tests)."""
    name = schema.partition("(")[0]
    LIBRARY.define(schema, tags=(torch.Tag.pt2_compliant_tag,))
    op = getattr(torch.ops.lkconv, name).default
    # Dynamo must not trace into the kernel when a compiled graph calls the op (custom_op disables it too).
    LIBRARY.impl(name, torch._disable_dynamo(kernel), "CompositeExplicitAutograd")
    torch.library.register_fake(op, fake, lib=LIBRARY)
    LIBRARY.impl(name, _autograd_kernel(op, setup_context, backward, jvp), "Autograd", with_keyset=True)
    return op


def carries_tangent(inputs) -> bool:
    """Whether forward-mode AD is on and any tensor in `inputs` carries a tangent."""
    return forward_ad._current_level >= 0 and torch._C._is_fwd_grad_enabled() and any(
        isinstance(t, torch.Tensor) and forward_ad.unpack_dual(t).tangent is not None for t in inputs)


def nested_forward_levels() -> int:
    """How many torch.func forward-mode transforms (jvp, jacfwd) are active, one inside another."""
    return sum(interpreter.key() == torch._C._functorch.TransformType.Jvp
               for interpreter in torch._C._functorch.get_interpreter_stack() or ())


def batched_by_vmap(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is batched by a vmap: torch.func's (any level of the transform stack), or the legacy one of
    autograd.grad(is_grads_batched=True). Such a tensor has only its logical layout: it can be neither asked whether
    it is channels_last nor copied into that layout, nor copied into an unbatched tensor. Dynamo reads whether a
    torch.func transform is active but not which, so while it traces any transform counts."""
    if torch.compiler.is_compiling():
        return torch._C._functorch.maybe_current_level() is not None
    return torch._C._functorch.is_legacy_batchedtensor(tensor) or any(
        interpreter.key() == torch._C._functorch.TransformType.Vmap
        for interpreter in torch._C._functorch.get_interpreter_stack() or ())


def _refuse_nested_forward_mode(op: torch._ops.OpOverload) -> None:
    """A jvp formula runs with forward mode off (as for any autograd.Function), so under two nested forward-mode
    transforms the outer one would get no tangent through it: a silently wrong derivative. Refuse instead."""
    if nested_forward_levels() >= 2:
        raise RuntimeError(
            f"{op}: a torch.func forward-mode transform (jvp, jacfwd) inside another cannot differentiate lkconv's "
            "ops; call lkconv.depthwise_conv2d, which computes such calls with PyTorch's own conv")


def _autograd_kernel(op: torch._ops.OpOverload, setup_context: Callable, backward: Callable,
                     jvp: Callable) -> Callable:
    """The Autograd kernel of `op`: the op below autograd, recorded by an autograd.Function when a derivative is
    needed.

    The Function takes three inputs beyond the op's, and returns no gradient for them: the dispatch key set, so that
    its forward can redispatch below autograd; whether any input carries a forward-mode tangent (only then does it
    keep its tensors for `jvp`); and, under a torch.func transform, the grad and forward-grad modes of the call.
    It is applied as a C++ autograd kernel would record its node: under a torch.func transform this kernel runs at
    the transform's level, on that level's tensors, so the Python-level check of `Function.apply` (which refuses a
    Function without setup_context under torch.func) does not apply."""

    def forward(ctx, *args):
        *inputs, keyset, has_tangent, outer_modes = args
        if outer_modes is not None:
            # Under a torch.func transform the levels below this one differentiate for themselves, in the grad and
            # forward-grad modes the call was made in: apply turned both off, so restore them for the redispatch.
            grad_mode, forward_grad_mode = outer_modes
            with torch.set_grad_enabled(grad_mode), forward_ad._set_fwd_grad_enabled(forward_grad_mode), \
                    torch._C._AutoDispatchBelowAutograd():
                output = op.redispatch(keyset, *inputs)
        else:
            with torch._C._AutoDispatchBelowAutograd():
                output = op.redispatch(keyset, *inputs)
        saved = setup_context(ctx, inputs, output)
        ctx.save_for_backward(*saved)
        if has_tangent:
            ctx.save_for_forward(*saved)
            ctx.set_materialize_grads(False)  # inputs without a tangent reach jvp as None, not as zeros to multiply
        return output

    def backward_without_extras(ctx, *grads):
        return (*backward(ctx, *grads), None, None, None)

    def jvp_without_extras(ctx, *tangents):
        return jvp(ctx, *tangents[:-3])

    function = type(f"{op._opname}_autograd", (torch.autograd.Function,), {
        "forward": staticmethod(forward),
        "backward": staticmethod(backward_without_extras),
        "jvp": staticmethod(jvp_without_extras),
    })
    record = torch._C._FunctionBase.__dict__["apply"].__get__(None, function)  # Function.apply without its Python layer

    def kernel(keyset, *inputs):
        keyset = keyset & _AFTER_AUTOGRAD
        has_tangent = carries_tangent(inputs)
        if has_tangent or (torch.is_grad_enabled() and torch._C._any_requires_grad(*inputs)):
            if torch._C._are_functorch_transforms_active():
                if has_tangent:
                    _refuse_nested_forward_mode(op)
                outer_modes = (torch.is_grad_enabled(), torch._C._is_fwd_grad_enabled())
                with enable_single_level_autograd_function():
                    return record(*inputs, keyset, has_tangent, outer_modes)
            return record(*inputs, keyset, has_tangent, None)
        with torch._C._AutoDispatchBelowAutograd():
            return op.redispatch(keyset, *inputs)

    return kernel
