"""The RepLKNet paper's Table 1 on this machine: a stack of 24 depthwise convs on (64, 384, R, R) for kernel sizes
3 to 31, PyTorch and lkconv measured in the same run, printed in the paper's layout beside the paper's numbers."""

import contextlib
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F

import lkconv

from .op_suite import BACKENDS, LAYOUTS, baseline_label, checked, tolerance
from .formatting import ms, speedup
from .progress import Progress
from .timing import Budget, exact_fp32, failure, measure, release_memory, set_fp32_math

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PASSES = ("forward", "fwd_bwd")
BASELINES = ("nchw", "channels_last")  # PyTorch's conv on NCHW input (native kernels) and channels_last (cuDNN)

PAPER_SOURCE = "paper, 2080Ti"
PAPER_KERNELS = (3, 5, 7, 9, 13, 17, 21, 27, 29, 31)
# REFERENCE.md §2: ms for the 24-layer stack on (64, 384, R, R), fp32 forward, PyTorch 1.9 + cuDNN 7.6.5 on a
# 2080Ti; "MegEngine" is the paper's own kernel. Keyed (R, implementation), then K.
PAPER_TABLE1: dict[tuple[int, str], dict[int, float]] = {
    (16, "PyTorch"): dict(zip(PAPER_KERNELS, (5.6, 11.0, 14.4, 17.6, 36.0, 57.2, 83.4, 133.5, 150.7, 171.4))),
    (16, "MegEngine"): dict(zip(PAPER_KERNELS, (5.6, 6.5, 6.4, 6.9, 7.5, 8.4, 8.4, 8.4, 8.3, 8.4))),
    (32, "PyTorch"): dict(zip(PAPER_KERNELS, (21.9, 34.1, 54.8, 76.1, 141.2, 230.5, 342.3, 557.8, 638.6, 734.8))),
    (32, "MegEngine"): dict(zip(PAPER_KERNELS, (21.9, 28.7, 34.6, 40.6, 52.5, 64.5, 73.9, 87.9, 92.7, 96.7))),
    (64, "PyTorch"): dict(zip(PAPER_KERNELS,
                              (69.6, 141.2, 228.6, 319.8, 600.0, 977.7, 1454.4, 2371.1, 2698.4, 3090.4))),
    (64, "MegEngine"): dict(zip(PAPER_KERNELS,
                                (69.6, 112.6, 130.7, 152.6, 199.7, 251.5, 301.0, 378.2, 406.0, 431.7))),
}
PAPER_SIZES = {"batch": 64, "channels": 384, "layers": 24}  # the stack the paper's numbers are for


class Impl(NamedTuple):
    """A TableSettings.impls entry: the row's impl name, its input layout, and the lkconv backend (None: PyTorch)."""

    name: str
    layout: str
    backend: Optional[str]


def parse_impl(text: str) -> Impl:
    """'pytorch[nchw]', 'pytorch[channels_last]', 'lkconv[<backend>]' (NCHW input) or 'lkconv[<backend>]@<layout>'.

    The layout suffix goes to the row's "layout" column, so the impl column stays one of the three forms.
    """
    name, _, layout = text.partition("@")
    if not layout and name in (f"pytorch[{baseline}]" for baseline in BASELINES):
        return Impl(name, name.removeprefix("pytorch[").removesuffix("]"), None)
    backend = name.removeprefix("lkconv[").removesuffix("]")
    if name == f"lkconv[{backend}]" and backend in BACKENDS and (layout or "nchw") in LAYOUTS:
        return Impl(name, layout or "nchw", backend)
    raise ValueError(f"impl must be one of {', '.join(f'pytorch[{b}]' for b in BASELINES)}, lkconv[<backend>] or "
                     f"lkconv[<backend>]@<layout> with backend in {BACKENDS} and layout in {tuple(LAYOUTS)}; "
                     f"got {text!r}")


