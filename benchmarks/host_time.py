"""Host time per call of lkconv's Python layers, measured on a CPU: ``python -m benchmarks host``.

A small call (batch 1 inference, a 14x14 map) takes a GPU tens of µs, so outside a CUDA graph the host's share
decides how fast a loop of such calls runs. That share needs no GPU to measure. The triton backend plans as on a GPU
(`triton_launches.planned_as_on_a_gpu`) and its launches are skipped, so every layer of a call runs: argument checks,
autocast and transform routing, op dispatch and autograd, the backend choice and launch planning. Left out: Triton's
own launcher, the kernels and the GPU's device guard. The tensors are small CPU tensors, on one thread: PyTorch's own
ops in a call (allocations; the weight grad's sum of 17 split partials, ≈11 µs here) run on the CPU where a GPU would
queue them. (Meta tensors would compute nothing, but they reach the ops' fake kernels.) PyTorch's F.conv2d on meta
tensors (its dispatch and shape checks, without cuDNN) is timed beside it for scale.
"""

import contextlib
from typing import Callable, Iterator, NamedTuple

import torch
import torch.nn.functional as F

import lkconv
from lkconv import backends, ops
from lkconv.backends import triton_backend

from . import triton_launches
from .timing import host_us

SHAPE, KERNEL = (1, 8, 32, 32), 31  # few channels: little CPU work in PyTorch's own ops; planning ignores them


class HostTime(NamedTuple):
    """One kind of call and the host's µs per call (the fastest of several runs of many calls)."""

    call: str
    us: float
    launches: float  # Triton launches planned per call over every call made (0 for PyTorch's conv)


class _LaunchCounter:
    """Counts the launches handed to it and keeps none (a kept launch would keep its tensors alive)."""

    def __init__(self):
        self.count = 0

    def __call__(self, launch) -> None:
        self.count += 1


@contextlib.contextmanager
def triton_as_on_a_gpu(on_launch: Callable = lambda launch: None) -> Iterator[None]:
    """lkconv forced to the triton backend, planning as on an H100 (132 SMs), its launches handed to `on_launch`."""
    saved = {name: getattr(triton_backend, name) for name in ("unavailable_reason", "unsupported_reason")}
    with triton_launches.planned_as_on_a_gpu(on_launch, multiprocessors=132):
        triton_backend.unavailable_reason = lambda: None
        triton_backend.unsupported_reason = lambda device, dtype: None
        backends._choose.cache_clear()  # choices made without the stand-ins must not answer, nor outlive them
        try:
            with lkconv.use_backend("triton"):
                yield
        finally:
            for name, value in saved.items():
                setattr(triton_backend, name, value)
            backends._choose.cache_clear()


def measure(calls: int = 2000, repeats: int = 5) -> list[HostTime]:
    """The host's µs per call for an fp32 map of SHAPE with a KERNEL x KERNEL filter, layer by layer."""
    channels, padding = SHAPE[1], KERNEL // 2
    x, w, b = (torch.randn(shape) for shape in (SHAPE, (channels, 1, KERNEL, KERNEL), (channels,)))
    xg, wg, bg = (t.clone().requires_grad_() for t in (x, w, b))
    module = lkconv.DepthwiseConv2d(channels, KERNEL, padding=padding)
    grad = torch.randn(SHAPE)
    pads, ones = [padding] * 4, [1, 1]
    meta = [t.to("meta") for t in (x, w, b)]

    def backward():
        torch.autograd.grad(lkconv.depthwise_conv2d(xg, wg, bg, padding=padding), (xg, wg, bg), grad)

    no_grad = {
        "F.conv2d on meta tensors (for scale: dispatch and shape checks)":
            lambda: F.conv2d(*meta, 1, padding, 1, channels),
        "lkconv.depthwise_conv2d": lambda: lkconv.depthwise_conv2d(x, w, b, padding=padding),
        "lkconv.DepthwiseConv2d": lambda: module(x),
        "of which the op, torch.ops.lkconv.depthwise_conv2d": lambda: ops.depthwise_conv2d_op(x, w, b, ones, pads, ones),
        "of which the triton backend's forward (planning, packing)":
            lambda: triton_backend.forward(x, w, b, ones, pads, ones),
    }
    with_grad = {
        "lkconv.depthwise_conv2d, recording autograd": lambda: lkconv.depthwise_conv2d(xg, wg, bg, padding=padding),
        "forward and backward (three ops)": backward,
    }
    results, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for grad_mode, calls_by_name in ((False, no_grad), (True, with_grad)):
            for name, fn in calls_by_name.items():
                launches = _LaunchCounter()
                warmups = max(1, calls // 10)  # caches, first-call imports
                with torch.set_grad_enabled(grad_mode), triton_as_on_a_gpu(launches):
                    for _ in range(warmups):
                        fn()
                    us = host_us(fn, calls, repeats)
                made = warmups + calls * repeats
                results.append(HostTime(name + ("" if grad_mode else ", no grad"), us, launches.count / made))
    finally:
        torch.set_num_threads(threads)
    return results


def table(results: list[HostTime]) -> str:
    """A markdown table of `results`, with what was measured and on which versions."""
    lines = [f"Host time per call on this CPU (one thread), torch {torch.__version__}, a {'x'.join(map(str, SHAPE))} "
             f"fp32 map, K={KERNEL}; the triton backend plans as on an H100 and skips its launches:", "",
             "| call | µs per call | Triton launches planned per call |", "|---|---|---|"]
    lines += [f"| {r.call} | {r.us:.1f} | {r.launches:g} |" for r in results]
    return "\n".join(lines)
