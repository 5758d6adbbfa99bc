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
    # per dtype and layout: forward, input grad, weight grad
    assert len(launches) == 3 * len(triton_launches.DTYPES) * len(triton_launches.LAYOUTS)
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
    # precompile also takes the quick preset's Table 1 stacks, which the session's third phase times
    table1 = {((64, 384, r, r), (k, k)) for r in (16, 32) for k in (3, 5, 7, 9, 13, 17, 21, 27, 29, 31)}
    assert table1 <= {(case.shape, case.kernel) for case in triton_launches.PRECOMPILED_CASES}
    assert set(triton_launches.SESSION_CASES) <= set(triton_launches.PRECOMPILED_CASES)


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
    first = triton_launches.warm([case], 0, 2) + triton_launches.warm([case], 1, 2)
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
