"""The benchmark command: ``python -m benchmarks`` (also installed as ``lkconv-bench``).

    python -m benchmarks                               # quick preset on a GPU, small CPU defaults otherwise
    python -m benchmarks --preset full --chunk 1/4 --out results/h100
    python -m benchmarks --suites op --shapes 64x384x32x32 --kernels 31 51x5 --dtypes bfloat16 --passes forward
    python -m benchmarks report results/h100           # merge chunks, redo tables and plots from the JSON
    python -m benchmarks choices results/h100          # auto's triton-vs-cuda table from a run timing both
    python -m benchmarks precompile                    # compile a GPU session's Triton kernels on every core first
    python -m benchmarks host                          # the host's µs per call of lkconv's Python layers, on a CPU
"""

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from lkconv.backends import measured

from . import host_time, model_suite, op_suite, paper_table, plots, presets, report, triton_launches
from .progress import Progress
from .provenance import provenance
from .roofline import PASSES, ConvCase
from .timing import Budget, CudaContextLost, failure, release_memory, set_fp32_math

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SUITES = ("op", "table1", "model")


def parse_shape(text: str) -> tuple[int, int, int, int]:
    """An NxCxHxW shape from the command line."""
    parts = text.lower().replace(",", "x").split("x")
    if len(parts) != 4 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"a shape is NxCxHxW with positive ints, e.g. 64x384x32x32; got {text!r}")
    return tuple(int(p) for p in parts)


def parse_kernel(text: str) -> tuple[int, int]:
    """An odd K or KHxKW kernel size from the command line."""
    parts = text.lower().split("x")
    if len(parts) not in (1, 2) or not all(p.isdigit() and int(p) % 2 == 1 for p in parts):
        raise argparse.ArgumentTypeError(f"a kernel is an odd K or KHxKW, e.g. 31 or 51x5; got {text!r}")
    return (int(parts[0]), int(parts[-1]))


def parse_chunk(text: str) -> tuple[int, int]:
    """A K/N chunk of the full preset from the command line."""
    try:
        index, count = (int(p) for p in text.split("/"))
    except ValueError:
        index = count = 0
    if not 1 <= index <= count:
        raise argparse.ArgumentTypeError(f"a chunk is K/N with 1 <= K <= N, e.g. 2/4; got {text!r}")
    return index, count


