"""The CUDA tensor-core kernels (csrc/tensor_core*.cuh: both conv forms, both weight-grad forms) run on a CPU: their own
source, built with g++ and AddressSanitizer against host emulations of ldmatrix, mma.sync and the block barrier
(tests/cuda_emulation), and checked against F.conv2d in float64. This tests their tiling, fragment indexing and masks
without a GPU; test_gpu.py runs them for real where there is one."""

import pytest
import torch
import torch.nn.functional as F

from conftest import TF32_TOLERANCE, TOLERANCE, assert_close, assert_never_hidden, non_finite_reach
from emulation import (DTYPE_CODES, SANITIZERS, as_map, build_emulator, emulate, map_fields, nan_buffer,
                       random_tensor, read_weight_grad, tensor_of, written_view)


@pytest.fixture(scope="module", params=SANITIZERS)
def emulator(request, tmp_path_factory):
    return build_emulator("tensor_core_host.cpp", tmp_path_factory.mktemp("emulation"), request.param)


def run_conv(emulator, tmp_path, src, dst, weight, bias, origin, flip, multiplier, form) -> torch.Tensor:
    """Runs the conv kernel of `form` ("rows" or "whole_map") on (src -> dst; tensors or FarImages) as
    tensor_core_conv would launch it; returns dst as the kernel left it."""
    header = [DTYPE_CODES[weight.dtype], weight.shape[2], weight.shape[3], multiplier, *origin, int(flip),
              int(bias is not None), int(form == "whole_map"), *map_fields(src), *map_fields(dst)]
    tensors = [src, dst, weight] + ([bias] if bias is not None else [])
    return written_view(emulate(emulator, tmp_path, "conv", header, tensors), dst)


def run_weight_grad(emulator, tmp_path, grad_output, input, kernel, padding, multiplier, splits, form):
    """Runs the weight-grad partials kernel of `form` ("rows" or "whole_map") with a workspace for `splits`, as
    weight_grad.cu launches it, then the reduce, on grad_output and input (tensors or FarImages); returns
    read_weight_grad's (splits used, partials, dW, db)."""
    dtype, channels = tensor_of(input).dtype, tensor_of(grad_output).shape[1]
    header = [DTYPE_CODES[dtype], *kernel, multiplier, *padding, splits, int(form == "whole_map"),
              *map_fields(grad_output), *map_fields(input)]
    raw = emulate(emulator, tmp_path, "weight_grad", header, [grad_output, input])
    return read_weight_grad(raw, splits, channels, kernel[0] * kernel[1], dtype)


def _tolerance(dtype):
    """fp32 runs these kernels as TF32 (only where PyTorch allows TF32 for convs)."""
    return TF32_TOLERANCE if dtype == torch.float32 else TOLERANCE[dtype]


