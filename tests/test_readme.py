"""The README's usage example runs as written (on a CPU-only machine PyTorch's own conv answers)."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_usage_example_runs(capsys):
    text = README.read_text()
    usage = text[text.index("## Usage"):]
    example = re.search(r"```python\n(.*?)```", usage, re.S).group(1)
    namespace = {}
    exec(compile(example, "README.md usage", "exec"), namespace)
    x, w, y = namespace["x"], namespace["w"], namespace["y"]
    expected = torch.nn.functional.conv2d(x.detach(), w.detach(), padding="same", groups=64)
    assert torch.allclose(y, expected, rtol=1e-4, atol=1e-4)
    assert x.grad is not None and w.grad is not None
    assert type(namespace["model"][0]).__name__ == "DepthwiseConv2d"
    assert type(namespace["plain"][0]) is torch.nn.Conv2d
    assert "backend:" in capsys.readouterr().out
