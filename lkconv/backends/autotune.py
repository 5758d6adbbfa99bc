"""Run-time measurement for `auto` (LKCONV_AUTOTUNE=1): where the committed table (measured.py) has nothing for a
shape class on this GPU and both GPU backends can run it, the first forward call times each backend's forward and
backward on that call's shapes and remembers the faster one for the rest of the process.

It is opt-in, as cudnn.benchmark is:
- the first call of each key pays for the timing (and for compiling the Triton kernels it might not use), inference
  included, since the choice is for forward and backward together, as the committed table's is;
- the key is the GPU, dtype, fp32 rule (TF32 or exact), kernel, stride, dilation, layout and the map size rounded up
  to powers of two: the first call's batch and channels decide for the others;
- the choice may differ between processes whose timings are close, and the backends' results differ in rounding.
A candidate that fails while timed is left out. Calls that cannot be timed (during CUDA-graph capture or torch.compile
tracing) keep the default order until a later call has measured; a graph captured before then keeps it in replays.
"""

import os
import threading
import time
from typing import NamedTuple, Optional

import torch

from ..arguments import output_memory_format
from .gpu import conv_allows_tf32

VARIABLE = "LKCONV_AUTOTUNE"
REPEATS = 3  # timed runs per backend, after one untimed run (compilation, caches); the fastest counts


class Problem(NamedTuple):
    """One forward call's tensors and geometry: what the timed passes run on."""

    input: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    stride: tuple
    padding: tuple
    dilation: tuple


class Measured(NamedTuple):
    """The faster backend (None where every candidate failed), every timed backend's time for one forward and
    backward in ms, and the error of each candidate that failed while timed."""

    name: Optional[str]
    times_ms: dict
    failures: dict


_remembered: dict[tuple, Measured] = {}
_lock = threading.Lock()  # one thread measures a key; others wait for its answer


def enabled() -> bool:
    """Whether LKCONV_AUTOTUNE asks for run-time measurement ('1'; '0' or unset: no)."""
    value = os.environ.get(VARIABLE, "").strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"{VARIABLE} must be 0 or 1; got {value!r}")
    return value == "1"


def key_of(gpu: str, dtype: torch.dtype, shape) -> tuple:
    """What a measurement stands for: the GPU model, dtype, fp32 rule and shape class, its map size rounded up to
    powers of two."""
    size = tuple(1 << max(int(side) - 1, 0).bit_length() for side in shape.size)
    return gpu, dtype, dtype == torch.float32 and conv_allows_tf32(), shape._replace(size=size)


def remembered(key: tuple) -> Optional[Measured]:
    """What an earlier call measured for `key` (key_of), if any."""
    return _remembered.get(key)


def forget() -> None:
    """Drops every measurement, so the next call of each shape class measures again."""
    _remembered.clear()


def can_measure(tensor: torch.Tensor) -> bool:
    """Whether a call on `tensor` may run extra kernels and wait for them: a real CUDA tensor, outside CUDA-graph
    capture and outside torch.compile's tracing."""
    if tensor.device.type != "cuda" or torch.compiler.is_compiling():
        return False
    if isinstance(tensor, torch._subclasses.fake_tensor.FakeTensor):
        return False
    return not torch.cuda.is_current_stream_capturing()


def measure(key: tuple, candidates: dict, problem: Problem) -> Optional[Measured]:
    """Times each candidate backend (name -> module) on `problem`, remembers the fastest under `key` and returns it.
    Where every candidate fails, that is remembered too (name None), so that later calls go to PyTorch at once
    instead of timing the failures again. Out-of-memory and CUDA errors propagate, as they do from any call."""
    with _lock:
        if (found := _remembered.get(key)) is not None:  # another thread measured it meanwhile
            return found
        times, failures = {}, {}
        for name, module in candidates.items():
            try:
                times[name] = _time_ms(module, problem)
            except (torch.cuda.OutOfMemoryError, torch.AcceleratorError):
                raise
            except Exception as error:  # noqa: BLE001 - a backend that fails here is not chosen; explain says why
                failures[name] = f"{type(error).__name__}: {error}"
        found = _remembered[key] = Measured(min(times, key=times.get) if times else None, times, failures)
        return found


def _time_ms(module, p: Problem) -> float:
    """The fastest of REPEATS runs of `module`'s forward, input grad and weight grad, in ms (synchronised), with the
    layout copies the ops make around them (their outputs in the input's layout)."""
    layout = output_memory_format(p.input)

    def run() -> None:
        output = module.forward(p.input, p.weight, p.bias, p.stride, p.padding, p.dilation)
        # The output, in the layout autograd hands dy in, stands in for dy: the values do not change the time.
        output = output.contiguous(memory_format=layout)
        grad_input = module.input_grad(output, p.weight, tuple(p.input.shape), p.stride, p.padding, p.dilation)
        grad_input.contiguous(memory_format=layout)
        module.weight_grad(output, p.input, tuple(p.weight.shape[2:]), p.stride, p.padding, p.dilation,
                           p.bias is not None)

    with torch.no_grad():
        run()
        best = float("inf")
        for _ in range(REPEATS):
            _synchronize(p.input.device)
            start = time.perf_counter()
            run()
            _synchronize(p.input.device)
            best = min(best, (time.perf_counter() - start) * 1e3)
    return best


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