# (N, C, H, W), (kh, kw), multiplier, padding (top, bottom, left, right), dtype, with bias, src layout, dst layout.
# Each covers something the tiling must get right; they are small because every CUDA thread is a host thread.
FORWARD_CASES = {
    "31x31 same, map smaller than one block": ((1, 2, 20, 23), (31, 31), 1, (15, 15, 15, 15), torch.bfloat16,
                                               True, "nchw", "nchw"),
    "31x31 two column tiles, taller warps": ((1, 1, 40, 70), (31, 31), 1, (15, 15, 15, 15), torch.float16, True,
                                             "nchw", "nchw"),
    "two row tiles, valid padding": ((1, 1, 80, 9), (3, 5), 1, (0, 0, 0, 0), torch.bfloat16, False, "nchw",
                                     "nchw"),
    "asymmetric padding, multiplier 2": ((2, 2, 11, 13), (7, 13), 2, (1, 5, 6, 0), torch.float16, True, "nchw",
                                         "sliced"),
    "channels_last source": ((1, 3, 9, 17), (5, 5), 1, (2, 2, 2, 2), torch.bfloat16, True, "channels_last",
                             "channels_last"),
    "1x1 and even 1x2": ((1, 2, 5, 6), (1, 2), 1, (0, 0, 1, 0), torch.float16, False, "nchw", "nchw"),
    "band corners: kw = 3 mod 8 on a wide map": ((1, 1, 6, 40), (3, 11), 1, (1, 1, 5, 5), torch.bfloat16, False,
                                                 "nchw", "nchw"),
    "kw = 2 mod 16: only the last diagonal step reaches the last tap, two column tiles": (
        (1, 1, 6, 70), (3, 18), 1, (1, 1, 8, 9), torch.float16, True, "nchw", "nchw"),
    "TF32: kw = 2 mod 8, the last diagonal step": ((1, 1, 5, 30), (3, 10), 1, (1, 1, 4, 5), torch.float32, False,
                                                   "nchw", "nchw"),
    "deep top padding: leading kernel rows skipped": ((1, 1, 20, 9), (41, 3), 1, (36, 4, 1, 1), torch.float16,
                                                      True, "nchw", "nchw"),
    "SLaK 51x5": ((1, 1, 12, 10), (51, 5), 1, (25, 25, 2, 2), torch.bfloat16, True, "nchw", "nchw"),
    "TF32: 31x31 same, two column tiles": ((1, 1, 21, 70), (31, 31), 1, (15, 15, 15, 15), torch.float32, True,
                                           "nchw", "nchw"),
    "TF32: non-square, multiplier 2, strided output": ((1, 2, 40, 13), (9, 4), 2, (4, 4, 1, 2), torch.float32,
                                                       False, "channels_last", "sliced"),
    "63x63 on a map smaller than the kernel": ((1, 1, 8, 8), (63, 63), 1, (31, 31, 31, 31), torch.float16, False,
                                                "nchw", "nchw"),
    # Rows of a whole number of 16-byte vectors: the tile is staged in vectors from a boundary `shift` columns early.
    "16-byte rows: 31x31 same (shift 1), two column tiles, taller warps": (
        (1, 2, 36, 72), (31, 31), 1, (15, 15, 15, 15), torch.bfloat16, True, "nchw", "nchw"),
    "16-byte rows: kw = 17 with shift 5 needs one more diagonal step": (
        (1, 1, 6, 72), (3, 17), 1, (1, 1, 3, 13), torch.bfloat16, False, "nchw", "nchw"),
    "TF32, 16-byte rows: shift 2, multiplier 2": ((1, 2, 20, 68), (9, 13), 2, (4, 4, 6, 6), torch.float32, False,
                                                 "nchw", "sliced"),
    "int64 offsets: images 2^31 elements apart, in and out": ((2, 2, 12, 24), (7, 7), 1, (3, 3, 3, 3),
                                                              torch.float16, True, "far", "far"),
}


# The whole-map form (one dense GEMM per channel), on maps the kernel covers or nearly covers; same fields.
WHOLE_MAP_FORWARD_CASES = {
    "RepLKNet stage 4 shape: 7x7 with 13x13, odd width": ((3, 2, 7, 7), (13, 13), 1, (6, 6, 6, 6), torch.bfloat16,
                                                          True, "nchw", "nchw"),
    "kernel short of the map, multiplier 2": ((2, 2, 9, 5), (5, 3), 2, (2, 2, 1, 1), torch.float16, True, "nchw",
                                              "sliced"),
    "several chunks and pixel tiles": ((2, 1, 12, 12), (25, 25), 1, (12, 12, 12, 12), torch.bfloat16, False, "nchw",
                                       "nchw"),
    "batch 40: 32 images per warp, partial image tile": ((40, 1, 4, 6), (5, 5), 1, (2, 2, 2, 2), torch.float16,
                                                         True, "channels_last", "nchw"),
    "asymmetric padding, output smaller than the input": ((2, 1, 10, 11), (7, 9), 1, (0, 3, 4, 1), torch.bfloat16,
                                                          True, "nchw", "channels_last"),
    "TF32: odd width, multiplier 2": ((3, 2, 7, 9), (11, 11), 2, (5, 5, 5, 5), torch.float32, True, "channels_last",
                                      "sliced"),
    "TF32: two chunks": ((2, 1, 9, 9), (17, 17), 1, (8, 8, 8, 8), torch.float32, False, "nchw", "nchw"),
    "int64 offsets: images 2^31 elements apart, in and out": ((2, 2, 7, 7), (13, 13), 1, (6, 6, 6, 6),
                                                              torch.bfloat16, True, "far", "far"),
}

FORWARD_RUNS = [("rows", case) for case in FORWARD_CASES] + [("whole_map", case) for case in WHOLE_MAP_FORWARD_CASES]


