"""lkconv._C, the CUDA extension, on any machine: it is built wherever nvcc is, it loads with a CPU-only torch,
its ops are registered for CUDA, and calls it cannot serve are answered cleanly (numerics are GPU tests)."""

import importlib.machinery
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import lkconv
from lkconv.backends import cuda_backend

OPS = ("cuda_forward", "cuda_input_grad", "cuda_weight_grad")
needs_cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")


def kernel_name(pass_name, dtype, allow_tf32, kernel, stride, dilation):
    """The extension's kernel name for a (64, 8, 128, 128) input and a 128x128 output: a map too large for the
    whole-map form, so the geometry alone decides."""
    return torch.ops.lkconv.cuda_kernel_name(pass_name, dtype, allow_tf32, [64, 8, 128, 128], [128, 128], kernel,
                                             stride, dilation)


@pytest.fixture(autouse=True)
def default_backend():
    lkconv.set_backend(None)
    yield
    lkconv.set_backend(None)


def test_extension_is_built_wherever_nvcc_is():
    """setup.py builds lkconv._C when nvcc is found; a build that silently fell back to pure Python fails here."""
    if shutil.which("nvcc") is None:
        assert not cuda_backend.extension_loaded()
        assert "without its CUDA extension" in cuda_backend.unavailable_reason()
    else:
        assert cuda_backend.extension_loaded(), cuda_backend.unavailable_reason()


