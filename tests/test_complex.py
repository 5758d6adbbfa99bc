"""Complex maps, which F.conv2d accepts: lkconv computes them as one real conv of the stacked real and imaginary
parts, so every backend runs them and autograd follows PyTorch's complex conventions."""

import pytest
import torch
import torch.nn.functional as F

import lkconv

from conftest import HAS_CUDA, TOLERANCE, TRITON_DEVICE, assert_close

REAL_PART = {torch.complex32: torch.float16, torch.complex64: torch.float32, torch.complex128: torch.float64}
# (backend, dtype, device): the triton backend on its device (interpreter on CPU), PyTorch's for every dtype.
CASES = [
    ("triton", torch.complex64, TRITON_DEVICE),
    ("torch", torch.complex64, "cpu"),
    ("torch", torch.complex128, "cpu"),
    ("torch", torch.complex32, "cuda" if HAS_CUDA else "cpu"),
]
CONVS = [  # (in channels, multiplier, kernel, stride, padding, dilation, channels_last)
    (3, 1, (3, 4), 1, "same", (2, 1), False),
    (2, 2, (5, 3), (2, 1), (2, 1), 1, True),
]


def as_real(tensor: torch.Tensor) -> torch.Tensor:
    """Real and imaginary parts side by side in complex128, so the real-valued tolerance helpers apply."""
    return torch.view_as_real(tensor.detach().to(torch.complex128).cpu())


def complex_randn(*shape, dtype, device):
    real, imag = (torch.randn(*shape, dtype=REAL_PART[dtype], device=device) for _ in range(2))
    return torch.complex(real, imag)


