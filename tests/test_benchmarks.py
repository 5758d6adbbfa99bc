"""The benchmark suite as a tool: the CLI runs end to end on a CPU, writes results with provenance and plots, splits
into chunks that add up to the whole, merges them again, and counts work and floors correctly."""

import csv
import json
import math
import statistics
import time

import pytest
import torch
import torch.nn.functional as F

import lkconv

from conftest import assert_close
from lkconv.benchmarks import __main__ as cli
from lkconv.benchmarks import op_suite, report
from lkconv.benchmarks.formatting import ms, percent, ratio
from lkconv.benchmarks.progress import Progress
from lkconv.benchmarks.roofline import ConvCase, floor, minimum_bytes, useful_flops, useful_taps_per_axis

TINY = ["--cpu-seconds", "0.005", "--shapes", "1x4x8x8", "--kernels", "3", "5x3"]


@pytest.mark.parametrize("size", [1, 4, 9])
@pytest.mark.parametrize("kernel", [1, 3, 5, 13])
def test_useful_taps_count_only_taps_inside_the_image(size, kernel):
    padding = kernel // 2
    ones = torch.ones(1, 1, 1, size, dtype=torch.float64)
    inside = F.conv2d(ones, torch.ones(1, 1, 1, kernel, dtype=torch.float64), padding=(0, padding)).sum()
    assert useful_taps_per_axis(size, kernel, padding) == int(inside)


def test_useful_flops_and_floors():
    case = ConvCase((2, 3, 6, 5), (3, 5), torch.float32)
    ones = torch.ones(2, 3, 6, 5, dtype=torch.float64)
    taps = F.conv2d(ones, torch.ones(3, 1, 3, 5, dtype=torch.float64), padding=(1, 2), groups=3).sum()
    assert useful_flops(case, "forward") == 2 * int(taps)
    assert useful_flops(case, "fwd_bwd") == 3 * useful_flops(case, "weight_grad")
    assert minimum_bytes(case, "forward") == 4 * (2 * 2 * 3 * 6 * 5 + 3 * 15)
    big = ConvCase((64, 384, 32, 32), (31, 31), torch.float32)
    assert floor(big, "forward", tf32=False).bound == "compute"
    assert floor(big, "forward", tf32=True).ms < floor(big, "forward", tf32=False).ms
    assert floor(big._replace(kernel=(1, 1)), "forward", tf32=False).bound == "memory"


def test_the_floors_are_reference_s_section_4_and_each_row_reports_its_fractions(monkeypatch):
    """REFERENCE.md §4 at (64,384,64,64), K=31: fp32 FMA 2.23 ms, fp32 memory 0.24 ms, bf16 memory 0.12 ms, and its
    bf16 tensor-core column (with Toeplitz waste) ≈0.24 ms, against which issue 5's 40% goal is set."""
    from lkconv.benchmarks import roofline, timing

    fp32 = ConvCase((64, 384, 64, 64), (31, 31), torch.float32)
    bf16 = fp32._replace(dtype=torch.bfloat16)
    assert floor(fp32, "forward", False).compute_ms == pytest.approx(2.23, abs=0.005)
    assert floor(fp32, "forward", False).memory_ms == pytest.approx(0.24, abs=0.005)
    assert floor(bf16, "forward", False).memory_ms == pytest.approx(0.12, abs=0.005)
    assert roofline.reference_16bit_floor_ms(bf16, "weight_grad") == 0.24
    assert roofline.reference_16bit_floor_ms(bf16, "fwd_bwd") == pytest.approx(0.72)
    assert roofline.reference_16bit_floor_ms(fp32, "forward") is None
    assert roofline.reference_16bit_floor_ms(bf16._replace(shape=(8, 384, 64, 64)), "forward") is None
    # A bf16 forward timed (on a faked GPU) at 0.6 ms: 40% of §4's floor, 0.1205 / 0.6 of the memory floor.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(op_suite, "measure", lambda fn, budget: timing.Timing(0.6, 0.59, 0.61, 100, 1.0))
    monkeypatch.setattr(op_suite, "_host_us", lambda fn, median_ms: None)
    row = op_suite._timed({"pass": "forward", "error": ""}, bf16, lambda: None, op_suite.OpSettings())
    assert row["reference_16bit_floor_fraction"] == pytest.approx(0.4)
    assert row["memory_floor_fraction"] == pytest.approx(floor(bf16, "forward", False).memory_ms / 0.6)
    assert row["fp32_fma_floor_fraction"] == pytest.approx(floor(fp32, "forward", False).compute_ms / 0.6)
    assert row["floor_fraction"] == pytest.approx(floor(bf16, "forward", False).ms / 0.6)
    # Where §4's tensor-core value is below the memory floor (RepLKNet-31B stage 3), the memory floor binds.
    stage3 = ConvCase((64, 512, 14, 14), (27, 27), torch.bfloat16)
    assert roofline.reference_16bit_floor_ms(stage3, "forward") < floor(stage3, "forward", False).memory_ms
    small = op_suite._timed({"pass": "forward", "error": ""}, stage3, lambda: None, op_suite.OpSettings())
    assert small["reference_16bit_floor_fraction"] == pytest.approx(floor(stage3, "forward", False).memory_ms / 0.6)
    table = report.op_table([{**row, "suite": "op", "shape": "64x384x64x64", "kernel": "31x31", "dtype": "bfloat16",
                              "impl": "lkconv[cuda]", "layout": "nchw", "runs_on": "cuda", "host_us": None}])
    header, _, cells = (line.split(" | ") for line in table.splitlines())
    assert cells[header.index("% §4 16-bit")] == "40.0%" and cells[header.index("% memory")] == "20.1%"


def read_results(folder, stem="results"):
    data = json.loads((folder / f"{stem}.json").read_text())
    return data["provenance"], data["rows"]


