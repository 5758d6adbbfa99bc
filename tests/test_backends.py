"""Backend control (set_backend, use_backend, LKCONV_BACKEND), dispatch, explain, and the forced triton backend."""

import contextlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lkconv
from lkconv import backends
from lkconv.backends import torch_backend, triton_backend
from conftest import TOLERANCE, assert_close, needs_interpreter, reference

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA_EXTENSION = importlib.util.find_spec("lkconv._C") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


@pytest.fixture(autouse=True)
def clean_backend_state(monkeypatch):
    """Every test starts from 'auto' with no LKCONV_BACKEND, and leaves no forced backend behind."""
    monkeypatch.delenv("LKCONV_BACKEND", raising=False)
    lkconv.set_backend(None)
    yield
    lkconv.set_backend(None)


@pytest.fixture
def ran(monkeypatch):
    """Records which backend each pass actually ran on: a list of (backend name, pass name)."""
    calls = []
    for backend in (torch_backend, triton_backend):
        for pass_name in ("forward", "input_grad", "weight_grad"):
            original = getattr(backend, pass_name)

            def spy(*args, _original=original, _where=(backend.name, pass_name), **kwargs):
                calls.append(_where)
                return _original(*args, **kwargs)

            monkeypatch.setattr(backend, pass_name, spy)
    return calls


def small_call(dtype=torch.float32, batch=2):
    x = torch.randn(batch, 3, 8, 9, dtype=dtype)
    w = torch.randn(3, 1, 5, 3, dtype=dtype)
    b = torch.randn(3, dtype=dtype)
    return x, w, b


def backend_of_a_call(dtype=torch.float32):
    x, w, b = small_call(dtype)
    return lkconv.explain(x, w, b, 1, (2, 1)).backend


# --- what is available ----------------------------------------------------------------------------------------------


def test_available_backends_lists_torch_and_triton_when_importable_never_cuda():
    names = lkconv.available_backends()
    assert isinstance(names, list) and all(isinstance(n, str) for n in names)
    assert "torch" in names
    assert ("triton" in names) == HAS_TRITON
    assert ("cuda" in names) == (HAS_CUDA_EXTENSION and torch.cuda.is_available())


@needs_interpreter
def test_explain_describes_an_empty_batch_on_triton():
    """N = 0 launches nothing, but explain still says which kernels a batch of that shape would run."""
    with lkconv.use_backend("triton"):
        plan = lkconv.explain(torch.randn(0, 3, 8, 8), torch.randn(3, 1, 5, 5), padding=2)
    assert plan.backend == "triton"
    assert plan.forward.startswith("rows") and plan.input_grad.startswith("rows")
    assert plan.weight_grad.startswith("weight_grad")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
def test_triton_is_not_available_without_a_gpu_or_the_interpreter(monkeypatch):
    monkeypatch.setattr(triton_backend, "interpreting", lambda: False)
    assert "triton" not in lkconv.available_backends()
    with pytest.raises(lkconv.BackendUnavailableError, match="TRITON_INTERPRET"):
        lkconv.set_backend("triton")


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
def test_lkconv_reads_triton_interpret_as_triton_does():
    """Triton takes true/yes/on as on, and reads the variable when kernels are decorated: lkconv agrees on both, so
    it neither refuses an interpreter Triton runs nor offers one Triton did not build."""
    check = ("import os, torch, torch.nn.functional as F, lkconv\n"
             "x, w = torch.randn(1, 2, 6, 6), torch.randn(2, 1, 3, 3)\n"
             "{before}\n"
             "print(sorted(lkconv.available_backends()))\n"
             "if 'triton' in lkconv.available_backends():\n"
             "    with lkconv.use_backend('triton'):\n"
             "        print(float((lkconv.depthwise_conv2d(x, w, padding=1) - F.conv2d(x, w, padding=1, groups=2))"
             ".abs().max()) < 1e-5)\n")
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    on = subprocess.run([sys.executable, "-c", check.format(before="")], capture_output=True, text=True,
                        env={**environment, "TRITON_INTERPRET": "true"}, timeout=300)
    assert on.stdout.split() == ["['torch',", "'triton']", "True"], on.stderr
    late = subprocess.run([sys.executable, "-c", check.format(before="import lkconv.kernels; "
                                                                     "os.environ['TRITON_INTERPRET'] = '1'")],
                          capture_output=True, text=True, env=environment, timeout=300)
    assert late.stdout.split() == ["['torch']"], late.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
def test_a_forced_backend_that_cannot_run_says_what_forced_it(monkeypatch):
    x, w = torch.randn(1, 2, 6, 6), torch.randn(2, 1, 3, 3)
    monkeypatch.setenv("LKCONV_BACKEND", " torch ")  # surrounding spaces are ignored, as for "" (auto)
    assert lkconv.explain(x, w).backend == "torch"
    for forced in ("LKCONV_BACKEND", "lkconv.set_backend", "lkconv.use_backend"):
        backends._choose.cache_clear()
        with contextlib.ExitStack() as stack:
            stack.callback(lkconv.set_backend, None)
            monkeypatch.setattr(triton_backend, "unavailable_reason", lambda: None)  # forcing it is allowed ...
            monkeypatch.setenv("LKCONV_BACKEND", "triton" if forced == "LKCONV_BACKEND" else "auto")
            if forced == "lkconv.set_backend":
                lkconv.set_backend("triton")
            elif forced == "lkconv.use_backend":
                stack.enter_context(lkconv.use_backend("triton"))
            # ... but it cannot run float64
            with pytest.raises(lkconv.BackendUnavailableError, match=rf"'triton' was forced \({re.escape(forced)}\)"):
                lkconv.explain(x.double(), w.double())
    backends._choose.cache_clear()


def test_an_empty_output_is_named_as_such_by_the_ops():
    op = torch.ops.lkconv.depthwise_conv2d
    with pytest.raises(ValueError, match=r"the output would be empty: .* give output size \(-3, -3\)"):
        op(torch.randn(2, 4, 3, 3), torch.randn(4, 1, 7, 7), None, [1, 1], [0, 0, 0, 0], [1, 1])
    with pytest.raises(ValueError, match=r"the output would be empty: input \(2, 4, 0, 3\)"):
        op(torch.randn(2, 4, 0, 3), torch.randn(4, 1, 1, 1), None, [1, 1], [1, 1, 1, 1], [1, 1])


def test_the_three_custom_ops_exist_under_torch_ops_lkconv():
    for op_name in ("depthwise_conv2d", "depthwise_conv2d_input_grad", "depthwise_conv2d_weight_grad"):
        assert hasattr(torch.ops.lkconv, op_name), op_name
        assert isinstance(getattr(torch.ops.lkconv, op_name).default, torch._ops.OpOverload)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("stride", [1, 2])
def test_custom_ops_compute_the_conv_and_its_grads_with_asymmetric_padding(stride, dtype):
    x = torch.randn(2, 3, 9, 8, dtype=dtype)
    w = torch.randn(6, 1, 4, 5, dtype=dtype)
    b = torch.randn(6, dtype=dtype)
    pad = [1, 2, 2, 1]  # (top, left, bottom, right), as the ops take it
    y = torch.ops.lkconv.depthwise_conv2d(x, w, b, [stride, stride], pad, [1, 1])
    dy = torch.randn(y.shape, dtype=dtype)
    dx = torch.ops.lkconv.depthwise_conv2d_input_grad(dy, w, list(x.shape), [stride, stride], pad, [1, 1])
    dw, db = torch.ops.lkconv.depthwise_conv2d_weight_grad(dy, x, [4, 5], [stride, stride], pad, [1, 1], True)
    x64 = x.double().requires_grad_()
    w64 = w.double().requires_grad_()
    b64 = b.double().requires_grad_()
    y64 = F.conv2d(F.pad(x64, (pad[1], pad[3], pad[0], pad[2])), w64, b64, stride, 0, 1, groups=3)
    grads = torch.autograd.grad(y64, (x64, w64, b64), dy.double())
    tolerance = TOLERANCE[dtype]
    for name, actual, expected in zip(("output", "grad_input", "grad_weight", "grad_bias"), (y, dx, dw, db), (y64, *grads)):
        assert_close(actual, expected, tolerance, name)