def test_a_package_installed_without_the_extension_stays_quiet_and_says_why(tmp_path):
    """A pure-Python install (no nvcc, or LKCONV_SKIP_CUDA_BUILD=1) has no lkconv/_C*.so. Importing and using it must
    not warn about a broken build: the cuda backend names the missing extension, and auto answers with PyTorch."""
    shutil.copytree(Path(lkconv.__file__).parent, tmp_path / "lkconv",
                    ignore=shutil.ignore_patterns("_C*", "__pycache__"))
    script = f"""
import sys, warnings
sys.path.insert(0, {str(tmp_path)!r})
# An editable install's finder maps lkconv._C to the source tree's library; a pure-Python install has none.
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
warnings.simplefilter("error")
import torch, lkconv
from lkconv.backends import cuda_backend
assert lkconv.__file__.startswith({str(tmp_path)!r}), lkconv.__file__
assert "cuda" not in lkconv.available_backends()
x, w = torch.randn(1, 2, 8, 8, dtype=torch.float64), torch.randn(2, 1, 3, 3, dtype=torch.float64)
y = torch.nn.functional.conv2d(x, w, padding=1, groups=2)
assert torch.allclose(lkconv.depthwise_conv2d(x, w, padding=1), y, rtol=1e-12, atol=1e-12)
print(cuda_backend.unavailable_reason())
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "installed without its CUDA extension" in result.stdout and "pip install -v" in result.stdout


@pytest.mark.skipif(not cuda_backend.extension_loaded(), reason="lkconv._C is not built (no nvcc at install)")
class TestLoadedExtension:
    @pytest.mark.parametrize("op", OPS)
    def test_ops_are_registered_for_cuda_only(self, op):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"lkconv::{op}", "CUDA")
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(f"lkconv::{op}", "CPU")

    def test_it_reports_the_cuda_runtime_it_links_and_the_driver_s(self):
        """The runtime is the CUDA of the toolkit that built it (found as setup.py finds it); a GPU machine that
        passes the other GPU tests has a driver for it, a machine without one reports 0."""
        runtime, driver = torch.ops.lkconv.cuda_versions()
        spec = importlib.util.spec_from_file_location("lkconv_setup", Path(lkconv.__file__).parent.parent / "setup.py")
        setup = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(setup)  # not __main__: defines the helpers, builds nothing
        home = setup.cuda_home()
        assert home is not None, "lkconv._C is built, but setup.py finds no CUDA toolkit now"
        release = re.search(r"release (\d+)\.(\d+)", subprocess.run([str(home / "bin" / "nvcc"), "--version"],
                                                                    capture_output=True, text=True).stdout)
        assert runtime == int(release.group(1)) * 1000 + int(release.group(2)) * 10, (runtime, release.group(0))
        assert driver // 1000 >= runtime // 1000 if torch.cuda.is_available() else driver >= 0, (runtime, driver)

    def test_a_driver_older_than_its_cuda_runtime_turns_the_backend_off_and_says_why(self, monkeypatch):
        """torch built for an older CUDA runs on such a driver, where every launch of ours would fail: auto must
        take another backend, and forcing cuda must name the versions and the fix."""
        from lkconv import backends

        monkeypatch.setattr(torch.ops.lkconv, "cuda_versions", lambda: [13000, 12080])
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        cuda_backend._driver_too_old.cache_clear()
        backends._choose.cache_clear()
        try:
            reason = cuda_backend.unavailable_reason()
            assert "built with CUDA 13.0" in reason and "supports CUDA up to 12.8" in reason, reason
            assert "pip install" in reason, reason
            with pytest.raises(lkconv.BackendUnavailableError, match="supports CUDA up to 12.8"):
                lkconv.set_backend("cuda")
            assert "cuda" not in lkconv.available_backends()
            # auto leaves it out: with triton unusable too (float64), PyTorch answers and says why cuda cannot.
            choice = backends.choose(torch.device("cuda", 0), torch.float64)
            assert choice.module.name == "torch" and "supports CUDA up to 12.8" in choice.reason, choice.reason
        finally:
            cuda_backend._driver_too_old.cache_clear()
            backends._choose.cache_clear()
        # An older driver of the same major version runs it (CUDA's minor-version compatibility), and a driver
        # version of 0 (none found by the extension's runtime, where torch found one) leaves the verdict to torch.
        for versions in ([12080, 12040], [13000, 0]):
            monkeypatch.setattr(torch.ops.lkconv, "cuda_versions", lambda versions=versions: versions)
            assert cuda_backend.unavailable_reason() is None, versions
            cuda_backend._driver_too_old.cache_clear()

    def test_calling_an_op_with_cpu_tensors_raises_instead_of_crashing(self):
        x, w = torch.randn(1, 2, 8, 8), torch.randn(2, 1, 3, 3)
        out = torch.empty(1, 2, 8, 8)
        with pytest.raises(NotImplementedError, match=r"cuda_forward.*CPU"):
            torch.ops.lkconv.cuda_forward(x, w, None, [1, 1], [1, 1, 1, 1], [1, 1], False, out)

    @pytest.mark.parametrize("pass_name,dtype,kernel,stride,dilation,expected", [  # TF32 not allowed
        ("forward", torch.float32, [31, 31], [1, 1], [1, 1], "forward_blocked"),
        ("forward", torch.float32, [51, 5], [1, 1], [1, 1], "forward_blocked"),  # SLaK
        ("forward", torch.float32, [63, 63], [1, 1], [1, 1], "forward_tiled"),  # the blocked tile would not fit
        ("forward", torch.float32, [5, 51], [2, 2], [1, 1], "forward_tiled"),
        ("forward", torch.float32, [13, 13], [1, 1], [2, 2], "forward_tiled"),
        ("forward", torch.float32, [63, 63], [2, 2], [2, 2], "forward_general"),  # the tile would not fit
        ("forward", torch.float32, [31, 31], [1, 1], [1000, 1], "forward_general"),  # once overflowed 32 bits
        ("forward", torch.bfloat16, [31, 31], [1, 1], [1, 1], "forward_tensor_core"),
        ("forward", torch.float16, [5, 51], [1, 1], [1, 1], "forward_tensor_core"),
        ("forward", torch.bfloat16, [63, 63], [1, 1], [1, 1], "forward_tensor_core"),
        ("forward", torch.bfloat16, [101, 101], [1, 1], [1, 1], "forward_general"),  # no tile would fit
        ("forward", torch.bfloat16, [13, 13], [2, 2], [1, 1], "forward_tiled"),  # stride 2: CUDA cores
        ("input_grad", torch.float32, [31, 31], [1, 1], [1, 1], "input_grad_blocked"),
        ("input_grad", torch.float16, [31, 31], [1, 1], [1, 1], "input_grad_tensor_core"),
        ("input_grad", torch.bfloat16, [51, 5], [1, 1], [1, 1], "input_grad_tensor_core"),
        ("input_grad", torch.float32, [13, 13], [1, 1], [3, 3], "input_grad_tiled"),
        ("input_grad", torch.bfloat16, [13, 13], [1, 1], [3, 3], "input_grad_tiled"),  # dilation: CUDA cores
        ("input_grad", torch.float32, [7, 7], [2, 2], [1, 1], "input_grad_general"),
        ("weight_grad", torch.float32, [31, 31], [1, 1], [1, 1], "weight_grad_blocked_partials + weight_grad_reduce"),
        ("weight_grad", torch.bfloat16, [31, 31], [1, 1], [1, 1],
         "weight_grad_tensor_core_partials + weight_grad_reduce"),
        ("weight_grad", torch.float16, [101, 101], [1, 1], [1, 1],  # tap tiles: any kernel size
         "weight_grad_tensor_core_partials + weight_grad_reduce"),
        ("weight_grad", torch.bfloat16, [7, 7], [2, 2], [1, 1], "weight_grad_partials + weight_grad_reduce"),
        ("weight_grad", torch.float32, [63, 63], [1, 1], [1, 1], "weight_grad_blocked_partials + weight_grad_reduce"),
        ("weight_grad", torch.float32, [7, 7], [2, 2], [1, 1], "weight_grad_partials + weight_grad_reduce"),
        ("weight_grad", torch.float32, [101, 101], [1, 1], [1, 1], "weight_grad_partials + weight_grad_reduce"),
    ])
    def test_kernel_names_follow_the_dtype_and_geometry(self, pass_name, dtype, kernel, stride, dilation, expected):
        assert kernel_name(pass_name, dtype, False, kernel, stride, dilation) == expected

    @pytest.mark.parametrize("pass_name,dtype,kernel,stride,expected", [
        ("forward", torch.float32, [31, 31], [1, 1], "forward_tensor_core (tf32)"),
        ("forward", torch.float32, [101, 101], [1, 1], "forward_general"),  # no tile would fit
        ("forward", torch.float32, [31, 31], [2, 2], "forward_tiled"),  # stride 2: exact CUDA cores
        ("input_grad", torch.float32, [51, 5], [1, 1], "input_grad_tensor_core (tf32)"),
        ("weight_grad", torch.float32, [31, 31], [1, 1], "weight_grad_tensor_core_partials (tf32) + weight_grad_reduce"),
        ("forward", torch.bfloat16, [31, 31], [1, 1], "forward_tensor_core"),  # TF32 concerns fp32 only
    ])
    def test_allowed_tf32_moves_fp32_at_stride_1_to_tensor_cores(self, pass_name, dtype, kernel, stride, expected):
        assert kernel_name(pass_name, dtype, True, kernel, stride, [1, 1]) == expected

    @pytest.mark.parametrize("pass_name,dtype,tf32,input_size,kernel,expected", [
        ("forward", torch.bfloat16, False, (64, 512, 14, 14), 27, "forward_tensor_core_whole_map"),  # RepLKNet stage 3
        ("input_grad", torch.float16, False, (64, 512, 14, 14), 27, "input_grad_tensor_core_whole_map"),
        ("forward", torch.bfloat16, False, (64, 1024, 7, 7), 13, "forward_tensor_core_whole_map"),  # stage 4
        ("forward", torch.float32, True, (64, 1024, 7, 7), 13, "forward_tensor_core_whole_map (tf32)"),
        ("input_grad", torch.float32, True, (64, 512, 14, 14), 27, "input_grad_tensor_core_whole_map (tf32)"),
        ("forward", torch.float32, False, (64, 512, 14, 14), 27, "forward_blocked"),  # exact fp32: CUDA cores
        ("forward", torch.bfloat16, False, (1, 512, 14, 14), 27, "forward_tensor_core"),  # one image: GEMM rows idle
        ("forward", torch.bfloat16, False, (64, 128, 56, 56), 31, "forward_tensor_core"),  # kernel covers little
        ("forward", torch.bfloat16, False, (64, 384, 64, 64), 31, "forward_tensor_core"),
        ("forward", torch.bfloat16, False, (64, 128, 28, 28), 13, "forward_tensor_core"),  # whole map: 0.5-0.8x the work
        ("weight_grad", torch.bfloat16, False, (64, 512, 14, 14), 27,
         "weight_grad_tensor_core_whole_map_partials + weight_grad_reduce"),
        ("weight_grad", torch.float32, True, (64, 1024, 7, 7), 13,
         "weight_grad_tensor_core_whole_map_partials (tf32) + weight_grad_reduce"),
        ("weight_grad", torch.float32, False, (64, 1024, 7, 7), 13,  # exact fp32: CUDA cores
         "weight_grad_blocked_partials + weight_grad_reduce"),
        ("weight_grad", torch.bfloat16, False, (1, 512, 14, 14), 27,
         "weight_grad_tensor_core_partials + weight_grad_reduce"),
        ("weight_grad", torch.bfloat16, False, (64, 384, 32, 32), 31,  # dy staged in passes of tiles
         "weight_grad_tensor_core_whole_map_partials + weight_grad_reduce"),
        ("weight_grad", torch.float16, False, (64, 256, 28, 28), 29,  # RepLKNet stage 2
         "weight_grad_tensor_core_whole_map_partials + weight_grad_reduce"),
        ("weight_grad", torch.bfloat16, False, (64, 128, 56, 56), 31,  # the forward keeps its row form here
         "weight_grad_tensor_core_partials + weight_grad_reduce"),
    ])
    def test_small_maps_the_kernel_covers_run_the_whole_map_form(self, pass_name, dtype, tf32, input_size, kernel,
                                                                  expected):
        """'same' padding: the output is the input's size."""
        name = torch.ops.lkconv.cuda_kernel_name(pass_name, dtype, tf32, list(input_size), list(input_size[2:]),
                                                 [kernel, kernel], [1, 1], [1, 1])
        assert name == expected

    def test_kernel_name_rejects_bad_arguments_by_name(self):
        with pytest.raises(RuntimeError, match="pass_name must be forward, input_grad or weight_grad; got 'backward'"):
            kernel_name("backward", torch.float32, False, [3, 3], [1, 1], [1, 1])
        with pytest.raises(RuntimeError, match=r"stride entries must be in \[1, 2\^30\]; got \[0, 1\]"):
            kernel_name("forward", torch.float32, False, [3, 3], [0, 1], [1, 1])
        with pytest.raises(RuntimeError, match=r"dilation entries must be in \[1, 2\^30\]"):
            kernel_name("forward", torch.float32, False, [3, 3], [1, 1], [1, 2**31])
        with pytest.raises(RuntimeError, match="kernel must have 2 entries; got 3"):
            kernel_name("forward", torch.float32, False, [3, 3, 3], [1, 1], [1, 1])
        with pytest.raises(RuntimeError, match="dtype must be float32, float16 or bfloat16; got Double"):
            kernel_name("forward", torch.float64, False, [3, 3], [1, 1], [1, 1])
        with pytest.raises(RuntimeError, match=r"input_size must be \(N, C, H, W\); got \[8, 8, 8\]"):
            torch.ops.lkconv.cuda_kernel_name("forward", torch.float32, False, [8, 8, 8], [8, 8], [3, 3], [1, 1],
                                              [1, 1])
        with pytest.raises(RuntimeError, match=r"output_size must be \(OH, OW\), both positive; got \[0, 8\]"):
            torch.ops.lkconv.cuda_kernel_name("forward", torch.float32, False, [1, 8, 8, 8], [0, 8], [3, 3], [1, 1],
                                              [1, 1])
        # Each of these divided by zero in the planners (the process died of SIGFPE) before the binding refused them.
        with pytest.raises(RuntimeError, match=r"kernel area \(kh \* kw\) must be <= 2\^30; got \[65536, 524285\]"):
            kernel_name("weight_grad", torch.float32, False, [65536, 524285], [1, 1], [1, 1])
        with pytest.raises(RuntimeError, match=r"input_size must have N, C >= 0 and H, W >= 1; got \[64, 512, 14, 0\]"):
            torch.ops.lkconv.cuda_kernel_name("weight_grad", torch.bfloat16, False, [64, 512, 14, 0], [14, 14],
                                              [27, 27], [1, 1], [1, 1])


