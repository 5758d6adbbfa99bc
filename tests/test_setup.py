"""setup.py's nvcc targets: TORCH_CUDA_ARCH_LIST as torch reads it (numbers, 'a'/'f' suffixes, +PTX, names)."""

import importlib.util
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


@pytest.mark.parametrize("arch_list", ["7.5", "sm_90", "Volta"])
def test_gencode_flags_reject_lists_with_nothing_to_build(setup_module, monkeypatch, arch_list):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", arch_list)
    with pytest.raises(ValueError, match="TORCH_CUDA_ARCH_LIST"):
        setup_module.gencode_flags(setup_module.cuda_home())
