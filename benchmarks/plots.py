"""PNG plots of a run: lkconv against PyTorch per pass (the README's headline), Table 1 latency against K, and
RepLKNet-31B throughput. Needs matplotlib (the `bench` extra); a machine without it can plot later with
`python -m benchmarks report DIR`."""

from collections import defaultdict
from pathlib import Path

IMPL_STYLE = {"pytorch[nchw]": "#9e9e9e", "pytorch[channels_last]": "#5c6bc0", "pytorch[compile]": "#8d6e63"}
LKCONV_COLOUR = "#e65100"


def available() -> bool:
    """Whether matplotlib is installed (the plots need it; the rest of the suite does not)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> bool:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _colour(impl: str, layout: str) -> str:
    if impl in IMPL_STYLE:
        return IMPL_STYLE[impl]
    return LKCONV_COLOUR if layout == "nchw" else "#ffb74d"


def op_headline(rows: list[dict], path: Path, device: str) -> bool:
    """Grouped bars: per pass, each implementation's median latency, one panel per (shape, kernel, dtype)."""
    rows = [r for r in rows if r.get("suite") == "op" and r.get("median_ms")]
    panels = defaultdict(list)
    for r in rows:
        panels[(r["shape"], r["kernel"], r["dtype"])].append(r)
    if not panels:
        return False
    plt = _pyplot()
    columns = min(2, len(panels))
    figure_rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(figure_rows, columns, figsize=(7 * columns, 3.6 * figure_rows), squeeze=False)
    for ax, ((shape, kernel, dtype), panel) in zip(axes.flat, sorted(panels.items())):
        passes = list(dict.fromkeys(r["pass"] for r in panel))
        series = list(dict.fromkeys((r["impl"], r["layout"]) for r in panel))
        width = 0.8 / len(series)
        for index, (impl, layout) in enumerate(series):
            values = {r["pass"]: r["median_ms"] for r in panel if (r["impl"], r["layout"]) == (impl, layout)}
            xs = [p + (index - (len(series) - 1) / 2) * width for p in range(len(passes))]
            label = impl if impl.startswith("pytorch") else f"{impl} {layout}"
            ax.bar(xs, [values.get(p, 0) for p in passes], width, label=label, color=_colour(impl, layout))
        ax.set_xticks(range(len(passes)), passes)
        times = [r["median_ms"] for r in panel]
        if max(times) > 20 * min(times):  # PyTorch's NCHW weight grad can be 50x the rest: keep the rest visible
            ax.set_yscale("log")
        ax.set_ylabel("median latency (ms)")
        ax.set_title(f"({shape}) K={kernel} {dtype}", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"lkconv vs PyTorch, depthwise conv per pass, lower is better ({device})", fontsize=11)
    return _save(plt, fig, path)


def table1_lines(rows: list[dict], path: Path, device: str) -> bool:
    """Latency of 24 stacked layers against K: one line per implementation and resolution, a panel per variant."""
    rows = [r for r in rows if r.get("suite") == "table1" and r.get("median_ms")]
    panels = defaultdict(list)
    for r in rows:
        panels[(r["dtype"], r["pass"])].append(r)
    if not panels:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.2), squeeze=False)
    markers = "os^D"
    for ax, ((dtype, pass_name), panel) in zip(axes.flat, sorted(panels.items())):
        resolutions = sorted({r["resolution"] for r in panel})
        for (impl, layout) in dict.fromkeys((r["impl"], r["layout"]) for r in panel):
            for index, resolution in enumerate(resolutions):
                points = sorted((r["kernel"], r["median_ms"]) for r in panel
                                if (r["impl"], r["layout"], r["resolution"]) == (impl, layout, resolution))
                label = f"{impl}{'' if impl.startswith('pytorch') else ' ' + layout} R={resolution}"
                ax.plot(*zip(*points), marker=markers[index % len(markers)], color=_colour(impl, layout),
                        label=label, alpha=0.55 + 0.45 * index / max(len(resolutions) - 1, 1))
        ax.set_yscale("log")
        ax.set_xlabel("kernel size K")
        ax.set_ylabel("latency of 24 layers (ms, log)")
        ax.set_title(f"Table 1 layers, {dtype} {pass_name}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.suptitle(f"RepLKNet Table 1 on {device}: latency against kernel size", fontsize=11)
    return _save(plt, fig, path)


def model_throughput(rows: list[dict], path: Path, device: str) -> bool:
    """Images/s of the model with lkconv and with plain PyTorch convs, one bar pair per configuration."""
    rows = [r for r in rows if r.get("suite") == "model" and r.get("images_per_s")]
    if not rows:
        return False
    keys = list(dict.fromkeys((r["resolution"], r["mode"], r["precision"], r["layout"], r["form"]) for r in rows))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(keys)), 4.2))
    for offset, impl, colour in ((-0.2, "pytorch", IMPL_STYLE["pytorch[nchw]"]), (0.2, "lkconv", LKCONV_COLOUR)):
        values = {(r["resolution"], r["mode"], r["precision"], r["layout"], r["form"]): r["images_per_s"]
                  for r in rows if r["impl"] == impl}
        ax.bar([i + offset for i in range(len(keys))], [values.get(k, 0) for k in keys], 0.4, label=impl,
               color=colour)
    ax.set_xticks(range(len(keys)), ["\n".join(map(str, k)) for k in keys], fontsize=7)
    ax.set_ylabel("images / s (higher is better)")
    ax.set_title(f"{rows[0]['model']} throughput on {device}", fontsize=10)
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    return _save(plt, fig, path)


def write_all(rows: list[dict], out: Path, device: str) -> list[Path]:
    """Every plot the rows allow; returns the files written."""
    written = []
    for name, plot in (("op_latency.png", op_headline), ("table1.png", table1_lines),
                       ("model_throughput.png", model_throughput)):
        if plot(rows, out / name, device):
            written.append(out / name)
    return written
