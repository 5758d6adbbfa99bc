"""Backend registry and dispatch: which implementation answers a pass, decided cheaply and explainably.

A backend module has `name`, `unavailable_reason()`, `unsupported_reason(device, dtype)`, `describe(...)` and the
passes `forward`, `input_grad` and `weight_grad`. The request comes from `set_backend` / `use_backend`, else
the LKCONV_BACKEND environment variable, else 'auto'. 'auto' takes the fastest backend that can run the call
and falls back to `torch`; a forced backend that cannot run the call raises instead of falling back. Which GPU
backend is fastest comes from the committed table (measured.py) or, with LKCONV_AUTOTUNE=1, from timing the first
call of each shape class (autotune.py); otherwise from the default order. A GPU backend that fails under 'auto' is
stepped around: PyTorch answers that shape class from then on (`run_pass`).
"""

import contextlib
import contextvars
import functools
import os
import warnings
from typing import Iterator, NamedTuple, Optional

import torch

from ..arguments import beyond_gpu_geometry
from . import autotune, cuda_backend, measured, torch_backend, triton_backend

NAMES = ("auto", "torch", "triton", "cuda")
_MODULES = {"torch": torch_backend, "triton": triton_backend, "cuda": cuda_backend}
# What `auto` tries, in order, before falling back to torch, where measured_choices.json has no entry for the shape
# class (see measured.py). Triton first although instruction counts predict the cuda kernels faster at K=31
# (benchmarks/NOTES.md): Triton's compiler generates its tensor-core code, while the cuda kernels' mma fragment
# layouts have been checked only against our emulation of them until a GPU run confirms them.
AUTO_ORDER = ("triton", "cuda")

_override: Optional[str] = None  # set_backend: the whole process
_scoped: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("lkconv_backend", default=None)  # use_backend


class BackendUnavailableError(RuntimeError):
    """A forced backend is not installed here, or cannot run the given tensors."""


class Choice(NamedTuple):
    """The backend that runs a call, and why it was picked; `candidates` are the GPU backends `auto` chose among by
    the default order alone (nothing measured), which run-time measurement may choose among instead. `failure_key`
    is set where `auto` picked a GPU backend: if that backend fails, PyTorch answers instead (`run_pass`)."""

    module: object
    reason: str
    candidates: tuple = ()
    failure_key: Optional[tuple] = None


# GPU backends that failed under `auto`, by (backend, device type, index, dtype, shape class): the error, so that
# later calls of the shape class go to PyTorch at once and `explain` can say why.
_failures: dict[tuple, str] = {}


def _check_name(name: object, source: str) -> str:
    if not isinstance(name, str) or name.strip().lower() not in NAMES:
        raise ValueError(f"{source} must be one of {', '.join(NAMES)}; got {name!r}")
    return name.strip().lower()


def requested_backend() -> str:
    """The backend asked for: use_backend (this thread/context), else set_backend, else LKCONV_BACKEND, else 'auto'."""
    if (scoped := _scoped.get()) is not None:
        return scoped
    if _override is not None:
        return _override
    return _check_name(os.environ.get("LKCONV_BACKEND", "").strip() or "auto", "LKCONV_BACKEND")


def _forced_by() -> str:
    """Which of the requests `requested_backend` reads forced the backend, in words."""
    if _scoped.get() is not None:
        return "lkconv.use_backend"
    return "lkconv.set_backend" if _override is not None else "LKCONV_BACKEND"


def unavailable_reason(name: str) -> Optional[str]:
    """Why backend `name` cannot run on this machine at all, or None if it can."""
    return _MODULES[name].unavailable_reason()


def available_backends() -> list[str]:
    """The backends installed and usable on this machine (`torch` always is)."""
    return [name for name in ("torch", "triton", "cuda") if unavailable_reason(name) is None]


def _checked(name: str) -> str:
    name = _check_name(name, "backend")
    if name != "auto" and (reason := unavailable_reason(name)) is not None:
        raise BackendUnavailableError(f"backend {name!r} is not available: {reason}")
    return name


