"""GPU checks at realistic shapes: the triton and cuda kernels against float64 F.conv2d on the GPU, determinism,
streams, CUDA graphs, torch.compile and compute-sanitizer (all skipped without CUDA)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lkconv

from conftest import TF32_TOLERANCE, TOLERANCE, assert_close, reference

pytestmark = pytest.mark.gpu

# Both GPU backends run every check; the cuda one needs lkconv._C, which pip install builds wherever nvcc is.
GPU_BACKENDS = ["triton", "cuda"]

# (N, C, H, W), K: the (32,384,32,32) K=31 and the RepLKNet-31B stages (REFERENCE.md §4).
SHAPES = [
    ((32, 384, 32, 32), 31),
    ((64, 128, 56, 56), 31),
    ((64, 256, 28, 28), 29),
    ((64, 512, 14, 14), 27),
    ((64, 1024, 7, 7), 13),
]


def _inputs(shape, kernel, dtype, channels_last):
    x = torch.randn(shape, device="cuda").to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(shape[1], 1, kernel, kernel, device="cuda").div_(kernel).to(dtype)
    b = torch.randn(shape[1], device="cuda").to(dtype)
    return x.requires_grad_(), w.requires_grad_(), b.requires_grad_()


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,kernel", SHAPES, ids=[f"{s}-k{k}" for s, k in SHAPES])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_matches_float64_at_realistic_shapes(backend, shape, kernel, dtype, channels_last, poisoned_outputs):
    x, w, b = _inputs(shape, kernel, dtype, channels_last)
    with lkconv.use_backend(backend):
        y = lkconv.depthwise_conv2d(x, w, b, padding=kernel // 2)
        dy = torch.randn_like(y)
        grads = torch.autograd.grad(y, (x, w, b), dy)
    expected = reference(x, w, b, 1, kernel // 2, 1, dy)
    for name, actual, wanted in zip(("output", "grad_input", "grad_weight", "grad_bias"), (y, *grads), expected):
        assert_close(actual, wanted, TOLERANCE[dtype], f"{shape} K={kernel} {dtype} {name}")
    if channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last)


def test_autotune_times_both_gpu_backends_and_answers_with_the_faster(monkeypatch):
    from lkconv import backends
    from lkconv.backends import autotune

    assert "cuda" in lkconv.available_backends(), "lkconv._C is built wherever nvcc is (test_cuda_extension.py)"
    monkeypatch.setenv("LKCONV_AUTOTUNE", "1")
    autotune.forget()
    backends._choose.cache_clear()
    try:
        x, w, b = _inputs((8, 64, 32, 32), 13, torch.bfloat16, False)
        y = lkconv.depthwise_conv2d(x, w, b, padding=6)
        plan = lkconv.explain(x, w, b, padding=6)
        assert plan.backend in ("triton", "cuda") and "measured faster at run time" in plan.reason, plan.reason
        dy = torch.randn_like(y)
        grads = torch.autograd.grad(y, (x, w, b), dy)
        expected = reference(x, w, b, 1, 6, 1, dy)
        for name, actual, wanted in zip(("output", "grad_input", "grad_weight", "grad_bias"), (y, *grads), expected):
            assert_close(actual, wanted, TOLERANCE[torch.bfloat16], f"autotuned {plan.backend} {name}")
    finally:
        autotune.forget()
        backends._choose.cache_clear()


def test_auto_picks_triton_on_cuda():
    x, w, b = _inputs((2, 8, 16, 16), 7, torch.bfloat16, False)
    assert lkconv.explain(x, w, b, padding=3).backend == "triton"


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_tf32_within_tf32_tolerance_when_allowed(backend, poisoned_outputs):
    torch.backends.cudnn.conv.fp32_precision = "tf32"
    x, w, b = _inputs((8, 64, 32, 32), 31, torch.float32, False)
    with lkconv.use_backend(backend):
        explanation = lkconv.explain(x, w, b, padding=15)
        y = lkconv.depthwise_conv2d(x, w, b, padding=15)
        dy = torch.randn_like(y)
        y.backward(dy)
    assert "tf32" in explanation.forward and "tf32" in explanation.weight_grad, explanation
    expected = reference(x, w, b, 1, 15, 1, dy)
    for name, actual, wanted in zip(("output", "grad_input", "grad_weight", "grad_bias"), (y, x.grad, w.grad, b.grad),
                                    expected):
        assert_close(actual, wanted, TF32_TOLERANCE, f"{backend} tf32 {name}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("batch,form", [(40, "whole_map"), (1, "rows")])
def test_cuda_tensor_core_forms_on_a_map_the_kernel_covers(batch, form, dtype, poisoned_outputs):
    """RepLKNet stage 3's 14x14 map with K=27: the whole-map GEMMs where the batch fills them, the row forms for one
    image; both against float64, every pass."""
    x, w, b = _inputs((batch, 48, 14, 14), 27, dtype, False)
    with lkconv.use_backend("cuda"):
        explanation = lkconv.explain(x, w, b, padding=13)
        y = lkconv.depthwise_conv2d(x, w, b, padding=13)
        dy = torch.randn_like(y)
        grads = torch.autograd.grad(y, (x, w, b), dy)
    for kernel in (explanation.forward, explanation.input_grad, explanation.weight_grad):
        assert ("whole_map" in kernel) == (form == "whole_map"), explanation
    expected = reference(x, w, b, 1, 13, 1, dy)
    for name, actual, wanted in zip(("output", "grad_input", "grad_weight", "grad_bias"), (y, *grads), expected):
        assert_close(actual, wanted, TOLERANCE[dtype], f"cuda {form} batch {batch} {dtype} {name}")


def test_cuda_gram_weight_grad_takes_one_split_per_image_chunk():
    """The Gram-matrix form (RepLKNet stage 2's 28x28, K=29) uses at most one split per 64-image chunk whatever
    workspace it is given: 8 splits asked of 40 images give the bits of 1, and the reduce reads only the splits
    written (a workspace left uninitialised past them would show)."""
    from lkconv.backends import cuda_backend

    x = torch.randn(40, 6, 28, 28, device="cuda").to(torch.bfloat16)
    dy = torch.randn(40, 6, 28, 28, device="cuda").to(torch.bfloat16)
    w = torch.zeros(6, 1, 29, 29, device="cuda", dtype=torch.bfloat16)
    with lkconv.use_backend("cuda"):
        assert "whole_map" in lkconv.explain(x, w, None, padding=14).weight_grad
    many = cuda_backend.weight_grad(dy, x, (29, 29), (1, 1), (14, 14, 14, 14), (1, 1), True, splits=8)
    one = cuda_backend.weight_grad(dy, x, (29, 29), (1, 1), (14, 14, 14, 14), (1, 1), True, splits=1)
    assert torch.equal(many[0], one[0]) and torch.equal(many[1], one[1])
    x64, dy64 = x.double().requires_grad_(), dy.double()
    w64 = w.double().requires_grad_()
    y = torch.nn.functional.conv2d(x64, w64, padding=14, groups=6)
    (grad_weight,) = torch.autograd.grad(y, (w64,), dy64)
    assert_close(many[0], grad_weight, TOLERANCE[torch.bfloat16], "Gram weight grad, 8 splits asked")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_weight_grad_bit_identical_over_runs_at_full_size(backend, dtype):
    x = torch.randn(32, 384, 32, 32, device="cuda").to(dtype)
    dy = torch.randn(32, 384, 32, 32, device="cuda").to(dtype)
    with lkconv.use_backend(backend):
        runs = [
            torch.ops.lkconv.depthwise_conv2d_weight_grad(dy, x, [31, 31], [1, 1], [15, 15, 15, 15], [1, 1], True)
            for _ in range(5)
        ]
    for grad_weight, grad_bias in runs[1:]:
        assert torch.equal(grad_weight, runs[0][0]) and torch.equal(grad_bias, runs[0][1])


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_graph_capture_on_a_side_stream(backend):
    """Capture fails if any launch goes to another stream, so this proves the current-stream launch; replays
    must then recompute from new inputs copied into the captured buffers."""
    x, w, b = _inputs((16, 64, 32, 32), 31, torch.bfloat16, False)
    x, w, b = x.detach(), w.detach(), b.detach()
    dy = torch.randn(16, 64, 32, 32, device="cuda", dtype=torch.bfloat16)

    def step():
        y = torch.ops.lkconv.depthwise_conv2d(x, w, b, [1, 1], [15, 15, 15, 15], [1, 1])
        grad_input = torch.ops.lkconv.depthwise_conv2d_input_grad(dy, w, list(x.shape), [1, 1], [15, 15, 15, 15], [1, 1])
        grad_weight, grad_bias = torch.ops.lkconv.depthwise_conv2d_weight_grad(
            dy, x, [31, 31], [1, 1], [15, 15, 15, 15], [1, 1], True
        )
        return y, grad_input, grad_weight, grad_bias

    with lkconv.use_backend(backend):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()  # compile and warm up outside the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = step()
    for tensor in (x, w, b, dy):
        tensor.copy_(torch.randn_like(tensor, dtype=torch.float32).to(tensor.dtype))
    graph.replay()
    torch.cuda.synchronize()
    expected = reference(x, w, b, 1, 15, 1, dy)
    for name, actual, wanted in zip(("output", "grad_input", "grad_weight", "grad_bias"), outputs, expected):
        assert_close(actual, wanted, TOLERANCE[torch.bfloat16], f"graph replay {name}")


@pytest.mark.parametrize("stride,dilation", [(2, 1), (1, 2), (2, 3)])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_strided_and_dilated_large_kernels(backend, stride, dilation, poisoned_outputs):
    x, w, b = _inputs((8, 96, 40, 36), 13, torch.bfloat16, True)
    with lkconv.use_backend(backend):
        y = lkconv.depthwise_conv2d(x, w, b, stride, 6, dilation)
        dy = torch.randn_like(y)
        grads = torch.autograd.grad(y, (x, w, b), dy)
    for actual, wanted in zip((y, *grads), reference(x, w, b, stride, 6, dilation, dy)):
        assert_close(actual, wanted, TOLERANCE[torch.bfloat16], f"stride {stride} dilation {dilation}")


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_tensors_past_2_to_the_31_elements(backend, channels_last):
    """int64 offsets: the last images and channels of a 2.1e9-element tensor, checked on slices in float64."""
    shape, kernel = (2, 64, 4096, 4100), 7
    assert shape[0] * shape[1] * shape[2] * shape[3] > 2**31
    x = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(shape[1], 1, kernel, kernel, device="cuda", dtype=torch.bfloat16)
    with lkconv.use_backend(backend):
        y = lkconv.depthwise_conv2d(x, w, padding=3)
        dy = torch.randn_like(y)
        grad_input = torch.ops.lkconv.depthwise_conv2d_input_grad(dy, w, list(shape), [1, 1], [3, 3, 3, 3], [1, 1])
        grad_weight, _ = torch.ops.lkconv.depthwise_conv2d_weight_grad(dy, x, [7, 7], [1, 1], [3, 3, 3, 3], [1, 1], False)
    tail = slice(-2, None)
    expected = reference(x[:, tail], w[tail], None, 1, 3, 1, dy[:, tail])
    assert_close(y[:, tail], expected[0], TOLERANCE[torch.bfloat16], "output, last channels")
    assert_close(grad_input[:, tail], expected[1], TOLERANCE[torch.bfloat16], "grad_input, last channels")
    assert_close(grad_weight[tail], expected[2], TOLERANCE[torch.bfloat16], "grad_weight, last channels")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_launches_on_the_current_non_default_stream(backend):
    """Inputs made on a side stream and used there without synchronising: a launch on another stream would race."""
    side = torch.cuda.Stream()
    with torch.cuda.stream(side), lkconv.use_backend(backend):
        x, w, b = _inputs((16, 128, 56, 56), 31, torch.float32, False)
        y = lkconv.depthwise_conv2d(x, w, b, padding=15)
        dy = torch.randn_like(y)
        grads = torch.autograd.grad(y, (x, w, b), dy)
    side.synchronize()
    for actual, wanted in zip((y, *grads), reference(x, w, b, 1, 15, 1, dy)):
        assert_close(actual, wanted, TOLERANCE[torch.float32], f"{backend} on a side stream")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_torch_compile_reduce_overhead(backend):
    layer = lkconv.DepthwiseConv2d(64, 31, padding=15).cuda()
    x = torch.randn(8, 64, 32, 32, device="cuda")
    with lkconv.use_backend(backend):
        compiled = torch.compile(layer, mode="reduce-overhead", fullgraph=True)
        for _ in range(3):  # the first calls record the CUDA graph, later ones replay it
            y = compiled(x)
    expected = reference(x, layer.weight, layer.bias, 1, 15, 1)[0]
    assert_close(y, expected, TOLERANCE[torch.float32], f"{backend} compiled with reduce-overhead")


SANITIZER_SCRIPT = """
import torch, lkconv
cl = torch.channels_last
for shape, kernel, stride, dilation, dtype, multiplier, layout in [
        ((2, 5, 17, 23), 31, 1, 1, torch.float32, 2, torch.contiguous_format),
        ((1, 3, 9, 40), 13, 2, 2, torch.bfloat16, 2, torch.contiguous_format),
        ((2, 4, 8, 8), 63, 1, 1, torch.float16, 2, torch.contiguous_format),
        ((40, 3, 7, 9), 13, 1, 1, torch.bfloat16, 2, torch.contiguous_format),  # cuda: whole map
        ((64, 2, 28, 28), 29, 1, 1, torch.bfloat16, 2, torch.contiguous_format),  # dy in passes
        ((2, 40, 17, 23), 31, 1, 1, torch.bfloat16, 1, cl),  # triton: channel blocks, the last one partial
        ((2, 20, 13, 30), 7, 2, 2, torch.float32, 1, cl)]:
    x = torch.randn(shape, device="cuda", dtype=dtype).contiguous(memory_format=layout).requires_grad_()
    w = torch.randn(shape[1] * multiplier, 1, kernel, kernel, device="cuda", dtype=dtype, requires_grad=True)
    y = lkconv.depthwise_conv2d(x, w, None, stride, kernel // 2 * dilation, dilation)
    y.backward(torch.randn_like(y))
torch.cuda.synchronize()
print("done")
"""


@pytest.mark.sanitizer
@pytest.mark.parametrize("backend,tool",  # the hand-written kernels first: the session may cut this phase short
                         [("cuda", "memcheck"), ("triton", "memcheck"), ("cuda", "racecheck")])
def test_compute_sanitizer(backend, tool, tmp_path):
    """memcheck: no access outside a buffer; racecheck (the hand-written kernels): no shared-memory hazard between
    threads, the GPU counterpart of the emulation tests' ThreadSanitizer run. PyTorch's caching allocator is off,
    so every tensor is its own allocation and an access past one is reported, not hidden inside a cached block."""
    home = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"))
    sanitizer = shutil.which("compute-sanitizer") or str(home / "bin" / "compute-sanitizer")
    if not Path(sanitizer).exists():
        pytest.skip("compute-sanitizer is not installed here")
    script = tmp_path / "sanitized.py"
    script.write_text(SANITIZER_SCRIPT)
    result = subprocess.run([sanitizer, "--tool", tool, "--error-exitcode", "3", sys.executable, str(script)],
                            capture_output=True, text=True, timeout=500,
                            env={**os.environ, "LKCONV_BACKEND": backend, "PYTORCH_NO_CUDA_MEMORY_CACHING": "1"})
    assert result.returncode == 0 and "done" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]


def test_cuda_ops_refuse_empty_maps_instead_of_dividing_by_zero():
    """The raw extension op, called directly with a zero-width map that padding would turn into a valid output shape:
    a clear error, not a launcher dividing by the width."""
    x = torch.randn(2, 4, 4, 0, device="cuda", dtype=torch.float16)
    dy = torch.randn(2, 4, 4, 4, device="cuda", dtype=torch.float16)
    workspace = torch.empty(2 * 4 * 26, device="cuda")
    grad_weight = torch.empty(4, 1, 5, 5, device="cuda", dtype=torch.float16)
    with pytest.raises(RuntimeError, match="heights and widths >= 1"):
        torch.ops.lkconv.cuda_weight_grad(dy, x, [1, 1], [2, 4, 2, 4], [1, 1], False, workspace, grad_weight, None)


def test_cuda_ops_reject_bad_arguments_by_name():
    """The raw extension ops check what the backend would never hand them, naming the argument and what it got."""
    x = torch.randn(2, 4, 8, 8, device="cuda")
    w = torch.randn(4, 1, 3, 3, device="cuda")
    out = torch.empty(2, 4, 8, 8, device="cuda")
    pad = [1, 1, 1, 1]
    calls = [
        (lambda: torch.ops.lkconv.cuda_forward(x, w.transpose(2, 3), None, [1, 1], pad, [1, 1], False, out),
         "weight must be contiguous; got strides"),
        (lambda: torch.ops.lkconv.cuda_forward(x, w, None, [1, 1], pad, [1, 1], False, out[:, :, :7]),
         "output must have shape"),
        (lambda: torch.ops.lkconv.cuda_forward(x, w, None, [1, 1], pad, [1, 1], False, out.half()),
         "output must have dtype"),
        (lambda: torch.ops.lkconv.cuda_forward(x, w, None, [0, 1], pad, [1, 1], False, out), "stride"),
        (lambda: torch.ops.lkconv.cuda_input_grad(out, w, [1, 1], pad[:3], [1, 1], False, x), "padding must have 4"),
        (lambda: torch.ops.lkconv.cuda_weight_grad(out, x, [1, 1], pad, [1, 1], False, torch.empty(4 * 10).half().cuda(),
                                                   torch.empty_like(w), None),
         "workspace must be a contiguous float32 tensor on cuda:0; got Half"),
        # these two divided by zero in the launchers (the process died of SIGFPE) before the binding refused them
        (lambda: torch.ops.lkconv.cuda_weight_grad(out[:, :0], x, [1, 1], pad, [1, 1], False,
                                                   torch.empty(40, device="cuda"), w[:0], None),
         "grad_weight.size\\(0\\) must be a positive multiple of the 4 input channels; got 0"),
        (lambda: torch.ops.lkconv.cuda_weight_grad(out, x, [1, 1], pad, [1, 1], False, torch.empty(40, device="cuda"),
                                                   torch.empty(4, 1, 0, 6, device="cuda"), None),
         "grad_weight kernel sizes must be >= 1 with an area"),
    ]
    for call, message in calls:
        with pytest.raises(RuntimeError, match=message):
            call()


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_an_ensemble_under_vmap_runs_on_the_gpu_kernels(backend):
    """torch.func.stack_module_state + vmap, as model ensembles run on one batch: the batching rule folds the
    members' filters into the depth multiplier of one call on the backend's kernels."""
    members = [lkconv.DepthwiseConv2d(64, 31, padding=15).cuda() for _ in range(3)]
    params, buffers = torch.func.stack_module_state(members)
    template = lkconv.DepthwiseConv2d(64, 31, padding=15, device="meta")
    x = torch.randn(8, 64, 32, 32, device="cuda")
    with lkconv.use_backend(backend), torch.no_grad():
        outputs = torch.func.vmap(lambda p, b: torch.func.functional_call(template, (p, b), (x,)))(params, buffers)
    for i, member in enumerate(members):
        expected = reference(x, member.weight, member.bias, 1, 15, 1)[0]
        assert_close(outputs[i], expected, TOLERANCE[torch.float32], f"member {i}")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_per_sample_grads_and_jvp_run_on_the_gpu_kernels(backend):
    """torch.func on a K=31 layer: vmap(grad) folds the samples into the channels of one weight-grad call, and jvp
    runs the forward's jvp on the backend's kernels; both against float64 PyTorch."""
    layer = lkconv.DepthwiseConv2d(64, 31, padding=15).cuda()
    params = {name: p.detach() for name, p in layer.named_parameters()}
    x, tangent = torch.randn(8, 64, 32, 32, device="cuda"), torch.randn(8, 64, 32, 32, device="cuda")

    def loss(p, sample):
        return (torch.func.functional_call(layer, p, (sample.unsqueeze(0),)) ** 2).sum()

    with lkconv.use_backend(backend):
        per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)
        _, output_tangent = torch.func.jvp(layer, (x,), (tangent,))
    for i in range(0, x.shape[0], 3):
        output = reference(x[i:i + 1], layer.weight, layer.bias, 1, 15, 1)[0]
        _, _, grad_weight, grad_bias = reference(x[i:i + 1], layer.weight, layer.bias, 1, 15, 1, 2 * output)
        assert_close(per_sample["weight"][i], grad_weight, TOLERANCE[torch.float32],
                     f"{backend} sample {i} weight grad")
        assert_close(per_sample["bias"][i], grad_bias, TOLERANCE[torch.float32], f"{backend} sample {i} bias grad")
    expected = reference(tangent, layer.weight, None, 1, 15, 1)[0]
    assert_close(output_tangent, expected, TOLERANCE[torch.float32], f"{backend} jvp")
