"""What `quick` and `full` measure on a GPU, and the small CPU defaults that only prove the suite runs.

quick runs in under 5 minutes on an H100 (predicted, not yet measured); full is meant to be split with --chunk so each
part stays under 9.
"""

import torch

# RepLKNet-31B's four stages (channels, map size at 224 input, kernel); at 384 input the maps are 96/48/24/12.
REPLKNET_31B_STAGES = ((128, 56, 31), (256, 28, 29), (512, 14, 27), (1024, 7, 13))
PAPER_KERNELS = (3, 5, 7, 9, 13, 17, 21, 27, 29, 31)


def _square(k: int) -> tuple[int, int]:
    return (k, k)


def op_shapes(preset: str) -> list[tuple[tuple[int, int, int, int], tuple[int, int]]]:
    """(input shape, kernel) pairs for the op suite."""
    if preset == "quick":
        # The issues' bars: K=31 on (64,384,32,32) and (64,128,56,56) first, then (64,384,64,64) and the other
        # RepLKNet-31B stages at 224.
        stages = [((64, c, r, r), _square(k)) for c, r, k in REPLKNET_31B_STAGES]
        return [((64, 384, 32, 32), _square(31)), stages[0], ((64, 384, 64, 64), _square(31)), *stages[1:]]
    if preset == "full":
        cases = [((64, 384, 32, 32), _square(k)) for k in PAPER_KERNELS]
        cases += [((n, c, r, r), _square(31)) for n in (1, 8) for c, r in ((384, 32), (128, 56))]
        cases += [((64, c, r, r), _square(k)) for c, r, k in REPLKNET_31B_STAGES]
        cases += [((32, c, r * 384 // 224, r * 384 // 224), _square(k)) for c, r, k in REPLKNET_31B_STAGES]
        cases += [((64, 124, 56, 56), (51, 5)), ((64, 124, 56, 56), (5, 51))]  # SLaK-T stage 1
        cases += [((64, 320, 14, 14), _square(13)), ((64, 160, 28, 28), _square(13))]  # UniRepLKNet
        return list(dict.fromkeys(cases))
    if preset == "cpu":
        return [((2, 16, 16, 16), _square(7)), ((2, 16, 16, 16), _square(31)), ((1, 8, 16, 16), (13, 3))]
    raise ValueError(f"preset must be quick, full or cpu; got {preset!r}")


def defaults(preset: str) -> dict:
    """Default options for `preset`; the command line overrides any of them."""
    on_gpu = preset != "cpu"
    return {
        "suites": ("op", "table1", "model"),
        "dtypes": ("float32", "bfloat16") if on_gpu else ("float32",),
        "layouts": ("nchw", "channels_last"),
        "baselines": ("nchw", "channels_last", "compile") if preset == "full" else ("nchw", "channels_last"),
        # On a GPU auto runs triton until measured_choices.json says otherwise; adding cuda times both, which is
        # what `python -m benchmarks choices` needs.
        "backends": ("auto", "triton", "cuda") if preset == "full" else (("auto", "cuda") if on_gpu else ("auto",)),
        # quick leaves out R=64: its 24-layer PyTorch stacks alone take minutes on an H100.
        "table_resolutions": (16, 32, 64) if preset == "full" else ((16, 32) if on_gpu else (8, 16)),
        "table_kernels": PAPER_KERNELS if on_gpu else (3, 7, 13),
        "table_batch": 64 if on_gpu else 1,
        "table_channels": 384 if on_gpu else 8,
        "table_dtypes": ("float32", "bfloat16") if preset == "full" else ("float32",),
        "table_passes": ("forward", "fwd_bwd") if preset == "full" else ("forward",),
        "model_resolutions": (224, 384) if preset == "full" else ((224,) if on_gpu else (64,)),
        "model_batches": {224: 64, 384: 32} if on_gpu else {64: 2},
        "model_modes": ("inference", "train"),
        "model_layouts": ("nchw", "channels_last") if preset == "full" else ("nchw",),
        "model_overrides": {} if on_gpu else dict(layers=(1, 1, 1, 1), channels=(8, 16, 16, 16), num_classes=10),
        "warmup_ms": 25.0,
        "rep_ms": 100.0,
        "model_rep_ms": 500.0,
        "cpu_seconds": 0.05,
    }


def default_preset() -> str:
    """`quick` on a GPU, `cpu` elsewhere."""
    return "quick" if torch.cuda.is_available() else "cpu"