def positive_float(text: str) -> float:
    """A time budget from the command line: a number > 0."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number > 0; got {text!r}")
    return value


def program() -> str:
    """How the user started the command (`python -m benchmarks`, `python -m lkconv.benchmarks` or the
    `lkconv-bench` entry point), for usage lines and hints."""
    invoked_as = Path(sys.argv[0]).name
    if invoked_as not in ("__main__.py", "-c", ""):
        return invoked_as
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name == "lkconv.benchmarks.__main__":
        return "python -m lkconv.benchmarks"
    return "python -m benchmarks"  # also where another program (pytest) imported this module


def parser() -> argparse.ArgumentParser:
    """The command line of a benchmark run; its help is this module's docstring."""
    p = argparse.ArgumentParser(prog=program(), description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=("quick", "full", "cpu"),
                   help="quick (predicted <5 min on an H100, not yet measured), full (use --chunk), cpu; default "
                        "quick on a GPU, cpu otherwise")
    p.add_argument("--suites", nargs="+", choices=SUITES, help="default: all three")
    p.add_argument("--out", type=Path, help="folder for results*.{json,csv,md} and PNG plots")
    p.add_argument("--chunk", type=parse_chunk, help="run only part K of N of the work (each part writes its files)")
    p.add_argument("--shapes", nargs="+", type=parse_shape, help="op suite input shapes NxCxHxW")
    p.add_argument("--kernels", nargs="+", type=parse_kernel, help="kernel sizes K or KHxKW (op suite; square ones "
                   "also for table1)")
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES))
    p.add_argument("--layouts", nargs="+", choices=list(op_suite.LAYOUTS), help="layouts lkconv runs in")
    p.add_argument("--passes", nargs="+", choices=PASSES, help="op suite passes (default: all four)")
    p.add_argument("--backends", nargs="+", choices=op_suite.BACKENDS, help="lkconv backends to time")
    p.add_argument("--baselines", nargs="+", choices=op_suite.BASELINES, help="PyTorch baselines to time")
    p.add_argument("--tf32", action="store_true", help="let fp32 convs use TF32 (PyTorch's default); off = exact fp32")
    p.add_argument("--rep-ms", type=positive_float, help="GPU timed repetitions per measurement (do_bench)")
    p.add_argument("--warmup-ms", type=positive_float, help="GPU warm-up per measurement (do_bench)")
    p.add_argument("--cpu-seconds", type=positive_float, help="CPU time budget per measurement")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--strict", action="store_true", help="exit 1 when any measurement failed")
    return p


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fills every unset option from the preset; on a CPU-only machine every preset becomes the cpu one.

    --dtypes, --passes, --layouts, --backends and --baselines reach every suite they mean something to (table1:
    dtypes, forward/fwd_bwd, backends, the NCHW and channels_last baselines; model: fp32/bf16, layouts). Raises
    ValueError when one given explicitly leaves a requested suite with nothing to run.
    """
    for name in ("suites", "shapes", "kernels", "dtypes", "layouts", "passes", "backends", "baselines"):
        if getattr(args, name) is not None:  # a value given twice is measured once
            setattr(args, name, list(dict.fromkeys(getattr(args, name))))
    asked = args.preset or presets.default_preset()
    args.preset = asked if torch.cuda.is_available() else "cpu"
    args.asked_preset = asked
    defaults = presets.defaults(args.preset)
    explicit = {name for name in ("dtypes", "layouts", "passes", "backends", "baselines")
                if getattr(args, name) is not None}
    for name in ("suites", "dtypes", "layouts", "backends", "baselines"):
        if getattr(args, name) is None:
            setattr(args, name, defaults[name])
    # A training step takes hundreds of ms on a GPU: the model suite's own default window gives a median of several
    # samples. A --rep-ms given applies to every suite.
    args.model_rep_ms = args.rep_ms or defaults["model_rep_ms"]
    for name in ("rep_ms", "warmup_ms", "cpu_seconds"):
        if getattr(args, name) is None:
            setattr(args, name, defaults[name])
    args.passes = tuple(args.passes or PASSES)
    if args.shapes or args.kernels:
        preset_cases = presets.op_shapes(args.preset)
        shapes = args.shapes or list(dict.fromkeys(shape for shape, _ in preset_cases))
        kernels = args.kernels or list(dict.fromkeys(kernel for _, kernel in preset_cases))
        args.op_cases = [(s, k) for s in shapes for k in kernels]
    else:
        args.op_cases = presets.op_shapes(args.preset)
    for name, takers in (("shapes", ("op",)), ("kernels", ("op", "table1"))):
        if getattr(args, name) and not set(takers) & set(args.suites):
            raise ValueError(f"--{name} applies to the {' and '.join(takers)} suite{'s' * (len(takers) > 1)}, "
                             f"which --suites {' '.join(args.suites)} leaves out")
    square = [k for k, w in args.kernels or [] if k == w]
    if args.kernels and not square and "table1" in args.suites:
        raise ValueError(f"--kernels {' '.join(f'{h}x{w}' for h, w in args.kernels)} leaves the table1 suite nothing "
                         "to run (the paper's table takes square kernels); add a square one, or leave table1 out of "
                         "--suites")
    args.defaults = defaults
    args.table_kernels = tuple(square) or defaults["table_kernels"]
    _apply_to_table_and_model(args, explicit)
    return args


MODEL_PRECISIONS = {"float32": "fp32", "bfloat16": "bf16"}  # the model suite's names for the dtypes it runs


def _apply_to_table_and_model(args: argparse.Namespace, explicit: set) -> None:
    d = args.defaults

    def chosen(name, allowed, suite, left="nothing to run"):
        """The explicitly given values of option `name` that `suite` takes; None when the option was not given. None
        of them is an error: the suite would be `left` with nothing to run, or a table with no baseline."""
        if name not in explicit:
            return None
        kept = tuple(value for value in getattr(args, name) if value in allowed)
        if not kept and suite in args.suites:
            raise ValueError(f"--{name} {' '.join(getattr(args, name))} leaves the {suite} suite {left} (it "
                             f"takes {', '.join(allowed)}); choose some of those, or leave {suite} out of --suites")
        return kept

    args.table_dtypes = chosen("dtypes", tuple(paper_table.DTYPES), "table1") or d["table_dtypes"]
    args.table_passes = chosen("passes", paper_table.PASSES, "table1") or d["table_passes"]
    default_impls = paper_table.TableSettings.impls
    # The paper's table compares lkconv with PyTorch: it needs a PyTorch baseline (compile is none).
    baselines = chosen("baselines", paper_table.BASELINES, "table1", left="no PyTorch baseline to compare with")
    backends = chosen("backends", op_suite.BACKENDS, "table1")
    args.table_impls = (
        tuple(i for i in default_impls if i.startswith("pytorch")) if baselines is None
        else tuple(f"pytorch[{b}]" for b in baselines)
    ) + (
        tuple(i for i in default_impls if i.startswith("lkconv")) if backends is None
        else tuple(f"lkconv[{b}]" for b in backends)
    )
    precisions = chosen("dtypes", tuple(MODEL_PRECISIONS), "model")
    args.model_precisions = tuple(MODEL_PRECISIONS[p] for p in precisions) if precisions else model_suite.PRECISIONS
    args.model_layouts = chosen("layouts", tuple(op_suite.LAYOUTS), "model") or d["model_layouts"]


def work_units(args: argparse.Namespace) -> list[tuple[str, object]]:
    """The run as independent pieces (suite, settings), so --chunk can split it evenly and reproducibly."""
    d, budget = args.defaults, Budget(args.warmup_ms, args.rep_ms, args.cpu_seconds)
    units = []
    if "op" in args.suites:
        settings = op_suite.OpSettings(args.passes, tuple(args.baselines), tuple(args.backends), tuple(args.layouts),
                                       args.tf32, budget)
        for shape, kernel in args.op_cases:
            for dtype in args.dtypes:
                units.append(("op", (ConvCase(shape, kernel, DTYPES[dtype]), settings)))
    if "table1" in args.suites:
        table = paper_table.TableSettings(
            resolutions=d["table_resolutions"], kernels=args.table_kernels, batch=d["table_batch"],
            channels=d["table_channels"], dtypes=args.table_dtypes, passes=args.table_passes, impls=args.table_impls,
            tf32=args.tf32, budget=budget)
        # One unit per (resolution, dtype, pass): the slow ones (R=64, fwd+bwd) then spread over chunks.
        units += [("table1", dataclasses.replace(table, resolutions=(r,), dtypes=(dtype,), passes=(pass_name,)))
                  for r in table.resolutions for dtype in table.dtypes for pass_name in table.passes]
    if "model" in args.suites:
        model_budget = budget._replace(rep_ms=args.model_rep_ms)
        model = model_suite.ModelSettings(
            resolutions=d["model_resolutions"], batches=d["model_batches"], modes=d["model_modes"],
            precisions=args.model_precisions, layouts=args.model_layouts, model_overrides=d["model_overrides"],
            tf32=args.tf32, budget=model_budget)
        # One unit per (resolution, mode): a time limit that stops the training steps keeps the inference rows.
        units += [("model", dataclasses.replace(model, resolutions=(r,), modes=(mode,)))
                  for r in model.resolutions for mode in model.modes]
    if args.chunk:
        index, count = args.chunk
        if count > len(units):
            raise ValueError(f"--chunk {index}/{count}: these settings make {len(units)} work unit(s), so some of "
                             f"{count} chunks would be empty; split into at most {len(units)}")
        units = units[index - 1::count]
    return units


def measurements(suite: str, work) -> int:
    """How many timings a suite's work unit takes, for the progress bar."""
    return work[1].measurements_per_case() if suite == "op" else work.measurements()