@pytest.mark.parametrize("conv", CONVS, ids=["same-dilated", "multiplier-2-strided-channels-last"])
@pytest.mark.parametrize("backend,dtype,device", CASES, ids=lambda v: str(v))
def test_complex_forward_and_every_gradient_match_f_conv2d_in_complex128(backend, dtype, device, conv):
    channels, multiplier, kernel, stride, padding, dilation, channels_last = conv
    x = complex_randn(2, channels, 9, 10, dtype=dtype, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = complex_randn(channels * multiplier, 1, *kernel, dtype=dtype, device=device)
    b = complex_randn(channels * multiplier, dtype=dtype, device=device)
    leaves = [t.requires_grad_() for t in (x, w, b)]
    with lkconv.use_backend(backend):
        y = lkconv.depthwise_conv2d(x, w, b, stride, padding, dilation)
        grad_output = complex_randn(*y.shape, dtype=dtype, device=device)
        grads = torch.autograd.grad(y, leaves, grad_output)

    exact = [t.detach().to(torch.complex128).cpu().requires_grad_() for t in leaves]
    expected = F.conv2d(*exact, stride, padding, dilation, groups=channels)
    expected_grads = torch.autograd.grad(expected, exact, grad_output.to(torch.complex128).cpu())
    tolerance = TOLERANCE[REAL_PART[dtype]]
    assert y.dtype == dtype and y.shape == expected.shape
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert_close(as_real(y), as_real(expected), tolerance, "output")
    for name, grad, expected_grad in zip(("input", "weight", "bias"), grads, expected_grads):
        assert grad.dtype == dtype, name
        assert_close(as_real(grad), as_real(expected_grad), tolerance, f"grad {name}")


def test_complex_gradcheck_and_gradgradcheck():
    x = torch.randn(2, 2, 6, 7, dtype=torch.complex128, requires_grad=True)
    w = torch.randn(4, 1, 3, 2, dtype=torch.complex128, requires_grad=True)
    b = torch.randn(4, dtype=torch.complex128, requires_grad=True)

    def conv(x, w, b):
        return lkconv.depthwise_conv2d(x, w, b, stride=(2, 1), padding=(1, 0), dilation=(1, 2))

    assert torch.autograd.gradcheck(conv, (x, w, b))
    assert torch.autograd.gradgradcheck(conv, (x, w, b))


def test_complex_unbatched_and_empty_batch():
    w = torch.randn(3, 1, 3, 3, dtype=torch.complex64)
    x = torch.randn(3, 7, 6, dtype=torch.complex64)
    expected = F.conv2d(x.to(torch.complex128), w.to(torch.complex128), padding=1, groups=3)
    assert_close(as_real(lkconv.depthwise_conv2d(x, w, padding=1)), as_real(expected), TOLERANCE[torch.float32],
                 "unbatched")
    assert lkconv.depthwise_conv2d(x[None][:0], w, padding=1).shape == (0, 3, 7, 6)


def test_complex_stays_complex_under_autocast_like_f_conv2d():
    x = torch.randn(2, 3, 8, 8, dtype=torch.complex64)
    w = torch.randn(3, 1, 3, 3, dtype=torch.complex64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lkconv.depthwise_conv2d(x, w, padding=1)
        assert y.dtype == F.conv2d(x, w, padding=1, groups=3).dtype == torch.complex64
    expected = F.conv2d(x.to(torch.complex128), w.to(torch.complex128), padding=1, groups=3)
    assert_close(as_real(y), as_real(expected), TOLERANCE[torch.float32], "autocast")


def test_complex_module_matches_nn_conv2d_in_every_padding_mode():
    for padding_mode in ("zeros", "reflect", "circular"):
        module = lkconv.DepthwiseConv2d(3, (5, 3), padding=2, padding_mode=padding_mode, dtype=torch.complex64)
        plain = torch.nn.Conv2d(3, 3, (5, 3), padding=2, groups=3, padding_mode=padding_mode, dtype=torch.complex128)
        plain.load_state_dict(module.state_dict())  # the reference in complex128
        x = torch.randn(2, 3, 8, 9, dtype=torch.complex64)
        assert_close(as_real(module(x)), as_real(plain(x.to(torch.complex128))), TOLERANCE[torch.float32],
                     padding_mode)


def test_explain_names_the_real_conv_a_complex_call_runs():
    x = torch.randn(2, 3, 8, 8, dtype=torch.complex128)
    w = torch.randn(6, 1, 3, 3, dtype=torch.complex128)
    explanation = lkconv.explain(x, w)
    assert explanation.backend == "torch"
    assert "complex: one torch.float64 conv" in explanation.reason and "(4, 3, 8, 8)" in explanation.reason


@pytest.mark.parametrize("op_name", ["depthwise_conv2d", "depthwise_conv2d_input_grad", "depthwise_conv2d_weight_grad"])
def test_the_ops_called_directly_refuse_complex_tensors(op_name):
    """Their backward formulas are those of a real conv, so a complex call would get unconjugated gradients."""
    x = torch.randn(1, 2, 6, 6, dtype=torch.complex64)
    w = torch.randn(2, 1, 3, 3, dtype=torch.complex64)
    calls = {
        "depthwise_conv2d": lambda: torch.ops.lkconv.depthwise_conv2d(x, w, None, [1, 1], [0] * 4, [1, 1]),
        "depthwise_conv2d_input_grad": lambda: torch.ops.lkconv.depthwise_conv2d_input_grad(
            x[:, :, :4, :4], w, [1, 2, 6, 6], [1, 1], [0] * 4, [1, 1]),
        "depthwise_conv2d_weight_grad": lambda: torch.ops.lkconv.depthwise_conv2d_weight_grad(
            x[:, :, :4, :4], x, [3, 3], [1, 1], [0] * 4, [1, 1], False),
    }
    with pytest.raises(TypeError, match=r"must be float16, bfloat16, float32 or float64.*got torch\.complex64"):
        calls[op_name]()


def test_complex_compiles_fullgraph_forward_and_backward():
    x = torch.randn(2, 3, 8, 8, dtype=torch.complex64, requires_grad=True)
    w = torch.randn(3, 1, 3, 3, dtype=torch.complex64, requires_grad=True)
    compiled = torch.compile(lambda x, w: lkconv.depthwise_conv2d(x, w, padding=1), fullgraph=True, backend="aot_eager")
    y = compiled(x, w)
    grads = torch.autograd.grad(y.abs().sum(), (x, w))
    exact = [t.detach().to(torch.complex128).requires_grad_() for t in (x, w)]
    expected = F.conv2d(*exact, padding=1, groups=3)
    expected_grads = torch.autograd.grad(expected.abs().sum(), exact)
    assert_close(as_real(y), as_real(expected), TOLERANCE[torch.float32], "compiled output")
    for grad, expected_grad in zip(grads, expected_grads):
        assert_close(as_real(grad), as_real(expected_grad), TOLERANCE[torch.float32], "compiled grad")
