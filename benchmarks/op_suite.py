"""Op level: each pass of one depthwise conv (forward, input grad, weight grad, fwd+bwd) for lkconv's backends
against PyTorch NCHW (native depthwise kernels), PyTorch channels_last (cuDNN) and torch.compile, on the same
inputs in the same process (ARCHITECTURE.md §6). Every lkconv result is also checked against PyTorch in exact fp32:
a wrong answer is reported as an error, never as a time."""

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F

import lkconv

from .progress import Progress
from .roofline import FLOORS_NOTE, PASSES, ConvCase, floor, reference_16bit_floor_ms, useful_flops
from .timing import Budget, exact_fp32, failure, host_us, measure, release_memory

LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
BASELINES = ("nchw", "channels_last", "compile")  # PyTorch's conv in NCHW, in channels_last, and compiled (NCHW)
BACKENDS = ("auto", "torch", "triton", "cuda")
COMPILED_PASSES = ("forward", "fwd_bwd")  # torch.compile has no separate backward-pass entry points to time


@dataclass
class OpSettings:
    """What the op suite times: passes, PyTorch baselines, lkconv backends and layouts, fp32 rule, budget."""
    passes: tuple[str, ...] = PASSES
    baselines: tuple[str, ...] = ("nchw", "channels_last")
    backends: tuple[str, ...] = ("auto",)
    layouts: tuple[str, ...] = tuple(LAYOUTS)
    tf32: bool = False
    budget: Budget = Budget()

    def measurements_per_case(self) -> int:
        baseline_passes = sum(len(self._passes_of(b)) for b in self.baselines)
        return baseline_passes + len(self.backends) * len(self.layouts) * len(self.passes)

    def _passes_of(self, baseline: str) -> tuple[str, ...]:
        return tuple(p for p in self.passes if baseline != "compile" or p in COMPILED_PASSES)


class Inputs(NamedTuple):
    """One case's tensors: the input, the weight and a grad_output for the backward passes."""
    input: torch.Tensor
    weight: torch.Tensor
    grad_output: torch.Tensor


def make_inputs(case: ConvCase, device: torch.device) -> Inputs:
    """Fresh random tensors (never zeros: some kernels skip work on them); the weight is scaled to keep bf16 sane."""
    c = case.shape[1]
    scale = 1.0 / math.sqrt(case.kernel[0] * case.kernel[1])
    return Inputs(
        torch.randn(case.shape, device=device, dtype=case.dtype),
        torch.randn((c, 1, *case.kernel), device=device, dtype=case.dtype) * scale,
        torch.randn(case.output_shape, device=device, dtype=case.dtype),
    )


def in_layout(inputs: Inputs, layout: str) -> Inputs:
    """The inputs with the maps in `layout` (the weight is the same in every layout)."""
    fmt = LAYOUTS[layout]
    return Inputs(inputs.input.contiguous(memory_format=fmt), inputs.weight,
                  inputs.grad_output.contiguous(memory_format=fmt))


def _fwd_bwd(conv: Callable, t: Inputs) -> Callable:
    """Forward then backward to input and weight; autograd.grad so that nothing accumulates into .grad."""
    x = t.input.detach().requires_grad_()
    w = t.weight.detach().requires_grad_()
    return lambda: torch.autograd.grad(conv(x, w), (x, w), t.grad_output)


def pytorch_passes(case: ConvCase, t: Inputs) -> dict[str, Callable]:
    """PyTorch's depthwise conv; each backward pass alone via aten.convolution_backward's output_mask."""
    c, padding = case.shape[1], list(case.padding)

    def backward(mask):
        return lambda: torch.ops.aten.convolution_backward(
            t.grad_output, t.input, t.weight, None, [1, 1], padding, [1, 1], False, [0, 0], c, mask)

    def conv(x, w):
        return F.conv2d(x, w, None, 1, padding, 1, c)

    return {"forward": lambda: conv(t.input, t.weight), "input_grad": backward([True, False, False]),
            "weight_grad": backward([False, True, False]), "fwd_bwd": _fwd_bwd(conv, t)}