def unit_label(suite: str, work) -> str:
    """What a work unit measures, in a few words, for a unit that failed as a whole."""
    if suite == "op":
        return work[0].label
    if suite == "table1":
        return f"R={work.resolutions[0]} {work.dtypes[0]} {work.passes[0]}"
    return f"{work.label()} R={work.resolutions[0]} {work.modes[0]}"


def run_unit(suite: str, work, progress: Progress) -> list[dict]:
    """One unit's rows. A failure outside the suite's own per-measurement handling (say, out of memory while
    preparing) becomes one error row for the unit, suite 'failed unit', and the run goes on with the next."""
    try:
        if suite == "op":
            return op_suite.run_case(*work, progress)
        if suite == "table1":
            return paper_table.run(work, progress)
        return model_suite.run(work, progress)
    except (CudaContextLost, KeyboardInterrupt):
        raise
    except Exception as error:  # noqa: BLE001 - failure() raises CudaContextLost where the context is gone
        return [{"suite": "failed unit", "unit": f"{suite} {unit_label(suite, work)}", **failure(error)}]


def run(units: list, progress: Progress, save) -> tuple[list[dict], Optional[str]]:
    """Runs the units in order, saving after each (marked as in progress, so that a file left by a killed run says
    so); stops early (keeping what it has) when interrupted or when a CUDA error made the context unusable.
    Returns the rows and why it stopped early, if it did."""
    rows = []
    for done, (suite, work) in enumerate(units, 1):
        try:
            rows += run_unit(suite, work, progress)
            release_memory()
        except CudaContextLost as error:
            return rows, f"stopped: the CUDA context was lost ({error})"
        except KeyboardInterrupt:
            return rows, "stopped: interrupted (SIGINT, e.g. a time limit)"
        if done < len(units):
            save(rows, f"in progress: {done} of {len(units)} work units done (a run killed before its end)")
    return rows, None


