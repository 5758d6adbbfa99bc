"""Per-pass latency of lkconv's depthwise conv against PyTorch's own depthwise convs, all measured in one run.

Each pass (forward, input grad, weight grad) is timed on its own and fwd+bwd together, because a total hides
which pass wins: PyTorch's NCHW weight grad is its slowest pass by far. The baselines are PyTorch NCHW (its
native depthwise kernels) and PyTorch channels_last (cuDNN), on the same inputs in the same process
(ARCHITECTURE.md §6). Without a GPU this is a smoke run on small CPU shapes: it shows the script works, not
how fast anything is.

    python benchmarks/bench_ops.py
    python benchmarks/bench_ops.py --shapes 64x384x32x32 --kernel 31 --dtypes bf16 --layouts nchw --out out/
"""

import argparse
import csv
import datetime
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F

import lkconv

REPO = Path(__file__).resolve().parent.parent

PASSES = ("forward", "input_grad", "weight_grad", "fwd_bwd")
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}
BACKENDS = ("auto", "torch", "triton", "cuda")

# H100 SXM floors from REFERENCE.md §4. On any other device the "% of floor" column still compares to these.
PEAK_FP32_FMA = 67e12
PEAK_TF32 = 495e12
PEAK_BF16_TENSOR_CORE = 989e12
HBM_BYTES_PER_S = 3.35e12

GPU_DEFAULTS = {
    "shapes": ["64x384x32x32", "64x128x56x56"], "kernel": [31],
    "dtypes": ["float32", "bfloat16"], "layouts": ["nchw", "channels_last"],
}
# Small enough that the whole CPU run takes seconds: there it only proves the script works.
CPU_DEFAULTS = {"shapes": ["2x16x32x32"], "kernel": [7, 31], "dtypes": ["float32"], "layouts": ["nchw", "channels_last"]}


class Case(NamedTuple):
    """One problem: input shape (N, C, H, W), a square K x K kernel with padding K // 2, stride 1, and a dtype."""

    shape: tuple[int, int, int, int]
    kernel: int
    dtype: torch.dtype

    @property
    def padding(self) -> int:
        return self.kernel // 2

    @property
    def output_shape(self) -> tuple[int, int, int, int]:
        n, c, h, w = self.shape
        grow = 2 * self.padding - self.kernel + 1
        return (n, c, h + grow, w + grow)

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


# --- arguments -----------------------------------------------------------------------------------------------


def parse_shape(text: str) -> tuple[int, int, int, int]:
    parts = text.lower().replace(",", "x").split("x")
    if len(parts) != 4 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"a shape is NxCxHxW with positive ints, e.g. 64x384x32x32; got {text!r}")
    return tuple(int(p) for p in parts)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", type=parse_shape, help="input shapes NxCxHxW (default: per device)")
    parser.add_argument("--kernel", nargs="+", type=int, help="square kernel sizes K, padding K//2 (default: per device)")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), help="default: float32 bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), help="layouts lkconv runs in (both PyTorch baselines always run)")
    parser.add_argument("--passes", nargs="+", choices=PASSES, default=list(PASSES))
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=["auto"], help="lkconv backends to time (forced via lkconv.use_backend)")
    parser.add_argument("--tf32", action="store_true", help="let fp32 convs use TF32 (PyTorch's default); off = exact fp32 for everyone")
    parser.add_argument("--warmup-ms", type=float, default=25.0, help="GPU warm-up per measurement (do_bench)")
    parser.add_argument("--rep-ms", type=float, default=200.0, help="GPU timed repetitions per measurement (do_bench)")
    parser.add_argument("--cpu-seconds", type=float, default=0.2, help="CPU time budget per measurement")
    parser.add_argument("--out", type=Path, help="directory for bench_ops.{csv,json,md}")
    args = parser.parse_args(argv)
    defaults = GPU_DEFAULTS if torch.cuda.is_available() else CPU_DEFAULTS
    args.shapes = args.shapes or [parse_shape(s) for s in defaults["shapes"]]
    args.kernel = args.kernel or defaults["kernel"]
    args.dtypes = args.dtypes or defaults["dtypes"]
    args.layouts = args.layouts or defaults["layouts"]
    if min(args.kernel) < 1:
        parser.error(f"--kernel sizes must be >= 1; got {args.kernel}")
    return args


