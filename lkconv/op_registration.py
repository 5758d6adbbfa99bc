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


def _carries_tangent(inputs) -> bool:
    """Whether forward-mode AD is on and any tensor in `inputs` carries a tangent."""
    return forward_ad._current_level >= 0 and torch._C._is_fwd_grad_enabled() and any(
        isinstance(t, torch.Tensor) and forward_ad.unpack_dual(t).tangent is not None for t in inputs)


def _autograd_kernel(op: torch._ops.OpOverload, setup_context: Callable, backward: Callable,
                     jvp: Callable) -> Callable:
    """The Autograd kernel of `op`: the op below autograd, recorded by an autograd.Function when a derivative is
    needed.

    The Function takes two inputs beyond the op's, and returns no gradient for them: the dispatch key set, so that
    its forward can redispatch below autograd, and whether any input carries a forward-mode tangent (only then does
    it keep its tensors for `jvp`). It is applied as a C++ autograd kernel would record its node: under a torch.func
    transform this kernel runs at the transform's level, on that level's tensors, so the Python-level check of
    `Function.apply` (which refuses a Function without setup_context under torch.func) does not apply."""

    def forward(ctx, *args):
        *inputs, keyset, has_tangent = args
        if torch._C._are_functorch_transforms_active():
            # The levels below this transform's differentiate for themselves: apply turned both modes off, so turn
            # them back on for the redispatch, as torch.func does around the forward of an autograd.Function.
            with torch.enable_grad(), forward_ad._set_fwd_grad_enabled(True), torch._C._AutoDispatchBelowAutograd():
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
        return (*backward(ctx, *grads), None, None)

    def jvp_without_extras(ctx, *tangents):
        return jvp(ctx, *tangents[:-2])

    function = type(f"{op._opname}_autograd", (torch.autograd.Function,), {
        "forward": staticmethod(forward),
        "backward": staticmethod(backward_without_extras),
        "jvp": staticmethod(jvp_without_extras),
    })
    record = torch._C._FunctionBase.__dict__["apply"].__get__(None, function)  # Function.apply without its Python layer

    def kernel(keyset, *inputs):
        keyset = keyset & _AFTER_AUTOGRAD
        has_tangent = _carries_tangent(inputs)
        if has_tangent or (torch.is_grad_enabled() and torch._C._any_requires_grad(*inputs)):
            if torch._C._are_functorch_transforms_active():
                with enable_single_level_autograd_function():
                    return record(*inputs, keyset, has_tangent)
            return record(*inputs, keyset, has_tangent)
        with torch._C._AutoDispatchBelowAutograd():
            return op.redispatch(keyset, *inputs)

    return kernel