def settings_note(args: argparse.Namespace) -> dict:
    """The run's settings and each chosen suite's method notes, for the results' provenance."""
    suite_notes = {"op": lambda: op_suite.notes(op_suite.OpSettings(tf32=args.tf32)),
                   "table1": lambda: paper_table.notes(paper_table.TableSettings(tf32=args.tf32)),
                   "model": lambda: model_suite.notes(model_suite.ModelSettings(
                       tf32=args.tf32, model_overrides=args.defaults["model_overrides"]))}
    selection = {name: getattr(args, name) for name in (
        "op_cases", "dtypes", "passes", "layouts", "backends", "baselines", "table_kernels", "table_dtypes",
        "table_passes", "table_impls", "model_precisions", "model_layouts", "warmup_ms", "rep_ms", "cpu_seconds")}
    return {
        "preset": args.preset, "suites": list(args.suites),
        # What the whole run measures (before --chunk splits it), so that `report` merges only chunks of one run.
        "selection": json.loads(json.dumps(selection)),
        "chunk": "/".join(map(str, args.chunk)) if args.chunk else None,
        "fp32_math": "tf32 allowed" if args.tf32 else "exact (ieee)",
        "timing": (f"triton.testing.do_bench(warmup={args.warmup_ms}, rep={args.rep_ms}; the model suite "
                   f"rep={args.model_rep_ms}), CUDA events, L2 flushed, median/p20/p80" if torch.cuda.is_available()
                   else f"time.perf_counter per call, {args.cpu_seconds}s per measurement, median/p20/p80"),
        **{key: value for suite in args.suites for key, value in suite_notes[suite]().items()},
    }