# --- set_backend / use_backend / LKCONV_BACKEND ----------------------------------------------------------------------


@needs_interpreter
@pytest.mark.parametrize(
    "name", ["torch", "auto", "Torch", pytest.param("triton", marks=needs_triton), pytest.param(" triton ", marks=needs_triton)]
)
def test_set_backend_forces_the_backend_for_later_calls(name, ran):
    lkconv.set_backend(name)
    expected = {"auto": "torch"}.get(name.strip().lower(), name.strip().lower())  # auto on CPU is torch
    assert backend_of_a_call() == expected
    x, w, b = small_call()
    y = lkconv.depthwise_conv2d(x, w, b, 1, (2, 1))
    assert ran == [(expected, "forward")]
    assert_close(y, reference(x, w, b, 1, (2, 1), 1)[0], TOLERANCE[torch.float32], "output")


@needs_interpreter
def test_set_backend_none_follows_the_environment_again(monkeypatch):
    monkeypatch.setenv("LKCONV_BACKEND", "triton")
    lkconv.set_backend("torch")
    assert backend_of_a_call() == "torch"
    lkconv.set_backend(None)
    assert backend_of_a_call() == "triton"


@needs_interpreter
def test_use_backend_restores_the_previous_setting():
    lkconv.set_backend("triton")
    with lkconv.use_backend("torch"):
        assert backend_of_a_call() == "torch"
        with lkconv.use_backend("triton"):
            assert backend_of_a_call() == "triton"
        assert backend_of_a_call() == "torch"
    assert backend_of_a_call() == "triton"
    assert backends.requested_backend() == "triton"


@needs_interpreter
def test_use_backend_restores_the_previous_setting_on_exceptions():
    lkconv.set_backend("torch")

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with lkconv.use_backend("triton"):
            assert backend_of_a_call() == "triton"
            raise Boom()
    assert backends.requested_backend() == "torch"
    assert backend_of_a_call() == "torch"


@needs_interpreter
def test_set_backend_inside_use_backend_sets_the_process_default_for_after_the_block(monkeypatch):
    monkeypatch.setenv("LKCONV_BACKEND", "triton")
    with lkconv.use_backend("torch"):
        lkconv.set_backend("auto")
        assert backends.requested_backend() == "torch"  # the block's own choice still wins inside it
    assert backends.requested_backend() == "auto"
    lkconv.set_backend(None)
    assert backends.requested_backend() == "triton"
    assert backend_of_a_call() == "triton"


def test_use_backend_does_not_leak_into_other_threads():
    import threading

    seen = {}
    inside, checked = threading.Event(), threading.Event()

    def other_thread():
        inside.wait()
        seen["other"] = backends.requested_backend()
        checked.set()

    worker = threading.Thread(target=other_thread)
    worker.start()
    lkconv.set_backend("torch")
    with lkconv.use_backend("triton"):
        inside.set()
        checked.wait()
        seen["this"] = backends.requested_backend()
    worker.join()
    assert seen == {"this": "triton", "other": "torch"}


@needs_interpreter
@pytest.mark.parametrize("forced,default", [("torch", "triton"), ("triton", "torch")])
def test_backward_on_another_thread_runs_on_the_backend_its_forward_used(forced, default, ran):
    """Autograd runs CUDA backward on its own threads, which do not see use_backend: the ops carry it there."""
    import threading

    x, w, b = (t.requires_grad_() for t in small_call())
    lkconv.set_backend(default)
    with lkconv.use_backend(forced):
        y = lkconv.depthwise_conv2d(x, w, b, 1, (2, 1))
    grad_output = torch.randn_like(y)
    worker = threading.Thread(target=lambda: y.backward(grad_output))
    worker.start()
    worker.join()
    assert ran == [(forced, "forward"), (forced, "input_grad"), (forced, "weight_grad")]
    _, *expected = reference(x, w, b, 1, (2, 1), 1, grad_output)
    for name, actual, wanted in zip(("input", "weight", "bias"), (x.grad, w.grad, b.grad), expected):
        assert_close(actual, wanted, TOLERANCE[torch.float32], f"grad of {name}")


@needs_interpreter
@pytest.mark.parametrize("forced,default", [("torch", "triton"), ("triton", "torch")])
def test_a_checkpointed_model_zoo_block_recomputes_on_the_forced_backend(forced, default, ran):
    """Activation checkpointing reruns a block's forward inside the backward, outside the caller's use_backend."""
    from lkconv.models.common import run_block

    x, w, b = (t.requires_grad_() for t in small_call())
    layer = lkconv.DepthwiseConv2d(3, (5, 3), padding=(2, 1))
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(b)
    block = nn.Sequential(layer, nn.Tanh())  # tanh saves its output: the recompute happens in tanh's backward
    lkconv.set_backend(default)
    with lkconv.use_backend(forced):
        y = run_block(block, x, use_checkpoint=True)
    grad_output = torch.randn_like(y)
    y.backward(grad_output)
    assert ran == [(forced, "forward"), (forced, "forward"), (forced, "input_grad"), (forced, "weight_grad")]
    reference_x = x.detach().double().requires_grad_()
    expected_y = torch.tanh(F.conv2d(reference_x, w.double(), b.double(), 1, (2, 1), groups=3))
    expected_y.backward(grad_output.double())
    assert_close(y, expected_y, TOLERANCE[torch.float32], "output")
    assert_close(x.grad, reference_x.grad, TOLERANCE[torch.float32], "grad of input")


@needs_interpreter
def test_lkconv_backend_environment_variable_is_read_on_every_call(monkeypatch, ran):
    x, w, b = small_call()
    expected = reference(x, w, b, 1, (2, 1), 1)[0]
    sequence = ["torch", "triton", "torch", "auto", "triton", "TORCH"] if HAS_TRITON else ["torch", "auto", "TORCH"]
    for value in sequence:
        monkeypatch.setenv("LKCONV_BACKEND", value)
        wanted = "torch" if value.lower() in ("auto", "torch") else value
        assert lkconv.explain(x, w, b, 1, (2, 1)).backend == wanted, value
        ran.clear()
        y = lkconv.depthwise_conv2d(x, w, b, 1, (2, 1))
        assert ran == [(wanted, "forward")], value
        assert_close(y, expected, TOLERANCE[torch.float32], f"LKCONV_BACKEND={value}")


def test_empty_lkconv_backend_means_auto(monkeypatch):
    monkeypatch.setenv("LKCONV_BACKEND", "")
    assert backends.requested_backend() == "auto"
    assert backend_of_a_call() == "torch"


@needs_interpreter
def test_set_backend_overrides_the_environment_variable(monkeypatch):
    monkeypatch.setenv("LKCONV_BACKEND", "triton")
    with lkconv.use_backend("torch"):
        assert backend_of_a_call() == "torch"
    with lkconv.use_backend("auto"):
        assert backend_of_a_call() == "torch"


@pytest.mark.parametrize("name", ["fast", "cudnn", "", 3, "auto,torch"])
def test_unknown_backend_name_raises_value_error_naming_the_argument(name):
    lkconv.set_backend("torch")
    with pytest.raises(ValueError, match=rf"backend.*{name!r}"):
        lkconv.set_backend(name)
    with pytest.raises(ValueError, match=rf"backend.*{name!r}"):
        with lkconv.use_backend(name):
            pass
    assert backends.requested_backend() == "torch"  # a rejected name changes nothing


