"""Build script: the Python package, plus lkconv._C (the `cuda` backend) whenever nvcc is found.

The .cu files are compiled by nvcc for explicit targets (sm_80 and sm_90 plus PTX, or TORCH_CUDA_ARCH_LIST) and
linked with the static CUDA runtime into a small torch extension whose binding uses only c10/ATen core headers.
No GPU is needed to build, and a CPU-only torch works too. Switches:
- LKCONV_SKIP_CUDA_BUILD=1: never build the extension.
- LKCONV_FORCE_CUDA=1: the extension must build; without nvcc, or when it fails to compile, the install fails.
- MAX_JOBS: parallel nvcc processes (default: CPU count).
Without nvcc, when TORCH_CUDA_ARCH_LIST names no sm_80+ architecture, or when the CUDA build fails (and
LKCONV_FORCE_CUDA is unset), the install is pure Python and says why in one line (pip shows it with -v), followed by
the compiler's diagnostics for a failed build. A malformed
TORCH_CUDA_ARCH_LIST or MAX_JOBS, a switch other than 1 or 0 (or both switches at once), or a CUDA_HOME that holds
no toolkit fails the install instead.
"""

import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
DEFAULT_ARCHS = "8.0;9.0+PTX"


def _flag(name: str) -> bool:
    """An on/off switch: 1 on; 0, empty or unset off; anything else fails the install rather than being ignored."""
    value = os.environ.get(name, "").strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"{name} must be 1 (on) or 0 (off); got {value!r}")
    return value == "1"


def _say(message: str) -> None:
    print(f"lkconv: {message}", file=sys.stderr)


def _is_toolkit(home: Path) -> bool:
    return (home / "bin" / "nvcc").exists() and (home / "include" / "cuda_runtime.h").exists()


def cuda_home():
    """The CUDA toolkit holding nvcc, its headers and the static runtime: CUDA_HOME (or CUDA_PATH) where set, else
    nvcc's on PATH, else /usr/local/cuda; None when there is none. A CUDA_HOME that holds no toolkit is an error,
    not a reason to build with another one."""
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        if value := os.environ.get(variable, "").strip():
            if not _is_toolkit(Path(value)):
                raise ValueError(f"{variable} must be a CUDA toolkit (with bin/nvcc and include/cuda_runtime.h); "
                                 f"got {value!r}")
            return Path(value)
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        # nvcc may be a wrapper script; `nvcc --list-gpu-arch` would not say where it lives, the realpath may.
        candidates.append(Path(os.path.realpath(nvcc)).parent.parent)
    candidates.append(Path("/usr/local/cuda"))
    return next((home for home in candidates if _is_toolkit(home)), None)


# The architecture names TORCH_CUDA_ARCH_LIST may hold, as torch.utils.cpp_extension (2.13) reads them.
NAMED_ARCHS = {"Kepler+Tesla": "3.7", "Kepler": "3.5+PTX", "Maxwell+Tegra": "5.3", "Maxwell": "5.0;5.2+PTX",
               "Pascal": "6.0;6.1+PTX", "Volta+Tegra": "7.2", "Volta": "7.0+PTX", "Turing": "7.5+PTX",
               "Ampere+Tegra": "8.7", "Ampere": "8.0;8.6+PTX", "Ada": "8.9+PTX", "Hopper": "9.0+PTX",
               "Blackwell+Tegra": "11.0", "Blackwell": "10.0;10.3;12.0;12.1+PTX"}