def write_outputs(out: Path, stem: str, rows: list[dict], meta: dict, with_plots: bool) -> None:
    """The results' JSON, CSV and markdown in `out`, and the plots where matplotlib is installed."""
    paths = report.write(out, stem, rows, meta)
    with_plots = with_plots and bool(rows)
    if with_plots:
        if plots.available():
            paths += plots.write_all(rows, out, meta.get("device", "?"))
        else:
            print("matplotlib is not installed: no plots (pip install matplotlib, then "
                  f"{program()} report {out})")
    print("wrote " + ", ".join(str(p) for p in paths))


def main_run(argv) -> int:
    """`python -m benchmarks`: runs the chosen suites and writes their results; returns the exit status."""
    p = parser()
    try:
        args = resolve(p.parse_args(argv))
        units = work_units(args)
    except ValueError as error:
        p.error(str(error))
    if args.out is not None:
        try:  # before anything is measured, not after the first unit
            args.out.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            p.error(f"--out {args.out}: cannot make it a folder for the results ({error.strerror or error})")
    if not torch.cuda.is_available():
        instead = "" if args.asked_preset == "cpu" else f" instead of '{args.asked_preset}'"
        print(f"No CUDA GPU here: running on the CPU, with the defaults of preset 'cpu'{instead} (small shapes, the "
              "torch backend) where the options say nothing else.\nGPU numbers need a GPU; nothing below says how fast "
              "lkconv is on one.")
        torch.set_num_threads(1)  # on a small shared machine, oversubscribed threads turn ms calls into time slices
    set_fp32_math(args.tf32)
    # cuDNN picks its fastest algorithm in the (untimed) first call, so the baseline is cuDNN at its best.
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    try:
        meta = provenance(settings_note(args))
    except ValueError as error:  # a malformed LKCONV_GIT_COMMIT
        p.error(str(error))
    print(f"{meta['device']} | torch {meta['torch']} | triton {meta['triton']} | CUDA {meta['cuda']} | "
          f"commit {(meta['git_commit'] or 'unknown')[:12]} | preset {args.preset} | fp32 {meta['fp32_math']}")
    progress = Progress(sum(measurements(suite, work) for suite, work in units))
    stem = f"results-chunk{args.chunk[0]}of{args.chunk[1]}" if args.chunk else "results"

    def save(rows, stopped):
        if args.out is not None:
            report.write(args.out, stem, rows, {**meta, "stopped_early": stopped})

    rows, stopped = run(units, progress, save)
    progress.close()
    meta["stopped_early"] = stopped
    if args.out is not None:
        write_outputs(args.out, stem, rows, meta, not args.no_plots)
    failed = report.errors(rows)
    for line in failed:
        print(f"FAILED {line}")
    for line in report.skipped(rows):
        print(f"skipped {line}")
    if stopped:
        print(stopped.upper())
    print()
    print(report.short_table(rows))
    return 1 if (failed or stopped) and args.strict else 0


def main_report(argv) -> int:
    """`python -m benchmarks report DIR`: merges a folder's results and draws the plots."""
    p = argparse.ArgumentParser(prog=f"{program()} report",
                                description="Merge the results*.json in a folder into combined.{json,csv,md} "
                                            "and PNG plots.")
    p.add_argument("folder", type=Path)
    p.add_argument("--out", type=Path, help="where to write them (default: the folder itself; give another for a "
                                            "read-only one, such as fetched device results)")
    args = p.parse_args(argv)
    try:
        rows, metas = report.load(args.folder)
    except (OSError, ValueError, KeyError) as error:
        p.error(f"cannot read results from {args.folder}: {error}")
    out = args.out or args.folder
    meta = report.merged_provenance(metas)
    if meta.get("missing_chunks"):
        print(f"warning: chunks {', '.join(map(str, meta['missing_chunks']))} of {meta['chunks_of']} are missing "
              f"from {args.folder}: the report covers part of the run")
    stops = meta.get("stopped_early")
    for file, stopped in (stops.items() if isinstance(stops, dict) else [(args.folder, stops)] if stops else []):
        if stopped:
            print(f"warning: {file} {stopped}: the report covers part of the run")
    try:
        write_outputs(out, "combined", rows, meta, True)
    except OSError as error:
        p.error(f"cannot write the report to {out} ({error.strerror or error}); choose a folder with --out")
    print(report.short_table(rows))
    return 0


