"""Synchronised timing: CUDA events through triton's do_bench on a GPU (L2 flushed, median and 20/80 percentiles),
wall-clock per call on a CPU; plus the peak memory one call allocates."""

import gc
import statistics
import time
from typing import Callable, NamedTuple, Optional

import torch


class Timing(NamedTuple):
    median_ms: float
    p20_ms: float
    p80_ms: float
    peak_memory_mb: Optional[float]


class Budget(NamedTuple):
    """How long to measure: do_bench's warm-up and repetition times on a GPU, a time budget per measurement on CPU."""

    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    cpu_seconds: float = 0.2


def measure(fn: Callable, budget: Budget) -> Timing:
    return time_gpu(fn, budget) if torch.cuda.is_available() else time_cpu(fn, budget)


def time_gpu(fn: Callable, budget: Budget) -> Timing:
    from triton.testing import do_bench

    median, p20, p80 = do_bench(fn, warmup=budget.warmup_ms, rep=budget.rep_ms, quantiles=[0.5, 0.2, 0.8])
    return Timing(median, p20, p80, peak_memory_mb(fn))


def peak_memory_mb(fn: Callable) -> float:
    """GPU memory one call allocates beyond what is already live (outputs, activations and workspace)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def time_cpu(fn: Callable, budget: Budget) -> Timing:
    """Single calls timed with perf_counter for a fixed budget (at least 5 calls), after two warm-up calls."""
    fn(), fn()
    times = []
    start = time.perf_counter()
    while len(times) < 5 or (time.perf_counter() - start < budget.cpu_seconds and len(times) < 1000):
        begin = time.perf_counter()
        fn()
        times.append((time.perf_counter() - begin) * 1e3)
    deciles = statistics.quantiles(times, n=10, method="inclusive")
    return Timing(statistics.median(times), deciles[1], deciles[7], None)


def set_fp32_math(tf32: bool) -> None:
    """One fp32 rule for every implementation; lkconv follows the same PyTorch setting cuDNN does."""
    torch.backends.cudnn.conv.fp32_precision = "tf32" if tf32 else "ieee"


def failure(error: Exception) -> dict:
    """The timing fields of a row whose measurement raised `error`: a benchmark run never stops at one failure."""
    message = str(error).splitlines()[0] if str(error) else ""
    return {"median_ms": None, "p20_ms": None, "p80_ms": None, "peak_memory_mb": None,
            "error": f"{type(error).__name__}: {message}"}


def release_memory() -> None:
    """Hands cached GPU blocks back, so the next, differently sized tensors (or the step after an OOM) can fit."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
