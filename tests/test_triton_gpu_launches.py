"""The triton launches a GPU makes, run by the interpreter, against float64 F.conv2d.

Elsewhere on a CPU the triton backend plans for the interpreter (`interpret=True`: its own block sizes, one
weight-grad split), so the GPU's block sizes, vector widths, shifted filter rows and split reductions would first meet
data on a GPU. Here the backend plans as on a GPU with 2 SMs, and each launch it makes runs in the interpreter,
changed only where the interpreter needs it: bfloat16 dot operands widened to fp32 (kernels/common.py). Cases that
name `shifted` lower the threshold for the shifted filter rows, which a GPU takes from about 12 images. Together the
cases launch every configuration in `kernel_configs()` and every vector width, which the test asserts. As in every
CPU test, conftest's `checked_triton_launches` also checks each launch's alignment hints, memory accesses and races.
"""

from typing import NamedTuple

import pytest
import torch

from lkconv.backends import triton_backend
from lkconv.benchmarks import triton_launches
from lkconv.benchmarks.op_suite import LAYOUTS

from conftest import HAS_CUDA, TOLERANCE, assert_close, reference

pytestmark = pytest.mark.skipif(HAS_CUDA, reason="runs the kernels in the Triton interpreter (a GPU runs them itself)")


class Case(NamedTuple):
    shape: tuple  # (N, C, H, W)
    kernel: tuple
    stride: int = 1
    padding: tuple = (0, 0)
    dilation: int = 1
    multiplier: int = 1
    shifted: bool = False  # plan the shifted filter rows wherever they apply (a GPU does so from about 12 images)


# Chosen by the GPU plan each gets (rows: BLOCK_W by width, BLOCK_J by source span; whole map: BLOCK_N by batch;
# weight grad: tap tile by kernel side, BLOCK_IW by width), with several row, column and split blocks.
CASES = [
    Case((2, 2, 9, 40), (7, 7), padding=(3, 3)),  # rows 32 x 64
    Case((2, 2, 9, 40), (7, 7), padding=(3, 3), shifted=True),
    Case((2, 2, 9, 40), (3, 1), padding=(1, 0)),  # rows 32 x 32
    Case((2, 2, 9, 40), (3, 1), padding=(1, 0), shifted=True),
    Case((1, 2, 20, 12), (5, 21), padding=(2, 10)),  # rows 16 x 64
    Case((1, 2, 20, 12), (5, 21), padding=(2, 10), shifted=True),
    Case((1, 2, 20, 12), (21, 5), padding=(10, 2)),  # rows 16 x 32, weight-grad tile 32 x 16
    Case((1, 2, 20, 12), (21, 5), padding=(10, 2), shifted=True),
    Case((20, 2, 5, 5), (7, 7), padding=(3, 3)),  # whole map, 64 images
    Case((3, 2, 5, 6), (7, 7), padding=(3, 2)),  # whole map, 16 images
    Case((1, 2, 6, 40), (3, 21), padding=(1, 10)),  # weight-grad tile 16 x 32 over 32 columns
    Case((1, 2, 20, 36), (21, 3), padding=(10, 1)),  # 32 x 16 over 32 columns
    Case((1, 2, 20, 12), (21, 21), padding=(10, 10)),  # 32 x 32 over 16 columns
    Case((1, 2, 20, 36), (17, 17), padding=(8, 8)),  # 32 x 32 over 32 columns
    Case((2, 2, 6, 64), (3, 31), padding=(1, 15), shifted=True),  # RepLKNet's 31-wide band on a 64-wide map
    Case((17, 2, 14, 14), (27, 27), padding=(13, 13)),  # RepLKNet-31B stage 3 (whole map, 32 x 32 taps)
    Case((2, 2, 9, 40), (7, 7), stride=2, padding=(3, 3)),
    Case((2, 3, 11, 24), (5, 5), padding=(4, 4), dilation=2),
    Case((2, 2, 9, 24), (5, 5), padding=(2, 2), multiplier=2, shifted=True),  # channels_last maps go per channel
    Case((2, 2, 7, 10), (3, 5), padding=(1, 2), shifted=True),  # 10 wide: 2-element vectors
    Case((2, 2, 7, 13), (3, 5), padding=(1, 2)),  # 13 wide: no vectors
]

