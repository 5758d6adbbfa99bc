"""Build script: installs the pure-Python package, plus lkconv._C once the CUDA sources exist.

The CUDA C++ extension (csrc/) is optional. ``LKCONV_SKIP_CUDA_BUILD=1`` always skips it; without nvcc the
install is pure Python and says so in one line.
"""

import os
import shutil
import sys

from setuptools import find_packages, setup


def _cuda_extensions():
    if os.environ.get("LKCONV_SKIP_CUDA_BUILD", "0") == "1":
        print("lkconv: LKCONV_SKIP_CUDA_BUILD=1, installing the pure-Python package", file=sys.stderr)
        return [], {}
    if shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
        print("lkconv: nvcc not found, installing the pure-Python package", file=sys.stderr)
        return [], {}
    # The CUDA kernels (the `cuda` backend) are not written yet: csrc/README.md tracks them.
    print("lkconv: csrc/ has no CUDA kernels yet, installing the pure-Python package", file=sys.stderr)
    return [], {}


ext_modules, cmdclass = _cuda_extensions()

setup(
    packages=find_packages(include=["lkconv", "lkconv.*"]) + ["lkconv.kernels", "lkconv.benchmarks"],
    # The top-level kernels/ and benchmarks/ folders install inside the package (`lkconv-bench` runs the latter).
    package_dir={"lkconv.kernels": "kernels", "lkconv.benchmarks": "benchmarks"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
