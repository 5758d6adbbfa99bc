"""The GPU session's Triton launches, recorded on a CPU, and their ahead-of-time compile into Triton's cache."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from lkconv.benchmarks import __main__ as cli
from lkconv.benchmarks import triton_launches


def test_record_covers_every_kernel_layout_and_dtype_of_the_session():
    launches = triton_launches.record([triton_launches.Case((2, 8, 16, 32), (5, 5), padding=(2, 2))])
    names = {launch.kernel.__name__ for launch in launches}
    assert names == {"depthwise_rows_kernel", "depthwise_rows_channels_last_kernel", "depthwise_weight_grad_kernel",
                     "depthwise_weight_grad_channels_last_kernel"}
    # per dtype and layout: forward and weight grad with a bias and without, input grad
    assert len(launches) == 5 * len(triton_launches.DTYPES) * len(triton_launches.LAYOUTS)
    # passes can be chosen, and fp32 is planned exact whatever PyTorch's rule is (the benchmarks' and tests' rule)
    previous = torch.backends.cudnn.conv.fp32_precision
    torch.backends.cudnn.conv.fp32_precision = "tf32"
    try:
        forward = triton_launches.record([triton_launches.Case((2, 8, 16, 32), (5, 5), padding=(2, 2))],
                                         dtypes=(torch.float32,), passes=("forward",))
    finally:
        torch.backends.cudnn.conv.fp32_precision = previous
    assert {launch.kernel.__name__ for launch in forward} == {"depthwise_rows_kernel",
                                                              "depthwise_rows_channels_last_kernel"}
    assert len(forward) == 2 * len(triton_launches.LAYOUTS) and {l.kwargs["PRECISION"] for l in forward} == {"ieee"}
    # NCHW maps load whole 16-byte vectors of their rows; channels_last maps 64 bytes of each pixel's channels.
    loads = {(launch.args[0].dtype, launch.args[0].is_contiguous(), launch.kernel.__name__,
              launch.kwargs.get("ALIGN", launch.kwargs.get("BLOCK_C"))) for launch in launches}
    assert {entry for entry in loads if entry[1]} == {
        (dtype, True, name, 16 // dtype.itemsize) for dtype in triton_launches.DTYPES
        for name in ("depthwise_rows_kernel", "depthwise_weight_grad_kernel")}
    assert {entry for entry in loads if not entry[1]} == {
        (dtype, False, name, 64 // dtype.itemsize) for dtype in triton_launches.DTYPES
        for name in ("depthwise_rows_channels_last_kernel", "depthwise_weight_grad_channels_last_kernel")}


def test_the_session_cases_include_the_issue_shapes():
    shapes = {(case.shape, case.kernel) for case in triton_launches.SESSION_CASES}
    assert ((64, 384, 32, 32), (31, 31)) in shapes and ((64, 128, 56, 56), (31, 31)) in shapes
    assert any(case.multiplier > 1 for case in triton_launches.SESSION_CASES)
    assert any(case.stride > 1 for case in triton_launches.SESSION_CASES)


SESSION_LAUNCHES = textwrap.dedent("""
    import torch
    from triton.backends.compiler import GPUTarget

    from lkconv.backends import triton_backend
    from lkconv.benchmarks import presets, timing, triton_launches

    target = GPUTarget("cuda", 90, 32)
    precompiled = {triton_launches.bind(launch, target)[0] for r in triton_launches.PRECOMPILED
                   for launch in triton_launches.record(r.cases, 132, r.dtypes, r.layouts, r.biases, r.passes)}
    timing.set_fp32_math(False)  # as the benchmark command does (and the tests' conftest)
    made = []
    with triton_launches.planned_as_on_a_gpu(made.append, 132):
        for shape, kernel in presets.op_shapes("quick"):  # the op suite: bias-free passes, both layouts
            for dtype in (torch.float32, torch.bfloat16):
                for memory_format in (torch.contiguous_format, torch.channels_last):
                    x = torch.empty(shape, dtype=dtype, memory_format=memory_format)
                    w = torch.empty(shape[1], 1, *kernel, dtype=dtype)
                    padding = (kernel[0] // 2, kernel[1] // 2) * 2
                    y = triton_backend.forward(x, w, None, (1, 1), padding, (1, 1))
                    triton_backend.input_grad(y, w, x.shape, (1, 1), padding, (1, 1))
                    triton_backend.weight_grad(y, x, kernel, (1, 1), padding, (1, 1), False)
        for r in (16, 32):  # Table 1: fp32 NCHW stacks, forward, no bias
            for k in (3, 5, 7, 9, 13, 17, 21, 27, 29, 31):
                x, w = torch.empty(64, 384, r, r), torch.empty(384, 1, k, k)
                triton_backend.forward(x, w, None, (1, 1), (k // 2,) * 4, (1, 1))
    missing = {triton_launches.bind(launch, target)[0] for launch in made} - precompiled
    print(len(made), len(missing), sorted(key[0] for key in missing))
""")


def test_precompile_covers_the_launches_of_the_session_s_benchmarks():
    """The op suite's bias-free passes at the quick shapes and Table 1's bias-free fp32 stacks, in exact fp32, launch
    kernels that precompile compiles (HAS_BIAS and the dot precision are compile-time constants: launches with a bias
    alone, planned under PyTorch's default TF32 rule, once missed all of them but bf16's with a bias)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the JIT's own binding, as on a GPU
    run = subprocess.run([sys.executable, "-c", SESSION_LAUNCHES], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    made, missing, names = run.stdout.split(" ", 2)
    assert int(made) > 50 and missing == "0", names


WARM = textwrap.dedent("""
    import json, os, torch
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    class StubDriver:  # what warm asks of the device: its target (an H100), a device and a stream
        def get_current_device(self): return 0
        def get_current_stream(self, device=None): return 0
        def get_current_target(self): return GPUTarget("cuda", 90, 32)
        def get_active_torch_device(self): return torch.device("cpu")

    driver.set_active(StubDriver())
    from lkconv.benchmarks import triton_launches
    case = triton_launches.Case((2, 8, 16, 32), (5, 5), padding=(2, 2))
    recording = [triton_launches.Recording([case])]
    first = triton_launches.warm(recording, 0, 2) + triton_launches.warm(recording, 1, 2)
    distinct = len(triton_launches.distinct(triton_launches.record([case]), GPUTarget("cuda", 90, 32)))
    print(json.dumps([first, distinct, sorted(os.listdir(os.environ["TRITON_CACHE_DIR"]))]))
""")


def test_warm_compiles_each_distinct_launch_once_into_the_cache(tmp_path):
    """Two halves of the launches compile every distinct kernel; a second run finds all of them in the cache."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    runs = [subprocess.run([sys.executable, "-c", WARM], env=env, capture_output=True, text=True, timeout=900)
            for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr[-3000:]
    (compiled, distinct, entries), (_, _, entries_again) = (json.loads(run.stdout) for run in runs)
    assert compiled == distinct >= 6, (compiled, distinct)  # every distinct launch, split over two parts
    assert len(entries) >= compiled, "each compiled kernel has its cache entry"
    assert entries_again == entries, "the second run found every kernel in the cache"


def test_precompile_needs_a_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("checks a machine without a GPU")
    with pytest.raises(SystemExit):
        cli.main(["precompile"])
    assert "needs a GPU" in capsys.readouterr().err
