"""setup.py without nvcc compiling anything: its nvcc targets (TORCH_CUDA_ARCH_LIST as torch reads it: numbers,
'a'/'f' suffixes, +PTX, names), its switches (LKCONV_SKIP_CUDA_BUILD, LKCONV_FORCE_CUDA, MAX_JOBS), and its build
command, run on stand-ins for nvcc's objects."""

import importlib.util
import os
import subprocess
import time
from pathlib import Path

import pytest

SETUP = Path(__file__).resolve().parent.parent / "setup.py"


@pytest.fixture(scope="module")
def setup_module():
    spec = importlib.util.spec_from_file_location("lkconv_setup", SETUP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # not __main__: defines the helpers, builds nothing
    if module.cuda_home() is None:
        pytest.skip("no CUDA toolkit here")
    return module


@pytest.mark.parametrize("arch_list,expected", [
    (None, ["arch=compute_80,code=sm_80", "arch=compute_90,code=sm_90", "arch=compute_90,code=compute_90"]),
    ("9.0a", ["arch=compute_90a,code=sm_90a"]),
    ("8.0 9.0a+PTX", ["arch=compute_80,code=sm_80", "arch=compute_90a,code=sm_90a",
                      "arch=compute_90a,code=compute_90a"]),
    ("Hopper", ["arch=compute_90,code=sm_90", "arch=compute_90,code=compute_90"]),
    ("Ampere", ["arch=compute_80,code=sm_80", "arch=compute_86,code=sm_86", "arch=compute_86,code=compute_86"]),
    ("Blackwell", ["arch=compute_100,code=sm_100", "arch=compute_103,code=sm_103", "arch=compute_120,code=sm_120",
                   "arch=compute_121,code=sm_121", "arch=compute_121,code=compute_121"]),
    (" ", ["arch=compute_80,code=sm_80", "arch=compute_90,code=sm_90", "arch=compute_90,code=compute_90"]),
    ("7.0;8.6", ["arch=compute_86,code=sm_86"]),  # below the kernels' sm_80 floor: left out
])
def test_gencode_flags_follow_torch_cuda_arch_list(setup_module, monkeypatch, arch_list, expected):
    if arch_list is None:
        monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    else:
        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", arch_list)
    flags = setup_module.gencode_flags(setup_module.cuda_home())
    assert flags[0::2] == ["-gencode"] * len(expected)
    assert flags[1::2] == expected


@pytest.mark.parametrize("arch_list", ["7.5", "Volta;Turing", "6.0 7.0+PTX"])
def test_gencode_flags_are_empty_when_no_architecture_is_sm80_or_newer(setup_module, monkeypatch, arch_list):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", arch_list)
    assert setup_module.gencode_flags(setup_module.cuda_home()) == []


@pytest.mark.parametrize("arch_list", ["sm_90", "9", "Hoppers", "9.0;bogus", "AdaHopper"])
def test_gencode_flags_reject_malformed_entries_as_given(setup_module, monkeypatch, arch_list):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", arch_list)
    with pytest.raises(ValueError, match=f"TORCH_CUDA_ARCH_LIST entries look like .*; got '{arch_list.split(';')[-1]}'"):
        setup_module.gencode_flags(setup_module.cuda_home())


def test_native_reads_the_visible_gpus_or_says_it_needs_one(setup_module, monkeypatch):
    import torch

    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "native")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="TORCH_CUDA_ARCH_LIST=native needs a visible GPU"):
        setup_module.gencode_flags(setup_module.cuda_home())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (9, 0) if index else (8, 0))
    assert setup_module.gencode_flags(setup_module.cuda_home())[1::2] == ["arch=compute_80,code=sm_80",
                                                                          "arch=compute_90,code=sm_90"]


# --- the switches, through cuda_extension() (which decides; nothing is compiled here) ------------------------------


@pytest.fixture
def switches(setup_module, monkeypatch):
    for name in ("LKCONV_SKIP_CUDA_BUILD", "LKCONV_FORCE_CUDA", "MAX_JOBS", "TORCH_CUDA_ARCH_LIST", "CUDA_HOME",
                 "CUDA_PATH"):
        monkeypatch.delenv(name, raising=False)
    return setup_module


def test_the_extension_is_built_wherever_nvcc_is(switches, capsys):
    modules, commands = switches.cuda_extension()
    assert [m.name for m in modules] == ["lkconv._C"] and "build_ext" in commands
    assert "building lkconv._C" in capsys.readouterr().err


def test_skip_cuda_build_installs_pure_python_with_one_line(switches, monkeypatch, capsys):
    monkeypatch.setenv("LKCONV_SKIP_CUDA_BUILD", "1")
    assert switches.cuda_extension() == ([], {})
    assert capsys.readouterr().err.strip().splitlines() == ["lkconv: LKCONV_SKIP_CUDA_BUILD=1, installing the "
                                                            "pure-Python package"]


def test_without_nvcc_the_install_is_pure_python_unless_forced(switches, monkeypatch, capsys):
    monkeypatch.setattr(switches, "cuda_home", lambda: None)
    assert switches.cuda_extension() == ([], {})
    assert "nvcc not found" in capsys.readouterr().err
    monkeypatch.setenv("LKCONV_FORCE_CUDA", "1")
    with pytest.raises(RuntimeError, match="LKCONV_FORCE_CUDA=1 but nvcc was not found"):
        switches.cuda_extension()


