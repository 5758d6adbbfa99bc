"""Invalid calls fail early with a clear message; edge cases that F.conv2d accepts (N=0, unbatched) work."""

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import lkconv
from lkconv.backends import torch_backend, triton_backend
from conftest import TOLERANCE, assert_close, reference

ERRORS = (TypeError, ValueError)


@pytest.fixture(autouse=True)
def reset_backend():
    yield
    lkconv.set_backend(None)


@pytest.fixture
def no_kernels(monkeypatch):
    """Makes every backend pass fail loudly: a validation error must come before any of them runs."""

    def kernel_ran(*args, **kwargs):
        raise AssertionError("a kernel ran before the arguments were rejected")

    for backend in (torch_backend, triton_backend):
        for pass_name in ("forward", "input_grad", "weight_grad"):
            monkeypatch.setattr(backend, pass_name, kernel_ran)


def randn(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device)


def call(input=None, weight=None, bias=None, **conv):
    """Arguments for a depthwise call: a valid (2, 3, 8, 9) float32 call unless overridden."""
    return dict(
        input=randn(2, 3, 8, 9) if input is None else input,
        weight=randn(3, 1, 3, 3) if weight is None else weight,
        bias=bias,
        **conv,
    )


# Each case: id, the call's arguments, the argument the message must name, the expected and the received value.
CASES = [
    ("input-2d", lambda: call(input=randn(3, 8)), "input", "4-D", "(3, 8)"),
    ("input-5d", lambda: call(input=randn(2, 3, 4, 8, 9)), "input", "4-D", "(2, 3, 4, 8, 9)"),
    ("weight-3d", lambda: call(weight=randn(3, 3, 3)), "weight", "4-D", "(3, 3, 3)"),
    ("weight-5d", lambda: call(weight=randn(3, 1, 1, 3, 3)), "weight", "4-D", "(3, 1, 1, 3, 3)"),
    ("weight-channels-not-a-multiple", lambda: call(weight=randn(5, 1, 3, 3)), "weight", "C = 3", "(5, 1, 3, 3)"),
    ("weight-fewer-channels", lambda: call(weight=randn(2, 1, 3, 3)), "weight", "C = 3", "(2, 1, 3, 3)"),
    ("weight-dim1-not-1", lambda: call(weight=randn(3, 2, 3, 3)), "weight", "(C*m, 1, kh, kw)", "(3, 2, 3, 3)"),
    ("weight-dense", lambda: call(weight=randn(3, 3, 3, 3)), "weight", "(C*m, 1, kh, kw)", "(3, 3, 3, 3)"),
    ("weight-empty-kernel", lambda: call(weight=randn(3, 1, 0, 3)), "weight", "kh, kw >= 1", "(3, 1, 0, 3)"),
    ("input-no-channels", lambda: call(input=randn(2, 0, 8, 9), weight=randn(0, 1, 3, 3)), "input", "one channel", "(2, 0, 8, 9)"),
    ("weight-dtype", lambda: call(weight=randn(3, 1, 3, 3, dtype=torch.float64)), "weight", "torch.float32", "torch.float64"),
    ("input-dtype", lambda: call(input=randn(2, 3, 8, 9, dtype=torch.float64)), "weight", "torch.float64", "torch.float32"),
    ("bias-dtype", lambda: call(bias=randn(3, dtype=torch.float16)), "bias", "torch.float32", "torch.float16"),
    ("weight-device", lambda: call(weight=randn(3, 1, 3, 3, device="meta")), "weight", "cpu", "meta"),
    ("bias-device", lambda: call(bias=randn(3, device="meta")), "bias", "cpu", "meta"),
    ("input-device", lambda: call(input=randn(2, 3, 8, 9, device="meta")), "weight", "meta", "cpu"),
    ("bias-length", lambda: call(bias=randn(4)), "bias", "(3,)", "(4,)"),
    ("bias-2d", lambda: call(bias=randn(3, 1)), "bias", "(3,)", "(3, 1)"),
    ("bias-ignores-multiplier", lambda: call(weight=randn(6, 1, 3, 3), bias=randn(3)), "bias", "(6,)", "(3,)"),
    ("stride-0", lambda: call(stride=0), "stride", ">= 1", "0"),
    ("stride-negative", lambda: call(stride=(1, -2)), "stride", ">= 1", "(1, -2)"),
    ("dilation-0", lambda: call(dilation=0), "dilation", ">= 1", "0"),
    ("dilation-pair-0", lambda: call(dilation=(0, 1)), "dilation", ">= 1", "(0, 1)"),
    ("stride-3-tuple", lambda: call(stride=(1, 1, 1)), "stride", "pair of ints", "(1, 1, 1)"),
    ("stride-float", lambda: call(stride=1.5), "stride", "int", "1.5"),
    ("dilation-float", lambda: call(dilation=2.0), "dilation", "int", "2.0"),
    ("stride-pair-of-floats", lambda: call(stride=(1.0, 2.0)), "stride", "pair of ints", "(1.0, 2.0)"),
    ("stride-float-tensor", lambda: call(stride=torch.tensor(2.0)), "stride", "pair of ints", "tensor(2.)"),
    ("padding-2-element-tensor", lambda: call(padding=torch.tensor([1, 2])), "padding", "pair of ints",
     "tensor([1, 2])"),
    ("padding-negative", lambda: call(padding=-1), "padding", ">= 0", "-1"),
    ("padding-pair-negative", lambda: call(padding=(1, -1)), "padding", ">= 0", "(1, -1)"),
    ("padding-unknown-string", lambda: call(padding="full"), "padding", "'same'", "'full'"),
    ("padding-3-tuple", lambda: call(padding=(1, 1, 1)), "padding", "pair of ints", "(1, 1, 1)"),
    ("padding-float", lambda: call(padding=1.5), "padding", "int", "1.5"),
    ("kernel-larger-than-input", lambda: call(input=randn(2, 3, 4, 4), weight=randn(3, 1, 7, 7)), "output would be empty", "(7, 7)", "(4, 4)"),
    ("dilated-kernel-larger", lambda: call(dilation=5), "output would be empty", "(11, 11)", "(8, 9)"),
    ("kernel-taller-than-padded", lambda: call(weight=randn(3, 1, 13, 3), padding=(2, 1)), "output would be empty", "(13, 3)", "(8, 9)"),
    ("same-with-stride-2", lambda: call(padding="same", stride=2), "padding='same'", "stride 1", "(2, 2)"),
    ("same-with-stride-pair", lambda: call(padding="same", stride=(1, 2)), "padding='same'", "stride 1", "(1, 2)"),
    ("input-int64", lambda: call(input=torch.randint(0, 5, (2, 3, 8, 9)), weight=torch.randint(0, 5, (3, 1, 3, 3))), "input", "float", "torch.int64"),
    ("input-uint8", lambda: call(input=torch.randint(0, 5, (2, 3, 8, 9), dtype=torch.uint8)), "input", "float", "torch.uint8"),
    ("weight-int32", lambda: call(weight=torch.randint(0, 5, (3, 1, 3, 3), dtype=torch.int32)), "weight", "float", "torch.int32"),
    ("bias-int64", lambda: call(bias=torch.randint(0, 5, (3,))), "bias", "float", "torch.int64"),
    ("input-bool", lambda: call(input=randn(2, 3, 8, 9) > 0), "input", "complex", "torch.bool"),
    ("complex-input-real-weight", lambda: call(input=randn(2, 3, 8, 9, dtype=torch.complex64)), "weight", "torch.complex64", "torch.float32"),
    ("input-list", lambda: call(input=randn(2, 3, 8, 9).tolist()), "input", "torch.Tensor", "list"),
    ("input-numpy", lambda: call(input=np.random.randn(2, 3, 8, 9).astype(np.float32)), "input", "torch.Tensor", "ndarray"),
    ("weight-none", lambda: dict(input=randn(2, 3, 8, 9), weight=None), "weight", "torch.Tensor", "NoneType"),
    ("bias-list", lambda: call(bias=[0.5, -1.0, 2.0]), "bias", "torch.Tensor", "list"),
    ("unbatched-weight-mismatch", lambda: call(input=randn(3, 8, 9), weight=randn(4, 1, 3, 3)), "weight", "C = 3", "(4, 1, 3, 3)"),
]


