"""A regular (not editable) install carries everything: the kernels/ and benchmarks/ folders install inside the
package as lkconv.kernels and lkconv.benchmarks, with auto's measured-choices table."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_wheel_holds_the_kernels_the_benchmarks_and_the_choices_table(tmp_path):
    env = {**os.environ, "LKCONV_SKIP_CUDA_BUILD": "1"}  # the pure-Python part; the CUDA build has its own tests
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--no-index",
                             "-w", str(tmp_path), str(ROOT)], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    (wheel,) = tmp_path.glob("lkconv-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for kernel in (ROOT / "kernels").glob("*.py"):
        assert f"lkconv/kernels/{kernel.name}" in names
    for module in (ROOT / "benchmarks").glob("*.py"):
        assert f"lkconv/benchmarks/{module.name}" in names
    assert "lkconv/backends/measured_choices.json" in names
    assert not any(name.startswith(("tests/", "kernels/", "benchmarks/")) for name in names), "top-level leftovers"