@pytest.mark.parametrize("form,case", FORWARD_RUNS)
def test_forward_matches_float64(emulator, tmp_path, form, case):
    shape, kernel, multiplier, (top, bottom, left, right), dtype, with_bias, src_layout, dst_layout = \
        (FORWARD_CASES if form == "rows" else WHOLE_MAP_FORWARD_CASES)[case]
    n, c, h, w = shape
    x = random_tensor(shape, dtype, src_layout == "channels_last")
    weight = random_tensor((c * multiplier, 1, *kernel), dtype)
    bias = random_tensor((c * multiplier,), dtype) if with_bias else None
    out_hw = (h + top + bottom - kernel[0] + 1, w + left + right - kernel[1] + 1)
    dst = nan_buffer((n, c * multiplier, *out_hw), dtype, dst_layout)

    actual = run_conv(emulator, tmp_path, as_map(x, src_layout), dst, weight, bias, (-top, -left), False, multiplier,
                      form)
    expected = F.conv2d(F.pad(x.double(), (left, right, top, bottom)), weight.double(),
                        None if bias is None else bias.double(), groups=c)
    assert_close(actual, expected, _tolerance(dtype), f"emulated tensor-core forward ({form}), {case}")


# (N, C, H, W) of the input, (kh, kw), multiplier, padding, dtype, grad_output layout.
INPUT_GRAD_CASES = {
    "31x31 same, kernel larger than the map": ((1, 2, 12, 12), (31, 31), 1, (15, 15, 15, 15), torch.bfloat16,
                                               "nchw"),
    "multiplier 3, non-square": ((1, 2, 10, 21), (5, 9), 3, (2, 1, 4, 0), torch.float16, "nchw"),
    "channels_last grad_output, taller warps": ((1, 1, 37, 11), (7, 7), 1, (3, 3, 3, 3), torch.bfloat16,
                                                "channels_last"),
    "TF32: 13x13, multiplier 2": ((1, 2, 15, 17), (13, 13), 2, (6, 6, 6, 6), torch.float32, "nchw"),
    "16-byte grad_output rows: shift 5, multiplier 2": ((1, 2, 12, 40), (5, 7), 2, (2, 2, 3, 3), torch.float16,
                                                       "nchw"),
    "int64 offsets: images 2^31 elements apart, in and out": ((2, 2, 10, 24), (7, 7), 1, (3, 3, 3, 3),
                                                              torch.bfloat16, "far"),
}


WHOLE_MAP_INPUT_GRAD_CASES = {
    "10x10 with 19x19, multiplier 3": ((2, 2, 10, 10), (19, 19), 3, (9, 9, 9, 9), torch.float16, "nchw"),
    "channels_last grad_output, asymmetric padding": ((3, 1, 9, 7), (9, 5), 1, (2, 6, 4, 0), torch.bfloat16,
                                                      "channels_last"),
    "TF32: 7x7 with 13x13": ((2, 2, 7, 7), (13, 13), 1, (6, 6, 6, 6), torch.float32, "nchw"),
    "int64 offsets: images 2^31 elements apart, in and out": ((2, 1, 7, 7), (13, 13), 2, (6, 6, 6, 6),
                                                              torch.float16, "far"),
}

INPUT_GRAD_RUNS = [("rows", case) for case in INPUT_GRAD_CASES] + \
    [("whole_map", case) for case in WHOLE_MAP_INPUT_GRAD_CASES]


@pytest.mark.parametrize("form,case", INPUT_GRAD_RUNS)
def test_input_grad_matches_float64(emulator, tmp_path, form, case):
    shape, kernel, multiplier, (top, bottom, left, right), dtype, layout = \
        (INPUT_GRAD_CASES if form == "rows" else WHOLE_MAP_INPUT_GRAD_CASES)[case]
    n, c, h, w = shape
    weight = random_tensor((c * multiplier, 1, *kernel), dtype)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    y = F.conv2d(F.pad(x, (left, right, top, bottom)), weight.double(), groups=c)
    grad_output = random_tensor(tuple(y.shape), dtype, layout == "channels_last")
    y.backward(grad_output.double())
    dst = nan_buffer(shape, dtype, "far" if layout == "far" else "nchw")

    origin = (top - (kernel[0] - 1), left - (kernel[1] - 1))
    actual = run_conv(emulator, tmp_path, as_map(grad_output, layout), dst, weight, None, origin, True, multiplier,
                      form)
    assert_close(actual, x.grad, _tolerance(dtype), f"emulated tensor-core input grad ({form}), {case}")


