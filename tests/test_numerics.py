"""lkconv.depthwise_conv2d against float64 F.conv2d: output and all grads, every backend, over the awkward grid."""

from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import lkconv
from lkconv.backends import triton_backend
from lkconv.kernels.common import split_count, split_rows

from conftest import TOLERANCE, TRITON_DEVICE, assert_close, assert_never_hidden, non_finite_reach, reference


class Case(NamedTuple):
    batch: int
    channels: int
    multiplier: int
    height: int
    width: int
    kernel: tuple
    stride: object = 1
    padding: object = 0
    dilation: object = 1
    layout: str = "nchw"  # nchw | channels_last | sliced

    def id(self):
        return (f"n{self.batch}c{self.channels}m{self.multiplier}_{self.height}x{self.width}_k{self.kernel[0]}x{self.kernel[1]}"
                f"_s{self.stride}_p{self.padding}_d{self.dilation}_{self.layout}").replace(" ", "")


# ARCHITECTURE.md §5: odd maps, maps smaller than the kernel, C not a multiple of 8, N = 0 and 1, K from 1 to 63
# (odd, even, non-square), stride 1 and 2, dilation, depth multipliers, channels_last and sliced inputs.
CASES = [
    Case(2, 3, 1, 9, 11, (3, 3), 1, 1),
    Case(2, 4, 1, 16, 16, (31, 31), 1, 15),
    Case(1, 5, 1, 7, 6, (9, 13), 1, "same"),
    Case(2, 3, 2, 10, 9, (4, 6), 2, (1, 2), (2, 1), "channels_last"),
    Case(1, 1, 1, 12, 9, (31, 5), 1, (15, 2)),
    Case(0, 3, 1, 8, 8, (5, 5), 1, 2),
    Case(2, 3, 3, 11, 13, (1, 1)),
    Case(1, 2, 1, 5, 40, (3, 63), 1, "same"),
    Case(2, 3, 1, 13, 7, (7, 7), 2, 3, 1, "sliced"),
    Case(2, 3, 1, 9, 9, (5, 5), 1, "same", 3),
    Case(1, 9, 1, 14, 14, (27, 27), 1, 13),
    Case(2, 3, 1, 8, 8, (2, 2), 1, "same"),
    Case(1, 2, 1, 6, 5, (13, 13), 2, 6, 1, "channels_last"),
    Case(2, 3, 1, 9, 10, (3, 5), (2, 1), "valid", (1, 2)),
    Case(1, 3, 2, 7, 7, (13, 13), 1, 6, 1, "channels_last"),
    Case(2, 2, 1, 6, 7, (8, 3), (1, 2), (7, 4), (2, 3), "sliced"),
    Case(2, 5, 1, 9, 11, (5, 3), 1, (2, 1), 1, "channels_last"),
    Case(2, 4, 1, 12, 20, (7, 7), 2, 3, 1, "channels_last"),
]


# The cuda backend (lkconv._C) runs CUDA tensors only: its cases are GPU tests.
BACKENDS = ["torch", "triton", pytest.param("cuda", marks=pytest.mark.gpu)]


def device_for(backend: str) -> str:
    return {"triton": TRITON_DEVICE, "cuda": "cuda"}.get(backend, "cpu")


def make_input(case: Case, dtype, device) -> torch.Tensor:
    shape = (case.batch, case.channels, case.height, case.width)
    if case.layout == "channels_last":
        return torch.randn(shape, device=device).to(dtype).contiguous(memory_format=torch.channels_last)
    if case.layout == "sliced":
        big = torch.randn(case.batch, 2 * case.channels, case.height + 2, case.width + 3, device=device).to(dtype)
        return big[:, ::2, 1:-1, 2:-1]
    return torch.randn(shape, device=device).to(dtype)


def run_case(case: Case, dtype, device, with_bias=True):
    x = make_input(case, dtype, device).requires_grad_()
    w = torch.randn(case.channels * case.multiplier, 1, *case.kernel, device=device).to(dtype).requires_grad_()
    b = torch.randn(case.channels * case.multiplier, device=device).to(dtype).requires_grad_() if with_bias else None
    y = lkconv.depthwise_conv2d(x, w, b, case.stride, case.padding, case.dilation)
    dy = torch.randn(y.shape, device=device).to(dtype).contiguous(memory_format=lkconv.arguments.output_memory_format(y))
    grads = torch.autograd.grad(y, [t for t in (x, w, b) if t is not None], dy)
    expected = reference(x, w, b, case.stride, case.padding, case.dilation, dy)
    return x, y, grads, expected