def error_pattern(name, received):
    return rf"(?s){re.escape(name)}.*{re.escape(received)}"


@pytest.mark.parametrize("entry_point", ["depthwise_conv2d", "explain"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_invalid_call_raises_before_any_kernel_naming_argument_expected_and_received(case, entry_point, no_kernels):
    _, make_args, name, expected, received = case
    args = make_args()
    with pytest.raises(ERRORS, match=error_pattern(name, received)) as info:
        getattr(lkconv, entry_point)(**args)
    assert expected in str(info.value), f"message does not state the expected value {expected!r}: {info.value}"


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", [c for c in CASES if c[0] in {"weight-dim1-not-1", "same-with-stride-2", "kernel-larger-than-input"}], ids=lambda c: c[0])
def test_invalid_call_raises_the_same_under_a_forced_backend(case, backend, no_kernels):
    _, make_args, name, expected, received = case
    with lkconv.use_backend(backend):
        with pytest.raises(ERRORS, match=error_pattern(name, received)):
            lkconv.depthwise_conv2d(**make_args())


# --- the same errors through the module -----------------------------------------------------------------------------

MODULE_CASES = [
    ("input-2d", dict(), lambda: randn(3, 8), "input", "(3, 8)"),
    ("input-5d", dict(), lambda: randn(2, 3, 4, 8, 9), "input", "(2, 3, 4, 8, 9)"),
    ("channel-mismatch", dict(), lambda: randn(2, 4, 8, 9), "input", "got 4 channels"),
    ("channel-mismatch-reflect", dict(padding=2, padding_mode="reflect"), lambda: randn(2, 4, 8, 9), "input",
     "got 4 channels"),
    ("dtype-mismatch", dict(), lambda: randn(2, 3, 8, 9, dtype=torch.float64), "weight", "torch.float32"),
    ("device-mismatch", dict(device="meta"), lambda: randn(2, 3, 8, 9), "weight", "meta"),
    ("integer-input", dict(), lambda: torch.randint(0, 5, (2, 3, 8, 9)), "input", "torch.int64"),
    ("non-tensor-input", dict(), lambda: randn(2, 3, 8, 9).tolist(), "input", "list"),
    ("stride-0", dict(stride=0), lambda: randn(2, 3, 8, 9), "stride", "0"),
    ("dilation-0", dict(dilation=(1, 0)), lambda: randn(2, 3, 8, 9), "dilation", "(1, 0)"),
    ("empty-output", dict(), lambda: randn(2, 3, 4, 4), "output would be empty", "(4, 4)"),
] + [  # padded by F.pad first, as nn.Conv2d does: the input must be checked before that
    (f"{check}-{mode}", dict(padding=2, padding_mode=mode), make_input, name, received)
    for mode in ("reflect", "replicate", "circular")
    for check, make_input, name, received in (
        ("input-2d", lambda: randn(3, 8), "input", "(3, 8)"),
        ("input-5d", lambda: randn(2, 3, 4, 8, 9), "input", "(2, 3, 4, 8, 9)"),
        ("non-tensor-input", lambda: randn(2, 3, 8, 9).tolist(), "input", "list"),
        ("integer-input", lambda: torch.randint(0, 5, (2, 3, 8, 9)), "input", "torch.int64"),
    )
]


@pytest.mark.parametrize("case", MODULE_CASES, ids=[c[0] for c in MODULE_CASES])
def test_depthwise_conv2d_module_raises_the_same_clear_errors(case, no_kernels):
    _, layer_kwargs, make_input, name, received = case
    with pytest.raises(ERRORS, match=error_pattern(name, received)):
        layer = lkconv.DepthwiseConv2d(3, 5, **layer_kwargs)
        layer(make_input())


# --- edge cases that are accepted -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "conv",
    [
        dict(kernel=(7, 7), multiplier=1, stride=1, padding=3, dilation=1),
        dict(kernel=(5, 3), multiplier=2, stride=2, padding=(2, 1), dilation=1),
        dict(kernel=(3, 3), multiplier=1, stride=1, padding="same", dilation=2),
    ],
    ids=["7x7", "5x3-m2-s2", "same-dilated"],
)
def test_empty_batch_is_accepted_with_correct_shape_and_backward(conv, dtype):
    x = torch.randn(0, 3, 8, 9, dtype=dtype, requires_grad=True)
    w = torch.randn(3 * conv["multiplier"], 1, *conv["kernel"], dtype=dtype, requires_grad=True)
    b = torch.randn(3 * conv["multiplier"], dtype=dtype, requires_grad=True)
    y = lkconv.depthwise_conv2d(x, w, b, conv["stride"], conv["padding"], conv["dilation"])
    dy = torch.randn(y.shape, dtype=dtype)
    ref = reference(x, w, b, conv["stride"], conv["padding"], conv["dilation"], dy)
    assert y.shape == ref[0].shape and y.shape[0] == 0 and y.shape[1] == w.shape[0]
    assert y.dtype == dtype
    y.backward(dy)
    assert x.grad.shape == x.shape
    for name, actual, expected in (("grad_weight", w.grad, ref[2]), ("grad_bias", b.grad, ref[3])):
        assert actual is not None and actual.dtype == dtype
        assert_close(actual, expected, TOLERANCE[dtype], name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "conv",
    [
        dict(kernel=(7, 7), multiplier=1, stride=1, padding=3, dilation=1, bias=True),
        dict(kernel=(5, 3), multiplier=2, stride=2, padding=(2, 1), dilation=1, bias=False),
        dict(kernel=(4, 4), multiplier=1, stride=1, padding="same", dilation=1, bias=True),
        dict(kernel=(3, 5), multiplier=3, stride=1, padding="valid", dilation=(2, 1), bias=True),
    ],
    ids=["7x7", "5x3-m2-s2", "4x4-same", "3x5-m3-valid-dilated"],
)
def test_unbatched_input_matches_f_conv2d(conv, dtype):
    x = torch.randn(3, 9, 10, dtype=dtype, requires_grad=True)
    channels_out = 3 * conv["multiplier"]
    w = torch.randn(channels_out, 1, *conv["kernel"], dtype=dtype, requires_grad=True)
    b = torch.randn(channels_out, dtype=dtype, requires_grad=True) if conv["bias"] else None
    y = lkconv.depthwise_conv2d(x, w, b, conv["stride"], conv["padding"], conv["dilation"])
    dy = torch.randn(y.shape, dtype=dtype)
    ref = reference(x.unsqueeze(0), w, b, conv["stride"], conv["padding"], conv["dilation"], dy.unsqueeze(0))
    assert y.dim() == 3
    # F.conv2d itself takes unbatched input too: the shapes agree with it.
    assert y.shape == F.conv2d(x.detach(), w.detach(), None, conv["stride"], conv["padding"], conv["dilation"], groups=3).shape
    assert_close(y, ref[0].squeeze(0), TOLERANCE[dtype], "output")
    y.backward(dy)
    assert_close(x.grad, ref[1].squeeze(0), TOLERANCE[dtype], "grad_input")
    assert_close(w.grad, ref[2], TOLERANCE[dtype], "grad_weight")
    if b is not None:
        assert_close(b.grad, ref[3], TOLERANCE[dtype], "grad_bias")


def test_unbatched_input_through_the_module_matches_f_conv2d():
    layer = lkconv.DepthwiseConv2d(3, (7, 5), padding=(3, 2), depth_multiplier=2, dtype=torch.float64)
    x = torch.randn(3, 8, 11, dtype=torch.float64)
    expected = reference(x.unsqueeze(0), layer.weight, layer.bias, 1, (3, 2), 1)[0].squeeze(0)
    assert_close(layer(x), expected, TOLERANCE[torch.float64], "unbatched module output")


@pytest.mark.parametrize("requested", [None, "auto"])
def test_float64_under_auto_runs_on_the_torch_backend(requested, monkeypatch):
    monkeypatch.delenv("LKCONV_BACKEND", raising=False)
    lkconv.set_backend(requested)
    x = torch.randn(2, 3, 8, 9, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 1, 7, 7, dtype=torch.float64, requires_grad=True)
    assert lkconv.explain(x, w, None, 1, 3).backend == "torch"
    y = lkconv.depthwise_conv2d(x, w, None, 1, 3)
    dy = torch.randn_like(y)
    y.backward(dy)
    ref = reference(x, w, None, 1, 3, 1, dy)
    for name, actual, expected in zip(("output", "grad_input", "grad_weight"), (y, x.grad, w.grad), ref):
        assert_close(actual, expected, TOLERANCE[torch.float64], name)


# --- the tall single-channel kernel that crashes aten's CPU weight grad ---------------------------------------------


def im2col_reference(input, weight, bias, padding, grad_output):
    """Output and grads of a stride-1 depthwise conv via F.unfold in float64 (no aten convolution involved).

    dW[o, 0, r, q] = sum_{n, l} dy[n, o, l] * unfold(x)[n, c*kh*kw + r*kw + q, l] with c = o // m.
    """
    x = input.detach().double().requires_grad_()
    w = weight.detach().double()
    batch, channels, height, width = x.shape
    out_channels, _, kh, kw = w.shape
    multiplier = out_channels // channels
    cols = F.unfold(x, (kh, kw), padding=padding)  # (N, C*kh*kw, L)
    out_h = height + 2 * padding[0] - kh + 1
    out_w = width + 2 * padding[1] - kw + 1
    cols = cols.view(batch, channels, kh * kw, out_h * out_w).repeat_interleave(multiplier, dim=1)  # (N, O, K, L)
    y = torch.einsum("nokl,ok->nol", cols, w.view(out_channels, kh * kw))
    if bias is not None:
        y = y + bias.detach().double().view(1, out_channels, 1)
    dy = grad_output.detach().double().view(batch, out_channels, out_h * out_w)
    grad_weight = torch.einsum("nol,nokl->ok", dy, cols).view(out_channels, 1, kh, kw)
    (grad_input,) = torch.autograd.grad(y, x, dy)  # unfold's adjoint is fold: still no convolution
    grad_bias = dy.sum((0, 2))
    return y.detach().view(batch, out_channels, out_h, out_w), grad_input, grad_weight, grad_bias


def test_im2col_reference_agrees_with_f_conv2d_where_aten_is_safe():
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64)
    w = torch.randn(6, 1, 5, 3, dtype=torch.float64)
    b = torch.randn(6, dtype=torch.float64)
    dy = torch.randn(2, 6, 9, 8, dtype=torch.float64)
    ours = im2col_reference(x, w, b, (2, 1), dy)
    theirs = reference(x, w, b, 1, (2, 1), 1, dy)
    for name, a, e in zip(("output", "grad_input", "grad_weight", "grad_bias"), ours, theirs):
        assert_close(a, e, 1e-12, f"im2col reference {name}")


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tall_single_channel_kernel_where_aten_cpu_weight_grad_crashes(dtype, batch, backend):
    x = torch.randn(batch, 1, 12, 9, dtype=dtype, requires_grad=True)
    w = torch.randn(1, 1, 31, 5, dtype=dtype, requires_grad=True)
    b = torch.randn(1, dtype=dtype, requires_grad=True)
    with lkconv.use_backend(backend):
        y = lkconv.depthwise_conv2d(x, w, b, 1, (15, 2), 1)
        dy = torch.randn_like(y)
        y.backward(dy)
    expected = im2col_reference(x, w, b, (15, 2), dy)
    tolerance = TOLERANCE[dtype]
    assert y.shape == (batch, 1, 12, 9)
    for name, actual, exp in zip(("output", "grad_input", "grad_weight"), (y, x.grad, w.grad), expected):
        assert_close(actual, exp, tolerance, name)
    # The bias grad is one sum of all of dy, which cancellation can leave near zero: its error is measured against the
    # summands' magnitude instead.
    assert (b.grad - expected[3]).abs().item() <= tolerance * dy.abs().sum().item()


