"""Synchronised timing: CUDA events on a GPU (triton's do_bench for fast calls, which flushes L2 between them; an
event loop with at least a few samples for slow ones), wall-clock per call on a CPU; plus peak memory."""

import contextlib
import gc
import statistics
import time
from typing import Callable, NamedTuple, Optional

import torch

import lkconv


class Timing(NamedTuple):
    """A measurement: median and 20th/80th percentile in ms, the sample count and the peak memory."""
    median_ms: float
    p20_ms: float
    p80_ms: float
    samples: int
    peak_memory_mib: Optional[float]  # the most one call allocated beyond what was live before it (GPU only)


class Budget(NamedTuple):
    """How long to measure: do_bench's warm-up and repetition times on a GPU, a time budget per measurement on CPU."""

    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    cpu_seconds: float = 0.2
    min_samples: int = 5  # slow calls are still timed this often, so the spread means something


class CudaContextLost(RuntimeError):
    """A CUDA error poisoned the context (illegal address, launch failure): no later measurement can be trusted."""


def measure(fn: Callable, budget: Budget) -> Timing:
    """Times `fn` with CUDA events on a GPU, with perf_counter on a CPU, within `budget`."""
    return time_gpu(fn, budget) if torch.cuda.is_available() else time_cpu(fn, budget)


def _quantiles(times: list[float], samples: int) -> Timing:
    if len(times) == 1:
        return Timing(times[0], times[0], times[0], samples, None)
    deciles = statistics.quantiles(times, n=10, method="inclusive")
    return Timing(statistics.median(times), deciles[1], deciles[7], samples, None)


def time_gpu(fn: Callable, budget: Budget) -> Timing:
    """The first call warms up (JIT, autotuning, cuDNN benchmark); the second measures peak memory (above what is
    live before it: the harness's inputs, references and other models are not the call's) and a first estimate."""
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    live = torch.cuda.memory_allocated()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    estimate, peak = start.elapsed_time(end), (torch.cuda.max_memory_allocated() - live) / 2**20
    if estimate * budget.min_samples <= budget.rep_ms:
        from triton.testing import do_bench

        times = do_bench(fn, warmup=budget.warmup_ms, rep=budget.rep_ms, return_mode="all")
        return _quantiles(times, len(times))._replace(peak_memory_mib=peak)
    # Slow calls: do_bench would time one or two; L2 flushing is moot when a call streams far more than L2 holds.
    times = []
    for _ in range(budget.min_samples):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return _quantiles(times, len(times))._replace(peak_memory_mib=peak)


def time_cpu(fn: Callable, budget: Budget) -> Timing:
    """Single calls timed with perf_counter for a fixed budget (at least min_samples), after two warm-up calls."""
    fn(), fn()
    times = []
    start = time.perf_counter()
    while len(times) < budget.min_samples or (time.perf_counter() - start < budget.cpu_seconds and len(times) < 1000):
        begin = time.perf_counter()
        fn()
        times.append((time.perf_counter() - begin) * 1e3)
    return _quantiles(times, len(times))


def host_us(fn: Callable, calls: int = 10, repeats: int = 3) -> float:
    """The host's wall time per call, in µs, with `calls` calls issued back to back and the GPU, if any, not awaited
    (the fastest of `repeats` tries): what a call costs the host in Python, dispatch and launches, plus any wait
    inside it. Where it exceeds the GPU time, a loop of such calls runs at the host's pace unless captured in a CUDA
    graph. The GPU timings above hide host time shorter than do_bench's cache flush, except between a call's own
    kernels."""
    gpu = torch.cuda.is_available()
    best = float("inf")
    for _ in range(repeats):
        if gpu:
            torch.cuda.synchronize()
        begin = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, time.perf_counter() - begin)
    if gpu:
        torch.cuda.synchronize()
    return best / calls * 1e6


@contextlib.contextmanager
def exact_fp32():
    """PyTorch's convs in exact fp32 inside the block, whatever the run's rule: for the references results are
    checked against."""
    previous = torch.backends.cudnn.conv.fp32_precision
    torch.backends.cudnn.conv.fp32_precision = "ieee"
    try:
        yield
    finally:
        torch.backends.cudnn.conv.fp32_precision = previous


def set_fp32_math(tf32: bool) -> None:
    """One fp32 rule for every implementation; lkconv follows the same PyTorch setting cuDNN does."""
    torch.backends.cudnn.conv.fp32_precision = "tf32" if tf32 else "ieee"


def failure(error: Exception) -> dict:
    """The timing fields of a row whose measurement raised `error`: a benchmark run never stops at one failure.

    A backend this machine lacks (BackendUnavailableError) makes the row skipped, not failed.

    Raises CudaContextLost instead when the error left the CUDA context unusable, so the run stops and writes
    what it has rather than recording every later measurement as failed.
    """
    message = str(error).splitlines()[0] if str(error) else ""
    empty = {"median_ms": None, "p20_ms": None, "p80_ms": None, "samples": 0, "peak_memory_mib": None}
    if isinstance(error, lkconv.BackendUnavailableError):  # not a failure: this machine lacks that backend
        return {**empty, "error": "", "skipped": message}
    if torch.cuda.is_available() and not _context_usable():
        raise CudaContextLost(f"{type(error).__name__}: {message}") from error
    return {**empty, "error": f"{type(error).__name__}: {message}"}


def _context_usable() -> bool:
    try:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    except RuntimeError:
        return False
    return True


def release_memory() -> None:
    """Hands cached GPU blocks back, so the next, differently sized tensors (or the step after an OOM) can fit."""
    gc.collect()
    if torch.cuda.is_available() and not _context_usable():
        raise CudaContextLost("the CUDA context became unusable")
