"""Which GPU backend `auto` picks per shape class, from measurements committed in measured_choices.json.

`python -m benchmarks choices RESULTS_DIR` writes the file from a benchmark run that timed both `triton` and
`cuda`: for each (dtype, kernel, stride, dilation, map size, layout) the backend with the faster forward+backward.
A table applies only on the GPU model it was measured on; without a matching entry `auto` keeps its default order.
On other GPUs, run the benchmark with both backends, write a table of your own with `choices --to PATH`, and point
LKCONV_CHOICES at it: it then stands in for the committed one.
"""

import functools
import json
import math
import os
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import torch

TABLE = Path(__file__).with_name("measured_choices.json")
_TABLE_NAME = str(TABLE)
CHOICES_VARIABLE = "LKCONV_CHOICES"
# A measured map size stands for maps up to this factor larger or smaller (per side).
NEAREST_FACTOR = 2.0


LAYOUTS = ("nchw", "channels_last")


class ShapeClass(NamedTuple):
    """What decides which kernel is fastest: the kernel geometry, the map size (batch and channels matter less) and
    the layout (triton has channels_last kernels of its own, cuda computes channels_last maps as NCHW copies)."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    size: tuple[int, int]
    layout: str = "nchw"

    @classmethod
    def of(cls, kernel: Sequence[int], stride: Sequence[int], dilation: Sequence[int], size: Sequence[int],
           layout: str = "nchw"):
        """The shape class of a call, from any int sequences."""
        return cls((int(kernel[0]), int(kernel[1])), (int(stride[0]), int(stride[1])),
                   (int(dilation[0]), int(dilation[1])), (int(size[0]), int(size[1])), layout)


def layout_of(tensor: torch.Tensor) -> str:
    """"channels_last" for a map whose channels are its contiguous dimension, else "nchw"."""
    return "channels_last" if tensor.shape[1] > 1 and tensor.stride(1) == 1 else "nchw"


def table_path() -> Path:
    """The table auto reads: $LKCONV_CHOICES where set (a leading ~ is the home folder), else the committed one."""
    return Path(os.environ[CHOICES_VARIABLE]).expanduser() if os.environ.get(CHOICES_VARIABLE) else TABLE


def version() -> tuple:
    """What identifies the table auto would read now (its path and modification time), so that choices cached
    from one table are not served after LKCONV_CHOICES or the file changes."""
    value = os.environ.get(CHOICES_VARIABLE)
    path = os.path.expanduser(value) if value else _TABLE_NAME  # plain strings: this runs on every GPU call
    try:
        return path, os.stat(path).st_mtime_ns
    except OSError:
        return path, None


def load(path: Optional[Path] = None) -> dict:
    """The table at `path` (default: table_path()): {"device": GPU name or None, "choices": [{dtype, kernel, stride,
    dilation, size, backend, ...}]}, read again when the file changes. A LKCONV_CHOICES that names no readable table is
    an error, not a silent default order."""
    path, committed = (path or table_path()).resolve(), TABLE.resolve()
    if path == committed and not path.exists():
        return {"device": None, "choices": []}
    source = f"the committed table {path}" if path == committed else f"{CHOICES_VARIABLE}={path}"
    try:
        return _read(path, path.stat().st_mtime_ns, source)
    except OSError as error:
        raise RuntimeError(f"cannot read {source}: {error}") from error


@functools.lru_cache(maxsize=16)
def _read(path: Path, _mtime_ns: int, source: str) -> dict:
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise RuntimeError(f"cannot read {source}: {error}") from error
    if not isinstance(table, dict) or not isinstance(table.get("choices"), list):
        raise RuntimeError(f"{source} is not a backend table: it needs a 'device' and a list of 'choices'")
    for index, entry in enumerate(table["choices"]):
        if not _valid_entry(entry):
            raise RuntimeError(
                f"{source}: choices[{index}] is not a choice: it needs 'dtype' (e.g. 'bfloat16'), 'kernel', 'stride', "
                f"'dilation' and 'size' as pairs of ints, 'backend' ('triton' or 'cuda') and optionally 'layout' "
                f"({' or '.join(LAYOUTS)}); got {entry!r}")
    return table


def _valid_entry(entry) -> bool:
    def is_pair(value):
        return isinstance(value, list) and len(value) == 2 and all(type(v) is int and v >= 1 for v in value)

    return (isinstance(entry, dict) and isinstance(entry.get("dtype"), str)
            and all(is_pair(entry.get(key)) for key in ("kernel", "stride", "dilation", "size"))
            and entry.get("backend") in ("triton", "cuda") and entry.get("layout", "nchw") in LAYOUTS)


def lookup(table: dict, device_name: str, dtype: torch.dtype, shape: ShapeClass) -> Optional[str]:
    """The measured-faster backend for `shape` on `device_name`, or None when nothing close was measured there."""
    if table.get("device") != device_name:
        return None
    dtype_name = str(dtype).removeprefix("torch.")
    best, best_distance = None, math.inf
    for entry in table.get("choices", []):
        if (entry["dtype"], tuple(entry["kernel"]), tuple(entry["stride"]), tuple(entry["dilation"]),
                entry.get("layout", "nchw")) != (dtype_name, shape.kernel, shape.stride, shape.dilation, shape.layout):
            continue
        # Each side within NEAREST_FACTOR; of those entries, the nearest over both sides.
        sides = [abs(math.log2(max(a, 1) / max(b, 1))) for a, b in zip(entry["size"], shape.size)]
        if max(sides) <= math.log2(NEAREST_FACTOR) and sum(sides) <= best_distance:
            best, best_distance = entry["backend"], sum(sides)
    return best


def choices_from_rows(rows: list[dict]) -> list[dict]:
    """One entry per shape class and layout that both GPU backends measured (forward+backward) on the same shapes:
    the backend with the smaller total over those shapes, so the largest batches weigh most. A shape only one
    backend ran (the other failed or was not timed) does not count: a batch-1 time is no answer to a batch-64 one.
    Nor does a backend's shape where any of its passes failed (a wrong answer included): fwd_bwd is not checked."""

    def run_by(row):  # a forced backend's rows, or `auto`'s, which say where they ran
        if row.get("impl") == "lkconv[auto]" and row.get("runs_on") in ("triton", "cuda"):
            return row["runs_on"]
        return {"lkconv[triton]": "triton", "lkconv[cuda]": "cuda"}.get(row.get("impl"))

    op_rows = [row for row in rows if row.get("suite") == "op" and row.get("layout") in LAYOUTS]
    failed = {(row["shape"], row["kernel"], row["dtype"], row["layout"], run_by(row))
              for row in op_rows if row.get("error")}
    timed = {}  # shape class -> full shape -> backend -> fastest median
    for row in op_rows:
        backend = run_by(row)
        if (row.get("pass") != "fwd_bwd" or backend is None or not row.get("median_ms")
                or (row["shape"], row["kernel"], row["dtype"], row["layout"], backend) in failed):
            continue
        _, _, height, width = (int(v) for v in row["shape"].split("x"))
        kernel = tuple(int(v) for v in row["kernel"].split("x"))
        key = (row["dtype"], kernel, (1, 1), (1, 1), (height, width), row["layout"])
        times = timed.setdefault(key, {}).setdefault(row["shape"], {})
        times[backend] = min(row["median_ms"], times.get(backend, math.inf))
    choices = []
    for (dtype, kernel, stride, dilation, size, layout), shapes in sorted(timed.items()):
        both = {shape: times for shape, times in sorted(shapes.items()) if len(times) == 2}
        if both:
            totals = {name: sum(times[name] for times in both.values()) for name in ("triton", "cuda")}
            choices.append({"dtype": dtype, "kernel": list(kernel), "stride": list(stride),
                            "dilation": list(dilation), "size": list(size), "layout": layout,
                            "backend": min(totals, key=totals.get), "fwd_bwd_ms": both})
    return choices