# PyTorch 2.13's CPU bfloat16 depthwise conv: wrong values at stride 2 along W, a crash at dilation 3 with deep
# padding, and a wrong weight grad (its conv with dy as the filter) at kernel width 1 and dilation 2 along W.
BFLOAT16_CPU_CASES = {
    "stride 2, kernel 9x2": ((1, 1, 9, 1), (9, 2), 2, (4, 1), 1),
    "dilation 3, deep padding, kernel 12x1": ((1, 1, 2, 11), (12, 1), 1, (16, 0), 3),
    "dilation 2, kernel 9x1": ((1, 1, 6, 16), (9, 1), 1, 6, 2),
}


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("case", BFLOAT16_CPU_CASES)
def test_bfloat16_on_the_cpu_where_pytorch_gets_it_wrong(case, backend):
    shape, kernel, stride, padding, dilation = BFLOAT16_CPU_CASES[case]
    x = torch.randn(shape).bfloat16().requires_grad_()
    w = torch.randn(shape[1], 1, *kernel).bfloat16().requires_grad_()
    with lkconv.use_backend(backend):
        y = lkconv.depthwise_conv2d(x, w, None, stride, padding, dilation)
        dy = torch.randn(y.shape).bfloat16()
        y.backward(dy)
    wanted = reference(x, w, None, stride, padding, dilation, dy)
    for name, actual, expected in zip(("output", "grad_input", "grad_weight"), (y, x.grad, w.grad), wanted):
        assert actual.dtype == torch.bfloat16
        assert_close(actual, expected, TOLERANCE[torch.bfloat16], f"{case}: {name}")