@pytest.mark.parametrize("value", ["fast", "cudnn", "tor ch"])
def test_unknown_lkconv_backend_raises_value_error_naming_the_variable(value, monkeypatch):
    monkeypatch.setenv("LKCONV_BACKEND", value)
    x, w, b = small_call()
    with pytest.raises(ValueError, match=rf"LKCONV_BACKEND.*{value!r}"):
        lkconv.depthwise_conv2d(x, w, b, 1, 2)
    with pytest.raises(ValueError, match=rf"LKCONV_BACKEND.*{value!r}"):
        lkconv.explain(x, w, b, 1, 2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
def test_forcing_cuda_raises_backend_unavailable_at_set_time():
    lkconv.set_backend("torch")
    reason = r"no CUDA GPU" if HAS_CUDA_EXTENSION else r"lkconv\._C"
    with pytest.raises(lkconv.BackendUnavailableError, match=rf"(?s)'cuda'.*not available.*{reason}"):
        lkconv.set_backend("cuda")
    with pytest.raises(lkconv.BackendUnavailableError, match=r"'cuda'"):
        with lkconv.use_backend("cuda"):
            pass
    assert backends.requested_backend() == "torch"
    assert issubclass(lkconv.BackendUnavailableError, RuntimeError)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
def test_cuda_from_the_environment_raises_backend_unavailable_at_call_time(monkeypatch, ran):
    monkeypatch.setenv("LKCONV_BACKEND", "cuda")
    x, w, b = small_call()
    with pytest.raises(lkconv.BackendUnavailableError, match=r"'cuda'"):
        lkconv.depthwise_conv2d(x, w, b, 1, 2)
    assert ran == []


@needs_triton
def test_forced_triton_with_float64_raises_at_call_time_without_falling_back(ran):
    lkconv.set_backend("triton")  # accepted: triton is installed
    x, w, b = small_call(torch.float64)
    with pytest.raises(lkconv.BackendUnavailableError, match=r"(?s)'triton'.*torch\.float64"):
        lkconv.depthwise_conv2d(x, w, b, 1, 2)
    with pytest.raises(lkconv.BackendUnavailableError, match=r"(?s)'triton'.*torch\.float64"):
        lkconv.explain(x, w, b, 1, 2)
    with pytest.raises(lkconv.BackendUnavailableError):
        lkconv.DepthwiseConv2d(3, 5, padding=2, dtype=torch.float64)(x)
    assert ran == []


@needs_triton
def test_forced_triton_on_cpu_tensors_without_the_interpreter_raises(monkeypatch, ran):
    """On a GPU machine (simulated: triton reports itself available) a CPU tensor cannot run on triton."""
    monkeypatch.setattr(triton_backend, "interpreting", lambda: False)
    monkeypatch.setattr(triton_backend, "unavailable_reason", lambda: None)
    x, w, b = small_call()
    with lkconv.use_backend("triton"):
        with pytest.raises(lkconv.BackendUnavailableError, match=r"(?s)'triton'.*cpu"):
            lkconv.depthwise_conv2d(x, w, b, 1, 2)
    assert ran == []


# --- auto ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [2, 0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_auto_runs_every_valid_cpu_call_correctly(dtype, batch, ran):
    x = torch.randn(batch, 3, 8, 9, dtype=dtype, requires_grad=True)
    w = torch.randn(6, 1, 7, 5, dtype=dtype, requires_grad=True)
    b = torch.randn(6, dtype=dtype, requires_grad=True)
    explanation = lkconv.explain(x, w, b, 1, (3, 2))
    assert explanation.backend == "torch"
    y = lkconv.depthwise_conv2d(x, w, b, 1, (3, 2))
    dy = torch.randn(y.shape, dtype=dtype)
    y.backward(dy)
    assert {name for name, _ in ran} == {"torch"}
    ref = reference(x, w, b, 1, (3, 2), 1, dy)
    for name, actual, expected in zip(("output", "grad_input", "grad_weight", "grad_bias"), (y, x.grad, w.grad, b.grad), ref):
        assert actual.dtype == dtype, name
        assert_close(actual, expected, TOLERANCE[dtype], name)


def test_auto_answers_float64_cuda_tensors_with_torch(monkeypatch):
    """On a GPU the triton and cuda kernels take fp16/bf16/fp32: auto hands float64 to PyTorch and says why (decided
    on the dtype before any GPU is asked, so a CPU-only machine can check it with a GPU pretended)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(triton_backend, "interpreting", lambda: False)
    backends._choose.cache_clear()
    try:
        choice = backends.choose(torch.device("cuda", 0), torch.float64)
    finally:
        backends._choose.cache_clear()
    assert choice.module is torch_backend
    assert "triton kernels take float16, bfloat16 and float32 tensors, not torch.float64" in choice.reason
    if HAS_CUDA_EXTENSION:
        assert "CUDA kernels take float16, bfloat16 and float32 tensors, not torch.float64" in choice.reason


# --- explain --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["auto", "torch", pytest.param("triton", marks=[needs_triton, needs_interpreter])])
def test_explain_returns_strings_and_its_str_names_the_backend(backend):
    x, w, b = small_call()
    with lkconv.use_backend(backend):
        explanation = lkconv.explain(x, w, b, 1, (2, 1))
    assert isinstance(explanation, lkconv.Explanation)
    for field in ("backend", "reason", "forward", "input_grad", "weight_grad"):
        value = getattr(explanation, field)
        assert isinstance(value, str) and value, field
    assert explanation.backend == ("torch" if backend == "auto" else backend)
    text = str(explanation)
    assert explanation.backend in text and explanation.forward in text and explanation.weight_grad in text
    if backend != "auto":
        assert "forced" in explanation.reason


@needs_interpreter
@needs_triton
@pytest.mark.parametrize(
    "shape, kernel, stride, padding, channels_last, form",
    [((2, 3, 8, 9), (5, 3), 2, (2, 1), False, "rows"), ((2, 3, 8, 9), (5, 3), 1, (2, 1), False, "rows_shifted_filter"),
     ((16, 2, 4, 4), (5, 5), 1, 2, False, "whole_map"), ((2, 3, 8, 9), (5, 3), 1, (2, 1), True, "rows_channels_last")],
    ids=["rows", "rows_shifted_filter", "whole_map", "rows_channels_last"],
)
def test_explain_names_the_triton_kernel_form(shape, kernel, stride, padding, channels_last, form):
    x = torch.randn(shape)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(shape[1], 1, *kernel)
    with lkconv.use_backend("triton"):
        explanation = lkconv.explain(x, w, None, stride, padding)
    assert explanation.backend == "triton"
    for plan in (explanation.forward, explanation.input_grad):
        assert plan.split()[0] == form, plan
    assert "weight_grad" in explanation.weight_grad


@needs_interpreter
@needs_triton
@pytest.mark.parametrize("shape,kernel,stride", [((2, 4, 9, 9), 9, 1), ((2, 4, 20, 20), 3, 20), ((2, 4, 12, 10), 5, 1)],
                         ids=["1x1 output", "strided to 1x1", "12x10"])
def test_explain_names_the_kernel_forms_a_channels_last_call_launches(shape, kernel, stride, monkeypatch):
    """dx takes dy's layout: a 1x1 dy is NCHW-contiguous, so its input grad runs the per-channel kernels."""
    x = torch.randn(shape).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(shape[1], 1, kernel, kernel)
    launched = []
    plan_conv = triton_backend.plan_conv

    def spy(p, interpret):
        plan = plan_conv(p, interpret)
        launched.append(plan.form)
        return plan

    monkeypatch.setattr(triton_backend, "plan_conv", spy)
    with lkconv.use_backend("triton"):
        explanation = lkconv.explain(x, w, None, stride)
        explained = [explanation.forward.split()[0], explanation.input_grad.split()[0]]
        launched.clear()
        y = lkconv.depthwise_conv2d(x, w, None, stride)
        torch.autograd.grad(y, x, torch.randn_like(y))
    assert launched == explained


@needs_interpreter
@needs_triton
@pytest.mark.parametrize("layout,dtype,width,vector", [
    ("nchw", torch.bfloat16, 32, "16-byte"), ("nchw", torch.float32, 32, "16-byte"), ("nchw", torch.bfloat16, 28, "8-byte"),
    # 3 channels (blocks of 4 under the interpreter): all 3 bf16 channels of a pixel at once.
    ("channels_last", torch.bfloat16, 32, "6-byte"),
])
def test_explain_names_the_source_load_width(layout, dtype, width, vector):
    """The input grad's width is the output's (dy comes in the output's layout), here that of the input."""
    x = torch.randn(2, 3, 40, width, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    with lkconv.use_backend("triton"):
        explanation = lkconv.explain(x, torch.randn(3, 1, 5, 5, dtype=dtype), None, 1, 2)
    for plan in (explanation.forward, explanation.input_grad, explanation.weight_grad):
        assert f"{vector} source loads" in plan, plan
        assert ("along channels" in plan) == (layout == "channels_last"), plan


KERNEL_OF_FORM = {"rows": "depthwise_rows_kernel", "rows_shifted_filter": "depthwise_rows_kernel",
                  "rows_channels_last": "depthwise_rows_channels_last_kernel",
                  "whole_map": "depthwise_whole_map_kernel", "weight_grad": "depthwise_weight_grad_kernel",
                  "weight_grad_channels_last": "depthwise_weight_grad_channels_last_kernel"}


class _LaunchRecorder:
    """Stands in for lkconv.kernels: launches each kernel as asked and records its name and ALIGN."""

    def __init__(self, kernels, launched):
        self._kernels, self._launched = kernels, launched

    def __getattr__(self, name):
        kernel, launched = getattr(self._kernels, name), self._launched

        class Launcher:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    launched.append((name, kwargs.get("ALIGN")))
                    return kernel[grid](*args, **kwargs)
                return launch
        return Launcher()


@needs_interpreter
@needs_triton
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_explain_names_what_y_sum_backward_launches(layout, monkeypatch):
    """y.sum().backward() hands the backward a stride-0 expansion of ones. The backward copies it into x's layout
    once, so each pass launches the kernel and the vector width explain names (before, an expanded dy took the
    per-channel weight grad on a channels_last x, and 4-byte loads on NCHW)."""
    x = torch.randn(2, 4, 10, 32)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    w = torch.randn(4, 1, 3, 3, requires_grad=True)
    launched = []
    kernels = triton_backend._kernels()
    monkeypatch.setattr(triton_backend, "_kernels", lambda: _LaunchRecorder(kernels, launched))
    with lkconv.use_backend("triton"):
        explanation = lkconv.explain(x, w, None, 1, 1)
        lkconv.depthwise_conv2d(x, w, None, 1, 1).sum().backward()
    plans = (explanation.forward, explanation.input_grad, explanation.weight_grad)
    assert [name for name, _ in launched] == [KERNEL_OF_FORM[plan.split()[0]] for plan in plans], (launched, plans)
    for (name, align), plan in zip(launched, plans):
        if align is not None:
            assert f"{align * x.element_size()}-byte source loads" in plan, (name, align, plan)
    assert_close(x.grad, reference(x, w, None, 1, 1, 1, torch.ones(2, 4, 10, 32))[1], TOLERANCE[torch.float32],
                 "input grad")


@needs_interpreter
@needs_triton
def test_geometry_beyond_32_bit_indexing_is_refused_by_gpu_backends_and_huge_strides_plan_quickly():
    """The GPU kernels index in 32 bits: a stride or padding past 2**30 raises under a forced GPU backend (it
    returned zeros before) and goes to PyTorch under auto. A large stride that fits plans in constant time (it took
    a minute at 10**7) and gives F.conv2d's result."""
    x, w = torch.randn(1, 2, 8, 8), torch.randn(2, 1, 3, 3)
    op = torch.ops.lkconv.depthwise_conv2d
    with lkconv.use_backend("triton"):
        with pytest.raises(lkconv.BackendUnavailableError, match=r"stride along the height, 2147483648, is beyond"):
            op(x, w, None, [2**31, 1], [2**31 - 2, 1, 0, 1], [1, 1])
        with pytest.raises(lkconv.BackendUnavailableError, match=r"padding along the width, 1073741825, is beyond"):
            lkconv.explain(x, w, padding=(0, 2**30 + 1))
        start = time.perf_counter()
        lkconv.explain(x, w, stride=(1, 10**7), padding=1)
        y = lkconv.depthwise_conv2d(x, w, None, (1, 10**7), 1)
        assert time.perf_counter() - start < 5
    assert_close(y, reference(x, w, None, (1, 10**7), 1, 1)[0], TOLERANCE[torch.float32], "stride 10**7")
    choice = backends.Choice(triton_backend, "auto: triton kernels", failure_key=("triton", "cpu", None, None, None))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(backends, "_choose_for_shape", lambda *args: choice)
        routed = backends.choose_for_conv(x, (3, 3), (2**31, 1), (0, 0, 0, 0), (1, 1), (8, 8))
        assert routed.module is torch_backend and "beyond the 2**30" in routed.reason
        # a kernel whose sides fit but whose taps do not (the weight grads count taps in 32 bits)
        routed = backends.choose_for_conv(x, (2**15 + 1, 2**15), (1, 1), (0, 0, 0, 0), (1, 1), (2**16, 2**16))
        assert routed.module is torch_backend and "kernel's area, 32769 x 32768 = 1073774592 taps" in routed.reason


@pytest.mark.parametrize("batch,height,width,beyond", [
    (2**21, 1024, 1, "rows (N x height)"), (2**21 - 2, 1024, 1, None), (1, 2**30, 1, None),
    (1, 1, 5000, "columns wide"),  # padding 2**30 - 2501 per side: 2**31 - 2 columns
    (1, 1, 3974, None),  # 2**31 - 1028 columns
])
def test_a_batch_with_too_many_rows_for_the_triton_kernels_goes_to_pytorch_or_raises_where_forced(batch, height,
                                                                                                 width, beyond):
    """The Triton kernels count a batch's map rows (N x height) and a padded row's columns in 32 bits, with room for a
    block; past that they wrote nothing and returned garbage (rows), or stored before the row (columns, where a
    block's last index wrapped negative). The CUDA kernels index in 64 bits and keep such calls."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lkconv.backends import cuda_backend

    side_padding = 2**30 - 2501 if width > 1 else 0
    geometry = ((31, 1), (1, 1), (15, side_padding, 15, side_padding), (1, 1), (height, width))
    with FakeTensorMode():
        x = torch.empty(batch, 1, height, width, device="cuda")
    with pytest.MonkeyPatch.context() as patch:
        for module in (triton_backend, cuda_backend):
            choice = backends.Choice(module, "auto: stand-in", failure_key=(module.name, "cuda", 0, None, None))
            patch.setattr(backends, "_choose_for_shape", lambda *args, c=choice: c)
            routed = backends.choose_for_conv(x, *geometry)
            assert routed.module is (torch_backend if beyond and module is triton_backend else module)
            if routed.module is torch_backend:
                assert beyond in routed.reason and "beyond the 2**31 - 1024 the triton kernels count" in routed.reason
        # Where the cuda backend can run the call, it answers instead of PyTorch (unless it failed on the class).
        patch.setattr(cuda_backend, "unavailable_reason", lambda: None)
        patch.setattr(cuda_backend, "unsupported_reason", lambda device, dtype: None)
        choice = backends.Choice(triton_backend, "auto: stand-in", failure_key=("triton", "cuda", 0, None, None))
        patch.setattr(backends, "_choose_for_shape", lambda *args: choice)
        routed = backends.choose_for_conv(x, *geometry)
        assert routed.module is (cuda_backend if beyond else triton_backend), routed.reason
        assert routed.failure_key == (("cuda" if beyond else "triton"), "cuda", 0, None, None)
        patch.setitem(backends._failures, ("cuda", "cuda", 0, None, None), "RuntimeError: stand-in")
        assert backends.choose_for_conv(x, *geometry).module is (torch_backend if beyond else triton_backend)
        if beyond:
            patch.setattr(backends, "_choose_for_shape", lambda *args: backends.Choice(triton_backend, "forced"))
            with lkconv.use_backend("triton"), pytest.raises(lkconv.BackendUnavailableError, match=re.escape(beyond)):
                backends.choose_for_conv(x, *geometry)


# --- the forced triton backend on CPU (interpreter) -----------------------------------------------------------------

TRITON_CASES = [
    dict(shape=(2, 3, 8, 9), kernel=(5, 3), multiplier=1, stride=1, padding=(2, 1), dilation=1, bias=True),
    dict(shape=(2, 3, 8, 9), kernel=(3, 3), multiplier=2, stride=2, padding=1, dilation=(1, 2), bias=False),
    dict(shape=(1, 3, 7, 6), kernel=(4, 4), multiplier=1, stride=1, padding="same", dilation=1, bias=True),
    dict(shape=(16, 2, 4, 4), kernel=(5, 5), multiplier=1, stride=1, padding=2, dilation=1, bias=True),  # whole_map
    dict(shape=(2, 2, 5, 6), kernel=(7, 7), multiplier=1, stride=1, padding=3, dilation=1, bias=True),  # K > H, W
]


@needs_interpreter
@needs_triton
@pytest.mark.parametrize(
    "case", TRITON_CASES, ids=["5x3", "3x3-m2-s2-dil", "4x4-same", "whole-map", "kernel-larger-than-map"]
)
def test_forced_triton_matches_reference_for_output_and_all_grads(case, ran):
    dtype = torch.float32
    batch, channels, height, width = case["shape"]
    x = torch.randn(case["shape"], dtype=dtype, requires_grad=True)
    w = torch.randn(channels * case["multiplier"], 1, *case["kernel"], dtype=dtype, requires_grad=True)
    b = torch.randn(w.shape[0], dtype=dtype, requires_grad=True) if case["bias"] else None
    conv = (case["stride"], case["padding"], case["dilation"])
    with lkconv.use_backend("triton"):
        y = lkconv.depthwise_conv2d(x, w, b, *conv)
        dy = torch.randn(y.shape, dtype=dtype)
        y.backward(dy)
    assert set(ran) == {("triton", "forward"), ("triton", "input_grad"), ("triton", "weight_grad")}
    ref = reference(x, w, b, *conv, grad_output=dy)
    actual = (y, x.grad, w.grad, b.grad if b is not None else None)
    for name, a, e in zip(("output", "grad_input", "grad_weight", "grad_bias"), actual, ref):
        if e is None:
            continue
        assert_close(a, e, TOLERANCE[dtype], f"triton {name}")


@needs_interpreter
@needs_triton
def test_forced_triton_bfloat16_matches_reference():
    x = torch.randn(2, 3, 8, 9, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(3, 1, 5, 3, dtype=torch.bfloat16, requires_grad=True)
    with lkconv.use_backend("triton"):
        y = lkconv.depthwise_conv2d(x, w, None, 1, (2, 1))
        dy = torch.randn(y.shape, dtype=torch.bfloat16)
        y.backward(dy)
    ref = reference(x, w, None, 1, (2, 1), 1, dy)
    for name, a, e in zip(("output", "grad_input", "grad_weight"), (y, x.grad, w.grad), ref):
        assert a.dtype == torch.bfloat16
        assert_close(a, e, TOLERANCE[torch.bfloat16], f"triton bf16 {name}")


@needs_interpreter
@needs_triton
def test_forced_triton_empty_batch_returns_empty_output_and_zero_weight_grad(ran):
    x = torch.randn(0, 3, 8, 9, requires_grad=True)
    w = torch.randn(3, 1, 5, 3, requires_grad=True)
    b = torch.randn(3, requires_grad=True)
    with lkconv.use_backend("triton"):
        y = lkconv.depthwise_conv2d(x, w, b, 1, (2, 1))
        dy = torch.randn(y.shape)
        y.backward(dy)
    ref = reference(x, w, b, 1, (2, 1), 1, dy)
    assert y.shape == ref[0].shape == (0, 3, 8, 9)
    assert x.grad.shape == x.shape
    assert_close(w.grad, ref[2], TOLERANCE[torch.float32], "grad_weight")
    assert_close(b.grad, ref[3], TOLERANCE[torch.float32], "grad_bias")
    assert ("triton", "forward") in ran


@needs_interpreter
@needs_triton
def test_forced_triton_drives_the_module_forward():
    layer = lkconv.DepthwiseConv2d(3, 5, padding=2, padding_mode="reflect", depth_multiplier=2)
    x = torch.randn(2, 3, 6, 7)
    with lkconv.use_backend("triton"):
        assert lkconv.explain(x, layer.weight, layer.bias, 1, 2).backend == "triton"
        y = layer(x)
    expected = reference(F.pad(x, (2, 2, 2, 2), mode="reflect"), layer.weight, layer.bias, 1, 0, 1)[0]
    assert_close(y, expected, TOLERANCE[torch.float32], "module on triton")


# --- auto between the two GPU backends: the committed measurements -------------------------------------------------


def test_measured_lookup_matches_geometry_exactly_and_size_within_a_factor_of_two():
    from lkconv.backends.measured import ShapeClass, lookup

    table = {"device": "GPU X", "choices": [
        {"dtype": "bfloat16", "kernel": [31, 31], "stride": [1, 1], "dilation": [1, 1], "size": [32, 32],
         "backend": "cuda"},
        {"dtype": "bfloat16", "kernel": [31, 31], "stride": [1, 1], "dilation": [1, 1], "size": [64, 64],
         "backend": "triton"},
    ]}
    shape = ShapeClass.of((31, 31), (1, 1), (1, 1), (30, 34))
    assert lookup(table, "GPU X", torch.bfloat16, shape) == "cuda"
    assert lookup(table, "GPU X", torch.bfloat16, shape._replace(size=(70, 60))) == "triton"
    assert lookup(table, "GPU X", torch.bfloat16, shape._replace(size=(7, 7))) is None  # nothing measured near
    # Each side within a factor of two: 4x off on one side is too far, whatever the other side matches.
    assert lookup(table, "GPU X", torch.bfloat16, shape._replace(size=(8, 32))) is None
    assert lookup(table, "GPU X", torch.bfloat16, shape._replace(size=(256, 64))) is None
    assert lookup(table, "GPU X", torch.bfloat16, shape._replace(size=(16, 16))) == "cuda"  # 2x per side
    assert lookup(table, "GPU X", torch.float32, shape) is None  # another dtype
    assert lookup(table, "GPU X", torch.bfloat16, shape._replace(kernel=(29, 29))) is None
    assert lookup(table, "GPU Y", torch.bfloat16, shape) is None  # measured on another GPU model
    assert lookup(table, "GPU X", torch.bfloat16, shape._replace(layout="channels_last")) is None  # another layout
    table["choices"].append({**table["choices"][0], "layout": "channels_last", "backend": "triton"})
    assert lookup(table, "GPU X", torch.bfloat16, shape._replace(layout="channels_last")) == "triton"
    assert lookup(table, "GPU X", torch.bfloat16, shape) == "cuda"  # entries without a layout are NCHW


def test_the_shape_class_layout_is_where_the_channels_are_contiguous():
    from lkconv.backends.measured import layout_of

    x = torch.zeros(2, 3, 4, 5)
    assert layout_of(x) == "nchw" and layout_of(x.contiguous(memory_format=torch.channels_last)) == "channels_last"
    assert layout_of(x.contiguous(memory_format=torch.channels_last)[:, ::2]) == "nchw"  # channel stride 2
    assert layout_of(x[:, :1]) == "nchw"  # one channel: either


def test_auto_follows_the_measured_table_when_both_gpu_backends_can_run(monkeypatch):
    from lkconv.backends import cuda_backend, measured

    for module in (triton_backend, cuda_backend):
        monkeypatch.setattr(module, "unavailable_reason", lambda: None)
        monkeypatch.setattr(module, "unsupported_reason", lambda device, dtype: None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "GPU X")
    table = {"device": "GPU X", "choices": [{"dtype": "float32", "kernel": [13, 13], "stride": [1, 1],
                                             "dilation": [1, 1], "size": [14, 14], "backend": "cuda"}]}
    monkeypatch.setattr(measured, "load", lambda: table)
    backends._choose.cache_clear()
    try:
        device = torch.device("cuda", 0)
        measured_shape = measured.ShapeClass.of((13, 13), (1, 1), (1, 1), (14, 14))
        choice = backends.choose(device, torch.float32, measured_shape)
        assert choice.module is cuda_backend and "measured faster" in choice.reason
        other = backends.choose(device, torch.float32, measured_shape._replace(kernel=(31, 31)))
        assert other.module is triton_backend and "no measurement" in other.reason
    finally:
        backends._choose.cache_clear()


def test_lkconv_choices_names_a_table_of_ones_own(monkeypatch, tmp_path):
    from lkconv.backends import measured

    table = {"device": "GPU Z", "choices": [{"dtype": "bfloat16", "kernel": [31, 31], "stride": [1, 1],
                                             "dilation": [1, 1], "size": [56, 56], "backend": "cuda"}]}
    path = tmp_path / "choices.json"
    path.write_text(json.dumps(table))
    monkeypatch.setenv("LKCONV_CHOICES", str(path))
    assert measured.table_path() == path and measured.load() == table
    shape = measured.ShapeClass.of((31, 31), (1, 1), (1, 1), (56, 56))
    assert measured.lookup(measured.load(), "GPU Z", torch.bfloat16, shape) == "cuda"
    table["choices"][0]["backend"] = "triton"  # an edited table is read again
    path.write_text(json.dumps(table))
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert measured.lookup(measured.load(), "GPU Z", torch.bfloat16, shape) == "triton"
    monkeypatch.chdir(tmp_path)  # a relative path is resolved when read
    monkeypatch.setenv("LKCONV_CHOICES", "choices.json")
    assert measured.load() == table
    monkeypatch.setenv("LKCONV_CHOICES", str(tmp_path / "missing.json"))
    with pytest.raises(RuntimeError, match="LKCONV_CHOICES=.*missing.json"):
        measured.load()
    (tmp_path / "list.json").write_text("[]")
    monkeypatch.setenv("LKCONV_CHOICES", str(tmp_path / "list.json"))
    with pytest.raises(RuntimeError, match="LKCONV_CHOICES=.*list.json is not a backend table"):
        measured.load()
    monkeypatch.delenv("LKCONV_CHOICES")
    assert measured.table_path() == measured.TABLE


def test_auto_reads_a_changed_lkconv_choices_and_says_when_a_table_is_for_another_gpu(monkeypatch, tmp_path):
    """Choices are cached per table: pointing LKCONV_CHOICES elsewhere (or at nothing) takes effect at the next call,
    and a table measured on another GPU model is named in the reason rather than silently unused."""
    from lkconv.backends import cuda_backend, measured

    for module in (triton_backend, cuda_backend):
        monkeypatch.setattr(module, "unavailable_reason", lambda: None)
        monkeypatch.setattr(module, "unsupported_reason", lambda device, dtype: None)
    monkeypatch.setattr(cuda_backend, "extension_loaded", lambda: True)  # the table matters only with lkconv._C
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "GPU X")
    entry = {"dtype": "float32", "kernel": [13, 13], "stride": [1, 1], "dilation": [1, 1], "size": [14, 14]}
    for name, device, backend in (("cuda.json", "GPU X", "cuda"), ("triton.json", "GPU X", "triton"),
                                  ("other.json", "GPU Y", "cuda")):
        (tmp_path / name).write_text(json.dumps({"device": device, "choices": [{**entry, "backend": backend}]}))
    device, shape = torch.device("cuda", 0), measured.ShapeClass.of((13, 13), (1, 1), (1, 1), (14, 14))
    backends._choose.cache_clear()
    try:
        monkeypatch.setenv("LKCONV_CHOICES", str(tmp_path / "cuda.json"))
        assert backends.choose(device, torch.float32, shape).module is cuda_backend
        monkeypatch.setenv("LKCONV_CHOICES", str(tmp_path / "triton.json"))
        assert backends.choose(device, torch.float32, shape).module is triton_backend
        monkeypatch.setenv("LKCONV_CHOICES", str(tmp_path / "other.json"))
        reason = backends.choose(device, torch.float32, shape).reason
        assert f"the backend table {tmp_path / 'other.json'} was measured on GPU Y, not on GPU X" in reason
        monkeypatch.setenv("LKCONV_CHOICES", str(tmp_path / "missing.json"))
        with pytest.raises(RuntimeError, match="LKCONV_CHOICES=.*missing.json"):
            backends.choose(device, torch.float32, shape)
    finally:
        backends._choose.cache_clear()


@pytest.mark.parametrize("change", [dict(stride=None), dict(kernel=31), dict(kernel=[31, "31"]), dict(backend="Cuda"),
                                    dict(layout="nhwc"), "x"], ids=repr)
def test_lkconv_choices_entries_that_are_not_choices_are_named(change, monkeypatch, tmp_path):
    from lkconv.backends import measured

    entry = {"dtype": "float32", "kernel": [13, 13], "stride": [1, 1], "dilation": [1, 1], "size": [14, 14],
             "backend": "cuda"}
    entry = change if isinstance(change, str) else {k: v for k, v in {**entry, **change}.items() if v is not None}
    (tmp_path / "table.json").write_text(json.dumps({"device": "GPU X", "choices": [entry]}))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("LKCONV_CHOICES", "~/table.json")  # ~ is the home folder
    with pytest.raises(RuntimeError, match=r"LKCONV_CHOICES=.*table.json: choices\[0\] is not a choice"):
        measured.load()


def test_the_committed_table_is_valid_and_says_which_gpu_measured_it():
    """load() refuses a table with an entry that is not a choice (test_lkconv_choices_entries_that_are_not_choices_
    are_named); the committed one loads, and names the GPU its choices were measured on, or none while it is empty."""
    from lkconv.backends import measured

    table = measured.load(measured.TABLE)
    assert set(table) >= {"device", "choices"}
    if table["choices"]:
        assert isinstance(table["device"], str) and table["device"], "choices measured on no named GPU"
    else:
        assert table["device"] is None, "an empty table names a GPU"


# --- LKCONV_AUTOTUNE: run-time measurement where nothing is committed ----------------------------------------------


# The delay that makes a candidate slow: far above what a loaded 2-core CI machine adds to the tiny conv the
# candidates really run (28 ms was seen with two CI runs and ptxas sharing the cores; 20 ms of delay lost to it).
SLOW_FORWARD_S = 0.25


@pytest.fixture
def two_gpu_backends(monkeypatch):
    """Both GPU backends look usable on "GPU X", and their passes are PyTorch's plus a delay per forward that the
    test sets: autotune's timing runs on the CPU."""
    from lkconv.backends import autotune, cuda_backend

    delays = {"triton": 0.0, "cuda": 0.0}
    for name, module in (("triton", triton_backend), ("cuda", cuda_backend)):
        monkeypatch.setattr(module, "unavailable_reason", lambda: None)
        monkeypatch.setattr(module, "unsupported_reason", lambda device, dtype: None)

        def forward(*args, name=name):
            time.sleep(delays[name])
            return torch_backend.forward(*args)

        monkeypatch.setattr(module, "forward", forward)
        monkeypatch.setattr(module, "input_grad", torch_backend.input_grad)
        monkeypatch.setattr(module, "weight_grad", torch_backend.weight_grad)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "GPU X")
    monkeypatch.setattr(autotune, "can_measure", lambda tensor: True)
    monkeypatch.setenv("LKCONV_AUTOTUNE", "1")
    backends._choose.cache_clear()
    autotune.forget()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # no thread-pool barrier for a busy machine to stall: the timed work stays small
    try:
        yield delays
    finally:
        torch.set_num_threads(threads)
        backends._choose.cache_clear()
        autotune.forget()


def _autotune_call(shape_size=(12, 12)):
    from lkconv.backends import autotune, measured

    x = torch.randn(2, 3, *shape_size)
    w = torch.randn(3, 1, 5, 5)
    problem = autotune.Problem(x, w, None, (1, 1), (2, 2, 2, 2), (1, 1))
    shape = measured.ShapeClass.of((5, 5), (1, 1), (1, 1), shape_size)
    device = torch.device("cuda", 0)
    return device, x, shape, problem


@pytest.mark.parametrize("slow,fast", [("cuda", "triton"), ("triton", "cuda")])
def test_autotune_times_the_candidates_once_and_keeps_the_faster(two_gpu_backends, slow, fast):
    from lkconv.backends import autotune

    two_gpu_backends[slow] = SLOW_FORWARD_S
    device, x, shape, problem = _autotune_call()
    default = backends.choose(device, torch.float32, shape)
    assert default.candidates == ("triton", "cuda") and "no measurement" in default.reason
    choice = backends.autotuned(default, device, x, shape, problem)
    assert choice.module is backends._MODULES[fast], choice.reason
    assert "measured faster at run time on GPU X" in choice.reason and f"{slow} " in choice.reason
    found = autotune.remembered(autotune.key_of("GPU X", torch.float32, shape))
    # The slow candidate's delay was timed (a bound no load can break), and it lost.
    assert found.name == fast and found.times_ms[slow] >= SLOW_FORWARD_S * 1e3
    assert found.times_ms[slow] > found.times_ms[fast]
    # Later passes (no problem to time) and later calls take the remembered choice without timing again.
    two_gpu_backends[slow], two_gpu_backends[fast] = 0.0, SLOW_FORWARD_S
    assert backends.autotuned(default, device, x, shape, None).module is backends._MODULES[fast]
    assert backends.autotuned(default, device, x, shape, problem).module is backends._MODULES[fast]


def test_autotune_leaves_out_a_candidate_that_fails_and_keys_by_rounded_size_and_fp32_rule(two_gpu_backends,
                                                                                              monkeypatch):
    from lkconv.backends import autotune, cuda_backend

    def broken(*args):
        raise RuntimeError("too many resources requested for launch")

    monkeypatch.setattr(cuda_backend, "forward", broken)
    device, x, shape, problem = _autotune_call((12, 12))
    default = backends.choose(device, torch.float32, shape)
    choice = backends.autotuned(default, device, x, shape, problem)
    assert choice.module is triton_backend and "cuda failed while timed (RuntimeError: too many resources" in choice.reason
    # 12x12 and 15x16 maps share a key (16x16); 17x16 does not; nor does the same map under the other fp32 rule.
    key, bf16_key = autotune.key_of("GPU X", torch.float32, shape), autotune.key_of("GPU X", torch.bfloat16, shape)
    assert autotune.key_of("GPU X", torch.float32, shape._replace(size=(15, 16))) == key
    assert autotune.key_of("GPU X", torch.float32, shape._replace(size=(17, 16))) != key
    torch.backends.cudnn.conv.fp32_precision = "tf32"  # the autouse fixture restores "ieee"
    assert autotune.key_of("GPU X", torch.float32, shape) != key
    assert autotune.key_of("GPU X", torch.bfloat16, shape) == bf16_key  # the fp32 rule does not touch bf16


def test_autotune_remembers_that_every_candidate_failed_and_lets_memory_errors_through(two_gpu_backends,
                                                                                      monkeypatch):
    """Both backends failing is remembered: later calls go to PyTorch at once instead of timing (and, for Triton,
    compiling) the failures again on every call. Out of memory is no backend failure: it propagates."""
    from lkconv.backends import autotune, cuda_backend

    attempts = []

    def broken(*args):
        attempts.append(1)
        raise RuntimeError("stand-in: does not launch")

    for module in (triton_backend, cuda_backend):
        monkeypatch.setattr(module, "forward", broken)
    device, x, shape, problem = _autotune_call()
    default = backends.choose(device, torch.float32, shape)
    for _ in range(3):
        choice = backends.autotuned(default, device, x, shape, problem)
        assert choice.module is torch_backend and "every GPU backend failed while timed" in choice.reason
        assert "triton: RuntimeError: stand-in: does not launch" in choice.reason
    assert len(attempts) == 2
    autotune.forget()

    def out_of_memory(*args):
        raise torch.cuda.OutOfMemoryError("stand-in: out of memory")

    monkeypatch.setattr(triton_backend, "forward", out_of_memory)
    with pytest.raises(torch.cuda.OutOfMemoryError, match="stand-in"):
        backends.autotuned(default, device, x, shape, problem)
    assert autotune.remembered(autotune.key_of("GPU X", torch.float32, shape)) is None


@pytest.mark.parametrize("batch,stride,beyond,answers", [(2**21, 1, "rows (N x height)", "cuda"),
                                                          (1, 2**31, "beyond the 2**30", "torch")])
def test_autotune_never_times_a_call_a_gpu_backend_cannot_run(two_gpu_backends, monkeypatch, batch, stride, beyond,
                                                              answers):
    """LKCONV_AUTOTUNE runs the candidates on the call's tensors; a batch with too many rows for the Triton kernels,
    or a geometry past the GPU kernels' 32-bit indexing, would have run them (past the limits: memory corruption)
    before the dispatcher sent the call elsewhere. Such calls are not timed: cuda answers the first (it counts in 64
    bits), PyTorch the second."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lkconv.backends import autotune

    def measure(*args):
        raise AssertionError("timed a call that a candidate cannot run")

    monkeypatch.setattr(autotune, "measure", measure)
    with FakeTensorMode():
        x = torch.empty(batch, 1, 1024, 1, device="cuda")
        w = torch.empty(1, 1, 31, 1, device="cuda")
    problem = autotune.Problem(x, w, None, (stride, 1), (15, 0, 15, 0), (1, 1))
    choice = backends.choose_for_conv(x, (31, 1), (stride, 1), (15, 0, 15, 0), (1, 1), (1024, 1), problem)
    assert choice.module.name == answers and beyond in choice.reason, choice.reason


def test_autotune_keeps_the_default_order_where_it_cannot_time(two_gpu_backends, monkeypatch):
    from lkconv.backends import autotune

    monkeypatch.setattr(autotune, "can_measure", lambda tensor: False)  # e.g. during CUDA-graph capture
    device, x, shape, problem = _autotune_call()
    default = backends.choose(device, torch.float32, shape)
    choice = backends.autotuned(default, device, x, shape, problem)
    assert choice.module is default.module and "LKCONV_AUTOTUNE=1 times the candidates" in choice.reason
    assert autotune.remembered(autotune.key_of("GPU X", torch.float32, shape)) is None


def test_autotune_is_off_unless_asked_and_rejects_other_values(monkeypatch):
    from lkconv.backends import autotune

    monkeypatch.delenv("LKCONV_AUTOTUNE", raising=False)
    assert not autotune.enabled()
    monkeypatch.setenv("LKCONV_AUTOTUNE", "0")
    assert not autotune.enabled()
    monkeypatch.setenv("LKCONV_AUTOTUNE", "yes")
    with pytest.raises(ValueError, match=r"LKCONV_AUTOTUNE must be 0 or 1; got 'yes'"):
        autotune.enabled()
    # Read on every GPU call, also where one GPU backend alone could run it (nothing to time): a fake CUDA tensor.
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setattr(backends, "AUTO_ORDER", ("triton",))
    with FakeTensorMode():
        x = torch.empty(1, 2, 8, 8, device="cuda")
    try:
        with pytest.raises(ValueError, match=r"LKCONV_AUTOTUNE must be 0 or 1; got 'yes'"):
            backends.choose_for_conv(x, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), (8, 8))
    finally:
        backends._choose.cache_clear()  # choices made under the patched order must not outlive it


def test_the_forward_op_hands_its_call_to_autotune(monkeypatch):
    """The forward is the pass with every tensor a timing needs; it passes them as the autotune Problem."""
    from lkconv.backends import autotune

    seen = []
    original = backends.choose_for_conv

    def spy(map_tensor, kernel, stride, padding, dilation, input_hw, problem=None):
        seen.append(problem)
        return original(map_tensor, kernel, stride, padding, dilation, input_hw, problem)

    monkeypatch.setattr(backends, "choose_for_conv", spy)
    x, w, b = torch.randn(1, 2, 8, 8), torch.randn(2, 1, 3, 3), torch.randn(2)
    with lkconv.use_backend("torch"):
        lkconv.depthwise_conv2d(x, w, b, 1, 1, 1)
    problem = seen[0]
    assert isinstance(problem, autotune.Problem) and problem.input is x and problem.weight is w and problem.bias is b
    assert problem.padding == (1, 1, 1, 1) and problem.stride == (1, 1) and problem.dilation == (1, 1)


def test_autotune_never_times_cpu_or_fake_tensors():
    """Fake tensors (torch.compile's tracing) have no data to time; CPU tensors never reach the GPU backends."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lkconv.backends import autotune

    assert not autotune.can_measure(torch.randn(2))
    with FakeTensorMode():
        fake = torch.empty(2, device="cuda")
    assert fake.device.type == "cuda" and not autotune.can_measure(fake)


# --- auto steps around a GPU backend that fails --------------------------------------------------------------------


@pytest.fixture
def failing_triton(monkeypatch):
    """auto picks triton for CPU tensors here (as it would for CUDA ones), and triton's forward raises what the test
    sets; its backward passes are PyTorch's."""
    failure = {"error": RuntimeError("stand-in: the kernel does not compile on this GPU")}
    original_choose = backends._choose.__wrapped__

    def choose_as_on_a_gpu(requested, device_type, index, dtype, interpreting, shape, table_version):
        return original_choose(requested, "cuda", 0, dtype, interpreting, shape, table_version)

    def forward(*args):
        raise failure["error"]

    monkeypatch.setattr(backends, "_choose", choose_as_on_a_gpu)
    monkeypatch.setattr(backends, "_failures", {})
    monkeypatch.setattr(backends, "AUTO_ORDER", ("triton",))
    monkeypatch.setattr(triton_backend, "unavailable_reason", lambda: None)
    monkeypatch.setattr(triton_backend, "unsupported_reason", lambda device, dtype: None)
    monkeypatch.setattr(triton_backend, "forward", forward)
    monkeypatch.setattr(triton_backend, "input_grad", torch_backend.input_grad)
    monkeypatch.setattr(triton_backend, "weight_grad", torch_backend.weight_grad)
    return failure


def test_auto_answers_with_pytorch_where_a_gpu_backend_fails_and_says_so_once(failing_triton):
    x, w, b = torch.randn(2, 3, 9, 8, requires_grad=True), torch.randn(3, 1, 5, 3), torch.randn(3)
    assert lkconv.explain(x, w, b, padding=2).backend == "triton"
    with pytest.warns(RuntimeWarning, match="the triton backend failed .*stand-in: the kernel does not compile"):
        y = lkconv.depthwise_conv2d(x, w, b, padding=(2, 1))
    assert_close(y, reference(x, w, b, 1, (2, 1), 1)[0], TOLERANCE[torch.float32], "fallback output")
    explained = lkconv.explain(x, w, b, padding=(2, 1))
    assert explained.backend == "torch" and "triton failed on this shape class earlier" in explained.reason
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the failure is remembered: no second warning, no second try
        again = lkconv.depthwise_conv2d(x, w, b, padding=(2, 1))
    assert torch.equal(again, y)


def test_a_failing_cuda_backend_says_how_to_rebuild_it_for_this_gpu(monkeypatch):
    """"no kernel image is available" means lkconv._C was built for other GPUs: the warning names the rebuild."""
    from lkconv.backends import cuda_backend

    def forward(*args):
        raise RuntimeError("stand-in: no kernel image is available for execution on the device")

    monkeypatch.setattr(cuda_backend, "forward", forward)
    monkeypatch.setattr(backends, "_failures", {})
    choice = backends.Choice(cuda_backend, "auto: cuda kernels", failure_key=("cuda", "cuda", 0, torch.float32, None))
    x, w = torch.randn(1, 2, 6, 6), torch.randn(2, 1, 3, 3)
    with pytest.warns(RuntimeWarning, match=r"rebuild it for this one: TORCH_CUDA_ARCH_LIST=native pip install .*"
                                            r"--force-reinstall"):
        y = backends.run_pass(choice, "forward", x, w, None, [1, 1], [1, 1, 1, 1], [1, 1])
    assert_close(y, reference(x, w, None, 1, 1, 1)[0], TOLERANCE[torch.float32], "PyTorch's answer")


def test_a_forced_backends_failure_and_memory_and_cuda_errors_are_not_stepped_around(failing_triton):
    x, w = torch.randn(1, 2, 6, 6), torch.randn(2, 1, 3, 3)
    with lkconv.use_backend("triton"), pytest.raises(RuntimeError, match="stand-in: the kernel does not compile"):
        lkconv.depthwise_conv2d(x, w, padding=1)
    for error in (torch.cuda.OutOfMemoryError("stand-in: out of memory"), torch.AcceleratorError("stand-in: CUDA")):
        failing_triton["error"] = error
        with pytest.raises(type(error), match="stand-in"):
            lkconv.depthwise_conv2d(x, w, padding=1)
    assert lkconv.explain(x, w, padding=1).backend == "triton"


def test_triton_s_out_of_memory_and_a_broken_context_are_not_stepped_around(failing_triton, monkeypatch):
    """Triton raises CUDA errors as plain RuntimeErrors: out of memory loading a kernel propagates, and so does the
    device's own error where the context is broken (PyTorch's kernels would fail too); neither is remembered as a
    failure of the backend."""
    x, w = torch.randn(1, 2, 6, 6), torch.randn(2, 1, 3, 3)
    failing_triton["error"] = RuntimeError("Triton Error [CUDA]: out of memory")
    with pytest.raises(RuntimeError, match="Triton Error \\[CUDA\\]: out of memory"):
        lkconv.depthwise_conv2d(x, w, padding=1)
    broken = torch.AcceleratorError("stand-in: an illegal memory access was encountered")
    monkeypatch.setattr(backends, "_context_error", lambda device: broken)
    failing_triton["error"] = RuntimeError("Triton Error [CUDA]: an illegal memory access was encountered")
    with pytest.raises(torch.AcceleratorError, match="stand-in: an illegal memory access") as raised:
        lkconv.depthwise_conv2d(x, w, padding=1)
    assert raised.value.__cause__ is failing_triton["error"]
    assert lkconv.explain(x, w, padding=1).backend == "triton" and not backends._failures
    monkeypatch.setattr(backends, "_context_error", lambda device: None)  # a launch error of the backend's own
    with pytest.warns(RuntimeWarning, match="the triton backend failed"):
        lkconv.depthwise_conv2d(x, w, padding=1)
    assert lkconv.explain(x, w, padding=1).backend == "torch"


def test_triton_launches_on_one_gpu_take_turns_and_other_gpus_do_not_wait(monkeypatch):
    """Triton 3.6 can hand a second thread a kernel still loading for its first launch, and that launch fails: the
    triton backend's launches on one GPU hold that GPU's lock."""
    import threading

    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setattr(torch.cuda, "device", lambda index: contextlib.nullcontext())  # no GPU here
    with FakeTensorMode():
        on_0, also_on_0, on_1 = (torch.empty(1, device=f"cuda:{index}") for index in (0, 0, 1))
    entered = []

    def launch(tensor, name):
        with triton_backend._launching_on(tensor):
            entered.append(name)

    with triton_backend._launching_on(on_0):
        same, other = (threading.Thread(target=launch, args=args) for args in ((also_on_0, "same"), (on_1, "other")))
        same.start()
        other.start()
        other.join(timeout=10)
        same.join(timeout=0.3)
        assert entered == ["other"] and same.is_alive()
    same.join(timeout=10)
    assert entered == ["other", "same"]


def test_a_failure_is_remembered_for_its_shape_class_only(failing_triton):
    """Shape classes exist for CUDA tensors only: fake CUDA tensors (no GPU needed) give two classes, and a failure
    in one leaves auto's choice for the other alone."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 3, 12, 12, device="cuda")
        w = torch.empty(3, 1, 5, 5, device="cuda")
        first = backends.choose_for_conv(x, (5, 5), (1, 1), (2, 2, 2, 2), (1, 1), (12, 12))
        assert first.module is triton_backend and first.failure_key[-1] is not None
        with pytest.warns(RuntimeWarning, match="the triton backend failed"):
            backends.run_pass(first, "forward", x, w, None, [1, 1], [2, 2, 2, 2], [1, 1])
        assert backends.choose_for_conv(x, (5, 5), (1, 1), (2, 2, 2, 2), (1, 1), (12, 12)).module is torch_backend
        assert backends.choose_for_conv(x, (7, 7), (1, 1), (3, 3, 3, 3), (1, 1), (12, 12)).module is triton_backend