@needs_cpu_only
def test_auto_falls_back_and_a_forced_cuda_backend_refuses_cpu_tensors():
    x, w = torch.randn(1, 2, 8, 8), torch.randn(2, 1, 3, 3)
    assert lkconv.explain(x, w, padding=1).backend == "torch"
    expected = torch.nn.functional.conv2d(x, w, padding=1, groups=2)
    assert torch.equal(lkconv.depthwise_conv2d(x, w, padding=1), expected)
    with pytest.raises(lkconv.BackendUnavailableError, match=r"'cuda'.*no CUDA GPU"):
        lkconv.set_backend("cuda")


def test_unsupported_reasons_name_the_tensor():
    assert "CUDA tensors" in cuda_backend.unsupported_reason(torch.device("cpu"), torch.float32)
    assert "float64" in cuda_backend.unsupported_reason(torch.device("cuda", 0), torch.float64)


def test_a_broken_extension_warns_once_and_auto_carries_on(monkeypatch):
    """lkconv._C that exists but cannot load (e.g. built against another torch): one warning naming the reinstall
    command, the cuda backend reports why, and auto still answers."""
    import builtins
    import warnings

    real_import = builtins.__import__

    def failing_import(name, globals=None, locals=None, fromlist=(), level=0):
        if "_C" in (fromlist or ()) and name == "lkconv":
            raise ImportError("undefined symbol: _ZN3c10simulated")
        return real_import(name, globals, locals, fromlist, level)

    real_find_spec = importlib.util.find_spec

    def built_extension_spec(name, package=None):  # the library's file is there, on any machine
        return importlib.machinery.ModuleSpec(name, None) if name == "lkconv._C" else real_find_spec(name, package)

    monkeypatch.setattr(builtins, "__import__", failing_import)
    monkeypatch.setattr(importlib.util, "find_spec", built_extension_spec)
    cuda_backend._import_failure.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            first, second = cuda_backend.unavailable_reason(), cuda_backend.unavailable_reason()
        assert first == second and "failed to import" in first and "simulated" in first
        assert len([w for w in caught if "Reinstall with" in str(w.message)]) == 1
        x, w = torch.randn(1, 2, 8, 8), torch.randn(2, 1, 3, 3)
        assert torch.allclose(lkconv.depthwise_conv2d(x, w, padding=1),
                              torch.nn.functional.conv2d(x, w, padding=1, groups=2))
    finally:
        monkeypatch.undo()
        cuda_backend._import_failure.cache_clear()