@dataclass
class TableSettings:
    """What to measure; the defaults are the paper's Table 1 (fp32 forward) plus the PyTorch channels_last baseline."""

    resolutions: tuple[int, ...] = (16, 32, 64)
    kernels: tuple[int, ...] = PAPER_KERNELS
    batch: int = 64
    channels: int = 384
    layers: int = 24
    dtypes: tuple[str, ...] = ("float32",)
    passes: tuple[str, ...] = ("forward",)
    impls: tuple[str, ...] = ("pytorch[nchw]", "pytorch[channels_last]", "lkconv[auto]")
    tf32: bool = False
    budget: Budget = Budget()

    def __post_init__(self) -> None:
        """Rejects a bad setting before the run starts, not hours into it."""
        if even := [k for k in self.kernels if k % 2 == 0]:
            raise ValueError(f"kernels must be odd (padding K // 2 keeps the map size through the stack); got {even}")
        for name, allowed in (("dtypes", tuple(DTYPES)), ("passes", PASSES)):
            if unknown := [value for value in getattr(self, name) if value not in allowed]:
                raise ValueError(f"{name} must be among {allowed}; got {unknown}")
        for impl in self.impls:
            parse_impl(impl)

    def measurements(self) -> int:
        return len(self.resolutions) * len(self.kernels) * len(self.dtypes) * len(self.passes) * len(self.impls)


class Stack(NamedTuple):
    """The input, one (C, 1, K, K) weight per layer, and a gradient for the last layer's output."""

    input: torch.Tensor
    weights: list[torch.Tensor]
    grad_output: torch.Tensor

    @property
    def padding(self) -> int:
        return self.weights[0].shape[-1] // 2


def make_stack(settings: TableSettings, resolution: int, dtype: torch.dtype, kernel: int,
               device: torch.device) -> Stack:
    """Random tensors (never zeros: some kernels skip work on them); weights N(0, 1/K²) keep every layer's output
    near unit scale, so 24 layers stay finite in bf16."""
    shape = (settings.batch, settings.channels, resolution, resolution)
    weights = [torch.randn(settings.channels, 1, kernel, kernel, device=device, dtype=dtype) / kernel
               for _ in range(settings.layers)]
    return Stack(torch.randn(shape, device=device, dtype=dtype), weights,
                 torch.randn(shape, device=device, dtype=dtype))


def stack_call(stack: Stack, impl: Impl, pass_name: str) -> Callable:
    """The timed call: every layer in sequence; fwd_bwd adds the backward to the input and all weights through
    autograd.grad, so nothing accumulates into .grad. Layout copies and leaves are made here, outside the timing."""
    channels, padding = stack.input.shape[1], stack.padding

    def conv(x, weight):
        if impl.backend is None:
            return F.conv2d(x, weight, None, 1, padding, 1, channels)
        return lkconv.depthwise_conv2d(x, weight, None, 1, padding)

    def layers(x, weights):
        for weight in weights:
            x = conv(x, weight)
        return x

    memory_format = LAYOUTS[impl.layout]
    x = stack.input.contiguous(memory_format=memory_format)
    if pass_name == "forward":
        return lambda: layers(x, stack.weights)
    x = x.detach().requires_grad_()
    weights = [weight.detach().requires_grad_() for weight in stack.weights]
    grad_output = stack.grad_output.contiguous(memory_format=memory_format)
    return lambda: torch.autograd.grad(layers(x, weights), (x, *weights), grad_output)


def reference_output(stack: Stack) -> torch.Tensor:
    """The stack's forward by PyTorch in exact fp32 (NCHW) from the same numbers: what lkconv's rows are checked
    against."""
    x = stack.input.float()
    with exact_fp32():
        for weight in stack.weights:
            x = F.conv2d(x, weight.float(), None, 1, stack.padding, 1, x.shape[1])
    return x


def _measured(stack: Stack, impl: Impl, pass_name: str, budget: Budget) -> dict:
    """runs_on and the timing of one impl and pass, or the error it raised (a run never stops at one failure)."""
    fields = {"runs_on": baseline_label(impl.layout) if impl.backend is None else ""}
    backend = contextlib.nullcontext() if impl.backend is None else lkconv.use_backend(impl.backend)
    try:
        with backend:
            if impl.backend is not None:
                x = stack.input.contiguous(memory_format=LAYOUTS[impl.layout])
                fields["runs_on"] = lkconv.explain(x, stack.weights[0], None, 1, stack.padding).backend
            timing = measure(stack_call(stack, impl, pass_name), budget)
    except Exception as error:  # noqa: BLE001 - reported in the row
        fields.update(failure(error))
        if isinstance(error, lkconv.BackendUnavailableError):
            fields["runs_on"] = "unavailable"
    else:
        return {**fields, **timing._asdict(), "error": ""}
    release_memory()  # here, once the traceback no longer holds the failed call's tensors
    return fields