# --- argument forms F.conv2d accepts --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "conv",
    [
        dict(stride=[2, 1]),
        dict(padding=torch.Size([1, 2])),
        dict(stride=(2,)),
        dict(padding=(1,)),
        dict(dilation=[2]),
        dict(stride=np.int64(2)),
        dict(padding=np.int64(1)),
        dict(dilation=(np.int32(2), 1)),
        dict(stride=torch.tensor(2)),
        dict(padding=(torch.tensor(1, dtype=torch.uint8), 2)),
        dict(dilation=torch.tensor([2])),
    ],
    ids=["stride-list", "padding-size", "stride-1-tuple", "padding-1-tuple", "dilation-1-list",
         "stride-numpy-int", "padding-numpy-int", "dilation-numpy-int-pair", "stride-int-tensor",
         "padding-uint8-tensor-pair", "dilation-1-element-tensor"],
)
def test_accepts_every_stride_padding_dilation_form_f_conv2d_accepts(conv):
    x = torch.randn(2, 3, 9, 10, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    full = {"stride": 1, "padding": 0, "dilation": 1, **conv}
    y = lkconv.depthwise_conv2d(x, w, None, **full)
    dy = torch.randn(y.shape, dtype=torch.float64)
    y.backward(dy)
    ref = reference(x, w, None, full["stride"], full["padding"], full["dilation"], dy)  # F.conv2d takes them as given
    for name, actual, expected in zip(("output", "grad_input", "grad_weight"), (y, x.grad, w.grad), ref):
        assert_close(actual, expected, TOLERANCE[torch.float64], name)


# --- meta tensors (shape inference) ---------------------------------------------------------------------------------


@pytest.mark.parametrize("entry_point", ["function", "module"])
def test_meta_tensors_give_the_same_output_shape_as_f_conv2d(entry_point):
    x = torch.randn(2, 3, 9, 10, device="meta")
    layer = lkconv.DepthwiseConv2d(3, (7, 5), stride=2, padding=(3, 1), depth_multiplier=2, device="meta")
    expected = F.conv2d(x, layer.weight, layer.bias, 2, (3, 1), 1, groups=3)
    if entry_point == "function":
        y = lkconv.depthwise_conv2d(x, layer.weight, layer.bias, 2, (3, 1))
    else:
        y = layer(x)
    assert y.device.type == "meta"
    assert y.shape == expected.shape == (2, 6, 5, 4)
