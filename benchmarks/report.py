"""Writing results: CSV and JSON with provenance, a markdown report, and the short table printed at the end.

`python -m benchmarks report DIR` merges the JSON files of a chunked run (results-chunk*.json) into one report.
"""

import csv
import io
import json
import math
import os
import re
from pathlib import Path
from typing import Optional

from . import model_suite, paper_table
from .formatting import ms, percent, ratio


def markdown(header: list[str], lines: list[list[str]]) -> str:
    """A markdown table from a header and rows of cells."""
    rows = [header, ["---"] * len(header), *lines]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in rows)


def op_table(rows: list[dict], lkconv_only: bool = False) -> str:
    """Op rows: time, spread, host time per call, speed-up over each PyTorch baseline, TFLOP/s, % of the H100 floor,
    peak memory, and the relative error against PyTorch in exact fp32 (lkconv rows)."""
    header = ["shape", "K", "dtype", "pass", "impl", "layout", "runs on", "median ms", "p20–p80 ms (n)", "host µs",
              "vs NCHW", "vs CL", "vs compile", "TFLOP/s", "% floor", "% fp32 FMA", "% §4 16-bit", "% memory",
              "peak MiB", "rel. error"]
    lines = []
    for r in rows:
        if r.get("suite") != "op" or (lkconv_only and not r["impl"].startswith("lkconv")):
            continue
        failed = bool(r.get("error") or r.get("skipped"))
        memory = r.get("peak_memory_mib")
        lines.append([
            r["shape"], r["kernel"], r["dtype"], r["pass"], r["impl"], r["layout"], r["runs_on"],
            ("skipped" if r.get("skipped") else "error") if failed else ms(r["median_ms"]),
            "—" if failed else f"{ms(r['p20_ms'])}–{ms(r['p80_ms'])} ({r.get('samples', '?')})",
            "—" if r.get("host_us") is None else f"{r['host_us']:.0f}",
            ratio(r.get("speedup_vs_nchw")), ratio(r.get("speedup_vs_channels_last")),
            ratio(r.get("speedup_vs_compile")),
            "—" if failed else f"{r['tflops']:.3g}", percent(r.get("floor_fraction")),
            percent(r.get("fp32_fma_floor_fraction")), percent(r.get("reference_16bit_floor_fraction")),
            percent(r.get("memory_floor_fraction")), "—" if memory is None else f"{memory:.0f}",
            "—" if r.get("rel_error") is None else f"{r['rel_error']:.1e}",
        ])
    return markdown(header, lines) if lines else ""


# compact_table's short names.
SHORT_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "nchw": "NCHW", "channels_last": "CL",
               "forward": "fwd", "input_grad": "dgrad", "weight_grad": "wgrad", "fwd_bwd": "fwd+bwd"}


def compact_table(rows: list[dict]) -> str:
    """The op results in few characters (a GPU call's reply keeps only its output's last 12,000): one line per case
    and pass, each lkconv backend's median ms, and the fastest one's speed-ups and fraction of the floor."""
    cases: dict[tuple, dict] = {}
    for r in rows:
        if r.get("suite") == "op" and r["impl"].startswith("lkconv"):
            cases.setdefault((r["shape"], r["kernel"], r["dtype"], r["layout"], r["pass"]), {})[r["impl"]] = r
    impls = sorted({impl for found in cases.values() for impl in found})
    header = ["case", "dtype", "layout", "pass", *(impl.removeprefix("lkconv") + " ms" for impl in impls), "vs NCHW",
              "vs CL", "% floor"]
    lines = []
    for (shape, kernel, dtype, layout, pass_name), found in cases.items():
        timed = [r for r in found.values() if r.get("median_ms") is not None]
        best = min(timed, key=lambda r: r["median_ms"]) if timed else {}
        lines.append([f"{shape} K={kernel}", *(SHORT_NAMES.get(name, name) for name in (dtype, layout, pass_name)),
                      *(ms(found[impl].get("median_ms")) if impl in found else "" for impl in impls),
                      ratio(best.get("speedup_vs_nchw")), ratio(best.get("speedup_vs_channels_last")),
                      percent(best.get("floor_fraction"))])
    return markdown(header, lines) if lines else ""


def _describe(r: dict) -> str:
    keys = ("suite", "unit", "shape", "kernel", "resolution", "dtype", "pass", "mode", "precision", "impl", "layout",
            "form")
    return " ".join(str(r[k]) for k in keys if r.get(k) not in (None, ""))


def skipped(rows: list[dict]) -> list[str]:
    """One line per row that was skipped, with the reason."""
    return [f"{_describe(r)}: {r['skipped']}" for r in rows if r.get("skipped")]


def errors(rows: list[dict]) -> list[str]:
    """One line per row that failed, with its error."""
    return [f"{_describe(r)}: {r['error']}" for r in rows if r.get("error")]


def full_report(rows: list[dict], meta: dict) -> str:
    """Everything, for the results file: provenance, then each suite's table."""
    parts = ["# lkconv benchmarks", "\n".join(f"- {key}: {value}" for key, value in meta.items())]
    if any(r.get("suite") == "op" for r in rows):
        parts += ["## Op level: each pass of one depthwise conv", op_table(rows)]
    table_rows = [r for r in rows if r.get("suite") == "table1"]
    if table_rows:
        parts += ["## RepLKNet paper, Table 1: 24 stacked depthwise layers", paper_table.paper_layout(table_rows)]
    model_rows = [r for r in rows if r.get("suite") == "model"]
    if model_rows:
        parts += ["## Model level", model_suite.summary_table(model_rows)]
    failed = errors(rows)
    if failed:
        parts += ["## Errors", "\n".join(f"- {line}" for line in failed)]
    not_run = skipped(rows)
    if not_run:
        parts += ["## Skipped (backend not available here)", "\n".join(f"- {line}" for line in not_run)]
    return "\n\n".join(parts) + "\n"


