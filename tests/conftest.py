"""Shared test setup: the Triton interpreter on CPU-only machines (every launch checked for false alignment hints,
stray memory accesses and races between programs), the float64 reference and per-dtype tolerances."""

import os
import warnings
from typing import Optional

import numpy
import pytest
import torch
import torch.nn.functional as F

# Without a GPU the Triton kernels run under the interpreter; it must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


HAS_CUDA = torch.cuda.is_available()
# Where the triton backend runs: CUDA tensors on a GPU machine, CPU tensors under the interpreter otherwise.
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"
# Dispatch tests that force triton on small CPU tensors need the interpreter, which only CPU-only machines use;
# on a GPU machine test_numerics.py, test_ops.py and test_gpu.py run the same kernels on CUDA tensors instead.
needs_interpreter = pytest.mark.skipif(HAS_CUDA, reason="forces triton on CPU tensors: needs the Triton interpreter")

# Relative L2 error allowed against the float64 reference (ARCHITECTURE.md §5). The contract allows 1e-2 for 16-bit
# inputs; fp16 is held to 1e-3, because its 11-bit significand rounds 8x finer than bfloat16's and a kernel that lost
# fp16 precision (rounding operands to bfloat16, say) must fail.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
TF32_TOLERANCE = 3e-3


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def exact_fp32_convs():
    """fp32 tests expect exact fp32 unless they opt into TF32 themselves."""
    conv = torch.backends.cudnn.conv
    previous = conv.fp32_precision
    conv.fp32_precision = "ieee"
    yield
    conv.fp32_precision = previous


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64; NaN anywhere gives inf so it never passes."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    if actual.shape != expected.shape:
        raise AssertionError(f"shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    if not torch.isfinite(actual).all():
        return float("inf")
    scale = expected.norm().item()
    return (actual - expected).norm().item() / (scale if scale > 0 else 1.0)


def assert_close(actual, expected, tolerance, what=""):
    error = relative_error(actual, expected)
    if not error <= tolerance:
        diff = (actual.detach().double().cpu() - expected.detach().double().cpu()).abs()
        worst = tuple(int(i) for i in torch.nonzero(diff == diff.max())[0]) if diff.numel() else ()
        raise AssertionError(f"{what}: relative error {error:.3e} > {tolerance:.1e} (largest at index {worst})")


def reference(input, weight, bias, stride, padding, dilation, grad_output=None):
    """F.conv2d in float64 on copies of the inputs: (output, grad_input, grad_weight, grad_bias or None)."""
    x = input.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    b = bias.detach().double().requires_grad_() if bias is not None else None
    y = F.conv2d(x, w, b, stride, padding, dilation, groups=x.shape[1])
    if grad_output is None:
        return y.detach(), None, None, None
    grads = torch.autograd.grad(y, [t for t in (x, w, b) if t is not None], grad_output.double())
    return (y.detach(), grads[0], grads[1], grads[2] if b is not None else None)


def non_finite_reach(input, grad_output, kernel, multiplier, stride, padding, dilation):
    """The elements of (output, grad_input, grad_weight) that a non-finite element of `input` or `grad_output` must
    make non-finite, padding (top, bottom, left, right) aside: an output whose window holds one, an input grad that
    sums one, a weight-grad tap that pairs one with an input inside the map (or one input with any grad). F.conv2d
    also multiplies the padding's zeros, so its weight grad can be NaN at more taps: they are not required here."""
    top, bottom, left, right = padding
    marks = [(~torch.isfinite(t.detach())).double().cpu() for t in (input, grad_output)]
    ones = torch.ones(input.shape[1] * multiplier, 1, *kernel, dtype=torch.float64, requires_grad=True)

    def conv(x, w):
        return F.conv2d(F.pad(x, (left, right, top, bottom)), w, None, stride, 0, dilation, input.shape[1])

    x = torch.zeros_like(marks[0], requires_grad=True)
    (grad_input,) = torch.autograd.grad(conv(x, ones), x, marks[1])
    (inside,) = torch.autograd.grad(conv(torch.ones_like(marks[0]), ones), ones, marks[1])
    (from_input,) = torch.autograd.grad(conv(marks[0], ones), ones, torch.ones_like(marks[1]))
    return conv(marks[0], ones).detach() > 0, grad_input > 0, (inside > 0) | (from_input > 0)


def assert_never_hidden(name, actual, must) -> None:
    """Every element `must` marks is non-finite in `actual` (and the case marks some, or it tests nothing)."""
    assert must.any(), f"{name}: no non-finite value reaches it, so the case tests nothing"
    hidden = must & torch.isfinite(actual.detach()).cpu()
    assert not hidden.any(), f"{name}: {int(hidden.sum())} elements a non-finite value reaches came back finite"


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """Triton and CUDA outputs start as NaN, so an element a kernel never writes fails the comparison."""
    from lkconv.backends import cuda_backend, triton_backend

    for module in (triton_backend, cuda_backend):
        original = module.new_buffer

        def nan_buffer(*args, _original=original, **kwargs):
            return _original(*args, **kwargs).fill_(float("nan"))

        monkeypatch.setattr(module, "new_buffer", nan_buffer)


def _hint_is_false(data, values) -> Optional[int]:
    """The first value `tl.multiple_of(data, values)` is wrong about, or None. Per axis, the hint speaks of the first
    element of each run of consecutive values (so `multiple_of(pid * B + arange(B), B)` is right)."""
    data = numpy.asarray(data)
    if data.ndim == 0:
        data = data.reshape(1)
    values = list(values) * data.ndim if len(values) == 1 else list(values)
    for axis, value in enumerate(values):
        run_start = numpy.ones(data.shape, dtype=bool)
        later = [slice(None)] * data.ndim
        later[axis] = slice(1, None)
        run_start[tuple(later)] = numpy.diff(data.astype(numpy.int64), axis=axis) != 1
        wrong = data[run_start & (data % value != 0)]
        if wrong.size:
            return int(wrong[0])
    return None


def _check_hints(monkeypatch, interpreter) -> None:
    """Every `tl.multiple_of` promise the kernels make to the compiler must hold on the data. The interpreter
    otherwise ignores the hints; a GPU trusts them, so a false one means misaligned vector loads there."""
    patch_core = interpreter._patch_lang_core  # re-applied by the interpreter at every launch

    def patch_with_checks(lang, scope):
        patch_core(lang, scope)
        hint = lang.multiple_of

        def multiple_of(input, values):
            data = input.handle.data if hasattr(input, "handle") else input
            values = [getattr(v, "value", v) for v in (values if isinstance(values, (list, tuple)) else [values])]
            wrong = _hint_is_false(data, values)
            assert wrong is None, f"tl.multiple_of(..., {values}) is false: {wrong} starts a run"
            return hint(input, values)

        scope.set_attr(lang, "multiple_of", multiple_of)

    monkeypatch.setattr(interpreter, "_patch_lang_core", patch_with_checks)


def _span(tensor: torch.Tensor) -> tuple[int, int]:
    """The addresses [first, end) a tensor's elements occupy (a strided view's, not its whole storage's)."""
    if tensor.numel() == 0:
        return (0, 0)
    extents = [(size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride())]
    first = tensor.data_ptr() + sum(min(0, e) for e in extents) * tensor.element_size()
    return first, tensor.data_ptr() + (sum(max(0, e) for e in extents) + 1) * tensor.element_size()


def _check_races(stores: list, loads: list) -> None:
    """Within one tensor and launch, no element stored by one program is stored or loaded by another: the
    interpreter runs programs one after another, a GPU at once. Each entry is (addresses, program)."""
    stored = numpy.concatenate([addresses for addresses, _ in stores])
    stored_by = numpy.concatenate([numpy.full(addresses.size, program) for addresses, program in stores])
    order = numpy.lexsort((stored_by, stored))
    stored, stored_by = stored[order], stored_by[order]
    distinct = numpy.ones(stored.size, dtype=bool)  # one entry per (address, program)
    distinct[1:] = (stored[1:] != stored[:-1]) | (stored_by[1:] != stored_by[:-1])
    stored, stored_by = stored[distinct], stored_by[distinct]
    shared = stored[1:][stored[1:] == stored[:-1]]
    assert not shared.size, f"{hex(int(shared[0]))} was stored by several programs of one launch: on a GPU they race"
    for addresses, program in loads:
        at = numpy.minimum(numpy.searchsorted(stored, addresses), stored.size - 1)
        raced = addresses[(stored[at] == addresses) & (stored_by[at] != program)]
        assert not raced.size, (f"{hex(int(raced[0]))} was loaded by one program and stored by another in one launch: "
                                "on a GPU they race")


def _check_memory(monkeypatch, interpreter) -> None:
    """Every load and store must fall, all its active lanes together, inside one tensor the launch was given (that
    view's span, not its whole storage): compute-sanitizer's memcheck, on a CPU. The interpreter itself reads and
    writes raw addresses, so a stray access would otherwise pass unseen or corrupt memory. Then `_check_races`."""
    spans, accesses = [], {}  # accesses[(argument index, "load" or "store")]: [(addresses, program), ...]
    run_launch = interpreter.GridExecutor.__call__
    load, store = interpreter.InterpreterBuilder.create_masked_load, interpreter.InterpreterBuilder.create_masked_store

    def launch(self, *args, **kwargs):
        spans[:] = [_span(arg) if isinstance(arg, torch.Tensor) else (0, 0) for arg in (*args, *kwargs.values())]
        accesses.clear()
        result = run_launch(self, *args, **kwargs)
        for (index, access), entries in accesses.items():
            if access == "store":
                _check_races(entries, accesses.get((index, "load"), []))
        return result

    def check(builder, ptrs, mask, access):
        addresses = ptrs.data.astype(numpy.uint64)
        addresses = addresses[numpy.broadcast_to(mask.data, addresses.shape)]
        if not addresses.size:
            return
        first, last = int(addresses.min()), int(addresses.max()) + max(1, ptrs.get_element_ty().primitive_bitwidth // 8)
        index = next((i for i, (begin, end) in enumerate(spans) if begin <= first and last <= end), None)
        assert index is not None, f"a {access} of {hex(first)}..{hex(last)} lies in no one tensor of the launch"
        x, y, z = builder.grid_idx
        accesses.setdefault((index, access), []).append((addresses, (z * 65536 + y) * 65536 + x))

    def checked_load(self, ptrs, mask, *args):
        check(self, ptrs, mask, "load")
        return load(self, ptrs, mask, *args)

    def checked_store(self, ptrs, value, mask, *args):
        check(self, ptrs, mask, "store")
        return store(self, ptrs, value, mask, *args)

    monkeypatch.setattr(interpreter.GridExecutor, "__call__", launch)
    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_masked_load", checked_load)
    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_masked_store", checked_store)


@pytest.fixture(autouse=True)
def checked_triton_launches(monkeypatch):
    """In the interpreter, every triton launch of every test is checked for what only a GPU would otherwise show:
    false alignment hints, accesses outside the launch's tensors and races between programs. The checks hook the
    interpreter's internals as triton 3.6 (what CI installs) has them; another version without them warns and runs
    unchecked. (Pointer alignment needs no check: Triton tests each pointer's alignment at launch.)"""
    if HAS_CUDA:
        yield
        return
    from triton.runtime import interpreter

    builder = getattr(interpreter, "InterpreterBuilder", None)
    hooks = (getattr(interpreter, "_patch_lang_core", None), getattr(interpreter, "GridExecutor", None),
             getattr(builder, "create_masked_load", None), getattr(builder, "create_masked_store", None),
             getattr(builder, "set_grid_idx", None))
    if None in hooks:
        warnings.warn("this triton's interpreter lacks the internals the launch checks hook (triton 3.6 has them): "
                      "alignment hints, memory accesses and races go unchecked")
    else:
        _check_hints(monkeypatch, interpreter)
        _check_memory(monkeypatch, interpreter)
    yield