def test_cpu_run_of_every_suite_writes_results_provenance_and_plots(tmp_path, capsys):
    assert cli.main(TINY + ["--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "No CUDA GPU here" in printed and "GPU numbers need a GPU" in printed
    meta, rows = read_results(tmp_path)
    for key in ("device", "torch", "triton", "cuda", "lkconv_cuda_runtime", "git_commit", "date_utc", "driver",
                "preset", "timing"):
        assert key in meta
    from lkconv.backends import cuda_backend

    assert (meta["lkconv_cuda_runtime"] is None) == (not cuda_backend.extension_loaded())
    # Each suite that ran says how it measured: the op floors, what the paper columns are, the model baseline.
    for key in ("op_floors", "table1_reference", "model_baseline"):
        assert key in meta, f"the provenance lacks the method note {key!r}"
    assert meta["preset"] == "cpu"
    assert {r["suite"] for r in rows} == {"op", "table1", "model"}
    assert not [r for r in rows if r["error"]], report.errors(rows)
    op_rows = [r for r in rows if r["suite"] == "op"]
    assert {r["kernel"] for r in op_rows} == {"3x3", "5x3"}
    assert {r["pass"] for r in op_rows} == {"forward", "input_grad", "weight_grad", "fwd_bwd"}
    for r in op_rows:
        assert r["median_ms"] > 0 and r["p20_ms"] <= r["median_ms"] <= r["p80_ms"] and r["tflops"] > 0
        assert r["speedup_vs_nchw"] == pytest.approx(
            next(b["median_ms"] for b in op_rows if b["impl"] == "pytorch[nchw]" and
                 (b["shape"], b["kernel"], b["dtype"], b["pass"]) == (r["shape"], r["kernel"], r["dtype"], r["pass"]))
            / r["median_ms"])
    for r in op_rows:  # lkconv rows name the kernels each pass ran (here PyTorch's, through the torch backend)
        expected = {"forward": "F.conv2d", "input_grad": "F.conv_transpose2d", "weight_grad": "grouped F.conv2d",
                    "fwd_bwd": "F.conv2d | F.conv_transpose2d | grouped F.conv2d"}[r["pass"]]
        assert r["kernels"].startswith(expected) if r["impl"].startswith("lkconv") else "kernels" not in r, r
    for r in op_rows:  # every lkconv result but fwd+bwd is checked against PyTorch in exact fp32
        checked = r["impl"].startswith("lkconv") and r["pass"] != "fwd_bwd"
        assert (r.get("rel_error") is not None) == checked, r
        assert not checked or r["rel_error"] <= 1e-5
    model_rows = [r for r in rows if r["suite"] == "model"]
    assert {r["impl"] for r in model_rows} == {"lkconv", "pytorch"}
    toy = "replknet_31b (layers=(1, 1, 1, 1), channels=(8, 16, 16, 16), num_classes=10)"  # not RepLKNet-31B itself
    assert {r["model"] for r in model_rows} == {toy} and meta["model"] == toy
    assert all(r["images_per_s"] > 0 for r in model_rows)
    plots = ("op_latency.png", "table1.png", "model_throughput.png") if cli.plots.available() else ()
    for name in ("results.csv", "results.md", *plots):
        assert (tmp_path / name).stat().st_size > 0, name
    assert "RepLKNet paper, Table 1" in (tmp_path / "results.md").read_text()
    with open(tmp_path / "results.csv", newline="") as file:
        csv_rows = list(csv.DictReader(file))
    assert len(csv_rows) == len(rows)
    for csv_row, row in zip(csv_rows, rows):  # each CSV row says where it was measured, then what
        assert {k: csv_row[k] for k in report.CSV_PROVENANCE} == {
            k: "" if meta[k] is None else str(meta[k]) for k in report.CSV_PROVENANCE}
        assert {k: csv_row[k] for k in row} == {k: "" if v is None else str(v) for k, v in row.items()}
    assert printed.rstrip().endswith(report.short_table(rows).rstrip()), "the short table is printed last"


def test_a_value_given_twice_is_measured_once():
    twice = ["--suites", "op", "op", "--shapes", "1x4x8x8", "1x4x8x8", "--kernels", "3", "3x3", "--dtypes", "float32",
             "float32", "--layouts", "nchw", "nchw", "--passes", "forward", "forward", "--backends", "torch", "torch",
             "--baselines", "nchw", "nchw"]
    args = cli.resolve(cli.parser().parse_args(twice))
    assert args.op_cases == [((1, 4, 8, 8), (3, 3))]
    assert (args.suites, args.dtypes, args.layouts, args.passes, args.backends, args.baselines) == (
        ["op"], ["float32"], ["nchw"], ("forward",), ["torch"], ["nchw"])
    assert len(cli.work_units(args)) == 1


def test_the_model_suite_s_longer_window_gives_way_to_an_explicit_rep_ms():
    def budgets(arguments):
        units = cli.work_units(cli.resolve(cli.parser().parse_args(["--suites", "op", "model"] + arguments)))
        return {suite: (work[1] if suite == "op" else work).budget.rep_ms for suite, work in units}

    assert budgets([]) == {"op": 100.0, "model": 500.0}
    assert budgets(["--rep-ms", "40"]) == {"op": 40.0, "model": 40.0}


def test_the_model_suite_runs_each_mode_as_its_own_unit():
    """A time limit that stops the training steps keeps the inference rows (each unit is saved when it ends)."""
    units = cli.work_units(cli.resolve(cli.parser().parse_args(["--suites", "model"])))
    assert [(work.resolutions, work.modes) for _, work in units] == [((64,), ("inference",)), ((64,), ("train",))]


def test_chunks_partition_the_work_and_report_merges_them(tmp_path):
    args = cli.resolve(cli.parser().parse_args(TINY))
    whole = cli.work_units(args)
    parts = []
    for index in (1, 2, 3):
        chunk = cli.resolve(cli.parser().parse_args(TINY + ["--chunk", f"{index}/3"]))
        parts.append(cli.work_units(chunk))
    assert sorted(map(repr, sum(parts, []))) == sorted(map(repr, whole))
    assert all(parts)

    for index in (1, 2):
        assert cli.main(TINY + ["--suites", "op", "--chunk", f"{index}/2", "--out", str(tmp_path), "--no-plots"]) == 0
    assert cli.main(["report", str(tmp_path)]) == 0
    meta, rows = read_results(tmp_path, "combined")
    assert meta["merged_from"] == ["results-chunk1of2.json", "results-chunk2of2.json"]
    assert {r["kernel"] for r in rows} == {"3x3", "5x3"}
    assert (tmp_path / "op_latency.png").exists() == cli.plots.available()


def test_without_matplotlib_the_results_are_written_and_the_fix_is_named(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli.plots, "available", lambda: False)
    assert cli.main(["--suites", "op", "--passes", "forward", "--out", str(tmp_path)] + TINY) == 0
    assert f"python -m benchmarks report {tmp_path}" in capsys.readouterr().out
    assert (tmp_path / "results.json").exists() and not list(tmp_path.glob("*.png"))


def test_an_unavailable_backend_is_skipped_not_failed(tmp_path, capsys):
    """The cuda backend cannot run here (no GPU): its rows say why, and even --strict does not count them."""
    arguments = ["--suites", "op", "--backends", "auto", "cuda", "--passes", "forward"] + TINY
    assert cli.main(arguments + ["--out", str(tmp_path), "--strict"]) == 0
    _, rows = read_results(tmp_path)
    skipped = [r for r in rows if r.get("skipped")]
    assert skipped and all(r["impl"] == "lkconv[cuda]" and not r["error"] for r in skipped)
    assert all(r["median_ms"] > 0 for r in rows if not r.get("skipped"))
    assert "skipped" in capsys.readouterr().out


def test_a_failing_measurement_is_reported_not_raised(tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(lkconv, "depthwise_conv2d", broken)
    arguments = ["--suites", "op", "--passes", "forward", "fwd_bwd"] + TINY
    assert cli.main(arguments + ["--out", str(tmp_path)]) == 0
    _, rows = read_results(tmp_path)
    failed = [r for r in rows if r["error"]]
    assert failed and all(r["impl"] == "lkconv[auto]" and "kernel exploded" in r["error"] for r in failed)
    assert all(r["median_ms"] > 0 for r in rows if r["impl"].startswith("pytorch"))
    assert "FAILED" in capsys.readouterr().out
    assert cli.main(arguments + ["--strict"]) == 1


@pytest.mark.parametrize("pass_name", ["forward", "input_grad", "weight_grad"])
def test_a_wrong_result_is_an_error_not_a_time(tmp_path, capsys, monkeypatch, pass_name):
    """A backend pass that returns a slightly wrong answer (one element off) fails its row, and --strict fails."""
    from lkconv.backends import torch_backend

    real = getattr(torch_backend, pass_name)

    def off_by_one_element(*args, **kwargs):
        result = real(*args, **kwargs)
        first = result[0] if isinstance(result, tuple) else result
        first[(0,) * first.dim()] += 1.0
        return result

    monkeypatch.setattr(torch_backend, pass_name, off_by_one_element)
    assert cli.main(TINY + ["--suites", "op", "--passes", pass_name, "--strict", "--out", str(tmp_path)]) == 1
    _, rows = read_results(tmp_path)
    wrong = [r for r in rows if r["impl"].startswith("lkconv")]
    assert wrong and all(r["error"].startswith("wrong result: relative error") for r in wrong), wrong
    assert all(r["speedup_vs_nchw"] is None for r in wrong), "a wrong answer has no speed-up either"
    assert all(r.get(field) is None for r in wrong for field in op_suite.TIMED_FIELDS), "nor a time"
    assert all(r["unchecked_median_ms"] > 0 for r in wrong)
    assert all(not r["error"] for r in rows if r["impl"].startswith("pytorch"))
    assert "FAILED" in capsys.readouterr().out
    # fwd_bwd runs the wrong pass: it is not timed either
    assert cli.main(TINY + ["--suites", "op", "--passes", pass_name, "fwd_bwd", "--out", str(tmp_path)]) == 0
    _, rows = read_results(tmp_path)
    both = [r for r in rows if r["impl"].startswith("lkconv") and r["pass"] == "fwd_bwd"]
    assert both and all(r["error"] == f"not timed: its {pass_name} gave a wrong answer or failed its check"
                        and r["median_ms"] is None and r["speedup_vs_nchw"] is None for r in both), both


def test_a_withdrawn_row_keeps_none_of_its_gpu_timing_fields():
    """On a GPU a row also has host time, TFLOP/s, floor fractions and peak memory: a wrong answer empties them all."""
    row = {"pass": "forward", "dtype": "float32", "error": "", "samples": 9,
           **{field: 1.5 for field in op_suite.TIMED_FIELDS}}
    expected = torch.ones(3)
    kept = op_suite.checked(dict(row), lambda: torch.ones(3), expected, 1e-5)
    assert kept["rel_error"] == 0 and all(kept[field] == 1.5 for field in op_suite.TIMED_FIELDS)
    wrong = op_suite.checked(dict(row), lambda: torch.zeros(3), expected, 1e-5)
    assert wrong["error"].startswith("wrong result: relative error 1.00e+00")
    assert all(wrong[field] is None for field in op_suite.TIMED_FIELDS)
    assert wrong["unchecked_median_ms"] == 1.5 and wrong["samples"] == 9
    raised = op_suite.checked(dict(row), lambda: torch.zeros(4), expected, 1e-5)
    assert raised["error"].startswith("not checked: RuntimeError") and raised["median_ms"] is None


def test_gpu_timing_counts_the_samples_it_took_and_the_memory_the_call_allocated(monkeypatch):
    """On a GPU (faked here: CUDA events on perf_counter, do_bench returning its samples): the quantiles and the count
    are those of the samples, and the peak memory is what the call allocated above what was live before it."""
    import triton.testing

    from lkconv.benchmarks import timing

    class Event:
        def __init__(self, enable_timing=False):
            self.at = None

        def record(self):
            self.at = time.perf_counter()

        def elapsed_time(self, end):
            return (end.at - self.at) * 1e3

    mib = 2**20
    monkeypatch.setattr(torch.cuda, "Event", Event)
    for name in ("synchronize", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda *args: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *args: 900 * mib)  # inputs, references, ...
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *args: 912 * mib)  # ... and the call's 12 MiB
    samples = [0.05 + 0.001 * ((7 * i) % 40) for i in range(700)]
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, warmup, rep, return_mode: list(samples))
    measured = timing.time_gpu(lambda: None, timing.Budget())
    assert measured.samples == 700 and measured.peak_memory_mib == 12
    assert measured.median_ms == pytest.approx(statistics.median(samples))
    assert measured.p20_ms < measured.median_ms < measured.p80_ms
    slow = timing.time_gpu(lambda: time.sleep(0.03), timing.Budget(rep_ms=100, min_samples=5))  # past do_bench
    assert slow.samples == 5 and slow.peak_memory_mib == 12 and slow.median_ms >= 30


def test_host_time_is_measured_only_for_calls_under_a_millisecond(monkeypatch):
    """A GPU session's slow rows (PyTorch's NCHW weight grad takes hundreds of ms) spend no calls on host time."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: None)
    assert op_suite._host_us(lambda: calls.append(1), median_ms=1.0) is None and not calls
    assert op_suite._host_us(lambda: calls.append(1), median_ms=0.9) > 0 and len(calls) == 30


def test_table1_checks_lkconv_s_forward_rows_against_pytorch(tmp_path, monkeypatch):
    """Table 1's lkconv rows carry their error against PyTorch's stack; a wrong forward is an error with no time."""
    from lkconv.backends import torch_backend

    arguments = ["--suites", "table1", "--kernels", "3", "--passes", "forward", "fwd_bwd", "--cpu-seconds", "0.005",
                 "--no-plots", "--out", str(tmp_path)]
    assert cli.main(arguments) == 0
    _, rows = read_results(tmp_path)
    forward = [r for r in rows if r["impl"].startswith("lkconv") and r["pass"] == "forward"]
    assert forward and all(not r["error"] and r["rel_error"] < 1e-5 and r["median_ms"] > 0 for r in forward)
    real = torch_backend.forward

    def off_by_one_element(*args, **kwargs):
        result = real(*args, **kwargs)
        result[(0,) * result.dim()] += 1.0
        return result

    monkeypatch.setattr(torch_backend, "forward", off_by_one_element)
    assert cli.main(arguments + ["--strict"]) == 1
    _, rows = read_results(tmp_path)
    wrong = [r for r in rows if r["impl"].startswith("lkconv") and r["pass"] == "forward"]
    assert wrong and all(r["error"].startswith("wrong result") and r["median_ms"] is None for r in wrong), wrong
    assert all(r["speedup_vs_nchw"] is None and r["unchecked_median_ms"] > 0 for r in wrong)
    assert all(r["median_ms"] > 0 for r in rows if r["impl"].startswith("pytorch"))


def test_a_check_or_an_explanation_that_raises_fails_its_rows_and_the_run_goes_on(tmp_path, monkeypatch):
    """A pass whose answer cannot even be compared (a wrong shape), or an `explain` that raises, turns its rows into
    errors; the other passes, cases and baselines are still measured."""
    from lkconv.backends import torch_backend

    real_input_grad, real_explain = torch_backend.input_grad, lkconv.explain
    monkeypatch.setattr(torch_backend, "input_grad", lambda *args: real_input_grad(*args)[..., :-1])

    def explain_fails_for_channels_last(input, *args, **kwargs):
        if input.is_contiguous(memory_format=torch.channels_last) and not input.is_contiguous():
            raise RuntimeError("explain exploded")
        return real_explain(input, *args, **kwargs)

    monkeypatch.setattr(lkconv, "explain", explain_fails_for_channels_last)
    arguments = TINY + ["--suites", "op", "--passes", "forward", "input_grad", "--layouts", "nchw", "channels_last"]
    assert cli.main(arguments + ["--no-plots", "--out", str(tmp_path)]) == 0
    _, rows = read_results(tmp_path)
    lkconv_rows = {(r["kernel"], r["pass"], r["layout"]): r for r in rows if r["impl"] == "lkconv[auto]"}
    assert len(lkconv_rows) == 8 and all(r["median_ms"] > 0 for r in rows if r["impl"].startswith("pytorch"))
    for (kernel, pass_name, layout), row in lkconv_rows.items():
        if layout == "channels_last":
            assert row["runs_on"] == "explain failed" and "explain exploded" in row["error"], row
        elif pass_name == "input_grad":
            assert row["error"].startswith("not checked: RuntimeError: The size of tensor a"), row
            assert row["median_ms"] is None and row["unchecked_median_ms"] > 0
        else:
            assert not row["error"] and row["median_ms"] > 0, row


def test_an_interrupted_run_keeps_the_units_it_finished(tmp_path, monkeypatch):
    """A time limit sends SIGINT: the finished units are on disk, and the results say the run stopped early."""
    real_run_case, calls = cli.op_suite.run_case, []

    def interrupt_second(*args):
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_run_case(*args)

    monkeypatch.setattr(cli.op_suite, "run_case", interrupt_second)
    assert cli.main(["--suites", "op", "--out", str(tmp_path), "--no-plots"] + TINY) == 0
    meta, rows = read_results(tmp_path)
    assert "interrupted" in meta["stopped_early"]
    assert {r["kernel"] for r in rows} == {"3x3"}


def test_a_unit_that_raises_becomes_one_error_row_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    """An error outside a suite's own per-measurement handling (out of memory while preparing, say) costs that unit
    only; the file saved after each unit but the last says the run was still in progress."""
    real_run_case, saved = cli.op_suite.run_case, []
    real_write = cli.report.write

    def fail_first(case, *args):
        if case.kernel == (3, 3):
            raise RuntimeError("out of memory while preparing")
        return real_run_case(case, *args)

    def spy(out, stem, rows, meta):
        saved.append(meta["stopped_early"])
        return real_write(out, stem, rows, meta)

    monkeypatch.setattr(cli.op_suite, "run_case", fail_first)
    monkeypatch.setattr(cli.report, "write", spy)
    assert cli.main(["--suites", "op", "--out", str(tmp_path), "--no-plots", "--strict"] + TINY) == 1
    meta, rows = read_results(tmp_path)
    assert meta["stopped_early"] is None
    assert saved == ["in progress: 1 of 2 work units done (a run killed before its end)", None]
    failed = [r for r in rows if r["suite"] == "failed unit"]
    assert len(failed) == 1 and failed[0]["unit"] == "op 1x4x8x8 K=3x3 float32"
    assert failed[0]["error"] == "RuntimeError: out of memory while preparing"
    assert {r["kernel"] for r in rows if r["suite"] == "op"} == {"5x3"}
    printed = capsys.readouterr().out
    assert "FAILED failed unit op 1x4x8x8 K=3x3 float32: RuntimeError: out of memory while preparing" in printed
    assert not list(tmp_path.glob("*.partial"))


def test_compact_table_gives_each_case_and_pass_one_line_with_the_fastest_backends_ratios(tmp_path):
    assert cli.main(["--suites", "op", "--backends", "torch", "auto", "--out", str(tmp_path), "--no-plots"] + TINY) == 0
    _, rows = read_results(tmp_path)
    lines = report.compact_table(rows).splitlines()
    assert lines[0] == ("| case | dtype | layout | pass | [auto] ms | [torch] ms | vs NCHW | vs CL | % floor |")
    lkconv_rows = [r for r in rows if r["suite"] == "op" and r["impl"].startswith("lkconv")]
    cases = {(r["shape"], r["kernel"], r["dtype"], r["layout"], r["pass"]) for r in lkconv_rows}
    assert len(lines) == 2 + len(cases) and len(cases) == len(lkconv_rows) // 2
    for shape, kernel, dtype, layout, pass_name in cases:
        pair = [r for r in lkconv_rows if (r["shape"], r["kernel"], r["dtype"], r["layout"], r["pass"]) ==
                (shape, kernel, dtype, layout, pass_name)]
        best = min(pair, key=lambda r: r["median_ms"])
        auto, torch_row = sorted(pair, key=lambda r: r["impl"])
        short = [report.SHORT_NAMES[name] for name in (dtype, layout, pass_name)]
        expected = (f"| {shape} K={kernel} | {' | '.join(short)} | {ms(auto['median_ms'])} | "
                    f"{ms(torch_row['median_ms'])} | {ratio(best['speedup_vs_nchw'])} | "
                    f"{ratio(best['speedup_vs_channels_last'])} | {percent(best.get('floor_fraction'))} |")
        assert expected in lines


def test_report_writes_to_another_folder_when_asked_and_names_an_unwritable_one(tmp_path, capsys):
    results, elsewhere = tmp_path / "fetched", tmp_path / "report"
    assert cli.main(["--suites", "op", "--out", str(results), "--no-plots"] + TINY) == 0
    before = sorted(path.name for path in results.iterdir())
    assert cli.main(["report", str(results), "--out", str(elsewhere)]) == 0
    assert sorted(path.name for path in results.iterdir()) == before
    assert (elsewhere / "combined.json").is_file() and (elsewhere / "combined.csv").is_file()
    blocked = tmp_path / "a file"
    blocked.write_text("")
    with pytest.raises(SystemExit):
        cli.main(["report", str(results), "--out", str(blocked / "inside")])
    assert f"cannot write the report to {blocked / 'inside'}" in capsys.readouterr().err


def test_dtype_pass_layout_backend_and_baseline_options_reach_table1_and_model(tmp_path):
    arguments = ["--suites", "table1", "model", "--dtypes", "bfloat16", "--layouts", "channels_last", "--passes",
                 "fwd_bwd", "--backends", "torch", "--baselines", "channels_last", "--kernels", "3", "--no-plots",
                 "--cpu-seconds", "0.005", "--out", str(tmp_path)]
    assert cli.main(arguments) == 0
    _, rows = read_results(tmp_path)
    table = [r for r in rows if r["suite"] == "table1"]
    assert table and {(r["dtype"], r["pass"]) for r in table} == {("bfloat16", "fwd_bwd")}
    assert {r["impl"] for r in table} == {"pytorch[channels_last]", "lkconv[torch]"}
    model = [r for r in rows if r["suite"] == "model"]
    assert model and {(r["precision"], r["layout"]) for r in model if r["mode"] == "inference"} == {
        ("bf16", "channels_last")}


def test_the_commit_comes_from_lkconv_git_commit_outside_a_repository(monkeypatch):
    """A tree copied without .git (as onto a lent GPU machine) records the commit passed in LKCONV_GIT_COMMIT."""
    from lkconv.benchmarks import provenance

    monkeypatch.setattr(provenance, "_command_output", lambda *command: None)  # no git here
    for value, commit, dirty in (("0123abc", "0123abc", False), ("0123abc-dirty", "0123abc", True), ("", None, None),
                                 ("v0.1.0-2-g0123abc-dirty", "0123abc", True)):  # a tagged history's describe
        monkeypatch.setenv("LKCONV_GIT_COMMIT", value)
        meta = provenance.provenance({})
        assert (meta["git_commit"], meta["git_dirty"]) == (commit, dirty), value
    for value in ("HEAD", "0123abc-changed", "0123ABCZ"):
        monkeypatch.setenv("LKCONV_GIT_COMMIT", value)
        with pytest.raises(ValueError, match=f"LKCONV_GIT_COMMIT must be a commit hash.*; got '{value}'"):
            provenance.provenance({})


def test_the_lkconv_bench_entry_point_is_installed_and_its_usage_lines_name_it():
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    script = shutil.which("lkconv-bench") or str(Path(sys.executable).with_name("lkconv-bench"))
    result = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--preset" in result.stdout, result.stderr
    assert result.stdout.startswith("usage: lkconv-bench ")
    for command in ("report", "choices", "precompile", "host"):
        result = subprocess.run([script, command, "--help"], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0 and result.stdout.startswith(f"usage: lkconv-bench {command}"), result.stdout
    # Run as a module, the usage names the module the user ran, which works from any folder.
    result = subprocess.run([sys.executable, "-m", "lkconv.benchmarks", "report", "--help"], capture_output=True,
                            text=True, timeout=120, cwd=Path(lkconv.__file__).parent.parent.parent)
    assert result.returncode == 0 and result.stdout.startswith("usage: python -m lkconv.benchmarks report"), result


@pytest.mark.parametrize("arguments,message", [
    (["--shapes", "1x2x3"], "a shape is NxCxHxW"),
    (["--kernels", "4"], "a kernel is an odd K or KHxKW"),
    (["--chunk", "3/2"], "a chunk is K/N"),
    (["--dtypes", "float8"], "invalid choice"),
    (["--suites", "table1", "--passes", "input_grad"], "--passes input_grad leaves the table1 suite nothing to run"),
    (["--suites", "model", "--dtypes", "float16"], "--dtypes float16 leaves the model suite nothing to run"),
    (["--suites", "table1", "--baselines", "compile", "--backends"], "expected at least one argument"),
    (["--suites", "op", "table1", "--baselines", "compile"], "--baselines compile leaves the table1 suite no "
                                                              "PyTorch baseline to compare with (it takes nchw, "
                                                              "channels_last)"),
    (["--suites", "table1", "--kernels", "51x5", "5x51"], "--kernels 51x5 5x51 leaves the table1 suite nothing"),
    (["--cpu-seconds", "-5"], "argument --cpu-seconds: must be a number > 0; got '-5'"),
    (["--suites", "model", "--kernels", "51x5"], "--kernels applies to the op and table1 suites, which --suites model "
                                                 "leaves out"),
    (["--suites", "table1", "model", "--shapes", "1x4x8x8"], "--shapes applies to the op suite, which --suites "
                                                             "table1 model leaves out"),
    (["--rep-ms", "0"], "argument --rep-ms: must be a number > 0"),
    (["--warmup-ms", "inf"], "argument --warmup-ms: must be a number > 0"),
    (["--suites", "op", "--shapes", "1x4x8x8", "--kernels", "7", "--dtypes", "float32", "--chunk", "2/5"],
     "--chunk 2/5: these settings make 1 work unit(s), so some of 5 chunks would be empty"),
])
def test_bad_options_name_the_problem(arguments, message, capsys):
    with pytest.raises(SystemExit):
        cli.main(arguments)
    assert message in capsys.readouterr().err


def test_an_unusable_out_folder_is_refused_before_anything_is_measured(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "run", lambda *args: pytest.fail("measured before checking --out"))
    (tmp_path / "a-file").touch()
    for out in (tmp_path / "a-file", tmp_path / "a-file" / "below"):
        with pytest.raises(SystemExit):
            cli.main(TINY + ["--out", str(out)])
        assert f"--out {out}: cannot make it a folder for the results" in capsys.readouterr().err


@pytest.mark.parametrize("content", ['{"rows": 3}', "[]", '{"provenance": {}, "rows": [3]}'])
def test_report_names_a_file_that_is_not_a_results_file(tmp_path, capsys, content):
    (tmp_path / "results.json").write_text(content)
    with pytest.raises(SystemExit):
        cli.main(["report", str(tmp_path)])
    assert "results.json is not a results file of this benchmark" in capsys.readouterr().err


def test_report_refuses_two_runs_in_one_folder_and_says_which_chunks_are_missing(tmp_path, capsys):
    """Merging a whole run with chunks, or chunks of different splits, would duplicate or mix rows; a chunk left
    out is named in the output and in the merged provenance."""
    three_units = TINY + ["--kernels", "3", "5", "7", "--suites", "op", "--dtypes", "float32", "--no-plots"]
    for index in (1, 3):
        assert cli.main(three_units + ["--chunk", f"{index}/3", "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    assert cli.main(["report", str(tmp_path)]) == 0
    assert f"warning: chunks 2 of 3 are missing from {tmp_path}" in capsys.readouterr().out
    meta, _ = read_results(tmp_path, "combined")
    assert (meta["chunks_of"], meta["chunks_merged"], meta["missing_chunks"], meta["chunk"]) == (3, [1, 3], [2], None)
    assert meta["merged_from"] == ["results-chunk1of3.json", "results-chunk3of3.json"]
    for extra in ("results.json", "results-chunk1of2.json"):
        (tmp_path / extra).write_text((tmp_path / "results-chunk1of3.json").read_text())
        with pytest.raises(SystemExit):
            cli.main(["report", str(tmp_path)])
        assert "holds the results of more than one run" in capsys.readouterr().err
        (tmp_path / extra).unlink()


def test_report_merges_only_chunks_of_one_run_and_names_a_chunk_that_stopped_early(tmp_path, capsys):
    """Chunks of different selections, commits or GPUs would merge into a table no run measured."""
    base = TINY + ["--suites", "op", "--dtypes", "float32", "--passes", "forward", "--no-plots", "--out", str(tmp_path)]
    assert cli.main(base + ["--chunk", "1/2"]) == 0
    assert cli.main(base + ["--kernels", "7", "9", "--chunk", "2/2"]) == 0  # another selection
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli.main(["report", str(tmp_path)])
    assert "results-chunk1of2.json and results-chunk2of2.json are not chunks of one run: their selection differ" in \
        capsys.readouterr().err
    assert cli.main(base + ["--chunk", "2/2"]) == 0
    second = tmp_path / "results-chunk2of2.json"
    data = json.loads(second.read_text())
    for key, value in (("device", "NVIDIA A100"), ("git_commit", "0123abc")):
        second.write_text(json.dumps({**data, "provenance": {**data["provenance"], key: value}}))
        with pytest.raises(SystemExit):
            cli.main(["report", str(tmp_path)])
        assert f"their {key} differ" in capsys.readouterr().err
    stopped = "stopped: interrupted (SIGINT, e.g. a time limit)"
    second.write_text(json.dumps({**data, "provenance": {**data["provenance"], "stopped_early": stopped}}))
    assert cli.main(["report", str(tmp_path)]) == 0
    assert f"warning: results-chunk2of2.json {stopped}" in capsys.readouterr().out
    meta, rows = read_results(tmp_path, "combined")
    assert meta["stopped_early"] == {"results-chunk1of2.json": None, "results-chunk2of2.json": stopped}
    assert meta["device"] == data["provenance"]["device"] and {r["kernel"] for r in rows} == {"3x3", "5x3"}


def test_report_without_results_names_the_folder(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["report", str(tmp_path)])
    assert f"cannot read results from {tmp_path}: no results" in capsys.readouterr().err


def test_progress_counts_and_estimates(capsys):
    import io

    stream = io.StringIO()
    progress = Progress(3, stream=stream)
    for label in ("a", "b", "c"):
        progress.update(label)
        progress.advance()
    progress.close()
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("[") and "0/3" in lines[0] and lines[-1].startswith("3/3 measurements")
    assert not math.isnan(float(lines[2].split("~")[1].split("s")[0]))


def test_a_case_whose_inputs_cannot_be_made_reports_every_planned_row(tmp_path, monkeypatch):
    real, calls = cli.op_suite.make_inputs, []

    def out_of_memory_once(case, device):
        calls.append(case)
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(case, device)

    monkeypatch.setattr(cli.op_suite, "make_inputs", out_of_memory_once)
    assert cli.main(["--suites", "op", "--passes", "forward", "--out", str(tmp_path), "--no-plots"] + TINY) == 0
    _, rows = read_results(tmp_path)
    first = [r for r in rows if r["kernel"] == "3x3"]
    assert len(first) == 4 and all("out of memory" in r["error"] for r in first)  # 2 baselines + 2 lkconv layouts
    second = [r for r in rows if r["kernel"] == "5x3"]  # the next case runs on
    assert len(second) == 4 and all(r["median_ms"] > 0 for r in second)


def test_choices_turns_a_run_timing_both_gpu_backends_into_autos_table(tmp_path, capsys):
    from lkconv.backends import measured

    rows = [{"suite": "op", "pass": "fwd_bwd", "layout": "nchw", "impl": impl, "shape": "64x384x32x32",
             "kernel": "31x31", "dtype": "bfloat16", "median_ms": ms} for impl, ms in
            (("lkconv[triton]", 2.0), ("lkconv[cuda]", 1.5), ("pytorch[nchw]", 9.0))]
    rows.append({**rows[0], "kernel": "13x13"})  # timed by one backend only: no choice
    rows += [{**rows[0], "layout": "channels_last", "median_ms": 1.0},  # channels_last: its own class
             {**rows[1], "layout": "channels_last", "median_ms": 2.5}]
    (tmp_path / "results.json").write_text(json.dumps({"provenance": {"device": "GPU X", "git_commit": "abc"},
                                                       "rows": rows}))
    target = tmp_path / "choices.json"
    assert cli.main(["choices", str(tmp_path), "--to", str(target)]) == 0
    table = json.loads(target.read_text())
    assert table["device"] == "GPU X" and len(table["choices"]) == 2
    assert {(c["layout"], c["backend"], tuple(c["size"])) for c in table["choices"]} == {
        ("nchw", "cuda", (32, 32)), ("channels_last", "triton", (32, 32))}
    shape = measured.ShapeClass.of((31, 31), (1, 1), (1, 1), (32, 32))
    assert measured.lookup(table, "GPU X", torch.bfloat16, shape) == "cuda"
    assert measured.lookup(table, "GPU X", torch.bfloat16, shape._replace(layout="channels_last")) == "triton"
    # Batch 1 on the same map: triton far faster, cuda failed. Only shapes both backends ran count, and the
    # choice weighs them by their total time, so batch 64 decides.
    small = [{**rows[0], "shape": "1x384x32x32", "median_ms": 0.3}, {**rows[1], "shape": "1x384x32x32",
                                                                       "median_ms": None, "error": "failed"}]
    (tmp_path / "results.json").write_text(json.dumps({"provenance": {"device": "GPU X"}, "rows": rows + small}))
    assert cli.main(["choices", str(tmp_path), "--to", str(target)]) == 0
    nchw = next(c for c in json.loads(target.read_text())["choices"] if c["layout"] == "nchw")
    assert nchw["backend"] == "cuda" and nchw["fwd_bwd_ms"] == {"64x384x32x32": {"triton": 2.0, "cuda": 1.5}}
    small[1].update(median_ms=0.2, error=None)
    (tmp_path / "results.json").write_text(json.dumps({"provenance": {"device": "GPU X"}, "rows": rows + small}))
    assert cli.main(["choices", str(tmp_path), "--to", str(target)]) == 0
    nchw = next(c for c in json.loads(target.read_text())["choices"] if c["layout"] == "nchw")
    assert nchw["backend"] == "cuda" and set(nchw["fwd_bwd_ms"]) == {"64x384x32x32", "1x384x32x32"}
    # A backend whose pass gave a wrong answer on a shape has no vote there (fwd_bwd itself is not checked).
    wrong = {**rows[1], "pass": "forward", "median_ms": None, "error": "wrong result: relative error 1e-01"}
    (tmp_path / "results.json").write_text(json.dumps({"provenance": {"device": "GPU X"},
                                                       "rows": rows + small + [wrong]}))
    assert cli.main(["choices", str(tmp_path), "--to", str(target)]) == 0
    nchw = next(c for c in json.loads(target.read_text())["choices"] if c["layout"] == "nchw")
    assert nchw["fwd_bwd_ms"] == {"1x384x32x32": {"triton": 0.3, "cuda": 0.2}}
    with pytest.raises(SystemExit):
        cli.main(["choices", str(tmp_path), "--to", str(tmp_path / "no-such-folder" / "choices.json")])
    assert f"--to {tmp_path / 'no-such-folder' / 'choices.json'}: cannot write the table there" in \
        capsys.readouterr().err
    (tmp_path / "results.json").write_text(json.dumps({"provenance": {"device": "GPU X"}, "rows": rows[2:4]}))
    with pytest.raises(SystemExit):
        cli.main(["choices", str(tmp_path), "--to", str(target)])
    assert "no shape class timed with both" in capsys.readouterr().err


def test_the_full_preset_covers_the_issues_shape_sets():
    shapes = cli.presets.op_shapes("full")
    kernels = {kernel for _, kernel in shapes}
    assert {(k, k) for k in (3, 5, 7, 9, 13, 17, 21, 27, 29, 31)} <= kernels
    assert {(51, 5), (5, 51), (13, 13)} <= kernels
    assert {shape[0] for shape, _ in shapes} >= {1, 8, 64}
    stages = {(shape[1:], kernel) for shape, kernel in shapes}
    assert ((128, 56, 56), (31, 31)) in stages and ((1024, 7, 7), (13, 13)) in stages  # RepLKNet-31B at 224
    assert ((128, 96, 96), (31, 31)) in stages  # and at 384
    full = cli.presets.defaults("full")
    assert set(full["baselines"]) == {"nchw", "channels_last", "compile"}
    assert set(full["backends"]) == {"auto", "triton", "cuda"}
    assert full["table_resolutions"] == (16, 32, 64) and full["model_resolutions"] == (224, 384)


def test_the_quick_preset_measures_the_issues_bars_first():
    """What a GPU session's op phase runs (benchmarks/gpu_session.sh): issue 2's two K=31 shapes first, then issue 5's
    (64,384,64,64) and the RepLKNet-31B stages, so that a phase cut short still has the bars."""
    shapes = cli.presets.op_shapes("quick")
    assert shapes[:2] == [((64, 384, 32, 32), (31, 31)), ((64, 128, 56, 56), (31, 31))]
    assert {((64, 384, 64, 64), (31, 31)), ((64, 256, 28, 28), (29, 29)), ((64, 512, 14, 14), (27, 27)),
            ((64, 1024, 7, 7), (13, 13))} <= set(shapes)
    assert cli.presets.defaults("quick")["dtypes"] == ("float32", "bfloat16")


def test_the_compile_baseline_runs(tmp_path):
    arguments = ["--suites", "op", "--baselines", "compile", "--backends", "auto", "--passes", "forward",
                 "--shapes", "1x4x8x8", "--kernels", "3", "--cpu-seconds", "0.005", "--out", str(tmp_path), "--no-plots"]
    assert cli.main(arguments) == 0
    _, rows = read_results(tmp_path)
    compiled = [r for r in rows if r["impl"] == "pytorch[compile]"]
    assert compiled and not compiled[0]["error"] and compiled[0]["median_ms"] > 0


def test_the_pytest_benchmark_subset_runs():
    import subprocess
    import sys
    from pathlib import Path

    repository = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, "-m", "pytest", "benchmarks/", "--benchmark-only", "-q", "-p",
                             "no:cacheprovider"], cwd=repository, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert " passed" in result.stdout


def test_the_op_table_shows_each_calls_host_time():
    row = {"suite": "op", "shape": "1x8x16x16", "kernel": "7x7", "dtype": "float32", "pass": "forward",
           "impl": "lkconv[auto]", "layout": "nchw", "runs_on": "triton", "median_ms": 0.01, "p20_ms": 0.009,
           "p80_ms": 0.011, "samples": 100, "tflops": 1.0, "host_us": 42.4}
    header, _, measured, unmeasured = report.op_table([row, {**row, "host_us": None}]).splitlines()
    column = header.split(" | ").index("host µs")
    assert measured.split(" | ")[column] == "42"
    assert unmeasured.split(" | ")[column] == "—"


@pytest.mark.gpu
def test_host_time_counts_the_cpu_not_the_gpu():
    from lkconv.benchmarks.timing import host_us

    long_kernel = host_us(lambda: torch.cuda._sleep(20_000_000), calls=5)  # ≈10 ms on the GPU each
    assert long_kernel < 2000, f"{long_kernel:.0f} µs: the host waited for the GPU"
    sleeping_host = host_us(lambda: time.sleep(0.002), calls=5)
    assert sleeping_host >= 2000, f"{sleeping_host:.0f} µs for calls that sleep 2 ms each"


def test_host_time_plans_every_lkconv_call_on_triton_and_restores_the_backend(capsys):
    """`python -m benchmarks host` times lkconv's layers with the triton backend planning as on a GPU: every timed
    lkconv call planned its Triton launches (PyTorch's conv would plan none), and the stand-ins end with the command:
    the triton backend computes again afterwards."""
    from lkconv.backends import triton_backend

    patched = ("_kernels", "interpreting", "_multiprocessors", "unavailable_reason", "unsupported_reason")
    before = {name: getattr(triton_backend, name) for name in patched}
    threads = torch.get_num_threads()
    assert cli.main(["host", "--calls", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1:] for line in lines if line.startswith("| ")}
    # Launches per call over every call made, warm-up and timed runs included.
    assert {call: launches.rstrip(" |") for call, (_, launches) in rows.items() if call != "call"} == {
        "F.conv2d on meta tensors (for scale: dispatch and shape checks), no grad": "0",
        "lkconv.depthwise_conv2d, no grad": "1",
        "lkconv.DepthwiseConv2d, no grad": "1",
        "of which the op, torch.ops.lkconv.depthwise_conv2d, no grad": "1",
        "of which the triton backend's forward (planning, packing), no grad": "1",
        "lkconv.depthwise_conv2d, recording autograd": "1",
        "forward and backward (three ops)": "3",
    }
    assert all(float(us) > 0 for call, (us, _) in rows.items() if call != "call")
    assert {name: getattr(triton_backend, name) for name in patched} == before
    assert torch.get_num_threads() == threads
    x, w = torch.randn(1, 2, 8, 8), torch.randn(2, 1, 3, 3)
    assert lkconv.explain(x, w).backend == "torch"  # auto on a CPU, as before the command
    with lkconv.use_backend("triton"):
        y = lkconv.depthwise_conv2d(x, w, padding=1)
    assert_close(y, F.conv2d(x.double(), w.double(), None, 1, 1, 1, 2), 1e-5, "triton after the host command")
