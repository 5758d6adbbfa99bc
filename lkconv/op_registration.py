"""Defines lkconv's ops in the dispatcher: what torch.library.custom_op registers, in fewer steps per call.

An op needs a kernel, a fake kernel for tracing, and an Autograd kernel that records its backward. custom_op
registers these through generic wrappers (pytree handling, out= and alias checks, a metadata object per call),
which cost a six-argument op ≈14 µs of host time per call, and ≈17 µs more when the call records autograd
(benchmarks/NOTES.md, "Host time per call"). lkconv calls its ops on every pass of every layer, so it registers
the same three kernels directly: the Autograd kernel redispatches below autograd, through an autograd.Function
when a gradient is needed, as custom_op's does.
"""

from typing import Callable

import torch

LIBRARY = torch.library.Library("lkconv", "FRAGMENT")
_AFTER_AUTOGRAD = torch._C._after_autograd_keyset


def define(schema: str, kernel: Callable, fake: Callable, setup_context: Callable,
           backward: Callable) -> torch._ops.OpOverload:
    """Defines `lkconv::<schema>` with `kernel` for every device, `fake` for tracing, and autograd: when a gradient
    is needed, `setup_context(ctx, inputs, output)` runs after the kernel and `backward(ctx, *grads)` returns one
    gradient (or None) per input, as for custom_op's register_autograd (`ctx.needs_input_grad` has one more entry,
    last, for the key set).

    `kernel` must return fresh tensors: custom_op checked at run time that no output aliases an input or another
    output, and this registration does not (opcheck does, in the tests)."""
    name = schema.partition("(")[0]
    LIBRARY.define(schema, tags=(torch.Tag.pt2_compliant_tag,))
    op = getattr(torch.ops.lkconv, name).default
    # Dynamo must not trace into the kernel when a compiled graph calls the op (custom_op disables it too).
    LIBRARY.impl(name, torch._disable_dynamo(kernel), "CompositeExplicitAutograd")
    torch.library.register_fake(op, fake, lib=LIBRARY)
    LIBRARY.impl(name, _autograd_kernel(op, setup_context, backward), "Autograd", with_keyset=True)
    return op


def _autograd_kernel(op: torch._ops.OpOverload, setup_context: Callable, backward: Callable) -> Callable:
    """The Autograd kernel of `op`: the op below autograd, recorded by an autograd.Function when a gradient is
    needed. The Function takes the dispatch key set as its last input, and returns no gradient for it."""

    def forward(ctx, *args):
        *inputs, keyset = args
        with torch._C._AutoDispatchBelowAutograd():
            output = op.redispatch(keyset, *inputs)
        setup_context(ctx, inputs, output)
        return output

    def backward_with_keyset(ctx, *grads):
        return (*backward(ctx, *grads), None)

    function = type(f"{op._opname}_autograd", (torch.autograd.Function,),
                    {"forward": staticmethod(forward), "backward": staticmethod(backward_with_keyset)})

    def kernel(keyset, *inputs):
        keyset = keyset & _AFTER_AUTOGRAD
        if torch.is_grad_enabled() and torch._C._any_requires_grad(*inputs):
            return function.apply(*inputs, keyset)
        with torch._C._AutoDispatchBelowAutograd():
            return op.redispatch(keyset, *inputs)

    return kernel