def test_the_reinstall_command_fits_the_install_it_is_given_for(tmp_path):
    """An editable install is rebuilt from its own folder, which the command names; an install from a wheel has no
    source folder, so the command asks for the user's (a -e on site-packages would fail)."""
    source = tmp_path / "src"
    (source / "csrc").mkdir(parents=True)
    (source / "setup.py").write_text("")
    (source / "lkconv").mkdir()
    editable = cuda_backend.reinstall_command(source / "lkconv")
    assert f"--force-reinstall --no-deps -e {source} (with nvcc on PATH" in editable
    (tmp_path / "site-packages" / "lkconv").mkdir(parents=True)
    from_a_wheel = cuda_backend.reinstall_command(tmp_path / "site-packages" / "lkconv")
    assert "--no-deps <lkconv's source folder or sdist> (with nvcc on PATH" in from_a_wheel
    assert " -e " not in from_a_wheel
    package = Path(lkconv.__file__).resolve().parent  # this test run's own lkconv
    expected = f"-e {package.parent}" if (package.parent / "setup.py").is_file() else "<lkconv's source folder"
    assert expected in cuda_backend.REINSTALL


@pytest.mark.parametrize("arch", ["80", "90"])
def test_cuda_kernels_keep_every_value_in_registers(arch, tmp_path):
    """No kernel in csrc/ spills registers to local memory on sm_80 or sm_90: ptxas's own count, with setup.py's
    flags. A spill in an inner loop would cost far more than the instruction counts the kernels are tuned by, and only
    a GPU would show it otherwise."""
    nvcc = shutil.which("nvcc")
    assert nvcc is not None, "nvcc is on every machine lkconv builds on (README); it is not on PATH here"
    csrc = Path(__file__).resolve().parent.parent / "csrc"

    def compile_and_report(source: Path) -> str:
        command = [nvcc, "-std=c++20", "-O3", "-I", str(csrc), f"-arch=sm_{arch}", "-cubin", "--resource-usage",
                   "-o", str(tmp_path / f"{source.stem}.cubin"), str(source)]
        built = subprocess.run(command, capture_output=True, text=True)
        assert built.returncode == 0, f"nvcc failed on {source.name}:\n{built.stderr[-3000:]}"
        return built.stdout + built.stderr

    sources = sorted(csrc.glob("*.cu"))
    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
        reports = list(pool.map(compile_and_report, sources))
    kernels, spilling = 0, []
    for report in reports:
        kernel = None
        for line in report.splitlines():
            if found := re.search(r"Compiling entry function '(\S+)'", line):
                kernel, kernels = found.group(1), kernels + 1
            elif kernel and (spill := re.search(r"(\d+) bytes spill stores", line)) and int(spill.group(1)) > 0:
                spilling.append(f"{kernel}: {spill.group(1)} bytes")
    assert kernels >= len(sources), f"ptxas reported {kernels} kernels for {len(sources)} sources"
    assert not spilling, f"sm_{arch} kernels that spill:\n" + "\n".join(spilling)


