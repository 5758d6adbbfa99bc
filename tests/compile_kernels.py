"""Compiles every Triton kernel configuration the dispatcher can pick for sm_80 and sm_90, with no GPU present.

The interpreter never compiles, so this is what proves the kernels lower to PTX and cubins. Run as a script in a
process where TRITON_INTERPRET is unset (tests/test_compile.py does that) and prints one JSON line per kernel.
"""

import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

ARCHES = (80, 90)
# (tensor dtype, tl.dot precision) pairs the backend can launch with on a GPU.
PRECISIONS = (("fp32", "ieee"), ("fp32", "tf32"), ("fp16", "tf32"), ("bf16", "tf32"))


def _jobs():
    """(kernel, arch, dtype, precision, transposed, bias, config, int type) for every launch variant.

    Integer arguments compile as i32, and as i64 (what Triton passes once a stride passes 2**31) in bf16.
    """
    from lkconv.backends.triton_backend import kernel_configs

    configs = kernel_configs()
    for arch in ARCHES:
        for dtype, precision in PRECISIONS:
            for int_type in ("i32", "i64") if dtype == "bf16" else ("i32",):
                for kind in ("rows", "whole_map"):
                    for config in configs[kind]:
                        for transposed, bias in ((False, False), (False, True), (True, False)):
                            yield (kind, arch, dtype, precision, transposed, bias, tuple(config), int_type)
                for config in configs["weight_grad"]:
                    for bias in (False, True):
                        yield ("weight_grad", arch, dtype, precision, False, bias, tuple(config), int_type)


def _ptxas_usage(ptx: str, arch: int):
    """(registers, spilled bytes) from the ptxas that ships with triton: free resource facts without a GPU."""
    import triton.backends.nvidia as nvidia

    ptxas = os.path.join(os.path.dirname(nvidia.__file__), "bin", "ptxas")
    if not os.path.exists(ptxas):
        return None, None
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "kernel.ptx")
        with open(source, "w") as f:
            f.write(ptx)
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        result = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", source, "-o", os.path.join(tmp, "kernel.o")],
                                capture_output=True, text=True)
    report = result.stdout + result.stderr
    registers = re.search(r"Used (\d+) registers", report)
    spills = re.findall(r"(\d+) bytes spill stores", report)
    return (int(registers.group(1)) if registers else None), sum(int(n) for n in spills)


def _compile(job):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from lkconv import kernels

    kind, arch, dtype, precision, transposed, bias, config, int_type = job
    flags = {"HAS_BIAS": bias, "PRECISION": precision, "OPERANDS_FP32": False}
    if kind == "weight_grad":
        fn = kernels.depthwise_weight_grad_kernel
        pointer_types = {"grad_out_ptr": dtype, "input_ptr": dtype, "weight_partial_ptr": "fp32", "bias_partial_ptr": "fp32"}
        blocks = dict(zip(("BLOCK_R", "BLOCK_Q", "BLOCK_ROWS", "BLOCK_IW"), config[:4]))
    else:
        fn = kernels.depthwise_rows_kernel if kind == "rows" else kernels.depthwise_whole_map_kernel
        pointer_types = {"src_ptr": dtype, "weight_ptr": dtype, "bias_ptr": dtype, "dst_ptr": dtype}
        names = ("BLOCK_M", "BLOCK_W", "BLOCK_J") if kind == "rows" else ("BLOCK_N", "BLOCK_P", "BLOCK_K")
        blocks = dict(zip(names, config[:3]))
        flags["TRANSPOSED"] = transposed
    constexprs = {**flags, **blocks}
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointer_types:
            signature[name] = "*" + pointer_types[name]
        else:
            signature[name] = int_type
    num_warps, num_stages = config[-2:]
    compiled = triton.compile(
        ASTSource(fn=fn, signature=signature, constexprs=constexprs),
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": num_warps, "num_stages": num_stages},
    )
    registers, spill_bytes = _ptxas_usage(compiled.asm["ptx"], arch)
    return {
        "kernel": kind, "arch": f"sm_{arch}", "dtype": dtype, "precision": precision, "transposed": transposed,
        "bias": bias, "config": list(config), "int_type": int_type, "cubin_bytes": len(compiled.asm["cubin"]),
        "shared_bytes": compiled.metadata.shared, "registers": registers, "spill_bytes": spill_bytes,
        "uses_mma": ("mma" in compiled.asm["ptx"]) if precision != "ieee" else None,
    }


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the interpreter does not compile", file=sys.stderr)
        return 2
    jobs = list(_jobs())
    with ProcessPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        for result in pool.map(_compile, jobs):
            print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
