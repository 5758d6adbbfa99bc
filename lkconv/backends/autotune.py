"""Run-time measurement for `auto` (LKCONV_AUTOTUNE=1): where the committed table (measured.py) has nothing for a
shape class on this GPU and both GPU backends can run it, the first forward call times each backend's forward and
backward on that call's shapes and remembers the faster one for the rest of the process.

It is opt-in, as cudnn.benchmark is: the first call of each shape class pays for the timing (and for compiling the
Triton kernels it might not use), the choice may differ between processes whose timings are close, and the backends'
results differ in rounding. Calls that cannot be timed (during CUDA-graph capture or torch.compile tracing) keep the
default order until a later call has measured.
"""

import os
import time
from typing import NamedTuple, Optional

import torch

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
    """The faster backend and every backend's time for one forward and backward, in ms."""

    name: str
    times_ms: dict


_remembered: dict[tuple, Measured] = {}


def enabled() -> bool:
    """Whether LKCONV_AUTOTUNE asks for run-time measurement ('1'; '0' or unset: no)."""
    value = os.environ.get(VARIABLE, "").strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"{VARIABLE} must be 0 or 1; got {value!r}")
    return value == "1"


def remembered(key: tuple) -> Optional[Measured]:
    """What an earlier call measured for `key` (GPU name, dtype, shape class), if any."""
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


def measure(key: tuple, candidates: dict, problem: Problem) -> Measured:
    """Times each candidate backend (name -> module) on `problem`, remembers the fastest under `key`, returns it."""
    times = {name: _time_ms(module, problem) for name, module in candidates.items()}
    found = Measured(min(times, key=times.get), times)
    _remembered[key] = found
    return found


def _time_ms(module, p: Problem) -> float:
    """The fastest of REPEATS runs of `module`'s forward, input grad and weight grad, in ms (synchronised)."""
    def run() -> None:
        output = module.forward(p.input, p.weight, p.bias, p.stride, p.padding, p.dilation)
        # The output stands in for dy: it has dy's shape and layout, and the values do not change the time.
        module.input_grad(output, p.weight, tuple(p.input.shape), p.stride, p.padding, p.dilation)
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
