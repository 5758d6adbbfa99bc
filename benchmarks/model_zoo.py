"""Prints the model-zoo table of README.md: parameters before and after the merge, and GMACs at 224x224.

Everything is built on the meta device, so it needs no GPU and no memory for weights:
    python benchmarks/model_zoo.py
"""

import torch
from torch.utils.flop_counter import FlopCounterMode

import lkconv
from lkconv.models import create_model, list_models


def describe(name: str, resolution: int = 224) -> tuple[float, float, float]:
    """(parameters before the merge, after it, in millions; multiply-adds of one merged forward, in billions)."""
    with torch.device("meta"):
        model = create_model(name).eval()
        merged = lkconv.reparameterize_model(model)
        with FlopCounterMode(display=False) as counter:
            merged(torch.empty(1, 3, resolution, resolution))
    millions = lambda m: sum(p.numel() for p in m.parameters()) / 1e6  # noqa: E731
    return millions(model), millions(merged), counter.get_total_flops() / 2e9


def main() -> None:
    """Prints a markdown table of every registered model's size and cost."""
    print("| model | params before merge (M) | params after merge (M) | GMACs at 224 (merged) |")
    print("|---|---:|---:|---:|")
    for name in list_models():
        before, after, gmacs = describe(name)
        print(f"| `{name}` | {before:.2f} | {after:.2f} | {gmacs:.2f} |")


if __name__ == "__main__":
    main()
