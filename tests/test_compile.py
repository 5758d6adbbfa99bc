"""Every Triton kernel configuration the dispatcher can pick compiles for sm_80 and sm_90 with no GPU present."""

import json
import os
import subprocess
import sys
from pathlib import Path

from lkconv.backends.triton_backend import kernel_configs

SCRIPT = Path(__file__).with_name("compile_kernels.py")
SHARED_MEMORY_LIMIT = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}


def test_every_kernel_configuration_compiles_for_sm80_and_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # really compile, not a cache hit
    result = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-4000:]
    compiled = [json.loads(line) for line in result.stdout.splitlines()]
    (tmp_path / "report.jsonl").write_text(result.stdout)

    configs = kernel_configs()
    per_precision = 3 * len(configs["rows"]) + 3 * len(configs["whole_map"]) + 2 * len(configs["weight_grad"])
    assert len(compiled) == 2 * 5 * per_precision  # 2 arches x (4 precisions with i32 + bf16 with i64)
    assert {e["int_type"] for e in compiled} == {"i32", "i64"}
    for entry in compiled:
        assert entry["cubin_bytes"] > 0, entry
        assert entry["shared_bytes"] <= SHARED_MEMORY_LIMIT[entry["arch"]], entry
        if entry["precision"] != "ieee":
            assert entry["uses_mma"], f"no tensor-core instruction in {entry}"
    assert {(e["kernel"], e["arch"]) for e in compiled} == {
        (kernel, arch) for kernel in ("rows", "whole_map", "weight_grad") for arch in ("sm_80", "sm_90")
    }