def set_backend(name: Optional[str]) -> None:
    """Forces a backend for every later call in the process ('auto', 'torch', 'triton' or 'cuda'); None follows
    LKCONV_BACKEND again. Raises at once if the backend is not installed here."""
    global _override
    _override = None if name is None else _checked(name)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Forces a backend inside a `with` block, for this thread (or asyncio task) only; restores it on exit.

    Like any context variable (decimal.localcontext, say), a `with` around a generator's `yield` also applies to
    the code that resumes the generator, until the generator leaves the block."""
    token = _scoped.set(_checked(name))
    try:
        yield
    finally:
        _scoped.reset(token)


def scoped_request() -> Optional[str]:
    """The use_backend request active in this context, if any, so the ops can carry it to their backward."""
    return _scoped.get()


@contextlib.contextmanager
def scope(name: str) -> Iterator[None]:
    """Re-enters a use_backend request saved by `scoped_request`.

    Autograd runs the backward of CUDA tensors on its own threads, which do not see the caller's use_backend; the
    ops save the request in their forward and re-enter it here, so a forced backend answers every pass.
    """
    token = _scoped.set(name)
    try:
        yield
    finally:
        _scoped.reset(token)


def choose(device: torch.device, dtype: torch.dtype, shape: Optional[measured.ShapeClass] = None) -> Choice:
    """The backend that answers a call on tensors of this device and dtype, for a conv of this shape class
    (cached per request, device, dtype and shape class)."""
    # The table decides only between triton and cuda: without lkconv._C, no need to look at it on every call.
    table = measured.version() if device.type == "cuda" and cuda_backend.extension_loaded() else None
    return _choose(requested_backend(), device.type, device.index, dtype, triton_backend.interpreting(), shape, table)


def choose_for_conv(map_tensor: torch.Tensor, kernel, stride, padding, dilation, input_hw,
                    problem: Optional[autotune.Problem] = None) -> Choice:
    """`choose` for one pass of a conv that reads `map_tensor` (x, or dy in the backward). Only CUDA tensors can pick
    by shape class (measured.py), so only they build one: other calls share one cache entry per device and dtype.
    `problem` (the forward call's tensors) lets LKCONV_AUTOTUNE time the candidates where nothing was measured.
    A geometry too large for the GPU kernels' 32-bit indexing goes to PyTorch under `auto`, and raises where a GPU
    backend is forced; counts too large for the Triton kernels (rows, padded columns) go to `cuda` where it can run
    them (it counts in 64 bits), else to PyTorch."""
    beyond_geometry = beyond_gpu_geometry(kernel, stride, padding, dilation, input_hw)
    beyond_counts = triton_backend.beyond_count_limit(map_tensor.shape[0], kernel, stride, padding, dilation, input_hw)
    # LKCONV_AUTOTUNE times the candidates on the call's own tensors: never where one of them cannot run it.
    timeable = problem if beyond_geometry is None and beyond_counts is None else None
    choice = _choose_for_shape(map_tensor, kernel, stride, dilation, input_hw, timeable)
    if choice.module is torch_backend:
        return choice
    why = beyond_geometry or (beyond_counts if choice.module is triton_backend else None)
    if why is not None:
        if requested_backend() != "auto":
            raise BackendUnavailableError(f"backend {choice.module.name!r} was forced ({_forced_by()}) but cannot run "
                                          f"this call: {why}")
        cuda_key = ("cuda", *choice.failure_key[1:])
        if beyond_geometry is None and cuda_key not in _failures and cuda_backend.unavailable_reason() is None \
                and cuda_backend.unsupported_reason(map_tensor.device, map_tensor.dtype) is None:
            return Choice(cuda_backend, f"auto: for triton, {why}; cuda answers", failure_key=cuda_key)
        return Choice(torch_backend, f"auto: {why}; PyTorch answers")
    return choice


def _choose_for_shape(map_tensor, kernel, stride, dilation, input_hw, problem) -> Choice:
    device = map_tensor.device
    shape = (measured.ShapeClass.of(kernel, stride, dilation, input_hw, measured.layout_of(map_tensor))
             if device.type == "cuda" else None)
    choice = choose(device, map_tensor.dtype, shape)
    # LKCONV_AUTOTUNE is read on every GPU call, so that a bad value fails on any GPU, not only where a choice is timed
    # (CPU calls never tune, and do not read it).
    tune = device.type == "cuda" and autotune.enabled()
    if choice.candidates and tune:  # candidates come only with a shape class
        choice = autotuned(choice, device, map_tensor, shape, problem)
    if (error := _failures.get(choice.failure_key)) is not None:
        return Choice(torch_backend, f"auto: {choice.module.name} failed on this shape class earlier in this process "
                                     f"({error}); PyTorch answers")
    return choice


def _context_error(device: torch.device) -> Optional[BaseException]:
    """The error of a CUDA device whose context a kernel broke (an illegal address, a failed assert: sticky, so every
    later call fails), or None. Asked only after a GPU backend failed, so the synchronization costs nothing else."""
    if device.type != "cuda" or not torch.cuda.is_available():  # fake CUDA tensors have no context to break
        return None
    try:
        torch.cuda.synchronize(device)
    except torch.AcceleratorError as error:
        return error
    return None


def _capturing(tensor: torch.Tensor) -> bool:
    """Whether a CUDA graph is being captured on the stream `tensor`'s kernels go to."""
    return tensor.is_cuda and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def run_pass(choice: Choice, pass_name: str, *args):
    """Runs one pass ("forward", "input_grad" or "weight_grad") on the chosen backend.

    Where `auto` chose a GPU backend and it fails (a kernel that does not compile or launch on this GPU, driver or
    triton version, say), lkconv warns once and PyTorch answers, now and for the rest of the process for that shape
    class, as `auto` promises an answer wherever F.conv2d gives one. These propagate: every error of a forced
    backend; out-of-memory errors (Triton's too); errors that leave the CUDA context broken (`torch.AcceleratorError`,
    or the device's own error where Triton raised a plain one: a sticky error, from an earlier kernel too, which
    PyTorch's kernels would meet as well); and any error during CUDA-graph capture, which it invalidates.
    """
    try:
        return getattr(choice.module, pass_name)(*args)
    except (torch.cuda.OutOfMemoryError, torch.AcceleratorError):
        raise
    except Exception as error:
        # Triton reports CUDA errors as plain RuntimeErrors ("Triton Error [CUDA]: ..."): out of memory loading a
        # kernel, or a broken context, which PyTorch's kernels would meet as well.
        if choice.failure_key is None or _capturing(args[0]) or "out of memory" in str(error):
            raise
        if (broken := _context_error(args[0].device)) is not None:
            raise broken from error
        _failures[choice.failure_key] = f"{type(error).__name__}: {error}"
        advice = (f" If lkconv._C was built for other GPUs, rebuild it for this one: TORCH_CUDA_ARCH_LIST=native "
                  f"{cuda_backend.REINSTALL}." if choice.module is cuda_backend else "")
        warnings.warn(f"lkconv: the {choice.module.name} backend failed ({type(error).__name__}: {error}); PyTorch "
                      f"answers this shape class from now on in this process.{advice} Please report it with "
                      "lkconv.explain(...) of the call.", RuntimeWarning, stacklevel=2)
        return getattr(torch_backend, pass_name)(*args)


def autotuned(choice: Choice, device: torch.device, map_tensor: torch.Tensor, shape: measured.ShapeClass,
              problem: Optional[autotune.Problem]) -> Choice:
    """The candidate measured faster at run time for this GPU, dtype and shape class: remembered from an earlier
    call, or timed now on `problem` where it may be; else `choice` (the default order) until a call measures."""
    gpu = torch.cuda.get_device_name(device)
    key = autotune.key_of(gpu, map_tensor.dtype, shape)
    found = autotune.remembered(key)
    if found is None and problem is not None and autotune.can_measure(map_tensor):
        found = autotune.measure(key, {name: _MODULES[name] for name in choice.candidates}, problem)
    if found is None:
        return choice._replace(reason=f"{choice.reason}; {autotune.VARIABLE}=1 times the candidates at the first "
                                      "forward call it can")
    if found.name is None:
        failed = "; ".join(f"{name}: {error}" for name, error in found.failures.items())
        return Choice(torch_backend, f"auto: every GPU backend failed while timed at run time on {gpu} ({failed}); "
                                     "PyTorch answers")
    times = ", ".join(f"{name} {ms:.3g} ms" for name, ms in found.times_ms.items())
    failed = "".join(f"; {name} failed while timed ({error})" for name, error in found.failures.items())
    return Choice(_MODULES[found.name], f"auto: {found.name} measured faster at run time on {gpu} (forward and "
                                        f"backward: {times}){failed}",
                  failure_key=(found.name, *choice.failure_key[1:]))


@functools.lru_cache(maxsize=1024)
def _choose(requested: str, device_type: str, index: Optional[int], dtype: torch.dtype, interpreting: bool,
            shape: Optional[measured.ShapeClass], table_version: Optional[tuple]) -> Choice:
    # table_version (measured.version()) only keys the cache: a changed table is read again.
    device = torch.device(device_type, index)
    if requested != "auto":
        reason = unavailable_reason(requested) or _MODULES[requested].unsupported_reason(device, dtype)
        if reason is not None:
            raise BackendUnavailableError(f"backend {requested!r} was forced ({_forced_by()}) but cannot run this "
                                          f"call: {reason}")
        return Choice(_MODULES[requested], f"forced ({requested!r})")
    if device_type != "cuda":
        return Choice(torch_backend, f"auto: lkconv's kernels run on CUDA tensors; PyTorch answers for {device_type}")
    failure_key = (device_type, index, dtype, shape)
    usable, skipped = [], []
    for name in AUTO_ORDER:
        module = _MODULES[name]
        reason = module.unavailable_reason() or module.unsupported_reason(device, dtype)
        if reason is None:
            usable.append(name)
        else:
            skipped.append(f"{name}: {reason}")
    if not usable:
        return Choice(torch_backend, "auto: falling back to PyTorch (" + "; ".join(skipped) + ")")
    unmeasured = " (no measurement for this shape class: the default order)" if len(usable) > 1 else ""
    if len(usable) > 1 and shape is not None:
        gpu = torch.cuda.get_device_name(device)
        table = measured.load()
        if (faster := measured.lookup(table, gpu, dtype, shape)) in usable:
            return Choice(_MODULES[faster], f"auto: {faster} measured faster than the other GPU backend for this "
                                            f"shape class on {gpu}", failure_key=(faster, *failure_key))
        if table.get("device") not in (None, gpu):
            unmeasured = (f" (the backend table {measured.table_path()} was measured on {table['device']}, not on "
                          f"{gpu}: the default order)")
    tried = f" ({'; '.join(skipped)})" if skipped else ""
    candidates = tuple(usable) if len(usable) > 1 and shape is not None else ()
    return Choice(_MODULES[usable[0]], f"auto: {usable[0]} kernels{tried}{unmeasured}", candidates,
                  failure_key=(usable[0], *failure_key))
