"""The README's usage example runs as written (on a CPU-only machine PyTorch's own conv answers)."""

import re
from pathlib import Path

import torch

from conftest import TOLERANCE, assert_close, reference

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_usage_example_runs(capsys):
    text = README.read_text()
    usage = text[text.index("## Usage"):]
    example = re.search(r"```python\n(.*?)```", usage, re.S).group(1)
    namespace = {}
    exec(compile(example, "README.md usage", "exec"), namespace)
    x, w, y = namespace["x"], namespace["w"], namespace["y"]
    # y.sum().backward(): the grads of a sum, against float64 F.conv2d.
    wanted = reference(x, w, None, 1, "same", 1, torch.ones_like(y))
    for actual, expected, what in zip((y, x.grad, w.grad), wanted, ("output", "input grad", "weight grad")):
        assert_close(actual, expected, TOLERANCE[torch.float32], f"README example {what}")
    assert type(namespace["model"][0]).__name__ == "DepthwiseConv2d"
    assert type(namespace["plain"][0]) is torch.nn.Conv2d
    assert "backend:" in capsys.readouterr().out
