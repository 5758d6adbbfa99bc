"""The pieces every re-param block is built from: a conv factory that puts depthwise convs on lkconv, conv-BN
pairs with the official parameter names, and the base class that `reparameterize_model` recognises."""

from typing import Optional, Union

import torch
from torch import nn

from ..arguments import pair, whole_number
from ..modules import DepthwiseConv2d
from ..reparam import fuse_conv_bn

_size_2_t = Union[int, tuple[int, int]]

# Depthwise convs at least this large (the larger side) run on lkconv; smaller ones stay on nn.Conv2d, as
# lkconv.convert's default does.
LARGE_KERNEL = 7


def make_conv(
    in_channels: int,
    out_channels: int,
    kernel_size: _size_2_t,
    stride: _size_2_t = 1,
    padding: _size_2_t = 0,
    dilation: _size_2_t = 1,
    groups: int = 1,
    bias: bool = False,
    device=None,
    dtype=None,
) -> nn.Conv2d:
    """An nn.Conv2d, or an lkconv.DepthwiseConv2d (same parameters and names) when it is depthwise and large."""
    in_channels, out_channels, groups = (whole_number(in_channels, "in_channels"),
                                         whole_number(out_channels, "out_channels"), whole_number(groups, "groups"))
    if in_channels % groups or out_channels % groups:
        raise ValueError(f"in_channels and out_channels must be multiples of groups; got in_channels={in_channels}, "
                         f"out_channels={out_channels}, groups={groups}")
    depthwise = groups == in_channels and out_channels % in_channels == 0
    if depthwise and max(pair(kernel_size, "kernel_size", 1)) >= LARGE_KERNEL:
        return DepthwiseConv2d(
            in_channels, kernel_size, stride, padding, dilation, bias=bias,
            depth_multiplier=out_channels // in_channels, device=device, dtype=dtype,
        )
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                     device=device, dtype=dtype)


def same_padding(kernel_size: _size_2_t, name: str = "kernel_size") -> tuple[int, int]:
    """k // 2 per side; kernels must be odd so that branches of different sizes share a centre."""
    sizes = pair(kernel_size, name, 1)
    if sizes[0] % 2 == 0 or sizes[1] % 2 == 0:
        raise ValueError(f"{name} must be an odd int or a pair of odd ints (branches must share a centre); "
                         f"got {kernel_size!r}")
    return sizes[0] // 2, sizes[1] // 2


class ConvBN(nn.Sequential):
    """conv (no bias) -> BatchNorm [-> activation], named `conv`, `bn`, `nonlinear` as in the official RepLKNet
    and RepVGG checkpoints. Padding defaults to 'same' for odd kernels: dilation·(kernel − 1)/2 per side."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _size_2_t,
        stride: _size_2_t = 1,
        padding: Optional[_size_2_t] = None,
        dilation: _size_2_t = 1,
        groups: int = 1,
        activation: Optional[nn.Module] = None,
        norm_layer: type = nn.BatchNorm2d,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if padding is None:
            rates = pair(dilation, "dilation", 1)
            padding = tuple(rate * half for rate, half in zip(rates, same_padding(kernel_size)))
        self.add_module("conv", make_conv(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                                          bias=False, device=device, dtype=dtype))
        self.add_module("bn", norm_layer(out_channels, device=device, dtype=dtype))
        if activation is not None:
            self.add_module("nonlinear", activation)

    def fused_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The (weight, bias) of the one conv that equals conv -> BN in eval mode."""
        return fuse_conv_bn(self.conv.weight, self.conv.bias, self.bn)


class ReparamBlock(nn.Module):
    """A training-time multi-branch block that collapses into a single conv.

    Subclasses implement `_merge()`; `reparameterize()` calls it once and does nothing afterwards, so it is
    idempotent. The merge uses BatchNorm running statistics: the merged block equals the original in eval mode.
    """

    @property
    def merged(self) -> bool:
        """Whether the block has been merged into its single inference conv."""
        raise NotImplementedError

    def _merge(self) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Merges the branches into one conv in place (a no-op once merged). The merged conv takes the block's
        train/eval mode, and stays frozen where every parameter of the block was."""
        if not self.merged:
            frozen = is_frozen(self)
            self._merge()
            take_state(self, self, frozen)

    def deployed(self) -> nn.Module:
        """The module an inference model holds in this block's place: by default the block itself, merged."""
        self.reparameterize()
        return self


def is_frozen(module: nn.Module) -> bool:
    """Whether `module` has parameters and none of them requires grad (a frozen block merges into a frozen conv)."""
    flags = [parameter.requires_grad for parameter in module.parameters()]
    return bool(flags) and not any(flags)


def take_state(module: nn.Module, like: nn.Module, frozen: bool) -> None:
    """Gives a merged `module` the train/eval mode of `like`, the block it replaces, and freezes it if `frozen`."""
    module.train(like.training)
    if frozen:
        module.requires_grad_(False)


def merged_conv_like(conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor,
                     padding: Optional[_size_2_t] = None) -> nn.Conv2d:
    """A conv with `conv`'s configuration and class (a DepthwiseConv2d, or nn.Conv2d in a model lkconv.revert has
    turned back), a bias, and the given merged weight and bias."""
    kernel_size = tuple(weight.shape[-2:])
    padding = same_padding(kernel_size) if padding is None else padding
    factory = dict(device=weight.device, dtype=weight.dtype)
    if isinstance(conv, DepthwiseConv2d):
        merged = DepthwiseConv2d(conv.in_channels, kernel_size, conv.stride, padding, bias=True,
                                 depth_multiplier=conv.depth_multiplier, **factory)
    else:
        merged = nn.Conv2d(conv.in_channels, conv.out_channels, kernel_size, conv.stride, padding,
                           groups=conv.groups, bias=True, **factory)
    merged.weight.copy_(weight)
    merged.bias.copy_(bias)
    return merged