def test_no_usable_architecture_is_pure_python_unless_forced(switches, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "7.5")
    assert switches.cuda_extension() == ([], {})
    assert "names no sm_80+ architecture" in capsys.readouterr().err
    monkeypatch.setenv("LKCONV_FORCE_CUDA", "1")
    with pytest.raises(RuntimeError, match="LKCONV_FORCE_CUDA=1 but TORCH_CUDA_ARCH_LIST='7.5'"):
        switches.cuda_extension()


@pytest.mark.parametrize("name,value,message", [
    ("MAX_JOBS", "0", "MAX_JOBS must be a positive integer; got '0'"),
    ("MAX_JOBS", "four", "MAX_JOBS must be a positive integer; got 'four'"),
    ("MAX_JOBS", "²", "MAX_JOBS must be a positive integer; got '²'"),
    ("LKCONV_FORCE_CUDA", "true", "LKCONV_FORCE_CUDA must be 1 \\(on\\) or 0 \\(off\\); got 'true'"),
    ("LKCONV_SKIP_CUDA_BUILD", "yes", "LKCONV_SKIP_CUDA_BUILD must be 1 \\(on\\) or 0 \\(off\\); got 'yes'"),
    ("CUDA_HOME", "/nonexistent", "CUDA_HOME must be a CUDA toolkit .*; got '/nonexistent'"),
    ("TORCH_CUDA_ARCH_LIST", "9.0;bogus", "entries look like 8.0, 9.0a, 9.0\\+PTX, Hopper or native; got 'bogus'"),
])
def test_a_malformed_switch_fails_the_install_instead_of_falling_back(switches, monkeypatch, name, value, message):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        switches.cuda_extension()


def test_both_switches_at_once_fail_the_install(switches, monkeypatch):
    monkeypatch.setenv("LKCONV_SKIP_CUDA_BUILD", "1")
    monkeypatch.setenv("LKCONV_FORCE_CUDA", "1")
    with pytest.raises(ValueError, match="LKCONV_SKIP_CUDA_BUILD=1 and LKCONV_FORCE_CUDA=1 contradict each other"):
        switches.cuda_extension()


def test_max_jobs_sets_the_parallel_nvcc_processes(switches, monkeypatch):
    monkeypatch.setenv("MAX_JOBS", " 3")
    assert switches._max_jobs() == 3
    monkeypatch.delenv("MAX_JOBS")
    assert switches._max_jobs() >= 1


# --- the build command itself, on stand-ins for nvcc's objects and the binding (seconds, not nvcc's minutes) -------


def _build(setup_module, monkeypatch, folder: Path, objects) -> list[Path]:
    """Runs setup.py's build_ext as pip does, with `objects(build_dir)` standing in for compile_cuda's nvcc objects
    and a one-line binding; returns the libraries built under `folder`."""
    from setuptools import Distribution

    monkeypatch.setattr(setup_module, "compile_cuda", lambda home, build_dir, gencode, jobs: objects(build_dir))
    binding = folder / "binding.cpp"
    if not binding.exists():  # an unchanged source between builds, as the real binding's usually is
        binding.write_text("int lkconv_binding() { return 0; }\n")
    modules, commands = setup_module.cuda_extension()
    modules[0].sources = [str(binding)]
    command = Distribution({"name": "lkconv", "ext_modules": modules, "cmdclass": commands}).get_command_obj(
        "build_ext")
    command.build_lib, command.build_temp = str(folder / "lib"), str(folder / "temp")
    command.ensure_finalized()
    command.run()
    return sorted((folder / "lib").rglob("_C*.so"))


def _kernels_object(version: str):
    def objects(build_dir: Path) -> list[str]:
        build_dir.mkdir(parents=True, exist_ok=True)
        source, target = build_dir / "kernels.c", build_dir / "kernels.o"
        source.write_text(f'const char *lkconv_kernels = "kernels version {version}";\n')
        subprocess.run(["gcc", "-fPIC", "-c", str(source), "-o", str(target)], check=True)
        return [str(target)]
    return objects


def test_a_rebuild_in_the_same_tree_links_the_new_nvcc_objects(switches, monkeypatch, tmp_path):
    """pip builds a regular install in ./build each time: after edited kernels or another TORCH_CUDA_ARCH_LIST, the
    library must hold the new objects, though the binding's source has not changed."""
    (library,) = _build(switches, monkeypatch, tmp_path, _kernels_object("one"))
    assert b"kernels version one" in library.read_bytes()
    # The first build an hour ago: setuptools compares whole seconds (older releases), and nvcc takes minutes.
    an_hour_ago = time.time() - 3600
    for path in tmp_path.rglob("*"):
        os.utime(path, (an_hour_ago, an_hour_ago))
    (library,) = _build(switches, monkeypatch, tmp_path, _kernels_object("two"))
    assert b"kernels version two" in library.read_bytes(), "the rebuild kept the old library"


def test_a_failed_cuda_build_shows_nvcc_s_errors_and_the_switch_that_makes_it_fatal(switches, monkeypatch, tmp_path,
                                                                                   capsys):
    def failing(build_dir):
        raise RuntimeError('nvcc failed on conv.cu:\nconv.cu(12): error: identifier "tile" is undefined')

    assert _build(switches, monkeypatch, tmp_path, failing) == []
    err = capsys.readouterr().err
    assert "the CUDA build failed, installing the pure-Python package: nvcc failed on conv.cu:" in err
    assert 'conv.cu(12): error: identifier "tile" is undefined' in err
    assert "LKCONV_FORCE_CUDA=1 makes a failed CUDA build fail the install" in err
    monkeypatch.setenv("LKCONV_FORCE_CUDA", "1")
    with pytest.raises(RuntimeError, match="identifier \"tile\" is undefined"):
        _build(switches, monkeypatch, tmp_path, failing)
