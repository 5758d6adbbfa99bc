"""Shared test setup: the Triton interpreter on CPU-only machines (every launch checked for false alignment hints,
stray memory accesses and racing stores), the float64 reference and per-dtype tolerances."""

import os
import warnings

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


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """Triton and CUDA outputs start as NaN, so an element a kernel never writes fails the comparison."""
    from lkconv.backends import cuda_backend, triton_backend

    for module in (triton_backend, cuda_backend):
        original = module.new_buffer

        def nan_buffer(*args, _original=original, **kwargs):
            return _original(*args, **kwargs).fill_(float("nan"))

        monkeypatch.setattr(module, "new_buffer", nan_buffer)


def _check_hints(monkeypatch, interpreter) -> None:
    """Every `tl.multiple_of` promise the kernels make to the compiler must hold on the data. The interpreter
    otherwise ignores the hints; a GPU trusts them, so a false one means misaligned vector loads there."""
    patch_core = interpreter._patch_lang_core  # re-applied by the interpreter at every launch

    def patch_with_checks(lang, scope):
        patch_core(lang, scope)
        hint = lang.multiple_of

        def multiple_of(input, values):
            data = input.handle.data if hasattr(input, "handle") else input
            for value in values if isinstance(values, (list, tuple)) else [values]:
                value = getattr(value, "value", value)
                assert (numpy.asarray(data) % value == 0).all(), f"tl.multiple_of({value}) is false for {data}"
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


def _check_memory(monkeypatch, interpreter) -> None:
    """Every load and store must fall inside one of the tensors the launch was given (the view's span, not its
    whole storage): compute-sanitizer's memcheck, on a CPU. The interpreter itself reads and writes raw addresses, so
    a stray access would otherwise pass unseen or corrupt memory. And no address may be stored twice in one launch:
    the interpreter runs programs one after another, where a GPU runs them at once and two writes would race."""
    spans, stored = [], []
    run_launch = interpreter.GridExecutor.__call__
    load, store = interpreter.InterpreterBuilder.create_masked_load, interpreter.InterpreterBuilder.create_masked_store

    def launch(self, *args, **kwargs):
        spans[:] = [_span(arg) for arg in (*args, *kwargs.values()) if isinstance(arg, torch.Tensor)]
        stored.clear()
        result = run_launch(self, *args, **kwargs)
        if stored:
            addresses, counts = numpy.unique(numpy.concatenate(stored), return_counts=True)
            assert (counts == 1).all(), (f"{hex(int(addresses[counts > 1][0]))} was stored {counts.max()} times in one "
                                         "launch: on a GPU, a race between programs")
        return result

    def check(ptrs, mask, access):
        addresses = ptrs.data.astype(numpy.uint64)
        addresses = addresses[numpy.broadcast_to(mask.data, addresses.shape)]
        size = ptrs.get_element_ty().primitive_bitwidth // 8
        inside = numpy.zeros(addresses.shape, dtype=bool)
        for first, end in spans:
            inside |= (addresses >= first) & (addresses + size <= end)
        assert inside.all(), f"a {access} outside every tensor of the launch, at {hex(int(addresses[~inside][0]))}"
        return addresses

    def checked_load(self, ptrs, mask, *args):
        check(ptrs, mask, "load")
        return load(self, ptrs, mask, *args)

    def checked_store(self, ptrs, value, mask, *args):
        stored.append(check(ptrs, mask, "store"))
        return store(self, ptrs, value, mask, *args)

    monkeypatch.setattr(interpreter.GridExecutor, "__call__", launch)
    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_masked_load", checked_load)
    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_masked_store", checked_store)


@pytest.fixture(autouse=True)
def checked_triton_launches(monkeypatch):
    """In the interpreter, every triton launch of every test is checked for what only a GPU would otherwise show:
    false alignment hints, accesses outside the launch's tensors and racing stores. The checks hook the interpreter's
    internals as triton 3.6 (what CI installs) has them; another version without them warns and runs unchecked."""
    if HAS_CUDA:
        yield
        return
    from triton.runtime import interpreter

    hooks = (getattr(interpreter, "_patch_lang_core", None), getattr(interpreter, "GridExecutor", None),
             getattr(getattr(interpreter, "InterpreterBuilder", None), "create_masked_load", None))
    if None in hooks:
        warnings.warn("this triton's interpreter lacks the internals the launch checks hook (triton 3.6 has them): "
                      "alignment hints, memory accesses and racing stores go unchecked")
    else:
        _check_hints(monkeypatch, interpreter)
        _check_memory(monkeypatch, interpreter)
    yield