# --- work and floors -----------------------------------------------------------------------------------------


def useful_taps_per_axis(size: int, kernel: int, padding: int, stride: int = 1, dilation: int = 1) -> int:
    """Sum over output positions of the kernel taps that land inside the image, along one axis.

    A 2-D conv's useful multiply-adds per map are the product of the two axes' sums, because a tap (r, q) is
    inside the image exactly when r is inside along H and q is inside along W.
    """
    outputs = (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    total = 0
    for o in range(max(outputs, 0)):
        first = max(0, -((o * stride - padding) // dilation))  # smallest tap with o*s - p + k*d >= 0
        last = min(kernel - 1, (size - 1 - o * stride + padding) // dilation)
        total += max(0, last - first + 1)
    return total


def useful_flops(case: Case) -> int:
    """2 x useful multiply-adds of one pass (forward, input grad and weight grad all do the same products)."""
    n, c, h, w = case.shape
    return 2 * n * c * useful_taps_per_axis(h, case.kernel, case.padding) * useful_taps_per_axis(w, case.kernel, case.padding)


def pass_flops(case: Case, pass_name: str) -> int:
    return useful_flops(case) * (3 if pass_name == "fwd_bwd" else 1)


def pass_bytes(case: Case, pass_name: str) -> int:
    """Bytes a pass must read and write at least once: its two big tensors in, one out, plus the weight."""
    element = torch.finfo(case.dtype).bits // 8
    x, y = math.prod(case.shape), math.prod(case.output_shape)
    w = case.shape[1] * case.kernel**2
    per_pass = {"forward": x + w + y, "input_grad": y + w + x, "weight_grad": y + x + w}
    if pass_name == "fwd_bwd":
        return element * sum(per_pass.values())
    return element * per_pass[pass_name]


def floor_ms(case: Case, pass_name: str, tf32: bool) -> tuple[float, str]:
    """The H100 roofline floor of a pass (ms) and what sets it: 'compute' or 'memory'."""
    if case.dtype == torch.float32:
        peak = PEAK_TF32 if tf32 else PEAK_FP32_FMA
    else:
        peak = PEAK_BF16_TENSOR_CORE
    compute = pass_flops(case, pass_name) / peak * 1e3
    memory = pass_bytes(case, pass_name) / HBM_BYTES_PER_S * 1e3
    return (compute, "compute") if compute >= memory else (memory, "memory")


# --- the timed functions -------------------------------------------------------------------------------------


class Inputs(NamedTuple):
    input: torch.Tensor
    weight: torch.Tensor
    grad_output: torch.Tensor


def make_inputs(case: Case, device: torch.device) -> Inputs:
    """Fresh random tensors (never zeros: some kernels skip work on them); the weight is scaled to keep bf16 sane."""
    c = case.shape[1]
    return Inputs(
        torch.randn(case.shape, device=device, dtype=case.dtype),
        torch.randn((c, 1, case.kernel, case.kernel), device=device, dtype=case.dtype) / case.kernel,
        torch.randn(case.output_shape, device=device, dtype=case.dtype),
    )


def in_layout(inputs: Inputs, layout: str) -> Inputs:
    fmt = LAYOUTS[layout]
    return Inputs(inputs.input.contiguous(memory_format=fmt), inputs.weight, inputs.grad_output.contiguous(memory_format=fmt))


def _fwd_bwd(conv: Callable, t: Inputs) -> Callable:
    """Forward then backward to input and weight; autograd.grad so that nothing accumulates into .grad."""
    x = t.input.detach().requires_grad_()
    w = t.weight.detach().requires_grad_()
    return lambda: torch.autograd.grad(conv(x, w), (x, w), t.grad_output)


def pytorch_passes(case: Case, t: Inputs) -> dict[str, Callable]:
    """PyTorch's depthwise conv; each backward pass alone via aten.convolution_backward's output_mask."""
    c, p = case.shape[1], case.padding

    def backward(mask):
        return lambda: torch.ops.aten.convolution_backward(
            t.grad_output, t.input, t.weight, None, [1, 1], [p, p], [1, 1], False, [0, 0], c, mask
        )

    return {
        "forward": lambda: F.conv2d(t.input, t.weight, None, 1, p, 1, c),
        "input_grad": backward([True, False, False]),
        "weight_grad": backward([False, True, False]),
        "fwd_bwd": _fwd_bwd(lambda x, w: F.conv2d(x, w, None, 1, p, 1, c), t),
    }


def lkconv_passes(case: Case, t: Inputs) -> dict[str, Callable]:
    """lkconv's public function and its two backward ops, called exactly as its autograd calls them."""
    p = case.padding
    box = [p, p, p, p]  # the ops take (top, left, bottom, right)
    kernel = [case.kernel, case.kernel]
    ops = torch.ops.lkconv
    return {
        "forward": lambda: lkconv.depthwise_conv2d(t.input, t.weight, None, 1, p),
        "input_grad": lambda: ops.depthwise_conv2d_input_grad(t.grad_output, t.weight, list(case.shape), [1, 1], box, [1, 1]),
        "weight_grad": lambda: ops.depthwise_conv2d_weight_grad(t.grad_output, t.input, kernel, [1, 1], box, [1, 1], False),
        "fwd_bwd": _fwd_bwd(lambda x, w: lkconv.depthwise_conv2d(x, w, None, 1, p), t),
    }


# --- timing --------------------------------------------------------------------------------------------------


class Timing(NamedTuple):
    median_ms: float
    p20_ms: float
    p80_ms: float
    extra_memory_mb: Optional[float]


def time_gpu(fn: Callable, args: argparse.Namespace) -> Timing:
    """CUDA-event timing with L2 flushed between calls (do_bench does both); median and 20/80 percentiles."""
    from triton.testing import do_bench

    median, p20, p80 = do_bench(fn, warmup=args.warmup_ms, rep=args.rep_ms, quantiles=[0.5, 0.2, 0.8])
    return Timing(median, p20, p80, peak_extra_memory_mb(fn))


def peak_extra_memory_mb(fn: Callable) -> float:
    """GPU memory one call allocates beyond what is already live (outputs plus workspace)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def time_cpu(fn: Callable, args: argparse.Namespace) -> Timing:
    """Wall-clock timing of single calls for a fixed budget (at least 5 calls), after two warm-up calls."""
    fn(), fn()
    times = []
    start = time.perf_counter()
    while len(times) < 5 or (time.perf_counter() - start < args.cpu_seconds and len(times) < 1000):
        begin = time.perf_counter()
        fn()
        times.append((time.perf_counter() - begin) * 1e3)
    deciles = statistics.quantiles(times, n=10, method="inclusive")
    return Timing(statistics.median(times), deciles[1], deciles[7], None)


def set_fp32_math(tf32: bool) -> None:
    """One fp32 rule for every implementation; lkconv follows the same PyTorch setting cuDNN does."""
    try:
        torch.backends.cudnn.conv.fp32_precision = "tf32" if tf32 else "ieee"
    except AttributeError:  # PyTorch without the fp32_precision API
        torch.backends.cudnn.allow_tf32 = tf32


# --- one case ------------------------------------------------------------------------------------------------


def measure(case: Case, pass_name: str, impl: str, layout: str, runs_on: str, fn: Callable, args, on_gpu: bool) -> dict:
    """One row: timing of `fn`, or the error it raised (a benchmark run never stops at one failure)."""
    row = {
        "shape": "x".join(map(str, case.shape)), "kernel": case.kernel, "dtype": case.dtype_name, "pass": pass_name,
        "impl": impl, "layout": layout, "runs_on": runs_on, "error": "",
    }
    try:
        timing = (time_gpu if on_gpu else time_cpu)(fn, args)
    except Exception as error:  # noqa: BLE001 - reported in the row and at the end
        row.update(median_ms=math.nan, p20_ms=math.nan, p80_ms=math.nan, extra_memory_mb=None)
        row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        return row
    row.update(timing._asdict())
    row["tflops"] = pass_flops(case, pass_name) / (timing.median_ms * 1e-3) / 1e12
    if on_gpu:
        floor, bound = floor_ms(case, pass_name, args.tf32)
        row.update(floor_ms=floor, floor_bound=bound, floor_fraction=floor / timing.median_ms)
    return row


def pytorch_label(layout: str, on_gpu: bool) -> str:
    """What answers PyTorch's call (REFERENCE.md §1): native kernels for NCHW, cuDNN for channels_last."""
    if not on_gpu:
        return "PyTorch CPU conv"
    return "aten native depthwise" if layout == "nchw" else "cuDNN"


def run_case(case: Case, args: argparse.Namespace, device: torch.device, on_gpu: bool) -> list[dict]:
    inputs = make_inputs(case, device)
    rows = []
    for layout in LAYOUTS:
        passes = pytorch_passes(case, in_layout(inputs, layout))
        for pass_name in args.passes:
            rows.append(measure(case, pass_name, "pytorch", layout, pytorch_label(layout, on_gpu), passes[pass_name], args, on_gpu))
    for backend in args.backends:
        for layout in args.layouts:
            t = in_layout(inputs, layout)
            try:
                with lkconv.use_backend(backend):
                    runs_on = lkconv.explain(t.input, t.weight, None, 1, case.padding).backend
            except lkconv.BackendUnavailableError as error:
                print(f"  skipped lkconv[{backend}] {layout}: {error}")
                continue
            passes = lkconv_passes(case, t)
            for pass_name in args.passes:
                with lkconv.use_backend(backend):
                    rows.append(measure(case, pass_name, f"lkconv[{backend}]", layout, runs_on, passes[pass_name], args, on_gpu))
    add_speedups(rows)
    return rows


def add_speedups(rows: list[dict]) -> None:
    """Speed-up of every row over both PyTorch baselines of the same pass (>1 means faster than PyTorch)."""
    baseline = {(r["pass"], r["layout"]): r["median_ms"] for r in rows if r["impl"] == "pytorch"}
    for row in rows:
        for layout in LAYOUTS:
            reference = baseline.get((row["pass"], layout), math.nan)
            row[f"speedup_vs_pytorch_{layout}"] = reference / row["median_ms"]


# --- provenance and output -----------------------------------------------------------------------------------


def _command_output(*command: str) -> Optional[str]:
    try:
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def provenance(args: argparse.Namespace, on_gpu: bool) -> dict:
    """Everything needed to tell later which machine and code produced the numbers."""
    import numpy
    import triton

    status = _command_output("git", "status", "--porcelain", "--untracked-files=no")
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _command_output("git", "rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "device": torch.cuda.get_device_name() if on_gpu else f"CPU ({platform.machine()}, torch threads: {torch.get_num_threads()})",
        "driver": _command_output("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader") if on_gpu else None,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if on_gpu else None,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
        "lkconv": lkconv.__version__,
        "lkconv_backends_available": lkconv.available_backends(),
        "fp32_math": "tf32 allowed" if args.tf32 else "exact (ieee)",
        "timing": (
            f"triton.testing.do_bench(warmup={args.warmup_ms}, rep={args.rep_ms}), CUDA events, L2 flushed, median/p20/p80"
            if on_gpu else f"time.perf_counter per call, {args.cpu_seconds}s per measurement, median/p20/p80"
        ),
        "floors": "H100 SXM (REFERENCE.md §4): fp32 FMA 67, TF32 495, bf16/fp16 989 TFLOP/s, HBM 3.35 TB/s",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }


def _ms(value: float) -> str:
    if value is None or math.isnan(value):
        return "—"
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def _ratio(value: Optional[float]) -> str:
    return "—" if value is None or math.isnan(value) else f"{value:.2f}x"


def _percent(value: Optional[float]) -> str:
    return "—" if value is None or math.isnan(value) else f"{100 * value:.1f}%"


def _markdown(header: list[str], lines: list[list[str]]) -> str:
    rows = [header, ["---"] * len(header), *lines]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in rows)


def full_table(rows: list[dict]) -> str:
    """Every measurement, with spread, throughput and memory (for the results file)."""
    header = ["shape", "K", "dtype", "pass", "impl", "layout", "runs on", "median ms", "p20–p80 ms",
              "vs PyTorch NCHW", "vs PyTorch CL", "TFLOP/s", "% of H100 floor", "extra MiB"]
    lines = []
    for r in rows:
        memory = r.get("extra_memory_mb")
        lines.append([
            r["shape"], str(r["kernel"]), r["dtype"], r["pass"], r["impl"], r["layout"], r["runs_on"],
            _ms(r["median_ms"]) if not r["error"] else f"error: {r['error']}",
            "—" if r["error"] else f"{_ms(r['p20_ms'])}–{_ms(r['p80_ms'])}",
            _ratio(r["speedup_vs_pytorch_nchw"]), _ratio(r["speedup_vs_pytorch_channels_last"]),
            f"{r['tflops']:.3g}" if "tflops" in r else "—", _percent(r.get("floor_fraction")),
            "—" if memory is None else f"{memory:.0f}",
        ])
    return _markdown(header, lines)


def short_table(rows: list[dict]) -> str:
    """One line per lkconv measurement next to both baselines: the table to read first."""
    baseline = {(r["shape"], r["kernel"], r["dtype"], r["pass"], r["layout"]): r["median_ms"] for r in rows if r["impl"] == "pytorch"}
    header = ["shape", "K", "dtype", "pass", "lkconv", "ms", "PyTorch NCHW ms", "PyTorch CL ms",
              "vs NCHW", "vs CL", "TFLOP/s", "% floor"]
    lines = []
    for r in rows:
        if r["impl"] == "pytorch":
            continue
        key = (r["shape"], r["kernel"], r["dtype"], r["pass"])
        lines.append([
            r["shape"], str(r["kernel"]), r["dtype"], r["pass"], f"{r['impl']} {r['layout']} ({r['runs_on']})",
            _ms(r["median_ms"]) if not r["error"] else "error",
            _ms(baseline.get((*key, "nchw"))), _ms(baseline.get((*key, "channels_last"))),
            _ratio(r["speedup_vs_pytorch_nchw"]), _ratio(r["speedup_vs_pytorch_channels_last"]),
            f"{r['tflops']:.3g}" if "tflops" in r else "—", _percent(r.get("floor_fraction")),
        ])
    return _markdown(header, lines)


def write_results(out: Path, rows: list[dict], meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(out / "bench_ops.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    with open(out / "bench_ops.json", "w") as file:
        # Strict JSON has no NaN: a failed measurement's times become null.
        clean = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()} for row in rows]
        json.dump({"provenance": meta, "rows": clean}, file, indent=1, default=str)
    provenance_lines = "\n".join(f"- {key}: {value}" for key, value in meta.items())
    (out / "bench_ops.md").write_text(f"# lkconv bench_ops\n\n{provenance_lines}\n\n{full_table(rows)}\n")
    print(f"wrote {out / 'bench_ops.csv'}, {out / 'bench_ops.json'}, {out / 'bench_ops.md'}")


def main(argv=None) -> int:
    args = parse_args(argv)
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    if not on_gpu:
        print("No CUDA GPU here: this is a CPU smoke run of the torch backend on small shapes.\n"
              "GPU numbers need a GPU (benchmarks/gpu_session.sh); nothing below says how fast lkconv is.")
        # One thread: on a small shared CI machine, oversubscribed threads turn millisecond calls into time slices.
        torch.set_num_threads(1)
    set_fp32_math(args.tf32)
    torch.manual_seed(0)
    meta = provenance(args, on_gpu)
    print(f"{meta['device']} | torch {meta['torch']} | triton {meta['triton']} | CUDA {meta['cuda']} | "
          f"commit {(meta['git_commit'] or 'unknown')[:12]} | fp32 {meta['fp32_math']}")

    rows = []
    for shape in args.shapes:
        for kernel in args.kernel:
            for dtype in dict.fromkeys(DTYPES[name] for name in args.dtypes):
                case = Case(shape, kernel, dtype)
                print(f"timing {case.shape} K={kernel} {case.dtype_name} ...", flush=True)
                try:
                    rows += run_case(case, args, device, on_gpu)
                finally:
                    if on_gpu:
                        torch.cuda.empty_cache()

    if args.out is not None:
        write_results(args.out, rows, meta)
    failures = [r for r in rows if r["error"]]
    for r in failures:
        print(f"FAILED {r['impl']} {r['layout']} {r['pass']} {r['shape']} K={r['kernel']} {r['dtype']}: {r['error']}")
    print()
    print(short_table(rows))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