def main_choices(argv) -> int:
    """`python -m benchmarks choices DIR`: writes auto's triton-or-cuda table from a run that timed both."""
    p = argparse.ArgumentParser(prog=f"{program()} choices",
                                description="Write which GPU backend auto should pick per shape class, from a run that "
                                            "timed both (--backends triton cuda): the faster forward+backward wins.")
    p.add_argument("folder", type=Path)
    p.add_argument("--to", type=Path, default=measured.table_path(),
                   help=f"the table to write (default: ${measured.CHOICES_VARIABLE} if set, else {measured.TABLE})")
    args = p.parse_args(argv)
    try:
        rows, metas = report.load(args.folder)
    except (OSError, ValueError, KeyError) as error:
        p.error(f"cannot read results from {args.folder}: {error}")
    choices = measured.choices_from_rows(rows)
    if not choices:
        p.error(f"{args.folder} has no shape class timed with both lkconv[triton] and lkconv[cuda] (fwd_bwd, nchw)")
    devices = {m.get("device") for m in metas}
    if len(devices) != 1:
        p.error(f"the results come from several devices {sorted(map(str, devices))}; use one device's results")
    table = {"device": devices.pop(), "measured_from": [f"{m['file']} ({m.get('git_commit')})" for m in metas],
             "choices": choices}
    try:
        args.to.write_text(json.dumps(table, indent=1) + "\n")
    except OSError as error:
        p.error(f"--to {args.to}: cannot write the table there ({error.strerror or error})")
    print(f"wrote {len(choices)} choices for {table['device']} to {args.to}")
    return 0


def main_precompile(argv) -> int:
    """`python -m benchmarks precompile`: fills Triton's cache with a GPU session's kernels."""
    p = argparse.ArgumentParser(prog=f"{program()} precompile",
                                description="Compile, on every core, the Triton kernels a GPU session launches "
                                            "(benchmarks/triton_launches.py), so that its tests and benchmarks find "
                                            "them in Triton's cache instead of compiling them one at a time.")
    p.add_argument("--workers", type=int, default=0, help="processes (default: one per core)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a GPU: Triton compiles for the device it finds")
    start = time.perf_counter()
    count = triton_launches.precompile(workers=args.workers)
    print(f"compiled {count} Triton kernels in {time.perf_counter() - start:.1f}s")
    return 0


def main_host(argv) -> int:
    """`python -m benchmarks host`: the host's time per call of lkconv's layers, launches skipped."""
    p = argparse.ArgumentParser(prog=f"{program()} host",
                                description="Time what a call costs the host in lkconv's Python layers (checks, "
                                            "dispatch, autograd, backend choice, Triton launch planning) on this "
                                            "machine's CPU, with the triton backend planning as on an H100 and its "
                                            "launches skipped (benchmarks/host_time.py).")
    p.add_argument("--calls", type=int, default=2000, help="calls per timed run (the fastest of 5 runs counts)")
    args = p.parse_args(argv)
    if args.calls < 1:
        p.error(f"--calls must be >= 1; got {args.calls}")
    print(host_time.table(host_time.measure(args.calls)))
    return 0


def main(argv=None) -> int:
    """The `python -m benchmarks` and `lkconv-bench` entry point: a subcommand, or a benchmark run."""
    argv = sys.argv[1:] if argv is None else list(argv)
    commands = {"report": main_report, "choices": main_choices, "precompile": main_precompile, "host": main_host}
    if argv[:1] and argv[0] in commands:
        return commands[argv[0]](argv[1:])
    return main_run(argv)


if __name__ == "__main__":
    sys.exit(main())
