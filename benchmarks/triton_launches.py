"""The Triton launches a GPU session makes, recorded without a GPU, and compiled ahead of time in parallel.

Triton compiles a kernel the first time each specialization of it is launched, about a second each, one at a time
inside the calling process; a GPU session's tests and benchmarks launch well over a hundred. `precompile` compiles
them first on every core (`python -m benchmarks precompile`), so the session finds them in Triton's cache.

The launches come from the triton backend itself: its three passes run for each case on never-touched CPU tensors
with the kernels replaced by a recorder, as on a GPU with `multiprocessors` SMs. Each worker then calls the kernel's
own `warmup`, Triton's JIT path, so the cache keys are exactly the ones a real launch looks up.
tests/compile_kernels.py compiles the session cases' launches (with a bias; its configuration jobs cover HAS_BIAS
both ways) for sm_80 and sm_90 on a CPU.
"""

import contextlib
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Iterator, NamedTuple

import torch

from .presets import REPLKNET_31B_STAGES, defaults, op_shapes
from .timing import exact_fp32


class Case(NamedTuple):
    """A conv configuration whose Triton launches a GPU session needs."""
    shape: tuple[int, int, int, int]
    kernel: tuple[int, int]
    stride: int = 1
    padding: tuple[int, int] = (0, 0)
    dilation: int = 1
    multiplier: int = 1