def _kernel_rows(settings: TableSettings, impls: list[Impl], resolution: int, dtype_name: str, kernel: int,
                 device: torch.device, progress: Progress) -> list[dict]:
    """Every pass and impl on one stack; the impls share its tensors, so they compute on the same numbers."""
    stack, setup_failure = None, {}
    try:
        stack = make_stack(settings, resolution, DTYPES[dtype_name], kernel, device)
    except Exception as error:  # noqa: BLE001 - e.g. out of memory; every row of this stack reports it
        setup_failure = {"runs_on": "", **failure(error)}
    reference, unchecked = None, ""
    if not setup_failure and "forward" in settings.passes and any(impl.backend for impl in impls):
        try:
            reference = reference_output(stack)
        except Exception as error:  # noqa: BLE001 - e.g. out of memory: lkconv's rows say they were not checked
            unchecked = f"not checked against PyTorch: {failure(error)['error']}"
    if setup_failure or unchecked:
        release_memory()
    rows = []
    for pass_name in settings.passes:
        for impl in impls:
            progress.update(f"table1 R={resolution} K={kernel} {dtype_name} {pass_name} {impl.name} {impl.layout}")
            row = {"suite": "table1", "resolution": resolution, "kernel": kernel, "batch": settings.batch,
                   "channels": settings.channels, "layers": settings.layers, "dtype": dtype_name, "pass": pass_name,
                   "impl": impl.name, "layout": impl.layout}
            row = {**row, **(setup_failure or _measured(stack, impl, pass_name, settings.budget))}
            if impl.backend is not None and pass_name == "forward" and row.get("median_ms") is not None:
                if reference is None:
                    row["checked"] = unchecked
                else:  # the forward's output against PyTorch's: a wrong answer is an error, not a time
                    with lkconv.use_backend(impl.backend):
                        row = checked(row, stack_call(stack, impl, "forward"), reference,
                                      tolerance(dtype_name, settings.tf32, settings.layers))
            rows.append(row)
            progress.advance()
    return rows


def run(settings: TableSettings, progress: Progress) -> list[dict]:
    """One row per (resolution, kernel, dtype, pass, impl), speed-ups filled in; a failure becomes its row's error.

    Sets the process-wide fp32 rule to `settings.tf32` first: PyTorch's convs and lkconv follow the same one.
    """
    set_fp32_math(settings.tf32)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    impls = [parse_impl(name) for name in settings.impls]
    rows = []
    for resolution in settings.resolutions:
        for dtype_name in settings.dtypes:
            for kernel in settings.kernels:
                rows += _kernel_rows(settings, impls, resolution, dtype_name, kernel, device, progress)
        release_memory()  # the next resolution's maps are 4x smaller or larger than the cached blocks
    add_speedups(rows)
    return rows


def add_speedups(rows: list[dict]) -> None:
    """Speed-up of every row over each PyTorch layout on the same stack and pass (>1: faster than that baseline)."""
    def stack_key(row):
        return tuple(row[name] for name in ("resolution", "kernel", "batch", "channels", "layers", "dtype", "pass"))

    baseline = {(stack_key(row), row["impl"]): row["median_ms"] for row in rows if row["impl"].startswith("pytorch")}
    for row in rows:
        for name in BASELINES:
            reference, own = baseline.get((stack_key(row), f"pytorch[{name}]")), row["median_ms"]
            row[f"speedup_vs_{name}"] = reference / own if reference and own else None


def notes(settings: TableSettings) -> dict:
    """How the Table 1 suite measures, and what its paper columns are, for the results' provenance."""
    return {
        "table1_fp32_math": "tf32 allowed" if settings.tf32 else "exact (ieee)",
        "table1_inputs": "random normal input; weights N(0, 1/K^2), so each layer keeps its input's scale",
        "table1_check": "each lkconv forward row's output against PyTorch's stack in exact fp32: past the dtype's "
                        "tolerance times sqrt(layers) the row is an error, not a time (fwd_bwd rows: the op suite "
                        "checks each backward pass)",
        "table1_reference": f"columns marked '{PAPER_SOURCE}' are the paper's Table 1 (REFERENCE.md §2: fp32 forward, "
                            "PyTorch 1.9 + cuDNN 7.6.5; MegEngine = the paper's kernel), not measured here",
    }


