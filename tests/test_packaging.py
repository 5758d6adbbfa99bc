"""A regular (not editable) install carries everything: the kernels/ and benchmarks/ folders install inside the
package as lkconv.kernels and lkconv.benchmarks, with auto's measured-choices table; the sdist carries the CUDA
sources and the tests an install from it builds and runs."""

import os
import shutil
import subprocess
import sys
import tarfile
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


def test_the_sdist_holds_every_file_of_the_sources_kernels_benchmarks_and_tests(tmp_path):
    # From a copy without lkconv.egg-info: setuptools adds the files an earlier build's SOURCES.txt lists, which
    # would hide a MANIFEST.in that lacks them.
    tree = tmp_path / "tree"
    tree.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md", "MANIFEST.in"):
        shutil.copy2(ROOT / name, tree / name)
    for folder in ("lkconv", "csrc", "kernels", "benchmarks", "tests"):
        shutil.copytree(ROOT / folder, tree / folder, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    env = {**os.environ, "LKCONV_SKIP_CUDA_BUILD": "1"}
    build = "import sys; from setuptools import build_meta; build_meta.build_sdist(sys.argv[1])"  # pip's own hook
    result = subprocess.run([sys.executable, "-c", build, str(tmp_path)], cwd=tree, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    (sdist,) = tmp_path.glob("lkconv-*.tar.gz")
    names = {name.split("/", 1)[1] for name in tarfile.open(sdist).getnames() if "/" in name}
    expected = {path.relative_to(ROOT).as_posix() for folder in ("csrc", "kernels", "benchmarks", "tests")
                for path in (ROOT / folder).rglob("*")
                if path.is_file() and "__pycache__" not in path.parts and path.suffix not in (".pyc", ".so", ".o")}
    assert expected, "no sources found"
    assert not sorted(expected - names), f"the sdist lacks {sorted(expected - names)}"
    assert {"setup.py", "pyproject.toml", "README.md", "csrc/conv.cu", "csrc/binding.cpp"} <= names