LAUNCH_CHECK = r"""
#include <cstdio>

#include "launch.cuh"

__global__ void mark(int* flags) { flags[blockIdx.x] = 1; }

int main() {
  int* flags = nullptr;  // never touched: every launch below must be refused before it runs
  const long long counts[] = {0, 2147483648LL, 4294967296LL + 5};
  for (long long blocks : counts) std::printf("%d\n", lkconv::launch(mark, blocks, 32, 0, nullptr, flags));
  std::printf("%d %d %d\n", lkconv::breaks_the_context(cudaErrorIllegalAddress),
              lkconv::breaks_the_context(cudaErrorAssert), lkconv::breaks_the_context(cudaErrorInvalidConfiguration));
}
"""


def test_a_grid_past_2_to_the_31_blocks_is_refused_not_cut_down(tmp_path):
    """<<<>>> keeps only 32 bits of a block count: 2^32 + 5 blocks would launch 5, leave the rest of the output
    unwritten and report nothing (N*C*m >= 2^32 planes of 1x1 maps reach it). lkconv's launch helper refuses any
    count outside [1, 2^31 - 1] as an invalid configuration, before the CUDA runtime is asked (so no GPU is needed),
    and tells sticky errors (which break the context) from launch errors."""
    nvcc = shutil.which("nvcc")
    assert nvcc is not None, "nvcc is on every machine lkconv builds on (README); it is not on PATH here"
    source, binary = tmp_path / "launch_check.cu", tmp_path / "launch_check"
    source.write_text(LAUNCH_CHECK)
    csrc = Path(__file__).resolve().parent.parent / "csrc"
    built = subprocess.run([nvcc, "-std=c++20", "-arch=sm_80", "-I", str(csrc), str(source), "-o", str(binary)],
                           capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-3000:]
    ran = subprocess.run([str(binary)], capture_output=True, text=True, timeout=60)
    invalid_configuration = "9"  # cudaErrorInvalidConfiguration
    assert ran.returncode == 0 and ran.stdout.splitlines() == [invalid_configuration] * 3 + ["1 1 0"], ran


def test_every_kernel_launch_goes_through_the_checked_helper():
    """The block-count check above holds for every kernel only if no launcher writes <<<>>> itself."""
    csrc = Path(__file__).resolve().parent.parent / "csrc"
    sources = [path for path in sorted(csrc.iterdir()) if path.suffix in (".cu", ".cuh", ".cpp", ".h")]
    assert len(sources) >= 10, sources
    raw = [f"{path.name}:{number}" for path in sources if path.name != "launch.cuh"
           for number, line in enumerate(path.read_text().splitlines(), 1) if "<<<" in line]
    assert not raw, f"launches outside launch.cuh's helpers: {raw}"