# --- markdown in the paper's layout ---------------------------------------------------------------------------------

def paper_layout(rows: list[dict], reference: bool = True) -> str:
    """Markdown in the paper's layout: a row per (R, implementation), a column per kernel size, and a speed-up row
    per R (PyTorch NCHW, the paper's baseline, over lkconv); one table per (dtype, pass).

    With `reference`, the fp32 forward table at the paper's sizes also shows the paper's own rows.
    """
    rows = [row for row in rows if row.get("suite") == "table1"]
    groups = dict.fromkeys((row["dtype"], row["pass"]) for row in rows)
    return "\n\n".join(_table([row for row in rows if (row["dtype"], row["pass"]) == group], reference)
                       for group in groups)


def _implementation_label(impl: str, layout: str, one_lkconv: bool) -> str:
    if impl.startswith("pytorch"):
        return "PyTorch" + (" channels_last" if layout == "channels_last" else "")
    return ("lkconv" if one_lkconv else impl) + (" channels_last" if layout == "channels_last" else "")


def _table(rows: list[dict], reference: bool) -> str:
    first = rows[0]
    median = {(row["resolution"], row["kernel"], row["impl"], row["layout"]): row["median_ms"] for row in rows}
    resolutions = sorted({row["resolution"] for row in rows})
    kernels = sorted({row["kernel"] for row in rows})
    implementations = list(dict.fromkeys((row["impl"], row["layout"]) for row in rows))
    one_lkconv = len({impl for impl, _ in implementations if impl.startswith("lkconv")}) <= 1
    with_paper = reference and (first["dtype"], first["pass"]) == ("float32", "forward") and all(
        first[name] == size for name, size in PAPER_SIZES.items())

    lines = [
        f"**Table 1, {first['dtype']}, {'forward' if first['pass'] == 'forward' else 'forward + backward'}**: "
        f"{first['layers']} stacked depthwise layers on ({first['batch']}, {first['channels']}, R, R), median ms; "
        "'faster by' = PyTorch NCHW / lkconv.",
        "",
        "| R | implementation | " + " | ".join(f"K={k}" for k in kernels) + " |",
        "|---|---|" + "---:|" * len(kernels),
    ]
    for resolution in resolutions:
        for impl, layout in implementations:
            values = [ms(median.get((resolution, k, impl, layout))) for k in kernels]
            lines.append(f"| {resolution} | {_implementation_label(impl, layout, one_lkconv)} | "
                         + " | ".join(values) + " |")
        for impl, layout in implementations:
            if impl.startswith("lkconv"):
                values = [speedup(median.get((resolution, k, "pytorch[nchw]", "nchw")), median.get(
                    (resolution, k, impl, layout))) for k in kernels]
                lines.append(f"| {resolution} | {_implementation_label(impl, layout, one_lkconv)} faster by | "
                             + " | ".join(values) + " |")
        if with_paper:
            for impl in ("PyTorch", "MegEngine"):
                values = [ms(PAPER_TABLE1.get((resolution, impl), {}).get(k)) for k in kernels]
                lines.append(f"| {resolution} | {PAPER_SOURCE}: {impl} | " + " | ".join(values) + " |")
    lines.append("")
    ran_on = {}
    for row in rows:
        ran_on.setdefault(f"{row['impl']} {row['layout']}", {})[row.get("runs_on") or "—"] = None
    lines.append("Ran on: " + "; ".join(f"{name}: {', '.join(places)}" for name, places in ran_on.items()) + ".")
    if with_paper:
        lines.append(f"'{PAPER_SOURCE}' rows: the paper's Table 1 (fp32, PyTorch 1.9 + cuDNN 7.6.5; MegEngine = "
                     "the paper's kernel), not measured here.")
    if failed := sum(1 for row in rows if row.get("error")):
        lines.append(f"{failed} of {len(rows)} measurements failed (—); the error column of the CSV says why.")
    return "\n".join(lines)
