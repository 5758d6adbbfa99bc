"""Stochastic depth for residual blocks: drops a whole sample's branch in training and rescales the survivors."""

import torch
from torch import nn

from ..arguments import probability


class DropPath(nn.Module):
    """Zeroes the branch for each sample with probability `p` in training (and scales the rest by 1/(1-p)).

    An identity in eval mode, so re-parameterization and inference never see it.
    """

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = probability(p, "drop path probability p")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """In training, each sample zeroed with probability p and the rest scaled by 1 / (1 - p)."""
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        """The drop probability, for repr."""
        return f"p={self.p}"
