"""Every Triton kernel configuration the dispatcher can pick, and the launches of the GPU tests' and the quick
benchmark's shapes (specialized as Triton specializes them), compile for sm_80 and sm_90 with no GPU present."""

import json
import os
import subprocess
import sys
from pathlib import Path

from lkconv.backends.triton_backend import kernel_configs

SCRIPT = Path(__file__).with_name("compile_kernels.py")
# What a block may use: sm_80 code runs on sm_86 and sm_89 too (RTX 30 and 40 series, A10, L4, L40S), which give a
# block 99 KB, not the A100's 163 KB; the csrc/ kernels keep to 99 KB as well.
SHARED_MEMORY_LIMIT = {"sm_80": 99 * 1024, "sm_90": 227 * 1024}


def test_every_kernel_configuration_and_the_gpu_sessions_launches_compile_for_sm80_and_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # really compile, not a cache hit
    result = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=3000)
    assert result.returncode == 0, result.stderr[-4000:]
    compiled = [json.loads(line) for line in result.stdout.splitlines()]
    (tmp_path / "report.jsonl").write_text(result.stdout)
    for entry in compiled:
        assert entry["cubin_bytes"] > 0, entry
        assert entry["shared_bytes"] <= SHARED_MEMORY_LIMIT[entry["arch"]], entry
        if entry["precision"] != "ieee":
            assert entry["uses_mma"], f"no tensor-core instruction in {entry}"

    configs = kernel_configs()
    swept = [e for e in compiled if e["set"] == "configs"]
    # rows and weight_grad twice (ALIGN 1 and a whole 16-byte vector), rows also with shifted filter rows (forward
    # and input grad); the channels_last kernels in the configurations of their element size (half of them); in
    # 2 arches x (4 precisions with i32 + bf16 with i64)
    per_precision = (3 * 2 * len(configs["rows"]) + 2 * len(configs["rows"]) + 3 * len(configs["rows_channels_last"]) // 2
                     + 3 * len(configs["whole_map"]) + 2 * 2 * len(configs["weight_grad"])
                     + 2 * len(configs["weight_grad_channels_last"]) // 2)
    assert len(swept) == 2 * 5 * per_precision
    assert {e["int_type"] for e in swept} == {"i32", "i64"}
    kernels = ("rows", "rows_channels_last", "whole_map", "weight_grad", "weight_grad_channels_last")
    assert {(e["kernel"], e["arch"]) for e in swept} == {(kernel, arch) for kernel in kernels for arch in ("sm_80", "sm_90")}

    launches = [e for e in compiled if e["set"] == "launches"]
    assert {(e["kernel"], e["arch"], e["dtype"]) for e in launches} == {
        (kernel, arch, dtype) for kernel in kernels for arch in ("sm_80", "sm_90") for dtype in ("fp32", "fp16", "bf16")
    }
    assert any("batch" in e["constants"] for e in launches), "a batch of 1 specializes to a constant"
    # NCHW maps whose widths are multiples of 16 bytes load their source rows as 16-byte asynchronous copies, and
    # channels_last maps whose channel counts Triton marks as multiples of 16 their pixels' channels.
    whole_vectors = [e for e in launches if e["kernel"] in ("rows", "weight_grad")
                     and e["align"] * (4 if e["dtype"] == "fp32" else 2) == 16]
    whole_vectors += [e for e in launches if e["kernel"].endswith("channels_last") and "channels" in e["divisible_by_16"]]
    assert whole_vectors and all(e["vector_async_copies"] > 0 for e in whole_vectors), [
        e for e in whole_vectors if not e["vector_async_copies"]]
    # With shifted filter rows the Toeplitz operand goes to shared memory as 16-byte asynchronous copies too: no load
    # through registers is left but the bias's. The plain row kernel gathers it element by element (16-bit types).
    shifted = [e for e in launches if e["shifted"]]
    assert {e["dtype"] for e in shifted} == {"fp32", "fp16", "bf16"}
    assert all(e["register_global_loads"] <= int(e["bias"]) and e["vector_async_copies"] > 0 for e in shifted), [
        e for e in shifted if e["register_global_loads"] > int(e["bias"]) or not e["vector_async_copies"]]
    gathers = [e for e in launches if e["kernel"] == "rows" and not e["shifted"] and e["dtype"] != "fp32"]
    assert gathers and all(e["register_global_loads"] > 0 for e in gathers)
