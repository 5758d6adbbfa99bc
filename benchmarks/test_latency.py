"""pytest-benchmark subset: `pytest benchmarks/ --benchmark-only` times lkconv and PyTorch on a few cases.

GPU cases (K=31 on RepLKNet shapes) are skipped without CUDA; the CPU case only shows the harness works. Each
timed call synchronises, so the numbers are whole-call latencies; the full suite with its baselines, spread and
floors is `python -m benchmarks`. Every implementation timed here is first checked against float64 PyTorch.
"""

import pytest
import torch
import torch.nn.functional as F

import lkconv

HAS_CUDA = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")

CPU_CASES = [pytest.param((2, 8, 16, 16), 7, torch.float32, id="small-2x8x16x16-k7-fp32")]
GPU_CASES = [
    pytest.param((64, 384, 32, 32), 31, dtype, id=f"gpu-64x384x32x32-k31-{str(dtype)[6:]}", marks=needs_gpu)
    for dtype in (torch.float32, torch.bfloat16)
] + [pytest.param((64, 128, 56, 56), 31, torch.bfloat16, id="gpu-64x128x56x56-k31-bfloat16", marks=needs_gpu)]
IMPLEMENTATIONS = {
    "lkconv": lambda x, w, p: lkconv.depthwise_conv2d(x, w, None, 1, p),
    "pytorch": lambda x, w, p: F.conv2d(x, w, None, 1, p, 1, x.shape[1]),
}


@pytest.fixture(autouse=True)
def exact_fp32():
    """PyTorch lets fp32 convs use TF32 by default; these checks (and the timings) are for exact fp32."""
    previous = torch.backends.cudnn.conv.fp32_precision
    torch.backends.cudnn.conv.fp32_precision = "ieee"
    yield
    torch.backends.cudnn.conv.fp32_precision = previous


def synchronised(fn):
    """`fn` followed by a device synchronisation, so pytest-benchmark times the work and not the launch."""
    def call():
        result = fn()
        if HAS_CUDA:
            torch.cuda.synchronize()
        return result

    return call


@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("shape,kernel,dtype", CPU_CASES + GPU_CASES)
@pytest.mark.parametrize("pass_name", ["forward", "fwd_bwd"])
def test_depthwise_latency(benchmark, shape, kernel, dtype, implementation, pass_name):
    """Times one pass of one implementation, after checking its result against float64 F.conv2d."""
    device = "cuda" if HAS_CUDA else "cpu"
    x = torch.randn(shape, device=device, dtype=dtype, requires_grad=pass_name == "fwd_bwd")
    w = (torch.randn(shape[1], 1, kernel, kernel, device=device, dtype=dtype) / kernel).requires_grad_(
        pass_name == "fwd_bwd")
    conv = IMPLEMENTATIONS[implementation]
    x64, w64 = (t.detach().double().requires_grad_(pass_name == "fwd_bwd") for t in (x, w))
    expected = F.conv2d(x64, w64, None, 1, kernel // 2, 1, shape[1])
    output = conv(x, w, kernel // 2)
    results, references = [output], [expected]
    if pass_name == "fwd_bwd":
        grad = torch.randn_like(output)
        results += torch.autograd.grad(output, (x, w), grad)
        references += torch.autograd.grad(expected, (x64, w64), grad.double())
    for name, result, reference in zip(("output", "input grad", "weight grad"), results, references):
        error = ((result.double() - reference).norm() / reference.norm()).item()
        assert error < (1e-5 if dtype == torch.float32 else 1e-2), f"{implementation}'s {name}: relative error {error}"
    if pass_name == "forward":
        fn = lambda: conv(x, w, kernel // 2)  # noqa: E731
    else:
        fn = lambda: torch.autograd.grad(conv(x, w, kernel // 2), (x, w), grad)  # noqa: E731
    benchmark.extra_info.update(shape="x".join(map(str, shape)), kernel=kernel, dtype=str(dtype), device=device)
    # One untimed round first: the backward kernels compile on their first call.
    benchmark.pedantic(synchronised(fn), rounds=20 if HAS_CUDA else 5, warmup_rounds=1)