def _same(shape, kernel) -> Case:
    return Case(shape, kernel, padding=(kernel[0] // 2, kernel[1] // 2))


# The quick benchmark's op shapes and the GPU tests' realistic ones at "same" padding, then small awkward ones whose
# launches specialize differently (size-1 batch, height and channel counts, stride 2, dilation, a multiplier).
SESSION_CASES = list(dict.fromkeys(
    [_same(shape, kernel) for shape, kernel in op_shapes("quick")]
    + [_same((32, 384, 32, 32), (31, 31))]
    + [_same((64, c, r, r), (k, k)) for c, r, k in REPLKNET_31B_STAGES]
    + [Case((1, 8, 16, 48), (7, 7), 2, (3, 3)), Case((2, 4, 1, 64), (1, 9), 1, (0, 4)),
       Case((2, 1, 16, 32), (5, 5), 1, (2, 1), multiplier=2), Case((2, 6, 20, 40), (7, 7), 1, (6, 6), dilation=2)]
))
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LAYOUTS = (torch.contiguous_format, torch.channels_last)
PASSES = ("forward", "input_grad", "weight_grad")


class Recording(NamedTuple):
    """Cases whose launches to record, and in which dtypes, layouts, bias variants and passes (HAS_BIAS is a
    compile-time constant: the benchmarks run without a bias, merged models and some tests with one)."""
    cases: list
    dtypes: tuple = DTYPES
    layouts: tuple = LAYOUTS
    biases: tuple = (True, False)
    passes: tuple = PASSES


# What `precompile` compiles: every launch of the session's cases, then the quick preset's Table 1 stacks as Table 1
# runs them (the same kernels and block configurations at other kernel sizes, so the CPU compile test leaves them
# out: they add time, not coverage).
_QUICK = defaults("quick")
TABLE1_CASES = [_same((_QUICK["table_batch"], _QUICK["table_channels"], r, r), (k, k))
                for r in _QUICK["table_resolutions"] for k in _QUICK["table_kernels"]]
PRECOMPILED = (
    Recording(SESSION_CASES),
    Recording(TABLE1_CASES, tuple(getattr(torch, name) for name in _QUICK["table_dtypes"]), (torch.contiguous_format,),
              (False,), ("forward",)),
)


class Launch(NamedTuple):
    """One recorded Triton launch: the kernel, its grid and its arguments."""
    kernel: object  # a triton JITFunction
    grid: tuple
    args: tuple
    kwargs: dict


@contextlib.contextmanager
def planned_as_on_a_gpu(on_launch: Callable[[Launch], None], multiprocessors: int) -> Iterator[None]:
    """The triton backend planning as it does on a GPU with `multiprocessors` SMs, handing each launch it makes to
    `on_launch` instead of making it."""
    from lkconv import kernels
    from lkconv.backends import triton_backend

    class Grid:  # what kernel[grid] returns
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: on_launch(Launch(self.kernel, grid, args, kwargs))

    class Launcher:  # stands in for the kernels module
        def __getattr__(self, name):
            return Grid(getattr(kernels, name))

    launcher = Launcher()
    saved = {name: getattr(triton_backend, name) for name in ("_kernels", "interpreting", "_multiprocessors")}
    triton_backend._kernels = lambda: launcher
    triton_backend.interpreting = lambda: False
    triton_backend._multiprocessors = lambda index: multiprocessors
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(triton_backend, name, value)


def record(cases=SESSION_CASES, multiprocessors: int = 132, dtypes=DTYPES, layouts=LAYOUTS, biases=(True, False),
           passes=PASSES) -> list[Launch]:
    """Every launch of `passes` (forward, input grad, weight grad) of `cases` in `dtypes` and `layouts`, with a bias
    and without (`biases`). fp32 is planned as exact fp32, the benchmarks' and tests' rule (the dot precision is a
    compile-time constant too). The tensors are allocated but never read: nothing runs."""
    from lkconv.backends import triton_backend

    if not biases:
        raise ValueError(f"biases must hold True, False or both; got {biases!r}")
    launches, running = [], [""]

    def keep(launch: Launch) -> None:  # the launches of the passes asked for
        if running[0] in passes:
            launches.append(launch)

    with planned_as_on_a_gpu(keep, multiprocessors), exact_fp32():
        for case in cases:
            stride, dilation = (case.stride,) * 2, (case.dilation,) * 2
            padding = (*case.padding, *case.padding)
            for dtype in dtypes:
                for memory_format in layouts:
                    x = torch.empty(case.shape, dtype=dtype, memory_format=memory_format)
                    channels = case.shape[1] * case.multiplier
                    w = torch.empty(channels, 1, *case.kernel, dtype=dtype)
                    for bias in biases:
                        b = torch.empty(channels, dtype=dtype) if bias else None
                        running[0] = "forward"
                        y = triton_backend.forward(x, w, b, stride, padding, dilation)
                        running[0] = "weight_grad"
                        triton_backend.weight_grad(y, x, case.kernel, stride, padding, dilation, bias)
                    running[0] = "input_grad"
                    triton_backend.input_grad(y, w, x.shape, stride, padding, dilation)
    return launches


def bind(launch: Launch, target):
    """What JITFunction.run does before it compiles (triton 3.6): (key, signature, constexprs, attrs, options),
    where the key tells two launches that compile to the same kernel apart from two that do not."""
    from triton import knobs
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(target)
    kwargs = {"debug": knobs.runtime.debug, "instrumentation_mode": knobs.compilation.instrumentation_mode,
              **launch.kwargs}
    binder = create_function_from_signature(launch.kernel.signature, launch.kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = launch.kernel._pack_args(backend, kwargs, bound, specialization, options)
    key = (launch.kernel.__name__, repr(specialization), repr(sorted(options.__dict__.items())))
    return key, signature, constexprs, attrs, options


def distinct(launches: list[Launch], target) -> list[Launch]:
    """One launch per kernel Triton would compile for `target`."""
    unique = {}
    for launch in launches:
        unique.setdefault(bind(launch, target)[0], launch)
    return list(unique.values())


def warm(recordings=PRECOMPILED, index: int = 0, count: int = 1) -> int:
    """Compiles every `count`-th distinct launch of `recordings` from `index` on, through the JIT of the current
    device (on a GPU it also builds each launcher and loads the kernel, which reports an out-of-resources error now
    rather than mid-test); returns how many."""
    from triton.runtime import driver

    multiprocessors = torch.cuda.get_device_properties(0).multi_processor_count if torch.cuda.is_available() else 132
    launches = [launch for r in recordings
                for launch in record(r.cases, multiprocessors, r.dtypes, r.layouts, r.biases, r.passes)]
    launches = distinct(launches, driver.active.get_current_target())[index::count]
    for launch in launches:
        compiled = launch.kernel.warmup(*launch.args, grid=launch.grid, **launch.kwargs)
        if torch.cuda.is_available():
            compiled._init_handles()
    return len(launches)


def _warm_part(part: tuple) -> int:
    return warm(*part)


def precompile(recordings=PRECOMPILED, workers: int = 0) -> int:
    """Compiles the distinct launches of `recordings` into Triton's cache with `workers` processes (default: every
    core); returns how many."""
    workers = workers or os.cpu_count() or 1
    context = multiprocessing.get_context("spawn")  # a worker must not inherit a parent's CUDA state
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        return sum(pool.map(_warm_part, [(recordings, index, workers) for index in range(workers)]))
