"""RepVGG's block: 3x3 conv-BN + 1x1 conv-BN (+ identity BN) -> [SE] -> ReLU, merging into one 3x3 conv."""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..arguments import pair
from ..reparam import fuse_conv_bn, identity_kernel, merge_branches
from .conv_bn import ConvBN, ReparamBlock, _size_2_t, merged_conv_like
from .drop_path import DropPath


class SEBlock(nn.Module):
    """RepVGG-D2se's squeeze-and-excitation: global average -> 1x1 down -> ReLU -> 1x1 up -> sigmoid gate.

    Official names `down` and `up`. It sits after the merged conv, so it is not part of the merge.
    """

    def __init__(self, channels: int, internal_neurons: int, device=None, dtype=None) -> None:
        super().__init__()
        self.down = nn.Conv2d(channels, internal_neurons, 1, bias=True, device=device, dtype=dtype)
        self.up = nn.Conv2d(internal_neurons, channels, 1, bias=True, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x scaled per channel by a gate from its spatial mean (squeeze and excitation)."""
        gate = torch.sigmoid(self.up(F.relu(self.down(F.adaptive_avg_pool2d(x, 1)))))
        return x * gate


class RepVGGBlock(ReparamBlock):
    """RepVGG's training-time block with official names `rbr_dense`, `rbr_1x1`, `rbr_identity`; merged `rbr_reparam`.

    The identity branch (a BatchNorm) exists only when in_channels == out_channels and stride is 1. Groups and
    stride 2 are supported. `drop_path` > 0 drops the conv branches per sample where an identity branch exists
    (as timm's RepVGG block does; the paper uses none); it is an identity in eval mode, so the merge ignores it.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: _size_2_t = 1,
        padding: int = 1,
        groups: int = 1,
        deploy: bool = False,
        use_se: bool = False,
        drop_path: float = 0.0,
        norm_layer: type = nn.BatchNorm2d,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if kernel_size != 3 or padding != 1:
            raise ValueError(f"RepVGGBlock needs kernel_size=3 and padding=1; got kernel_size={kernel_size!r}, "
                             f"padding={padding!r}")
        factory = dict(device=device, dtype=dtype)
        self.in_channels, self.groups = in_channels, groups
        self.nonlinearity = nn.ReLU()
        self.se = SEBlock(out_channels, max(1, out_channels // 16), **factory) if use_se else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path != 0 else nn.Identity()
        if deploy:
            self.rbr_reparam = nn.Conv2d(in_channels, out_channels, 3, stride, 1, groups=groups, bias=True, **factory)
            return
        has_identity = in_channels == out_channels and pair(stride, "stride", 1) == (1, 1)
        self.rbr_identity = norm_layer(in_channels, **factory) if has_identity else None
        self.rbr_dense = ConvBN(in_channels, out_channels, 3, stride, 1, groups=groups, norm_layer=norm_layer,
                                **factory)
        self.rbr_1x1 = ConvBN(in_channels, out_channels, 1, stride, 0, groups=groups, norm_layer=norm_layer,
                              **factory)

    @property
    def merged(self) -> bool:
        """Whether the branches have been merged into one conv."""
        return hasattr(self, "rbr_reparam")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The 3x3, 1x1 and identity branches summed (the conv branches dropped per sample in training), then SE and
        the nonlinearity; or the merged conv."""
        if self.merged:
            return self.nonlinearity(self.se(self.rbr_reparam(x)))
        out = self.rbr_dense(x) + self.rbr_1x1(x)
        if self.rbr_identity is not None:
            out = self.drop_path(out) + self.rbr_identity(x)
        return self.nonlinearity(self.se(out))

    def equivalent_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The merged 3x3 (weight, bias); differentiable (RepVGG's custom L2 penalty is built on it)."""
        if self.merged:
            return self.rbr_reparam.weight, self.rbr_reparam.bias
        branches = [self.rbr_dense.fused_kernel_bias(), self.rbr_1x1.fused_kernel_bias()]
        if self.rbr_identity is not None:
            weight = self.rbr_dense.conv.weight
            identity = identity_kernel(self.in_channels, self.groups, 3, dtype=weight.dtype, device=weight.device)
            branches.append(fuse_conv_bn(identity, None, self.rbr_identity))
        return merge_branches(branches, 3)

    def _merge(self) -> None:
        weight, bias = self.equivalent_kernel_bias()
        self.rbr_reparam = merged_conv_like(self.rbr_dense.conv, weight, bias)
        del self.rbr_dense, self.rbr_1x1, self.rbr_identity
