"""Compiles the Triton kernels for sm_80 and sm_90 with no GPU present, and prints one JSON line per compile.

The interpreter never compiles, so this is what proves the kernels lower to PTX and cubins. Two sets:
- every block configuration the dispatcher can pick, in every dtype and dot precision, with no launch
  specialization (what odd shapes and strides compile to), the row kernel also with its shifted filter rows;
- the launches the triton backend makes for the GPU session's shapes (lkconv.benchmarks.triton_launches: the GPU
  tests', the quick benchmark's and small awkward ones), specialized the way Triton specializes them at launch
  (integer arguments equal to 1 become constants, multiples of 16 and 16-byte aligned pointers get divisibility
  hints). These are the variants a GPU compiles, with vector loads.
Run as a script in a process where TRITON_INTERPRET is unset (tests/test_compile.py does that).
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
VECTOR_ELEMENTS = {"fp32": 4, "fp16": 8, "bf16": 8}  # 16-byte vectors: the largest ALIGN the backend passes
ELEMENT_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
KERNELS = {"rows": "depthwise_rows_kernel", "rows_channels_last": "depthwise_rows_channels_last_kernel",
           "whole_map": "depthwise_whole_map_kernel", "weight_grad": "depthwise_weight_grad_kernel",
           "weight_grad_channels_last": "depthwise_weight_grad_channels_last_kernel"}
BLOCK_NAMES = {"rows": ("BLOCK_M", "BLOCK_W", "BLOCK_J"), "rows_channels_last": ("BLOCK_C", "BLOCK_M", "BLOCK_W", "BLOCK_J"),
               "whole_map": ("BLOCK_N", "BLOCK_P", "BLOCK_K"), "weight_grad": ("BLOCK_R", "BLOCK_Q", "BLOCK_ROWS", "BLOCK_IW"),
               "weight_grad_channels_last": ("BLOCK_C", "BLOCK_R", "BLOCK_Q", "BLOCK_ROWS", "BLOCK_IW")}
# The channels_last kernels take CHANNEL_BYTES of channels: one block size per element size.
CHANNEL_BLOCK_KERNELS = ("rows_channels_last", "weight_grad_channels_last")
# Kernels whose runs of source columns widen to whole vectors (the ALIGN constexpr).
ALIGNED_KERNELS = ("rows", "weight_grad")


def _config_jobs():
    """Compile jobs (kernel, arch, signature, constexprs, attrs, options, and what the report says) for every configuration the dispatcher can pick, unspecialized: integer arguments compile as i32, and as i64
    (what Triton passes once a stride passes 2**31) in bf16; ALIGN as 1 and as a whole 16-byte vector."""
    from lkconv import kernels
    from lkconv.backends.triton_backend import CHANNEL_BYTES, kernel_configs

    configs = kernel_configs()
    for arch in ARCHES:
        for dtype, precision in PRECISIONS:
            for int_type in ("i32", "i64") if dtype == "bf16" else ("i32",):
                for kind, variants in (("rows", ((False, False), (False, True), (True, False))),
                                       ("rows_channels_last", ((False, False), (False, True), (True, False))),
                                       ("whole_map", ((False, False), (False, True), (True, False))),
                                       ("weight_grad", ((None, False), (None, True))),
                                       ("weight_grad_channels_last", ((None, False), (None, True)))):
                    aligns = (1, VECTOR_ELEMENTS[dtype]) if kind in ALIGNED_KERNELS else (1,)
                    # The row kernel's shifted filter rows (unit stride), with whole-vector source runs, no bias.
                    shifted_variants = [(False, align) for align in aligns] + \
                        ([(True, VECTOR_ELEMENTS[dtype])] if kind == "rows" else [])
                    for config in configs[kind]:
                        if kind in CHANNEL_BLOCK_KERNELS and config.block_c * ELEMENT_BYTES[dtype] != CHANNEL_BYTES:
                            continue
                        for transposed, bias in variants:
                            for shifted, align in shifted_variants:
                                if shifted and bias:
                                    continue
                                constexprs = {"HAS_BIAS": bias, "PRECISION": precision, "OPERANDS_FP32": False,
                                              **dict(zip(BLOCK_NAMES[kind], config))}
                                if transposed is not None:
                                    constexprs["TRANSPOSED"] = transposed
                                if kind in ALIGNED_KERNELS:
                                    constexprs["ALIGN"] = align
                                if kind == "rows":
                                    constexprs["SHIFTED"] = shifted
                                fn = getattr(kernels, KERNELS[kind])
                                signature = {name: "constexpr" if name in constexprs else
                                             ("*" + ("fp32" if "partial" in name else dtype) if name.endswith("_ptr")
                                              else int_type) for name in fn.arg_names}
                                yield dict(kind=kind, arch=arch, signature=signature, constexprs=constexprs, attrs={},
                                          options={"num_warps": config.num_warps, "num_stages": config.num_stages},
                                          report={"set": "configs", "dtype": dtype, "precision": precision,
                                                  "transposed": transposed, "bias": bias, "config": list(config),
                                                  "align": align, "shifted": shifted, "int_type": int_type})


def _launch_jobs():
    """The specialized launches of the GPU session's shapes (lkconv.benchmarks.triton_launches), each compiled once
    per arch. With a bias only: the bias-free variants differ in HAS_BIAS alone, which the configuration jobs above
    compile both ways."""
    from triton.backends.compiler import GPUTarget

    from lkconv.benchmarks import triton_launches

    launches = triton_launches.record(biases=(True,))
    jobs = {}
    for arch in ARCHES:
        for launch in launches:
            key, signature, constexprs, attrs, options = triton_launches.bind(launch, GPUTarget("cuda", arch, 32))
            if (arch, key) in jobs:
                continue
            names, kwargs = launch.kernel.arg_names, launch.kwargs
            kind = next(k for k, name in KERNELS.items() if name == launch.kernel.__name__)
            jobs[arch, key] = dict(
                kind=kind, arch=arch, signature=signature, constexprs=constexprs, attrs=attrs,
                options={"num_warps": options.num_warps, "num_stages": options.num_stages},
                report={"set": "launches", "dtype": signature[names[0]][1:], "precision": kwargs["PRECISION"],
                        "transposed": kwargs.get("TRANSPOSED"), "bias": kwargs["HAS_BIAS"],
                        "align": kwargs.get("ALIGN", 1), "shifted": kwargs.get("SHIFTED", False),
                        "constants": sorted(names[path[0]] for path in constexprs if names[path[0]] not in kwargs),
                        "divisible_by_16": sorted(names[path[0]] for path, hints in attrs.items() if hints)})
    return list(jobs.values())


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


def _compile(job: dict) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from lkconv import kernels

    fn = getattr(kernels, KERNELS[job["kind"]])
    compiled = triton.compile(
        ASTSource(fn=fn, signature=job["signature"], constexprs=job["constexprs"], attrs=job["attrs"]),
        target=GPUTarget("cuda", job["arch"], 32), options=job["options"],
    )
    registers, spill_bytes = _ptxas_usage(compiled.asm["ptx"], job["arch"])
    precision = job["report"]["precision"]
    return {
        "kernel": job["kind"], "arch": f"sm_{job['arch']}", **job["report"], "num_warps": job["options"]["num_warps"],
        "cubin_bytes": len(compiled.asm["cubin"]), "shared_bytes": compiled.metadata.shared,
        "registers": registers, "spill_bytes": spill_bytes,
        "uses_mma": ("mma" in compiled.asm["ptx"]) if precision != "ieee" else None,
        # cp.async with 16-byte vectors: what the aligned source loads become.
        "vector_async_copies": compiled.asm["ptx"].count("cp.async.cg.shared.global"),
        # Loads through registers: the masked filter gather of the plain row kernel, a bias.
        "register_global_loads": len(re.findall(r"\bld\.global", compiled.asm["ptx"])),
    }


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the interpreter does not compile", file=sys.stderr)
        return 2
    jobs = list(_config_jobs()) + _launch_jobs()
    with ProcessPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        for result in pool.map(_compile, jobs):
            print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