# (N, C, H, W) of the input, (kh, kw), multiplier, padding, dtype, splits, layout of grad_output and input.
WEIGHT_GRAD_CASES = {
    "31x31 same, one split": ((2, 1, 9, 12), (31, 31), 1, (15, 15, 15, 15), torch.bfloat16, 1, "nchw"),
    "31x31, a last chunk 18 wide: only the last diagonal step reaches its last column": (
        (1, 1, 3, 82), (31, 31), 1, (15, 15, 15, 15), torch.bfloat16, 1, "nchw"),
    "splits across images and strips": ((3, 1, 37, 7), (5, 3), 1, (2, 2, 1, 1), torch.float16, 4, "nchw"),
    "two column chunks, multiplier 2": ((1, 2, 5, 70), (3, 7), 2, (1, 1, 3, 3), torch.bfloat16, 2, "nchw"),
    "four tap tiles, asymmetric padding": ((1, 1, 6, 5), (35, 40), 1, (20, 14, 9, 30), torch.float16, 1, "nchw"),
    "17x17: partial m- and n-tiles, width 2 mod 8": ((1, 1, 20, 10), (17, 17), 1, (8, 8, 8, 8), torch.bfloat16, 2,
                                                      "nchw"),
    "channels_last, kernel larger than the map": ((2, 3, 6, 6), (13, 13), 1, (6, 6, 6, 6), torch.bfloat16, 3,
                                                  "channels_last"),
    "TF32: two tap tiles, two column chunks": ((2, 1, 7, 66), (9, 33), 1, (4, 4, 16, 16), torch.float32, 3, "nchw"),
    # Input rows of a whole number of 16-byte vectors: x is staged in vectors from a boundary `shift` columns early.
    "16-byte rows: 29x29 same (shift 2 adds a diagonal step), two column chunks": (
        (1, 2, 5, 80), (29, 29), 1, (14, 14, 14, 14), torch.bfloat16, 2, "nchw"),
    "TF32, 16-byte rows: shift 2, partial tap tile": ((2, 1, 6, 36), (9, 13), 1, (4, 4, 6, 6), torch.float32, 1,
                                                      "nchw"),
    "int64 offsets: images 2^31 elements apart, a split per image": ((2, 2, 6, 16), (7, 7), 1, (3, 3, 3, 3),
                                                                     torch.bfloat16, 2, "far"),
}


# The Gram-matrix form, on maps the kernel covers or nearly covers (rows at most 64 wide); same fields.
WHOLE_MAP_WEIGHT_GRAD_CASES = {
    "RepLKNet stage 4 shape: 7x7 with 13x13, two splits asked, one chunk used": (
        (5, 2, 7, 7), (13, 13), 1, (6, 6, 6, 6), torch.bfloat16, 2, "nchw"),
    "14x14 with 27x27: four x tiles, one row short": ((3, 1, 14, 14), (27, 27), 1, (13, 13, 13, 13), torch.float16, 1,
                                                      "nchw"),
    "kernel short of the map: skipped tile pairs": ((2, 1, 20, 9), (5, 3), 1, (2, 2, 1, 1), torch.bfloat16, 1,
                                                    "nchw"),
    "a tile pair that meets kernel row 0 only": ((2, 1, 12, 16), (3, 5), 1, (1, 1, 2, 2), torch.float16, 1, "nchw"),
    "asymmetric padding, multiplier 2, channels_last": ((2, 2, 9, 11), (7, 9), 2, (0, 3, 4, 1), torch.float16, 1,
                                                        "channels_last"),
    "70 images: two image chunks in one split": ((70, 1, 5, 6), (5, 5), 1, (2, 2, 2, 2), torch.bfloat16, 1, "nchw"),
    "more splits than images": ((2, 1, 6, 6), (7, 7), 1, (3, 3, 3, 3), torch.bfloat16, 3, "nchw"),
    "TF32: 40 images in two splits of whole chunks, odd width": ((40, 1, 7, 9), (11, 11), 1, (5, 5, 5, 5),
                                                                  torch.float32, 2, "nchw"),
    "130 images, two splits: two chunks and a partial one": ((130, 1, 5, 6), (5, 5), 1, (2, 2, 2, 2), torch.bfloat16,
                                                              2, "nchw"),
    "RepLKNet stage 2 shape: 28x28 with 29x29, dy in four passes": ((2, 1, 28, 28), (29, 29), 1, (14, 14, 14, 14),
                                                                     torch.float16, 1, "nchw"),
    "rows 40 wide: two dy passes, x tiles skipped per pass": ((3, 1, 8, 40), (5, 7), 1, (2, 2, 3, 3), torch.bfloat16,
                                                              2, "nchw"),
    "TF32: two dy passes, multiplier 2, channels_last": ((2, 2, 9, 33), (3, 5), 2, (1, 1, 2, 2), torch.float32, 1,
                                                         "channels_last"),
    "int64 offsets: images 2^31 elements apart": ((2, 2, 7, 7), (13, 13), 1, (6, 6, 6, 6), torch.float16, 1, "far"),
}