def _native_arch() -> str:
    """TORCH_CUDA_ARCH_LIST=native: the architectures of the GPUs this machine sees, as torch reads it."""
    import torch

    if not torch.cuda.is_available():
        raise ValueError("TORCH_CUDA_ARCH_LIST=native needs a visible GPU to read its architecture; name one instead "
                         "(e.g. 9.0)")
    return ";".join(sorted({"%d.%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}))


def gencode_flags(home: Path) -> list[str]:
    """-gencode flags for TORCH_CUDA_ARCH_LIST (e.g. '8.0;8.6;9.0a;9.0+PTX' or 'Hopper'), default sm_80 and sm_90
    plus PTX.

    Entries this nvcc cannot compile for (nvcc 13 dropped sm_70 and older), or below sm_80 (the kernels' floor),
    are left out with a message, and a list with nothing left gives no flags; an entry that is not an architecture
    raises ValueError.
    """
    listed = subprocess.run([str(home / "bin" / "nvcc"), "--list-gpu-arch"], capture_output=True, text=True)
    known = set(re.findall(r"compute_(\d+)", listed.stdout))  # nvcc lists base targets: 90, not 90a or 100f
    requested = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip() or DEFAULT_ARCHS  # empty: the default, as torch
    if requested == "native":
        requested = _native_arch()
    entries = []
    for given in re.split(r"[;\s,]+", requested):
        for entry in re.split(r";", NAMED_ARCHS.get(given, given)):
            entries.append((given, entry))
    flags = []
    for given, entry in entries:
        if not entry:
            continue
        match = re.fullmatch(r"(\d+)\.(\d+)([af]?)(\+PTX)?", entry)
        if match is None:
            raise ValueError(f"TORCH_CUDA_ARCH_LIST entries look like 8.0, 9.0a, 9.0+PTX, Hopper or native; got "
                             f"{given!r}")
        arch = f"{match[1]}{match[2]}{match[3]}"
        if int(match[1]) < 8 or (known and f"{match[1]}{match[2]}" not in known):
            _say(f"TORCH_CUDA_ARCH_LIST: leaving out {entry} (the kernels need sm_80+, and this nvcc must know it)")
            continue
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
        if match[4]:
            flags += ["-gencode", f"arch=compute_{arch},code=compute_{arch}"]
    return flags


def _max_jobs() -> int:
    value = os.environ.get("MAX_JOBS", "").strip()
    if not value:
        return os.cpu_count() or 1
    if not value.isdecimal() or not value.isascii() or int(value) < 1:
        raise ValueError(f"MAX_JOBS must be a positive integer; got {value!r}")
    return int(value)


def compile_cuda(home: Path, build_dir: Path, gencode: list[str], jobs: int) -> list[str]:
    """Compiles every csrc/*.cu with nvcc (`jobs` at a time) into object files; returns their paths."""
    build_dir.mkdir(parents=True, exist_ok=True)
    sources = sorted(CSRC.glob("*.cu"))
    common = [str(home / "bin" / "nvcc"), "-std=c++20", "-O3", "-Xcompiler", "-fPIC", "-I", str(CSRC), *gencode]

    def compile_one(source: Path) -> str:
        target = build_dir / (source.stem + ".o")
        command = [*common, "-c", str(source), "-o", str(target)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"nvcc failed on {source.name}:\n{result.stderr}")
        return str(target)

    with ThreadPoolExecutor(jobs) as pool:
        return list(pool.map(compile_one, sources))


def cuda_extension():
    """(ext_modules, cmdclass) for lkconv._C, or ([], {}) when it is not built."""
    skip, force = _flag("LKCONV_SKIP_CUDA_BUILD"), _flag("LKCONV_FORCE_CUDA")
    if skip and force:
        raise ValueError("LKCONV_SKIP_CUDA_BUILD=1 and LKCONV_FORCE_CUDA=1 contradict each other; unset one")
    if skip:
        _say("LKCONV_SKIP_CUDA_BUILD=1, installing the pure-Python package")
        return [], {}
    home = cuda_home()
    if home is None:
        if force:
            raise RuntimeError("LKCONV_FORCE_CUDA=1 but nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
        _say("nvcc not found, installing the pure-Python package (no `cuda` backend)")
        return [], {}

    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError as error:  # an isolated build without torch: say how to get the backend
        if force:
            raise
        _say(f"cannot build lkconv._C ({error}); installing the pure-Python package. Build it with "
             "pip install --no-build-isolation")
        return [], {}
    # A malformed TORCH_CUDA_ARCH_LIST or MAX_JOBS is the user's to fix: it fails the install, here and now.
    gencode, jobs = gencode_flags(home), _max_jobs()
    if not gencode:
        if force:
            raise RuntimeError(f"LKCONV_FORCE_CUDA=1 but TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST')!r} "
                               "names no sm_80+ architecture this nvcc can build for")
        _say(f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST')!r} names no sm_80+ architecture this "
             "nvcc can build for; installing the pure-Python package (no `cuda` backend)")
        return [], {}

    class BuildWithNvcc(BuildExtension):
        """Compiles the .cu files with nvcc first, then links them into the C++ binding; any failure of either
        leaves a pure-Python install (with one line saying why) unless LKCONV_FORCE_CUDA=1."""

        def build_extensions(self):
            try:
                objects = compile_cuda(home, Path(self.build_temp) / "cuda", gencode, jobs)
                for extension in self.extensions:
                    extension.extra_objects = objects
                    # setuptools relinks only when a dependency is newer than the library: the objects nvcc has
                    # just rebuilt (for edited kernels or other architectures) must count, or a rebuild in the
                    # same tree ships the old library.
                    extension.depends = objects
                super().build_extensions()
            except Exception as error:  # noqa: BLE001 - any build failure falls back the same way
                if force:
                    raise
                reason, *details = str(error).splitlines() or [type(error).__name__]
                _say(f"the CUDA build failed, installing the pure-Python package: {reason}")
                for line in details[-40:]:  # the compiler's own diagnostics, which say what to fix
                    print(f"    {line}", file=sys.stderr)
                _say("LKCONV_FORCE_CUDA=1 makes a failed CUDA build fail the install")
                self.extensions = []

    extension = CppExtension(
        "lkconv._C",
        [str(CSRC.relative_to(ROOT) / "binding.cpp")],
        include_dirs=[str(CSRC)],
        library_dirs=[str(home / "lib64"), str(home / "lib")],
        libraries=["cudart_static", "dl", "rt", "pthread"],
        extra_compile_args=["-O2", "-std=c++20"],  # what torch's own extensions use; its headers need it
    )
    _say(f"building lkconv._C with {home / 'bin' / 'nvcc'} for {' '.join(gencode[1::2])}")
    return [extension], {"build_ext": BuildWithNvcc.with_options(use_ninja=False)}


if __name__ == "__main__":  # pip runs this file as __main__; tests import it to check the flags it builds
    ext_modules, cmdclass = cuda_extension()
    setup(
        packages=find_packages(include=["lkconv", "lkconv.*"]) + ["lkconv.kernels", "lkconv.benchmarks"],
        # The top-level kernels/ and benchmarks/ folders install inside the package (`lkconv-bench` runs the latter).
        package_dir={"lkconv.kernels": "kernels", "lkconv.benchmarks": "benchmarks"},
        package_data={"lkconv.backends": ["measured_choices.json"]},
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )
