"""The CUDA-core kernels (csrc/blocked.cuh, direct_conv.cuh, direct_weight_grad.cuh: the exact fp32 paths, and every
stride-2 or dilated conv) run on a CPU: their own source, built with g++ and the sanitizers against host emulations of
the block barrier and shared memory (tests/cuda_emulation), and checked against F.conv2d in float64. This tests their
tiling, clamping and strided indexing without a GPU; test_gpu.py runs them for real where there is one."""

import pytest
import torch
import torch.nn.functional as F

from conftest import TOLERANCE, assert_close, assert_never_hidden, non_finite_reach
from emulation import (DTYPE_CODES, SANITIZERS, as_map, build_emulator, emulate, map_fields, nan_buffer,
                       random_tensor, read_weight_grad, run_emulator, written_view)

CONV_FORMS = {"blocked": 0, "tiled": 1, "general": 2}
WEIGHT_GRAD_FORMS = {"blocked": 0, "per_tap": 1}


@pytest.fixture(scope="module", params=SANITIZERS)
def emulator(request, tmp_path_factory):
    return build_emulator("cuda_core_host.cpp", tmp_path_factory.mktemp("emulation"), request.param)


def _header(dtype, kernel, multiplier, stride, padding, dilation, extra, form, first, second):
    """The emulator's 12 fields and two maps (cuda_core_host.cpp); padding is (top, left)."""
    return [DTYPE_CODES[dtype], *kernel, multiplier, *stride, *padding, *dilation, extra, form, *map_fields(first),
            *map_fields(second)]