WEIGHT_GRAD_RUNS = [("rows", case) for case in WEIGHT_GRAD_CASES] + \
    [("whole_map", case) for case in WHOLE_MAP_WEIGHT_GRAD_CASES]


@pytest.mark.parametrize("form,case", WEIGHT_GRAD_RUNS)
def test_weight_grad_partials_add_up_to_float64(emulator, tmp_path, form, case):
    """The splits' fp32 partial sums, added in order as weight_grad_reduce does, against autograd in float64: the
    products of 16-bit values are exact in fp32, so only fp32 summation error is allowed (TF32 rounds its inputs)."""
    shape, kernel, multiplier, (top, bottom, left, right), dtype, splits, layout = \
        (WEIGHT_GRAD_CASES if form == "rows" else WHOLE_MAP_WEIGHT_GRAD_CASES)[case]
    n, c, h, w = shape
    x = random_tensor(shape, dtype, layout == "channels_last")
    weight = torch.randn(c * multiplier, 1, *kernel, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(c * multiplier, dtype=torch.float64, requires_grad=True)
    y = F.conv2d(F.pad(x.double(), (left, right, top, bottom)), weight, bias, groups=c)
    grad_output = random_tensor(tuple(y.shape), dtype, layout == "channels_last")
    y.backward(grad_output.double())

    used, partials, grad_weight, grad_bias = run_weight_grad(emulator, tmp_path, as_map(grad_output, layout),
                                                             as_map(x, layout), kernel, (top, left), multiplier,
                                                             splits, form)
    # The Gram-matrix form takes no more splits than it has image chunks (64 images, 32 in TF32).
    chunk = 32 if dtype == torch.float32 else 64
    assert used == (min(splits, -(-n // chunk)) if form == "whole_map" else splits)
    total = partials[0].clone()
    for split in range(1, used):
        total += partials[split]
    taps = kernel[0] * kernel[1]
    tolerance = TF32_TOLERANCE if dtype == torch.float32 else TOLERANCE[torch.float32]
    assert_close(total[:, :taps].reshape(weight.shape), weight.grad, tolerance,
                 f"emulated tensor-core weight grad ({form}), {case}")
    # The bias grad sums dy in fp32 (not rounded to TF32). A sum of random values can nearly cancel, so its error is
    # measured against the sum of magnitudes, the scale fp32 summation error grows with.
    magnitude = grad_output.double().abs().sum(dim=(0, 2, 3))
    error = (total[:, taps].double() - bias.grad).abs() / magnitude
    assert error.max() <= TOLERANCE[torch.float32], f"emulated tensor-core bias grad ({form}), {case}: " \
        f"error {error.max():.2e}"
    # The reduce adds the same partials in the same order, then rounds to the storage type.
    assert_close(grad_weight.view(weight.shape), weight.grad, _tolerance(dtype), f"reduced weight grad ({form}), {case}")
    assert torch.equal(grad_bias, total[:, taps].to(dtype)), f"reduced bias grad ({form}), {case}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_a_non_finite_value_is_never_hidden(emulator, tmp_path, dtype):
    """An inf in the input and a NaN in the output grad reach every output and weight-grad tap F.conv2d's windows carry
    them to, in both forms of each (their GEMMs also multiply it by zeros, so they may reach more: README, Numerics)."""
    shape, kernel, padding = (2, 2, 7, 9), (5, 7), (2, 2, 3, 3)
    x, weight = random_tensor(shape, dtype), random_tensor((2, 1, *kernel), dtype)
    x[1, 0, 3, 2] = float("inf")
    grad_output = random_tensor(shape, dtype)  # 'same' padding: the output is the input's size
    grad_output[0, 1, 5, 6] = float("nan")
    reach_y, _, reach_dw = non_finite_reach(x, grad_output, kernel, 1, (1, 1), padding, (1, 1))
    for form in ("rows", "whole_map"):
        y = run_conv(emulator, tmp_path, x, nan_buffer(shape, dtype, "nchw"), weight, None, (-2, -3), False, 1, form)
        assert_never_hidden(f"{form} forward", y, reach_y)
        header = [DTYPE_CODES[dtype], *kernel, 1, 2, 3, 2, int(form == "whole_map"), *map_fields(grad_output),
                  *map_fields(x)]
        raw = emulate(emulator, tmp_path, "weight_grad", header, [grad_output, x])
        grad_weight = read_weight_grad(raw, 2, 2, kernel[0] * kernel[1], dtype, finite_inputs=False)[2]
        assert_never_hidden(f"{form} weight grad", grad_weight.view(2, 1, *kernel), reach_dw)