def short_table(rows: list[dict]) -> str:
    """The table to read first: every lkconv op measurement next to its baselines, then the model headline."""
    parts = [op_table(rows, lkconv_only=True)]
    model_rows = [r for r in rows if r.get("suite") == "model"]
    if model_rows:
        parts.append(model_suite.summary_table(model_rows))
    return "\n\n".join(p for p in parts if p)


def _json_safe(row: dict) -> dict:
    """Strict JSON has no NaN: a missing number becomes null."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}


# The provenance each CSV row repeats, so that a CSV copied away from its JSON still says where it was measured.
CSV_PROVENANCE = ("device", "driver", "cuda", "lkconv_cuda_runtime", "torch", "triton", "lkconv", "git_commit",
                  "git_dirty", "date_utc")


def write(out: Path, stem: str, rows: list[dict], meta: dict) -> list[Path]:
    """Writes `stem`.json (provenance + rows), .csv (rows, each led by CSV_PROVENANCE) and .md under `out`; returns
    the paths."""
    out.mkdir(parents=True, exist_ok=True)
    clashes = sorted({key for row in rows for key in row} & set(CSV_PROVENANCE))
    if clashes:
        raise ValueError(f"result rows may not hold the provenance keys {clashes}: the CSV repeats those per row")
    led = [{**{key: meta.get(key) for key in CSV_PROVENANCE}, **row} for row in rows]
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=list(dict.fromkeys([*CSV_PROVENANCE, *(k for row in rows for k in row)])))
    writer.writeheader()
    writer.writerows(led)
    texts = {
        out / f"{stem}.json": json.dumps({"provenance": meta, "rows": [_json_safe(r) for r in rows]}, indent=1,
                                         default=str),
        out / f"{stem}.csv": table.getvalue(),
        out / f"{stem}.md": full_report(rows, meta),
    }
    for path, text in texts.items():  # whole files only: a run killed mid-write leaves the previous save
        partial = path.with_name(path.name + ".partial")
        partial.write_text(text, newline="")
        os.replace(partial, path)
    return list(texts)


CHUNK_FILE = re.compile(r"results-chunk(\d+)of(\d+)\.json")


def _run_files(directory: Path) -> list[Path]:
    """The results files of the one run in `directory`: results.json, or its chunks (results-chunkKofN.json) of
    one N. Two runs' files would merge into duplicated or mixed rows, so that raises."""
    files = sorted(directory.glob("results*.json"), key=lambda path: (len(path.name), path.name))
    if not files:
        raise FileNotFoundError(f"no results*.json in {directory}")
    chunks = [path for path in files if CHUNK_FILE.fullmatch(path.name)]
    others = [path.name for path in files if path not in chunks]
    counts = {CHUNK_FILE.fullmatch(path.name)[2] for path in chunks}
    if (others and chunks) or len(others) > 1 or len(counts) > 1:
        raise ValueError(f"{directory} holds the results of more than one run ({', '.join(p.name for p in files)}): "
                         "keep one run per folder, either results.json or the chunks results-chunkKofN.json of one N")
    return files


# What makes two results files parts of one run: the same GPU model, code, library versions and selection. Other
# provenance (dates, driver, an early stop) may differ between chunks; the merged provenance keeps it per file.
RUN_KEYS = ("device", "git_commit", "git_dirty", "lkconv", "torch", "triton", "cuda", "cudnn", "preset", "suites",
            "fp32_math", "timing", "selection")


def load(directory: Path) -> tuple[list[dict], list[dict]]:
    """Rows and provenance records of the results files of the one run in `directory` (its chunks, or the whole).
    Chunks that disagree on any of RUN_KEYS come from different runs (another commit, GPU or selection): that
    raises, since their rows would merge into a table no single run measured."""
    rows, metas = [], []
    for path in _run_files(directory):
        data = json.loads(path.read_text())
        if not (isinstance(data, dict) and isinstance(data.get("provenance"), dict)
                and isinstance(data.get("rows"), list) and all(isinstance(row, dict) for row in data["rows"])):
            raise ValueError(f"{path.name} is not a results file of this benchmark (a JSON object with a "
                             "'provenance' object and a list of 'rows' objects)")
        rows += data["rows"]
        metas.append({"file": path.name, **data["provenance"]})
    first = metas[0]
    for meta in metas[1:]:
        for key in RUN_KEYS:
            if meta.get(key) != first.get(key):
                raise ValueError(f"{first['file']} and {meta['file']} are not chunks of one run: their {key} differ "
                                 f"({first.get(key)!r} against {meta.get(key)!r})")
    return rows, metas


def merged_provenance(metas: list[dict]) -> dict:
    """One provenance for the files `load` read: a value all files share once, a value that differs (dates, the
    command, an early stop) as {file: value}; for a chunked run, which chunks of how many it covers
    (`missing_chunks` lists the absent ones)."""
    meta = {"merged_from": [m["file"] for m in metas]}
    for key in dict.fromkeys(key for m in metas for key in m if key != "file"):
        values = [m.get(key) for m in metas]
        meta[key] = values[0] if all(v == values[0] for v in values) else {m["file"]: m.get(key) for m in metas}
    found = [CHUNK_FILE.fullmatch(m["file"]) for m in metas]
    if all(found):
        count = int(found[0][2])
        present = sorted(int(match[1]) for match in found)
        meta.update(chunk=None, chunks_of=count, chunks_merged=present,
                    missing_chunks=[k for k in range(1, count + 1) if k not in present])
    return meta