def compiled_passes(case: ConvCase, t: Inputs) -> dict[str, Callable]:
    """torch.compile of PyTorch's conv on the NCHW input: inductor's default mode calls aten's conv, in the layout
    its layout optimisation picks (on a GPU, channels_last, so cuDNN with copies in and out, for a depthwise conv of
    over 64 channels); compiled once per case before timing, from a fresh dynamo state so no case hits the
    recompile limit."""
    torch._dynamo.reset()
    c, padding = case.shape[1], list(case.padding)
    conv = torch.compile(lambda x, w: F.conv2d(x, w, None, 1, padding, 1, c), dynamic=False)
    return {"forward": lambda: conv(t.input, t.weight), "fwd_bwd": _fwd_bwd(conv, t)}


def lkconv_passes(case: ConvCase, t: Inputs) -> dict[str, Callable]:
    """lkconv's public function and its two backward ops, called exactly as its autograd calls them."""
    (ph, pw), ops = case.padding, torch.ops.lkconv
    box = [ph, pw, ph, pw]  # the ops take (top, left, bottom, right)

    def conv(x, w):
        return lkconv.depthwise_conv2d(x, w, None, 1, case.padding)

    return {
        "forward": lambda: conv(t.input, t.weight),
        "input_grad": lambda: ops.depthwise_conv2d_input_grad(t.grad_output, t.weight, list(case.shape), [1, 1], box,
                                                              [1, 1]),
        "weight_grad": lambda: ops.depthwise_conv2d_weight_grad(t.grad_output, t.input, list(case.kernel), [1, 1], box,
                                                                [1, 1], False),
        "fwd_bwd": _fwd_bwd(conv, t),
    }


# Relative L2 error an lkconv result may have against PyTorch's exact-fp32 result on the same (rounded) inputs; past it
# the row is an error, not a time (the tests' ARCHITECTURE.md §5 tolerances).
TOLERANCE = {"float32": 1e-5, "tf32": 3e-3, "bfloat16": 1e-2, "float16": 1e-2}
CHECKED_PASSES = ("forward", "input_grad", "weight_grad")


def tolerance(dtype_name: str, tf32: bool, layers: int = 1) -> float:
    """The relative error a result may have against PyTorch in exact fp32: the dtype's (TF32's where allowed), grown
    by the square root of the number of stacked layers, as independent roundings add up."""
    return TOLERANCE["tf32" if tf32 and dtype_name == "float32" else dtype_name] * layers**0.5


def reference_results(case: ConvCase, t: Inputs) -> dict[str, torch.Tensor]:
    """Each checked pass computed by PyTorch in exact fp32 from the case's inputs (NCHW: its native kernels)."""
    c, padding = case.shape[1], list(case.padding)
    x, w, dy = (tensor.float() for tensor in t)
    with exact_fp32():
        y = F.conv2d(x, w, None, 1, padding, 1, c)
        dx, dw, _ = torch.ops.aten.convolution_backward(dy, x, w, None, [1, 1], padding, [1, 1], False, [0, 0], c,
                                                        [True, True, False])
    return {"forward": y, "input_grad": dx, "weight_grad": dw}


# A row's timing fields: a row whose answer is wrong, or whose check raised, reports none of them.
TIMED_FIELDS = ("median_ms", "p20_ms", "p80_ms", "peak_memory_mib", "host_us", "tflops", "floor_ms", "floor_fraction",
                "fp32_fma_floor_fraction", "memory_floor_fraction", "reference_16bit_floor_fraction")


def checked(row: dict, fn: Callable, expected: torch.Tensor, tolerance: float) -> dict:
    """`row` with the relative error of one untimed call of `fn` against `expected`. A result past `tolerance`, or
    a check that raised, turns the row into an error with no time, TFLOP/s or floor fraction (and so no speed-up, no
    plot bar and no vote in `choices`); the time measured stays, as `unchecked_median_ms`, for diagnosis only."""
    try:
        result = fn()
        result = result[0] if isinstance(result, tuple) else result  # the weight-grad op also returns the bias grad
        # In fp32, on the device: precise enough for a 1e-5 tolerance, and no float64 copies of the largest maps.
        scale = expected.norm().item()
        error = (result.float() - expected).norm().item() / (scale or 1.0)
    except Exception as raised:  # noqa: BLE001 - e.g. a wrong shape; a lost CUDA context still stops the run
        reason = "not checked: " + failure(raised)["error"]
    else:
        row["rel_error"] = error
        if error <= tolerance:  # NaN fails too
            return row
        reason = f"wrong result: relative error {error:.2e} against PyTorch fp32 > {tolerance:.0e}"
    release_memory()  # here, after the except block: its traceback held the failed call's tensors
    return withdrawn(row, reason)