@pytest.fixture
def gpu_plans(monkeypatch):
    """The triton backend planning as on a GPU with 2 SMs, each launch run in the interpreter; returns the launches."""
    launched = []

    def run(launch: triton_launches.Launch) -> None:
        launched.append(launch)
        # The interpreter's own need (kernels/common.py mma): bfloat16 dot operands widened to fp32.
        launch.kernel[launch.grid](*launch.args, **{**launch.kwargs,
                                                    "OPERANDS_FP32": launch.args[0].dtype == torch.bfloat16})

    # Uncached: the shifted-rows threshold the cases set is not part of plan_conv's cache key.
    monkeypatch.setattr(triton_backend, "plan_conv", triton_backend.plan_conv.__wrapped__)
    with triton_launches.planned_as_on_a_gpu(run, multiprocessors=2):
        yield launched


def _run(case: Case, dtype, memory_format, monkeypatch) -> None:
    monkeypatch.setattr(triton_backend, "SHIFTED_MIN_READS_PER_ENTRY", 0 if case.shifted else 1e9)
    stride, dilation = (case.stride,) * 2, (case.dilation,) * 2
    padding = (*case.padding, *case.padding)
    x = torch.randn(case.shape).to(dtype).contiguous(memory_format=memory_format)
    channels = case.shape[1] * case.multiplier
    w = torch.randn(channels, 1, *case.kernel).to(dtype)
    b = torch.randn(channels).to(dtype)
    y = triton_backend.forward(x, w, b, stride, padding, dilation)
    dy = torch.randn(y.shape).to(dtype).contiguous(memory_format=memory_format)
    grad_input = triton_backend.input_grad(dy, w, x.shape, stride, padding, dilation)
    grad_weight, grad_bias = triton_backend.weight_grad(dy, x, case.kernel, stride, padding, dilation, True)
    expected = reference(x, w, b, stride, case.padding, dilation, dy)
    for name, actual, wanted in zip(("output", "input grad", "weight grad", "bias grad"),
                                    (y, grad_input, grad_weight, grad_bias), expected):
        assert_close(actual, wanted, TOLERANCE[dtype], f"{case} {dtype} {name}")


def _configs(launched, kernel: str) -> set:
    """The block sizes (and SHIFTED) of each launch of `kernel`."""
    return {tuple(sorted((key, value) for key, value in launch.kwargs.items()
                         if key.startswith("BLOCK") or key == "SHIFTED"))
            for launch in launched if launch.kernel.__name__ == kernel}


def _blocks(config, **extra) -> tuple:
    """A configuration's block sizes as the launches name them (BLOCK_R, ...), with `extra`."""
    blocks = {field.upper(): value for field, value in config._asdict().items() if field.startswith("block")}
    return tuple(sorted({**blocks, **extra}.items()))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_gpu_launch_computes_the_conv_and_its_grads(gpu_plans, layout, dtype, monkeypatch, poisoned_outputs):
    for case in CASES:
        _run(case, dtype, LAYOUTS[layout], monkeypatch)
    configs = triton_backend.kernel_configs()
    element_size = torch.empty(0, dtype=dtype).element_size()
    if layout == "nchw":
        expected = {
            "depthwise_rows_kernel": {_blocks(c, SHIFTED=s) for c in configs["rows"] for s in (False, True)},
            "depthwise_whole_map_kernel": {_blocks(c) for c in configs["whole_map"]},
            "depthwise_weight_grad_kernel": {_blocks(c) for c in configs["weight_grad"]},
        }
        vector_widths = {width for width in (1, 2, 4, 8) if width * element_size <= 16}
        for kernel in ("depthwise_rows_kernel", "depthwise_weight_grad_kernel"):
            widths = {launch.kwargs["ALIGN"] for launch in gpu_plans if launch.kernel.__name__ == kernel}
            assert widths == vector_widths, f"{kernel}: vector widths {widths}, not {vector_widths}"
    else:
        expected = {
            "depthwise_rows_channels_last_kernel": {
                _blocks(c) for c in configs["rows_channels_last"] if c.block_c * element_size == 64},
            "depthwise_weight_grad_channels_last_kernel": {
                _blocks(c) for c in configs["weight_grad_channels_last"] if c.block_c * element_size == 64},
        }
    for kernel, wanted in expected.items():
        assert _configs(gpu_plans, kernel) >= wanted, f"{kernel}: {wanted - _configs(gpu_plans, kernel)} never launched"