BACKEND_DTYPES = [("torch", torch.float64), ("torch", torch.float32), ("torch", torch.bfloat16),
                  ("triton", torch.float32), ("triton", torch.bfloat16), ("triton", torch.float16)] + [
    pytest.param("cuda", dtype, marks=pytest.mark.gpu) for dtype in (torch.float32, torch.bfloat16, torch.float16)]


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES,
                         ids=[f"{b}-{str(d)[6:]}" for b, d in (getattr(p, "values", p) for p in BACKEND_DTYPES)])
@pytest.mark.parametrize("case", CASES, ids=[c.id() for c in CASES])
def test_output_and_grads_match_float64_reference(case, backend, dtype, poisoned_outputs):
    with lkconv.use_backend(backend):
        x, y, grads, expected = run_case(case, dtype, device_for(backend))
    tolerance = TOLERANCE[dtype]
    for name, actual, wanted in zip(("output", "grad_input", "grad_weight", "grad_bias"), (y, *grads), expected):
        assert actual.dtype == dtype, f"{name} dtype {actual.dtype} != {dtype}"
        assert_close(actual, wanted, tolerance, f"{backend} {dtype} {name}")
    if case.layout == "channels_last" and case.batch > 0:
        assert y.is_contiguous(memory_format=torch.channels_last), "channels_last input must give channels_last output"
        assert grads[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_bias(backend):
    case = Case(2, 3, 2, 9, 8, (5, 7), 1, "same")
    with lkconv.use_backend(backend):
        _, y, grads, expected = run_case(case, torch.float32, device_for(backend), with_bias=False)
    assert len(grads) == 2
    for actual, wanted in zip((y, *grads), expected):
        assert_close(actual, wanted, TOLERANCE[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_weight_or_only_bias_requiring_grad(backend):
    device = device_for(backend)
    x = torch.randn(2, 3, 8, 9, device=device)
    w = torch.randn(3, 1, 5, 5, device=device, requires_grad=True)
    b = torch.randn(3, device=device, requires_grad=True)
    dy = torch.randn(2, 3, 8, 9, device=device)
    _, _, grad_w, grad_b = reference(x, w, b, 1, 2, 1, dy)
    with lkconv.use_backend(backend):
        (only_b,) = torch.autograd.grad(lkconv.depthwise_conv2d(x, w.detach(), b, padding=2), b, dy)
        (only_w,) = torch.autograd.grad(lkconv.depthwise_conv2d(x, w, b.detach(), padding=2), w, dy)
    assert_close(only_b, grad_b, TOLERANCE[torch.float32])
    assert_close(only_w, grad_w, TOLERANCE[torch.float32])


def test_unbatched_input_matches_reference():
    x = torch.randn(3, 10, 11, dtype=torch.float64)
    w = torch.randn(6, 1, 7, 3, dtype=torch.float64)
    expected = torch.nn.functional.conv2d(x, w, None, 1, (3, 1), 1, groups=3)
    assert_close(lkconv.depthwise_conv2d(x, w, padding=(3, 1)), expected, TOLERANCE[torch.float64])


# Three channels or more: the middle ones meet no non-finite value, in any of the three results.
NON_FINITE_CASES = [
    Case(1, 3, 1, 8, 40, (7, 7), 1, 3),  # row blocks
    Case(2, 3, 1, 7, 7, (13, 13), 1, 6),  # the kernel covers the map: whole-map GEMM
    Case(1, 4, 1, 8, 40, (7, 5), 1, (3, 2), 1, "channels_last"),  # channel blocks
    Case(2, 3, 2, 9, 12, (5, 5), 2, 2),  # stride 2, depth multiplier 2
]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy, on NaN
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", NON_FINITE_CASES, ids=[c.id() for c in NON_FINITE_CASES])
def test_a_non_finite_value_is_never_hidden(case, backend, dtype):
    """An inf in the input and a NaN in the output grad reach every result F.conv2d's windows carry them to (more may
    turn NaN: README, Numerics), and the images and channels they do not meet come back finite and right. AMP's loss
    scaling relies on the first: a grad that overflowed must not come back finite."""
    device = device_for(backend)
    x = make_input(case, dtype, device)
    w = torch.randn(case.channels * case.multiplier, 1, *case.kernel, device=device).to(dtype)
    x[-1, 0, case.height // 2, case.width // 3] = float("inf")
    with lkconv.use_backend(backend):
        xg, wg = x.detach().requires_grad_(), w.detach().requires_grad_()
        y = lkconv.depthwise_conv2d(xg, wg, None, case.stride, case.padding)
        dy = torch.randn(y.shape, device=device).to(dtype).contiguous(
            memory_format=lkconv.arguments.output_memory_format(y))
        dy[0, -1, y.shape[2] // 2, y.shape[3] // 2] = float("nan")
        dx, dw = torch.autograd.grad(y, [xg, wg], dy)
    expected = reference(x, w, None, case.stride, case.padding, 1, dy)
    padding = lkconv.arguments.conv_padding(case.padding, case.kernel, (case.stride,) * 2, (1, 1))
    must = non_finite_reach(x, dy, case.kernel, case.multiplier, case.stride, (padding[0], padding[2], padding[1],
                                                                              padding[3]), 1)
    # Per (image, channel): which hold no non-finite value in what they read (no kernel tile mixes them).
    x_bad = ~torch.isfinite(x).cpu().flatten(2).all(2)  # (N, C)
    dy_bad = ~torch.isfinite(dy).cpu().flatten(2).all(2)  # (N, C*m)
    m = case.multiplier
    untouched = [~x_bad.repeat_interleave(m, 1)[:, :, None, None],
                 ~dy_bad.unflatten(1, (-1, m)).any(2)[:, :, None, None],
                 ~(x_bad.any(0).repeat_interleave(m) | dy_bad.any(0))[:, None, None, None]]
    for name, actual, wanted, reached, clean in zip(("output", "grad_input", "grad_weight"), (y, dx, dw), expected,
                                                    must, untouched):
        assert_never_hidden(f"{backend} {name}", actual, reached)
        finite = torch.isfinite(actual).cpu()
        clean = clean.expand_as(finite)
        assert clean.any() and finite[clean].all(), f"{backend} {name}: non-finite where no non-finite value was read"
        both = finite & torch.isfinite(wanted)
        assert_close(actual.cpu()[both], wanted[both], TOLERANCE[dtype], f"{backend} {name}, finite elements")


@pytest.mark.parametrize("backend", BACKENDS)
def test_tf32_when_pytorch_allows_it(backend):
    torch.backends.cudnn.conv.fp32_precision = "tf32"
    case = Case(2, 4, 1, 12, 12, (7, 7), 1, 3)
    with lkconv.use_backend(backend):
        _, y, grads, expected = run_case(case, torch.float32, device_for(backend))
        if backend != "torch":  # the kernels' own precision; PyTorch's CPU conv has no TF32
            plan = lkconv.explain(torch.empty(2, 4, 12, 12, device=y.device), torch.empty(4, 1, 7, 7, device=y.device),
                                  stride=1, padding=3)
            for line in (plan.forward, plan.input_grad, plan.weight_grad):
                assert "tf32" in line, f"PyTorch allows TF32 for convs, but {backend} plans: {line}"
    # On a CPU, the interpreter's dots and PyTorch's convs ignore TF32: exact fp32 must still be fp32-exact there.
    tolerance = 3e-3 if y.is_cuda else TOLERANCE[torch.float32]
    for actual, wanted in zip((y, *grads), expected, strict=True):
        assert_close(actual, wanted, tolerance, "tf32")


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_weight_and_bias_and_expanded_grad_output(backend, poisoned_outputs):
    """Autograd hands kernels expanded (stride-0) grads; weights may be views. Only strides may be assumed."""
    device = device_for(backend)
    x = torch.randn(2, 3, 9, 8, device=device).requires_grad_()
    w = torch.randn(3, 1, 10, 14, device=device)[:, :, ::2, ::2].requires_grad_()
    b = torch.randn(6, device=device)[::2].requires_grad_()
    with lkconv.use_backend(backend):
        y = lkconv.depthwise_conv2d(x, w, b, padding=(2, 3))
        dy = torch.randn((), device=device).expand(y.shape)
        grads = torch.autograd.grad(y, (x, w, b), dy)
    expected = reference(x, w, b, 1, (2, 3), 1, dy)
    for name, actual, wanted in zip(("output", "grad_input", "grad_weight", "grad_bias"), (y, *grads), expected):
        assert_close(actual, wanted, TOLERANCE[torch.float32], name)


# GPU-sized blocks are far larger than the CPU shapes, so every map would fit one block. Small blocks make the
# interpreter run the paths a GPU takes: several row, column and pixel blocks per channel, and block edges.
SMALL_BLOCKS = {
    "rows": triton_backend.RowsConfig(16, 16, 16),
    "rows_shifted_filter": triton_backend.RowsConfig(16, 16, 16),
    "whole_map": triton_backend.WholeMapConfig(16, 16, 16),
}


def _unit_stride(case) -> bool:
    """Whether the row kernel's shifted filter rows apply: stride 1 and dilation 1."""
    return case.stride in (1, (1, 1)) and case.dilation in (1, (1, 1))


def _forms_and_cases(forms, cases):
    """Every (form, case) pair, the shifted filter rows only where they apply."""
    return [(form, case) for form in forms for case in cases if form != "rows_shifted_filter" or _unit_stride(case)]
MULTI_BLOCK_CASES = [
    Case(2, 2, 1, 12, 20, (5, 5), 1, 2),
    Case(2, 3, 2, 10, 9, (4, 6), 2, (1, 2), (2, 1), "channels_last"),
    Case(1, 5, 1, 7, 6, (9, 13), 1, "same"),
    Case(2, 3, 1, 13, 7, (7, 7), 2, 3, 1, "sliced"),
    Case(2, 2, 1, 6, 7, (8, 3), (1, 2), (7, 4), (2, 3), "sliced"),
    Case(1, 3, 2, 7, 7, (13, 13), 1, 6, 1, "channels_last"),
]


SMALL_BLOCK_RUNS = _forms_and_cases(["rows", "rows_shifted_filter", "whole_map"], MULTI_BLOCK_CASES)


@pytest.mark.parametrize("form,case", SMALL_BLOCK_RUNS, ids=[f"{form}-{case.id()}" for form, case in SMALL_BLOCK_RUNS])
def test_triton_kernels_with_small_blocks(case, form, monkeypatch, poisoned_outputs):
    monkeypatch.setattr(triton_backend, "plan_conv", lambda p, interpret: triton_backend.ConvPlan(form, SMALL_BLOCKS[form]))
    monkeypatch.setattr(triton_backend, "weight_grad_config", lambda *args: triton_backend.WeightGradConfig(16, 16, 2, 16))
    with lkconv.use_backend("triton"):
        _, y, grads, expected = run_case(case, torch.float32, TRITON_DEVICE)
    for name, actual, wanted in zip(("output", "grad_input", "grad_weight", "grad_bias"), (y, *grads), expected):
        assert_close(actual, wanted, TOLERANCE[torch.float32], f"{form} {name}")


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_triton_reads_inputs_in_place_without_a_copy(layout, monkeypatch):
    """NCHW and channels_last maps go to the kernels as they are: strides, not a hidden copy."""
    launched = []
    original = triton_backend._launch_conv

    def spy(p, src, weight, *args, **kwargs):
        launched.append((src.data_ptr(), weight.data_ptr()))
        return original(p, src, weight, *args, **kwargs)

    monkeypatch.setattr(triton_backend, "_launch_conv", spy)
    x = make_input(Case(2, 3, 1, 9, 8, (5, 5), layout=layout), torch.float32, TRITON_DEVICE).requires_grad_()
    w = torch.randn(3, 1, 5, 5, device=TRITON_DEVICE, requires_grad=True)
    with lkconv.use_backend("triton"):
        y = lkconv.depthwise_conv2d(x, w, padding=2)
        dy = torch.randn_like(y)
        y.backward(dy)
    assert launched == [(x.data_ptr(), w.data_ptr()), (dy.data_ptr(), w.data_ptr())]


@pytest.mark.parametrize("layout,dtype,expected", [
    ("nchw", torch.bfloat16, 8), ("nchw", torch.float16, 8), ("nchw", torch.float32, 4),
    ("width 28", torch.bfloat16, 4), ("width 14", torch.bfloat16, 2), ("width 7", torch.bfloat16, 1),
    ("channels_last", torch.bfloat16, 1), ("offset by one element", torch.bfloat16, 1),
    ("offset by four elements", torch.bfloat16, 4), ("rows padded to 40", torch.bfloat16, 8),
    ("rows padded to 36", torch.float32, 4), ("rows padded to 36", torch.bfloat16, 4),
])
def test_vector_align_divides_width_strides_and_pointer(layout, dtype, expected):
    """The triton kernels widen column runs to whole vectors of vector_align elements: it must divide the row
    width, every stride that multiplies a non-zero index and the data pointer, or the loads would be misaligned
    or leave the row."""
    width = {"width 28": 28, "width 14": 14, "width 7": 7}.get(layout, 32)
    x = torch.zeros(2, 3, 5, width, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout.startswith("offset"):
        x = torch.zeros(2 * 3 * 5 * 32 + 8, dtype=dtype)[1 if "one" in layout else 4:][:2 * 3 * 5 * 32].view(2, 3, 5, 32)
    elif layout.startswith("rows padded"):
        x = torch.zeros(2, 3, 5, int(layout.split()[-1]), dtype=dtype)[..., :32]
    assert triton_backend.vector_align(x.shape, x.stride(), x.element_size(), x.data_ptr()) == expected
    # A size-1 dimension's stride never multiplies a non-zero index, so it does not count.
    single = torch.zeros(1, 3, 5, 48, dtype=dtype)[:, :, :, :32]
    assert triton_backend.vector_align(single.shape, (7, *single.stride()[1:]), single.element_size(), 0) == \
        16 // single.element_size()


# Rows padded with NaN past the view's width: a kernel that widens a run of columns past the width multiplies a
# NaN (by a zero tap, but 0 * NaN is NaN) and fails. Small blocks give several column blocks and chunks per row,
# with runs that start off a vector boundary (padding 3 and 5).
ALIGNED_CASES = [
    Case(2, 2, 1, 6, 48, (7, 7), 1, 3),
    Case(1, 2, 2, 5, 32, (11, 5), 2, (5, 2)),
    Case(2, 2, 1, 7, 40, (3, 9), 1, (1, 4), (1, 2)),
]


ALIGNED_RUNS = _forms_and_cases(["rows", "rows_shifted_filter"], ALIGNED_CASES)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("form,case", ALIGNED_RUNS, ids=[f"{form}-{case.id()}" for form, case in ALIGNED_RUNS])
def test_triton_vector_runs_stay_inside_rows_padded_with_nan(case, form, dtype, monkeypatch, poisoned_outputs):
    monkeypatch.setattr(triton_backend, "plan_conv",
                        lambda p, interpret: triton_backend.ConvPlan(form, SMALL_BLOCKS[form]))
    monkeypatch.setattr(triton_backend, "weight_grad_config", lambda *args: triton_backend.WeightGradConfig(16, 16, 2, 16))
    padded = torch.full((case.batch, case.channels, case.height, case.width + 16), float("nan"), dtype=dtype)
    padded[..., :case.width] = torch.randn(case.batch, case.channels, case.height, case.width).to(dtype)
    x = padded[..., :case.width].requires_grad_()
    assert triton_backend.vector_align(x.shape, x.stride(), x.element_size(), x.data_ptr()) == 16 // x.element_size()
    w = torch.randn(case.channels * case.multiplier, 1, *case.kernel).to(dtype).requires_grad_()
    with lkconv.use_backend("triton"):
        y = lkconv.depthwise_conv2d(x, w, None, case.stride, case.padding, case.dilation)
        dy_padded = torch.full((*y.shape[:3], y.shape[3] + 16), float("nan"), dtype=dtype)
        dy_padded[..., :y.shape[3]] = torch.randn(y.shape).to(dtype)
        dy = dy_padded[..., :y.shape[3]]
        grads = torch.autograd.grad(y, (x, w), dy)
    expected = reference(x, w, None, case.stride, case.padding, case.dilation, dy)
    for name, actual, wanted in zip(("output", "grad_input", "grad_weight"), (y, *grads), expected):
        assert_close(actual, wanted, TOLERANCE[dtype], f"{dtype} {name}")


# channels_last maps with depth multiplier 1 take the channel-block kernels. Blocks of 2 channels, 16 rows and 16
# columns split these maps into several channel (one partial), row and column blocks and column chunks; the weight
# grad's 16x16 tap tiles and 2 rows of 16 columns give several tap tiles, row steps and column chunks.
CHANNEL_BLOCK_CASES = [
    Case(2, 5, 1, 12, 20, (5, 5), 1, 2, 1, "channels_last"),
    Case(1, 3, 1, 13, 22, (7, 9), 2, (3, 4), 1, "channels_last"),
    Case(2, 4, 1, 9, 18, (4, 6), (1, 2), "valid", (2, 1), "channels_last"),
    Case(1, 6, 1, 10, 17, (6, 4), 1, "same", (1, 3), "channels_last"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CHANNEL_BLOCK_CASES, ids=[c.id() for c in CHANNEL_BLOCK_CASES])
def test_triton_channels_last_kernels_with_small_blocks(case, dtype, monkeypatch, poisoned_outputs):
    small = triton_backend.RowsChannelsLastConfig(2, 16, 16, 16)
    monkeypatch.setattr(triton_backend, "_rows_channels_last_config", lambda p, interpret: small)
    monkeypatch.setattr(triton_backend, "weight_grad_channels_last_config",
                        lambda *args: triton_backend.WeightGradChannelsLastConfig(2, 16, 16, 2, 16))

    def per_channel_weight_grad(*args):
        raise AssertionError("the per-channel weight grad ran on channels_last maps")

    monkeypatch.setattr(triton_backend, "weight_grad_config", per_channel_weight_grad)
    plan_conv = triton_backend.plan_conv
    forms = []

    def spy(p, interpret):
        plan = plan_conv.__wrapped__(p, interpret)  # uncached: the small blocks must not stay behind
        forms.append(plan.form)
        return plan

    monkeypatch.setattr(triton_backend, "plan_conv", spy)
    with lkconv.use_backend("triton"):
        _, y, grads, expected = run_case(case, dtype, TRITON_DEVICE)
    assert forms == ["rows_channels_last", "rows_channels_last"], forms
    assert y.is_contiguous(memory_format=torch.channels_last)
    for name, actual, wanted in zip(("output", "grad_input", "grad_weight", "grad_bias"), (y, *grads), expected):
        assert_close(actual, wanted, TOLERANCE[dtype], f"{dtype} {name}")


@pytest.mark.parametrize("layout,multiplier,expected", [
    ("channels_last", 1, 32), ("channels_last", 2, 0), ("nchw", 1, 0), ("channel-sliced channels_last", 1, 0),
    ("width-sliced channels_last", 1, 32),  # its output is channels_last too, as F.conv2d's is
])
def test_channel_block_needs_unit_channel_stride_and_multiplier_one(layout, multiplier, expected):
    x = torch.zeros(2, 8, 5, 12, dtype=torch.bfloat16)
    if "channels_last" in layout:
        x = x.contiguous(memory_format=torch.channels_last)
    if layout.startswith("channel-sliced"):
        x = x[:, ::2]
    if layout.startswith("width-sliced"):
        x = x[..., ::2]
    out_shape = (2, x.shape[1] * multiplier, 5, x.shape[3])
    out_strides = triton_backend.layout_strides(out_shape, lkconv.arguments.output_memory_format(x))
    block = triton_backend.channel_block(x.shape, x.stride(), out_shape, out_strides, multiplier, x.element_size(),
                                         interpret=False)
    assert block == expected


VIEWS = {
    "channels_last": lambda x: x.contiguous(memory_format=torch.channels_last),
    "channels_last sliced along W": lambda x: x.contiguous(memory_format=torch.channels_last)[..., 1:11],
    "channels_last sliced along C": lambda x: x.contiguous(memory_format=torch.channels_last)[:, 1:5],
    "channels_last, one image": lambda x: x.contiguous(memory_format=torch.channels_last)[:1],
    "channels_last, one channel": lambda x: x.contiguous(memory_format=torch.channels_last)[:, :1],
    # Contiguous too, as a one-channel NHWC map is (a grayscale image permuted to NCHW): F.conv2d reads channels_last.
    "one-channel NHWC map": lambda x: x[:, :1].permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2),
    "NCHW sliced along W": lambda x: x[..., ::2],
    "H and W transposed": lambda x: x.transpose(2, 3),
}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("view", VIEWS)
def test_output_layout_follows_f_conv2d(view, backend):
    """The output takes the layout F.conv2d gives the same input (channels_last for views of a channels_last map),
    and its values are right whatever the view."""
    x = VIEWS[view](torch.randn(2, 8, 10, 12, device=device_for(backend)))
    w = torch.randn(x.shape[1], 1, 3, 3, device=x.device)
    expected = F.conv2d(x, w, padding=1, groups=x.shape[1])
    with lkconv.use_backend(backend):
        y = lkconv.depthwise_conv2d(x, w, padding=1)
    assert y.stride() == expected.stride(), f"{view}: strides {y.stride()}, F.conv2d's {expected.stride()}"
    assert_close(y, reference(x, w, None, 1, 1, 1)[0], TOLERANCE[torch.float32], view)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("view", VIEWS)
@pytest.mark.parametrize("whole_map_kernel", [False, True], ids=["3x3", "1x1 output"])
def test_input_grad_layout_follows_f_conv2d(view, whole_map_kernel, backend):
    """dx takes the layout F.conv2d's backward gives it, also where the output is 1x1: a (N, C, 1, 1) dy is
    contiguous in every layout, so dy's own layout says nothing (dx came back NCHW for a channels_last x there)."""
    x = VIEWS[view](torch.randn(2, 8, 10, 12, device=device_for(backend))).requires_grad_()
    kernel, padding = (tuple(x.shape[2:]), 0) if whole_map_kernel else ((3, 3), 1)
    w = torch.randn(x.shape[1], 1, *kernel, device=x.device)
    expected = F.conv2d(x, w, padding=padding, groups=x.shape[1])
    dy = torch.randn_like(expected)
    (expected_dx,) = torch.autograd.grad(expected, x, dy)
    with lkconv.use_backend(backend):
        (dx,) = torch.autograd.grad(lkconv.depthwise_conv2d(x, w, padding=padding), x, dy)
    # Strides of size-1 dimensions say nothing about the layout (F.conv2d gives a one-channel dx a channel stride of 1).
    memory_order = lambda t: [stride for stride, size in zip(t.stride(), t.shape) if size > 1]  # noqa: E731
    assert memory_order(dx) == memory_order(expected_dx), f"{view}: strides {dx.stride()}, F.conv2d's {expected_dx.stride()}"
    assert_close(dx, reference(x, w, None, 1, padding, 1, dy)[1], TOLERANCE[torch.float32], view)


def far_images(images: torch.Tensor) -> torch.Tensor:
    """`images` (3 or more) copied into a view whose images lie far enough apart that the last one starts past 2**31
    elements, while the batch stride still fits in int32. Its storage spans 2.1e9 elements, but only the images' pages
    are ever touched (on a CPU), so a test of int64 offsets needs no 8 GB tensor."""
    count = images.shape[0]
    assert count >= 3, "with 2 images the batch stride itself would pass 2**31"
    apart = -(-2**31 // (count - 1)) + 64
    storage = torch.empty((count - 1) * apart + images[0].numel(), dtype=images.dtype, device=images.device)
    view = storage.as_strided(images.shape, (apart, *images[0].stride()))
    return view.copy_(images)


@pytest.mark.parametrize("shape,kernel,memory_format,forms", [
    ((3, 2, 9, 12), 5, torch.contiguous_format, ("rows_shifted_filter", "weight_grad ")),
    ((16, 2, 5, 5), 7, torch.contiguous_format, ("whole_map", "weight_grad ")),  # a map smaller than the kernel
    ((3, 4, 9, 12), 5, torch.channels_last, ("rows_channels_last", "weight_grad_channels_last")),
], ids=["rows", "whole_map", "channels_last"])
def test_triton_offsets_past_2_to_the_31_elements(shape, kernel, memory_format, forms):
    """Every triton pass reads x and dy whose last image starts past 2**31 elements, with int32 strides. An offset
    computed in int32 wraps: on a GPU it reads elsewhere, and under the interpreter it crashes the test process."""
    x = far_images(torch.randn(shape, device=TRITON_DEVICE).contiguous(memory_format=memory_format)).requires_grad_()
    w = torch.randn(shape[1], 1, kernel, kernel, device=TRITON_DEVICE, requires_grad=True)
    b = torch.randn(shape[1], device=TRITON_DEVICE, requires_grad=True)
    with lkconv.use_backend("triton"):
        explained = lkconv.explain(x, w, b, padding=kernel // 2)
        assert explained.forward.startswith(forms[0]) and explained.weight_grad.startswith(forms[1]), explained
        y = lkconv.depthwise_conv2d(x, w, b, padding=kernel // 2)
        dy = far_images(torch.randn(y.shape, device=TRITON_DEVICE).contiguous(memory_format=memory_format))
        grads = torch.autograd.grad(y, (x, w, b), dy)
    for actual, expected, what in zip((y, *grads), reference(x, w, b, 1, kernel // 2, 1, dy),
                                      ("output", "input grad", "weight grad", "bias grad")):
        assert_close(actual, expected, TOLERANCE[torch.float32], what)


def test_channel_block_keeps_each_row_offset_below_2_to_the_31():
    """The row kernel adds channel and column offsets in int32: a row of W*C >= 2**31 elements goes per channel."""
    def block(channels, width):
        strides = triton_backend.layout_strides((1, channels, 1, width), torch.channels_last)
        return triton_backend.channel_block((1, channels, 1, width), strides, (1, channels, 1, width), strides, 1, 2,
                                            interpret=False)

    assert block(1024, 2**21) == 32  # last offset 2**31 - 1
    assert block(1024, 2**21 + 1) == 0  # last offset 2**31 + 1023


@pytest.mark.parametrize("out_hw,form", [
    ((242, 242), "whole_map"),
    ((46442, 46442), "rows_shifted_filter"),  # 2.16e9 pixels
    ((44196, 48590), "rows_shifted_filter"),  # 2**31 - 8 pixels: the block count wrapped
    ((44196, 48589), "whole_map"),  # 2**31 - 44204 pixels
])
def test_whole_map_plans_count_output_pixels_below_2_to_the_31(out_hw, form):
    """The whole-map kernel counts a channel's output pixels, and its pixel blocks, in int32. A 64x64 map with K=1023
    and a large padding has billions of output pixels: it went to the whole-map kernel, whose counts wrapped, and left
    the output unwritten. Such maps now take the row kernel, from 2**31 - 1024 pixels on."""
    p = triton_backend._forward_pass((1, 1, 64, 64), out_hw, (1023, 1023), (1, 1), (1, 1), (out_hw[1] + 958) // 2, 8,
                                     0)
    assert triton_backend.plan_conv(p, interpret=False).form == form


@triton.jit
def _split_ranges(out_ptr, rows_per_split, total_rows):
    """Each split's [begin, end), and the split count, as the weight-grad kernels compute them."""
    split = tl.program_id(0)
    begin, end = split_rows(split, rows_per_split, total_rows)
    tl.store(out_ptr + 3 * split, begin)
    tl.store(out_ptr + 3 * split + 1, end)
    tl.store(out_ptr + 3 * split + 2, split_count(total_rows, rows_per_split))


@pytest.mark.parametrize("total_rows,splits,block_rows", [
    (2147482623, 432, 16),  # 2 x 3 taps on an H100 (4 programs per SM): the last split's end would be 2**31 + 5632
    (2147482623, 432, 1),
    (2**31 - 1025, 7, 16),
    (5, 432, 16),
])
def test_weight_grad_splits_cover_the_rows_once_even_where_their_ends_pass_2_to_the_31(total_rows, splits,
                                                                                        block_rows):
    """The weight-grad kernels number a batch's N*OH output rows in int32 (the dispatcher keeps them below 2**31 -
    1024). A split's end, begin + rows per split, could pass 2**31 and wrap negative, and the last split summed
    nothing; the split count, a cdiv, wrapped too, and programs wrote outside their partials: a wrong weight grad.
    The kernels' own split_rows and split_count run here (int32 in the interpreter as on a GPU)."""
    count, rows_per_split = triton_backend.row_splits(total_rows, splits, block_rows)
    out = torch.full((count, 3), -1, dtype=torch.int32, device=TRITON_DEVICE)
    _split_ranges[(count,)](out, rows_per_split, total_rows)
    begins, ends, counts = out.cpu().T.tolist()
    assert set(counts) == {count}, f"the kernels count {set(counts)} splits, the host {count}"
    assert rows_per_split % block_rows == 0 and begins[0] == 0 and ends[-1] == total_rows, (begins[-1:], ends[-1:])
    assert all(end == next_begin for end, next_begin in zip(ends, begins[1:])), "splits overlap or leave a gap"
    assert all(begin < end for begin, end in zip(begins, ends)), "an empty split"


@pytest.mark.parametrize("shape,kernel,stride,dilation,expected", [
    ((64, 384, 64, 64), 31, 1, 1, "rows_shifted_filter"),  # the shape: B read far more often than built
    ((16, 384, 64, 64), 31, 1, 1, "rows_shifted_filter"),
    ((4, 384, 64, 64), 31, 1, 1, "rows"),  # few images: building the rows would cost about what it saves
    ((64, 384, 64, 64), 31, 2, 1, "rows"),  # the tap is no longer source minus destination column
    ((64, 384, 64, 64), 7, 1, 2, "rows"),
])
def test_gpu_row_plans_take_shifted_filter_rows_where_they_apply_and_pay(shape, kernel, stride, dilation, expected):
    out_hw = tuple((size + 2 * (kernel // 2) * dilation - dilation * (kernel - 1) - 1) // stride + 1
                   for size in shape[2:])
    p = triton_backend._forward_pass(shape, out_hw, (kernel, kernel), (stride, stride), (dilation, dilation),
                                     kernel // 2 * dilation, 8, 0)
    assert triton_backend.plan_conv(p, interpret=False).form == expected