def withdrawn(row: dict, reason: str) -> dict:
    """`row` as an error for `reason`, its timing fields emptied; the time measured stays as `unchecked_median_ms`."""
    return {**row, **{field: None for field in TIMED_FIELDS if field in row},
            "unchecked_median_ms": row.get("median_ms"), "error": reason}


def baseline_label(baseline: str) -> str:
    """What answers PyTorch's call (REFERENCE.md §1): native kernels for NCHW, cuDNN for channels_last."""
    if not torch.cuda.is_available():
        return "PyTorch CPU conv"
    return {"nchw": "aten native depthwise", "channels_last": "cuDNN",
            "compile": "inductor (aten conv, its layout)"}[baseline]


def _row(case: ConvCase, pass_name: str, impl: str, layout: str, runs_on: str) -> dict:
    return {"suite": "op", "shape": "x".join(map(str, case.shape)), "batch": case.shape[0],
            "kernel": f"{case.kernel[0]}x{case.kernel[1]}", "dtype": case.dtype_name, "pass": pass_name,
            "impl": impl, "layout": layout, "runs_on": runs_on, "error": ""}


def _kernels_by_pass(explanation: lkconv.Explanation) -> dict[str, str]:
    """The kernels (with blocks and load widths) each pass runs, as lkconv.explain says: a results column, so a GPU
    table tells which kernel form each time belongs to."""
    plans = {"forward": explanation.forward, "input_grad": explanation.input_grad,
             "weight_grad": explanation.weight_grad}
    return {**plans, "fwd_bwd": " | ".join(plans.values())}


def _host_us(fn: Callable, median_ms: float) -> Optional[float]:
    """The host's time per call on a GPU (None on a CPU, for calls of 1 ms or more, which no host overhead of
    Python and launches reaches, or if it cannot be measured: the GPU timing stands)."""
    if not torch.cuda.is_available() or median_ms >= 1:
        return None
    try:
        return host_us(fn)
    except Exception:  # noqa: BLE001 - e.g. out of memory with the timing's tensors still cached
        release_memory()
        return None


def _timed(row: dict, case: ConvCase, fn: Callable, settings: OpSettings) -> dict:
    """`row` with the timing of `fn`, or the error it raised (a benchmark run never stops at one failure)."""
    try:
        timing = measure(fn, settings.budget)
    except Exception as error:  # noqa: BLE001 - reported in the row and at the end
        fields = failure(error)
    else:
        fields = None
    if fields is not None:
        release_memory()  # here, once the traceback no longer holds the failed call's tensors
        return {**row, **fields}
    row.update(timing._asdict(), host_us=_host_us(fn, timing.median_ms))
    row["tflops"] = useful_flops(case, row["pass"]) / (timing.median_ms * 1e-3) / 1e12
    if torch.cuda.is_available():
        bound, reference = floor(case, row["pass"], settings.tf32), reference_16bit_floor_ms(case, row["pass"])
        fma = floor(case._replace(dtype=torch.float32), row["pass"], False)
        row.update(floor_ms=bound.ms, floor_bound=bound.bound, floor_fraction=bound.ms / timing.median_ms,
                   fp32_fma_floor_fraction=fma.compute_ms / timing.median_ms,
                   memory_floor_fraction=bound.memory_ms / timing.median_ms,
                   reference_16bit_floor_fraction=(None if reference is None
                                                   else max(reference, bound.memory_ms) / timing.median_ms))
    return row