def _output_hw(shape, kernel, stride, padding, dilation):
    top, bottom, left, right = padding
    return tuple((size + before + after - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1
                 for i, (size, before, after) in enumerate(((shape[2], top, bottom), (shape[3], left, right))))


# (N, C, H, W), (kh, kw), multiplier, stride, padding (top, bottom, left, right), dilation, dtype, with bias,
# source layout, destination layout. Small, because every CUDA thread is a host thread.
FORWARD_CASES = {
    "blocked": {
        "31x31 same, narrow map: 4 x 8 threads": ((1, 2, 20, 23), (31, 31), 1, (1, 1), (15, 15, 15, 15), (1, 1),
                                                  torch.float32, True, "nchw", "nchw"),
        "wide map: 8 x 8 threads, two column tiles, strided output": ((1, 1, 9, 70), (7, 13), 1, (1, 1),
                                                                      (3, 3, 6, 6), (1, 1), torch.float32, True,
                                                                      "nchw", "sliced"),
        "deep padding: kernel rows and chunks clamped": ((1, 1, 10, 9), (21, 17), 1, (1, 1), (18, 2, 15, 1), (1, 1),
                                                         torch.float32, False, "nchw", "nchw"),
        "multiplier 2, channels_last, bf16 storage": ((2, 2, 11, 13), (5, 9), 2, (1, 1), (2, 2, 4, 4), (1, 1),
                                                      torch.bfloat16, True, "channels_last", "channels_last"),
        "three filter chunks, two row tiles, fp16 storage": ((1, 1, 40, 12), (3, 19), 1, (1, 1), (1, 1, 9, 9),
                                                             (1, 1), torch.float16, False, "nchw", "nchw"),
        # Rows of a whole number of 16-byte vectors: the tile is staged in vectors from a boundary `shift` columns
        # early, and the filter gets `shift` leading zeros.
        "16-byte rows: 31x31 same (shift 1), 8 x 8 threads, two column tiles": (
            (1, 1, 12, 72), (31, 31), 1, (1, 1), (15, 15, 15, 15), (1, 1), torch.float32, True, "nchw", "nchw"),
        "16-byte bf16 rows: shift 7 takes an 8-wide filter into a second chunk": (
            (1, 2, 10, 16), (5, 8), 1, (1, 1), (2, 2, 1, 6), (1, 1), torch.bfloat16, True, "nchw", "sliced"),
        "int64 offsets: images 2^31 elements apart, in and out": ((2, 2, 9, 12), (7, 7), 1, (1, 1), (3, 3, 3, 3),
                                                                  (1, 1), torch.float32, True, "far", "far"),
    },
    "tiled": {
        "stride 2, asymmetric padding, two column tiles": ((1, 2, 21, 70), (7, 7), 1, (2, 2), (3, 1, 2, 3), (1, 1),
                                                           torch.float32, True, "nchw", "nchw"),
        "dilation (2, 3), multiplier 2, strided output": ((1, 2, 19, 40), (5, 3), 2, (1, 1), (4, 4, 3, 3), (2, 3),
                                                          torch.float32, False, "nchw", "sliced"),
        "stride (2, 1) and dilation 2 at once, channels_last, bf16": ((2, 1, 17, 18), (3, 5), 1, (2, 1),
                                                                       (2, 2, 4, 4), (2, 2), torch.bfloat16, True,
                                                                       "channels_last", "channels_last"),
        "stride 2, deep padding: kernel rows only a tile's lower rows reach, two row tiles": (
            (1, 1, 40, 12), (35, 3), 1, (2, 2), (17, 17, 1, 1), (1, 1), torch.float32, False, "nchw", "nchw"),
        "a kernel column that reaches only the first map column": ((1, 1, 6, 10), (3, 33), 1, (1, 1), (1, 1, 31, 31),
                                                                   (1, 1), torch.float32, True, "nchw", "nchw"),
        "stride 3: map smaller than a tile, fp16": ((1, 1, 5, 6), (3, 3), 1, (3, 3), (1, 1, 1, 1), (1, 1),
                                                    torch.float16, True, "nchw", "nchw"),
        "stride 1, deep top padding: leading kernel rows skipped": ((1, 1, 20, 9), (41, 3), 1, (1, 1),
                                                                    (36, 4, 1, 1), (1, 1), torch.float32, True,
                                                                    "nchw", "nchw"),
        "int64 offsets: stride 2, images 2^31 elements apart, bf16": ((2, 2, 11, 10), (5, 5), 1, (2, 2),
                                                                      (2, 2, 2, 2), (1, 1), torch.bfloat16, True,
                                                                      "far", "far"),
    },
    "general": {
        "dilation 30: the tile would not fit": ((1, 1, 12, 10), (5, 5), 1, (1, 1), (60, 60, 60, 60), (30, 30),
                                                torch.float32, True, "nchw", "nchw"),
        "stride (2, 3), dilation (25, 3), multiplier 3, channels_last, fp16": (
            (1, 2, 9, 8), (3, 6), 3, (2, 3), (25, 25, 7, 8), (25, 3), torch.float16, False, "channels_last", "sliced"),
        "int64 offsets: dilation 30, images 2^31 elements apart": ((2, 1, 7, 6), (3, 3), 2, (1, 1), (30, 30, 30, 30),
                                                                    (30, 30), torch.float32, True, "far", "far"),
    },
}

FORWARD_RUNS = [(form, case) for form, cases in FORWARD_CASES.items() for case in cases]


@pytest.mark.parametrize("form,case", FORWARD_RUNS)
def test_forward_matches_float64(emulator, tmp_path, form, case):
    shape, kernel, multiplier, stride, padding, dilation, dtype, with_bias, src_layout, dst_layout = \
        FORWARD_CASES[form][case]
    n, c, h, w = shape
    top, bottom, left, right = padding
    x = random_tensor(shape, dtype, src_layout == "channels_last")
    weight = random_tensor((c * multiplier, 1, *kernel), dtype)
    bias = random_tensor((c * multiplier,), dtype) if with_bias else None
    y = nan_buffer((n, c * multiplier, *_output_hw(shape, kernel, stride, padding, dilation)), dtype, dst_layout)

    source = as_map(x, src_layout)
    header = _header(dtype, kernel, multiplier, stride, (top, left), dilation, int(with_bias), CONV_FORMS[form], source,
                     y)
    tensors = [source, y, weight] + ([bias] if with_bias else [])
    actual = written_view(emulate(emulator, tmp_path, "forward", header, tensors), y)
    taps_only = F.conv2d(F.pad(x.double(), (left, right, top, bottom)), weight.double(), stride=stride,
                         dilation=dilation, groups=c)
    assert taps_only.abs().max() > 0, f"{case}: no tap reaches the map, so the case tests nothing"
    expected = taps_only if bias is None else taps_only + bias.double().view(1, -1, 1, 1)
    assert_close(actual, expected, TOLERANCE[dtype], f"emulated CUDA-core forward ({form}), {case}")


# (N, C, H, W) of the input, (kh, kw), multiplier, stride, padding, dilation, dtype, grad_output layout,
# grad_input layout.
INPUT_GRAD_CASES = {
    "blocked": {
        "31x31 same, multiplier 2: rotated filters summed": ((1, 2, 12, 12), (31, 31), 2, (1, 1), (15, 15, 15, 15),
                                                             (1, 1), torch.float32, "nchw", "nchw"),
        "wide map, channels_last grad_output, bf16": ((1, 1, 9, 40), (7, 7), 1, (1, 1), (3, 3, 3, 3), (1, 1),
                                                      torch.bfloat16, "channels_last", "sliced"),
        "asymmetric padding, output larger than the input": ((2, 1, 10, 11), (5, 9), 1, (1, 1), (4, 0, 1, 8),
                                                             (1, 1), torch.float32, "nchw", "nchw"),
        "16-byte grad_output rows: shift 3": ((1, 1, 11, 18), (3, 5), 1, (1, 1), (1, 1, 3, 3), (1, 1), torch.float32,
                                              "nchw", "nchw"),
        "16-byte fp16 grad_output rows: shift 5, multiplier 2": ((1, 2, 9, 16), (7, 7), 2, (1, 1), (3, 3, 3, 3),
                                                                  (1, 1), torch.float16, "nchw", "nchw"),
        "int64 offsets: images 2^31 elements apart, multiplier 2": ((2, 2, 10, 9), (5, 5), 2, (1, 1), (2, 2, 2, 2),
                                                                     (1, 1), torch.float32, "far", "far"),
    },
    "tiled": {
        "dilation 2, multiplier 3": ((1, 2, 15, 20), (5, 3), 3, (1, 1), (4, 4, 2, 2), (2, 2), torch.float32, "nchw",
                                     "nchw"),
        "dilation (1, 3), asymmetric padding, channels_last, fp16": ((1, 1, 18, 35), (3, 5), 1, (1, 1),
                                                                     (0, 2, 7, 3), (1, 3), torch.float16,
                                                                     "channels_last", "channels_last"),
    },
    "general": {
        "stride 2, multiplier 2, odd map": ((1, 2, 13, 11), (5, 5), 2, (2, 2), (2, 1, 2, 2), (1, 1), torch.float32,
                                            "nchw", "sliced"),
        "stride (3, 2), dilation 2, bf16": ((2, 1, 14, 9), (3, 4), 1, (3, 2), (2, 3, 3, 2), (2, 2), torch.bfloat16,
                                            "channels_last", "nchw"),
        "int64 offsets: stride 2, images 2^31 elements apart": ((2, 2, 9, 8), (3, 3), 1, (2, 2), (1, 1, 1, 1), (1, 1),
                                                                torch.float32, "far", "far"),
    },
}

INPUT_GRAD_RUNS = [(form, case) for form, cases in INPUT_GRAD_CASES.items() for case in cases]


@pytest.mark.parametrize("form,case", INPUT_GRAD_RUNS)
def test_input_grad_matches_float64(emulator, tmp_path, form, case):
    shape, kernel, multiplier, stride, padding, dilation, dtype, dy_layout, dx_layout = INPUT_GRAD_CASES[form][case]
    c = shape[1]
    top, bottom, left, right = padding
    weight = random_tensor((c * multiplier, 1, *kernel), dtype)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    y = F.conv2d(F.pad(x, (left, right, top, bottom)), weight.double(), stride=stride, dilation=dilation, groups=c)
    grad_output = random_tensor(tuple(y.shape), dtype, dy_layout == "channels_last")
    y.backward(grad_output.double())
    dx = nan_buffer(shape, dtype, dx_layout)

    dy = as_map(grad_output, dy_layout)
    header = _header(dtype, kernel, multiplier, stride, (top, left), dilation, 0, CONV_FORMS[form], dy, dx)
    actual = written_view(emulate(emulator, tmp_path, "input_grad", header, [dy, dx, weight]), dx)
    assert_close(actual, x.grad, TOLERANCE[dtype], f"emulated CUDA-core input grad ({form}), {case}")


# (N, C, H, W) of the input, (kh, kw), multiplier, stride, padding, dilation, dtype, splits, layout of both maps.
WEIGHT_GRAD_CASES = {
    "blocked": {
        "31x31 same, three splits": ((2, 1, 9, 12), (31, 31), 1, (1, 1), (15, 15, 15, 15), (1, 1), torch.float32, 3,
                                     "nchw"),
        "3x3: thread groups share the columns, two column pieces": ((2, 1, 20, 70), (3, 3), 1, (1, 1), (1, 1, 1, 1),
                                                                    (1, 1), torch.float32, 2, "nchw"),
        "16x3: eight thread groups, all with columns to add": ((1, 1, 20, 64), (16, 3), 1, (1, 1), (8, 7, 1, 1),
                                                               (1, 1), torch.float32, 1, "nchw"),
        "63x63: four passes of taps": ((1, 1, 6, 5), (63, 63), 1, (1, 1), (31, 31, 31, 31), (1, 1), torch.float32, 1,
                                       "nchw"),
        "multiplier 2, channels_last, splits across images and strips": ((3, 2, 19, 9), (5, 5), 2, (1, 1),
                                                                          (2, 2, 2, 2), (1, 1), torch.float32, 4,
                                                                          "channels_last"),
        # x rows of a whole number of 16-byte vectors (so is the 31x31 case above, with shift 1, and the 16x3 one,
        # with shift 3): x is staged in vectors from a boundary `shift` columns early.
        "16-byte rows: shift 2, two column pieces": ((1, 1, 7, 72), (5, 5), 1, (1, 1), (2, 2, 2, 2), (1, 1),
                                                     torch.float32, 2, "nchw"),
        "16-byte bf16 rows: shift 7 takes an 8-wide filter into a second tap window": (
            (1, 2, 10, 16), (5, 8), 1, (1, 1), (2, 2, 1, 6), (1, 1), torch.bfloat16, 2, "nchw"),
        # 16 taps per thread (the 31x31 and 63x63 cases above take them too): 40 units in 3 thread groups, which split
        # a full 64-column piece and a 1-column one.
        "20x32: 16 taps per thread in 3 groups, two column pieces": ((1, 1, 24, 64), (20, 32), 1, (1, 1),
                                                                     (10, 9, 16, 16), (1, 1), torch.float32, 2,
                                                                     "nchw"),
        "int64 offsets: images 2^31 elements apart, a split per image": ((2, 2, 9, 12), (7, 7), 1, (1, 1),
                                                                         (3, 3, 3, 3), (1, 1), torch.float32, 2,
                                                                         "far"),
    },
    "per_tap": {
        "stride 2, dilation 2, multiplier 2": ((2, 2, 13, 15), (3, 5), 2, (2, 2), (2, 2, 4, 4), (2, 2), torch.float32,
                                               3, "nchw"),
        "64x64: 4096 taps, the bias in a second tap group, stride 2": ((1, 1, 4, 4), (64, 64), 1, (2, 2),
                                                                        (32, 31, 32, 31), (1, 1), torch.float32, 1,
                                                                        "nchw"),
        "stride (1, 2), channels_last, bf16": ((2, 1, 11, 14), (5, 3), 1, (1, 2), (2, 2, 1, 1), (1, 1),
                                               torch.bfloat16, 2, "channels_last"),
        "dy rows longer than a staged chunk, stride (1, 2), fp16": ((1, 1, 3, 2200), (3, 3), 1, (1, 2),
                                                                    (1, 1, 1, 1), (1, 1), torch.float16, 2, "nchw"),
        "int64 offsets: stride 2, images 2^31 elements apart, bf16": ((2, 2, 9, 10), (3, 5), 1, (2, 2),
                                                                      (1, 1, 2, 2), (1, 1), torch.bfloat16, 3, "far"),
    },
}

WEIGHT_GRAD_RUNS = [(form, case) for form, cases in WEIGHT_GRAD_CASES.items() for case in cases]


@pytest.mark.parametrize("form,case", WEIGHT_GRAD_RUNS)
def test_weight_grad_matches_float64(emulator, tmp_path, form, case):
    """The partials kernel then weight_grad_reduce, against autograd in float64: every partial written, and dW and db
    within the storage type's tolerance."""
    shape, kernel, multiplier, stride, padding, dilation, dtype, splits, layout = WEIGHT_GRAD_CASES[form][case]
    c = shape[1]
    top, bottom, left, right = padding
    x = random_tensor(shape, dtype, layout == "channels_last")
    weight = torch.randn(c * multiplier, 1, *kernel, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(c * multiplier, dtype=torch.float64, requires_grad=True)
    y = F.conv2d(F.pad(x.double(), (left, right, top, bottom)), weight, bias, stride=stride, dilation=dilation,
                 groups=c)
    grad_output = random_tensor(tuple(y.shape), dtype, layout == "channels_last")
    y.backward(grad_output.double())

    maps = [as_map(grad_output, layout), as_map(x, layout)]
    header = _header(dtype, kernel, multiplier, stride, (top, left), dilation, splits, WEIGHT_GRAD_FORMS[form], *maps)
    raw = emulate(emulator, tmp_path, "weight_grad", header, maps)
    used, _, grad_weight, grad_bias = read_weight_grad(raw, splits, c * multiplier, kernel[0] * kernel[1], dtype)
    assert used == splits
    grad_weight = grad_weight.view(weight.shape)
    assert_close(grad_weight, weight.grad, TOLERANCE[dtype], f"emulated CUDA-core weight grad ({form}), {case}")
    # A sum of random values can nearly cancel, so the bias grad's error is measured against the sum of magnitudes.
    magnitude = grad_output.double().abs().sum(dim=(0, 2, 3))
    error = (grad_bias.double() - bias.grad).abs() / magnitude
    assert error.max() <= TOLERANCE[dtype], f"emulated CUDA-core bias grad ({form}), {case}: error {error.max():.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_a_non_finite_value_is_never_hidden(emulator, tmp_path, dtype):
    """An inf in the input and a NaN in the output grad reach every output and weight-grad tap F.conv2d's windows carry
    them to, in every form (the blocked forms multiply whole chunks, so they may reach more: README, Numerics)."""
    shape, kernel, padding = (1, 2, 8, 40), (7, 7), (3, 3, 3, 3)
    x, weight = random_tensor(shape, dtype), random_tensor((2, 1, *kernel), dtype)
    x[0, 0, 4, 13] = float("inf")
    out_hw = _output_hw(shape, kernel, (1, 1), padding, (1, 1))
    grad_output = random_tensor((1, 2, *out_hw), dtype)
    grad_output[0, 1, 4, 20] = float("nan")
    reach_y, _, reach_dw = non_finite_reach(x, grad_output, kernel, 1, (1, 1), padding, (1, 1))
    for form, code in CONV_FORMS.items():
        y = nan_buffer((1, 2, *out_hw), dtype, "nchw")
        header = _header(dtype, kernel, 1, (1, 1), (3, 3), (1, 1), 0, code, x, y)
        assert_never_hidden(f"{form} forward", written_view(emulate(emulator, tmp_path, "forward", header, [x, y, weight]),
                                                            y), reach_y)
    for form, code in WEIGHT_GRAD_FORMS.items():
        header = _header(dtype, kernel, 1, (1, 1), (3, 3), (1, 1), 2, code, grad_output, x)
        raw = emulate(emulator, tmp_path, "weight_grad", header, [grad_output, x])
        grad_weight = read_weight_grad(raw, 2, 2, kernel[0] * kernel[1], dtype, finite_inputs=False)[2]
        assert_never_hidden(f"{form} weight grad", grad_weight.view(2, 1, *kernel), reach_dw)


def test_an_unmet_precondition_stops_the_emulator_with_its_message(emulator, tmp_path):
    """The hosts' own checks run before any block: they must name what is wrong (exit code 3), not crash."""
    x, y = random_tensor((1, 1, 8, 8), torch.float32), nan_buffer((1, 1, 4, 4), torch.float32, "nchw")
    header = _header(torch.float32, (3, 3), 1, (2, 2), (1, 1), (1, 1), 0, CONV_FORMS["blocked"], x, y)
    result = run_emulator(emulator, tmp_path, "forward", header, [x, y, random_tensor((1, 1, 3, 3), torch.float32)])
    assert result.returncode == 3, result.stderr[-2000:]
    assert "emulation: the blocked kernel runs at stride 1 and dilation 1 only" in result.stderr