def run_case(case: ConvCase, settings: OpSettings, progress: Progress) -> list[dict]:
    """Every baseline and lkconv backend for every pass of `case`; one row each, speed-ups filled in."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        inputs = make_inputs(case, device)
    except Exception as error:  # noqa: BLE001 - e.g. out of memory: every row of this case says so
        fields = failure(error)
        release_memory()
        planned = [(f"pytorch[{b}]", "nchw" if b == "compile" else b, p) for b in settings.baselines
                   for p in settings._passes_of(b)]
        planned += [(f"lkconv[{b}]", layout, p) for b in settings.backends for layout in settings.layouts
                    for p in settings.passes]
        for _ in planned:
            progress.advance()
        return [{**_row(case, p, impl, layout, ""), **fields} for impl, layout, p in planned]
    try:
        expected = reference_results(case, inputs)
    except Exception as error:  # noqa: BLE001 - e.g. out of memory: lkconv's rows say they were not checked
        failure(error)  # raises CudaContextLost if the context is gone
        expected, unchecked = {}, f"not checked against PyTorch: {type(error).__name__}: {error}".splitlines()[0]
        release_memory()
    else:
        unchecked = ""
    rows = []
    for baseline in settings.baselines:
        layout = "nchw" if baseline == "compile" else baseline
        build = compiled_passes if baseline == "compile" else pytorch_passes
        passes = build(case, in_layout(inputs, layout))
        for pass_name in settings._passes_of(baseline):
            progress.update(f"{case.label} {pass_name} pytorch[{baseline}]")
            row = _row(case, pass_name, f"pytorch[{baseline}]", layout, baseline_label(baseline))
            rows.append(_timed(row, case, passes[pass_name], settings))
            progress.advance()
    for backend in settings.backends:
        for layout in settings.layouts:
            t = in_layout(inputs, layout)
            try:
                with lkconv.use_backend(backend):
                    explanation = lkconv.explain(t.input, t.weight, None, 1, case.padding)
            except Exception as error:  # noqa: BLE001 - unavailable here (skipped rows) or a failure (error rows)
                unavailable = isinstance(error, lkconv.BackendUnavailableError)
                runs_on, kernels, refused = "unavailable" if unavailable else "explain failed", {}, error
            else:
                runs_on, kernels, refused = explanation.backend, _kernels_by_pass(explanation), None
            passes, first = lkconv_passes(case, t), len(rows)
            for pass_name in settings.passes:
                progress.update(f"{case.label} {pass_name} lkconv[{backend}] {layout}")
                row = {**_row(case, pass_name, f"lkconv[{backend}]", layout, runs_on),
                       "kernels": kernels.get(pass_name, "")}
                if refused is not None:
                    rows.append({**row, **failure(refused)})
                else:
                    with lkconv.use_backend(backend):
                        row = _timed(row, case, passes[pass_name], settings)
                        if pass_name in expected and not row["error"]:
                            row = checked(row, passes[pass_name], expected[pass_name],
                                          tolerance(row["dtype"], settings.tf32))
                        elif pass_name in CHECKED_PASSES and unchecked:
                            row["checked"] = unchecked
                    rows.append(row)
                progress.advance()
            rows[first:] = _without_fwd_bwd_of_wrong_passes(rows[first:])
    add_speedups(rows)
    return rows


def _without_fwd_bwd_of_wrong_passes(rows: list[dict]) -> list[dict]:
    """One backend's rows in one layout, where a checked pass gave a wrong answer (or its check raised): the unchecked
    fwd_bwd row, which runs that pass, keeps no time either."""
    wrong = [row["pass"] for row in rows if row["error"].startswith(("wrong result", "not checked"))]
    if not wrong:
        return rows
    reason = f"not timed: its {' and '.join(wrong)} gave a wrong answer or failed its check"
    return [withdrawn(row, reason) if row["pass"] == "fwd_bwd" and not row["error"] else row for row in rows]


def add_speedups(rows: list[dict]) -> None:
    """Speed-up of every row over each PyTorch baseline of the same pass (>1 means faster than that baseline)."""
    baseline = {(r["pass"], r["impl"]): r.get("median_ms") for r in rows if r["impl"].startswith("pytorch")}
    for row in rows:
        for name in BASELINES:
            reference = baseline.get((row["pass"], f"pytorch[{name}]"))
            own = None if row.get("error") else row.get("median_ms")  # a wrong answer has no speed-up
            row[f"speedup_vs_{name}"] = reference / own if reference and own else None


def notes(settings: OpSettings) -> dict:
    """How the op suite measures and counts, for the results' provenance."""
    return {
        "op_fp32_math": "tf32 allowed" if settings.tf32 else "exact (ieee)",
        "op_floors": FLOORS_NOTE,
        "op_flops": "useful taps only (taps that land inside the image), 2 FLOPs per multiply-add",
        "op_host_us": "GPU only, for calls under 1 ms: the host's wall time per call, 10 calls issued back to back "
                      "without waiting for the GPU, fastest of 3; where it exceeds the median, consecutive calls are "
                      "host-bound unless captured in a CUDA graph",
    }
