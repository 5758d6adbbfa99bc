"""Large-kernel depthwise re-param blocks: RepLKNet's large+small kernel pair, SLaK's decomposed (K,5)+(5,K)+5x5
convs and UniRepLKNet's dilated branches. Each merges into one K×K depthwise conv with a bias on lkconv."""

from collections.abc import Sequence
from typing import Optional

import torch
from torch import nn

from ..arguments import pair, whole_number
from ..reparam import dilated_to_dense, fuse_conv_bn, merge_branches
from .conv_bn import ConvBN, ReparamBlock, _size_2_t, make_conv, merged_conv_like, same_padding


class SummedConvBNBranches(ReparamBlock):
    """A block that sums parallel conv-BN branches (the attributes named in BRANCHES that exist) and merges them
    into one conv with bias, `lkb_reparam`, of the first branch's configuration and `merged_size()` kernel."""

    BRANCHES: tuple[str, ...] = ()

    def _branches(self) -> list[ConvBN]:
        return [getattr(self, name) for name in self.BRANCHES if hasattr(self, name)]

    def merged_size(self) -> tuple[int, int]:
        """The (kh, kw) of the single conv the branches merge into."""
        raise NotImplementedError

    @property
    def merged(self) -> bool:
        """Whether the branches have been merged into one conv."""
        return hasattr(self, "lkb_reparam")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of the branches' conv-BN outputs, or the merged conv."""
        if self.merged:
            return self.lkb_reparam(x)
        branches = self._branches()
        out = branches[0](x)
        for branch in branches[1:]:
            out = out + branch(x)
        return out

    def equivalent_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The merged (weight, bias); differentiable, so it can feed a penalty during training."""
        if self.merged:
            return self.lkb_reparam.weight, self.lkb_reparam.bias
        return merge_branches([branch.fused_kernel_bias() for branch in self._branches()], self.merged_size())

    def _merge(self) -> None:
        weight, bias = self.equivalent_kernel_bias()
        self.lkb_reparam = merged_conv_like(self._branches()[0].conv, weight, bias)
        for name in self.BRANCHES:
            if hasattr(self, name):
                delattr(self, name)


class ReparamLargeKernelConv(SummedConvBNBranches):
    """RepLKNet's large-kernel conv: a K×K conv-BN plus an optional small k×k conv-BN, summed.

    Depthwise by default (`groups=None` means groups = in_channels). Official names: `lkb_origin.conv/bn`,
    `small_conv.conv/bn`, and after the merge `lkb_reparam` (a conv with bias). Every form pads K//2 (k//2 for
    the small branch), so the output size is the same before and after the merge, at stride 1 and 2.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _size_2_t,
        stride: _size_2_t = 1,
        groups: Optional[int] = None,
        small_kernel: Optional[_size_2_t] = None,
        deploy: bool = False,
        norm_layer: type = nn.BatchNorm2d,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        groups = in_channels if groups is None else groups
        padding = same_padding(kernel_size)
        self.kernel_size = kernel_size
        self.small_kernel = small_kernel
        if small_kernel is not None:
            same_padding(small_kernel, "small_kernel")
            big, small = pair(kernel_size, "kernel_size", 1), pair(small_kernel, "small_kernel", 1)
            if small[0] > big[0] or small[1] > big[1]:
                raise ValueError(f"small_kernel must not exceed kernel_size {kernel_size!r}; got {small_kernel!r}")
        factory = dict(device=device, dtype=dtype)
        if deploy:
            self.lkb_reparam = make_conv(in_channels, out_channels, kernel_size, stride, padding, 1, groups,
                                         bias=True, **factory)
            return
        self.lkb_origin = ConvBN(in_channels, out_channels, kernel_size, stride, padding, groups=groups,
                                 norm_layer=norm_layer, **factory)
        if small_kernel is not None:
            self.small_conv = ConvBN(in_channels, out_channels, small_kernel, stride, groups=groups,
                                     norm_layer=norm_layer, **factory)

    BRANCHES = ("lkb_origin", "small_conv")

    def merged_size(self) -> tuple[int, int]:
        """The (kh, kw) of the single conv the branches merge into."""
        return tuple(self.lkb_origin.conv.kernel_size)


class DecomposedLargeKernelConv(SummedConvBNBranches):
    """SLaK's decomposed large kernel: depthwise (K, s) and (s, K) conv-BNs plus an s×s conv-BN (s = 5, and only
    when s < K), summed.

    Names follow SLaK: `LoRA1`, `LoRA2`, `small_conv`. The merge gives one K×K depthwise conv `lkb_reparam`, which
    SLaK itself does not offer; it trades 2Ks + s² taps for K², so it pays off only where a dense K×K kernel is
    faster than two thin ones.
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int,
        small_kernel: int = 5,
        stride: _size_2_t = 1,
        deploy: bool = False,
        norm_layer: type = nn.BatchNorm2d,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        whole_number(channels, "channels")
        same_padding(kernel_size)
        same_padding(small_kernel, "small_kernel")
        if not isinstance(kernel_size, int) or not isinstance(small_kernel, int) or small_kernel > kernel_size:
            raise ValueError(f"kernel_size and small_kernel must be odd ints with small_kernel <= kernel_size; got "
                             f"kernel_size={kernel_size!r}, small_kernel={small_kernel!r}")
        self.kernel_size = kernel_size
        self.small_kernel = small_kernel
        factory = dict(device=device, dtype=dtype, norm_layer=norm_layer)
        if deploy:
            self.lkb_reparam = make_conv(channels, channels, kernel_size, stride, kernel_size // 2, 1, channels,
                                         bias=True, device=device, dtype=dtype)
            return
        self.LoRA1 = ConvBN(channels, channels, (kernel_size, small_kernel), stride, groups=channels, **factory)
        self.LoRA2 = ConvBN(channels, channels, (small_kernel, kernel_size), stride, groups=channels, **factory)
        if small_kernel < kernel_size:  # as in SLaK: at equal sizes the two thin kernels already cover it
            self.small_conv = ConvBN(channels, channels, small_kernel, stride, groups=channels, **factory)

    BRANCHES = ("LoRA1", "LoRA2", "small_conv")

    def merged_size(self) -> tuple[int, int]:
        """The (kh, kw) of the single conv the branches merge into."""
        return (self.kernel_size, self.kernel_size)


# UniRepLKNet's dilated branches per large kernel size: (kernel sizes, dilations), REFERENCE.md §5.
DILATED_BRANCHES = {
    17: ((5, 9, 3, 3, 3), (1, 2, 4, 5, 7)),
    15: ((5, 7, 3, 3, 3), (1, 2, 3, 5, 7)),
    13: ((5, 7, 3, 3, 3), (1, 2, 3, 4, 5)),
    11: ((5, 5, 3, 3, 3), (1, 2, 3, 4, 5)),
    9: ((5, 5, 3, 3), (1, 2, 3, 4)),
    7: ((5, 3, 3), (1, 2, 3)),
    5: ((3, 3), (1, 2)),
}


class DilatedReparamBlock(ReparamBlock):
    """UniRepLKNet's dilated re-param block: a K×K depthwise conv-BN plus dilated small-kernel depthwise conv-BNs.

    Parameter names follow UniRepLKNet: `lk_origin`, `origin_bn`, `dil_conv_k{k}_{r}`, `dil_bn_k{k}_{r}`; after the
    merge only `lk_origin` remains, now with a bias. The branches default to UniRepLKNet's table for K (5 to 17);
    other K need explicit `kernel_sizes` and `dilations`.
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int,
        deploy: bool = False,
        kernel_sizes: Optional[Sequence[int]] = None,
        dilations: Optional[Sequence[int]] = None,
        norm_layer: type = nn.BatchNorm2d,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        whole_number(channels, "channels")
        same_padding(kernel_size)
        if not isinstance(kernel_size, int):
            raise ValueError(f"kernel_size must be an odd int; got {kernel_size!r}")
        if (kernel_sizes is None) != (dilations is None):
            raise ValueError("kernel_sizes and dilations must be given together")
        if kernel_sizes is None:
            if kernel_size not in DILATED_BRANCHES:
                raise ValueError(f"kernel_size must be one of {sorted(DILATED_BRANCHES)} to use UniRepLKNet's "
                                 f"branches (or pass kernel_sizes and dilations); got {kernel_size}")
            kernel_sizes, dilations = DILATED_BRANCHES[kernel_size]
        if len(kernel_sizes) != len(dilations):
            raise ValueError(f"kernel_sizes and dilations must have the same length; got {len(kernel_sizes)} "
                             f"and {len(dilations)}")
        for k, r in zip(kernel_sizes, dilations):
            same_padding(k, "kernel_sizes entries")
            if not isinstance(r, int) or isinstance(r, bool) or r < 1 or r * (k - 1) + 1 > kernel_size:
                raise ValueError(f"each dilation must be an int >= 1 and its branch must fit in the "
                                 f"{kernel_size}x{kernel_size} kernel; got kernel {k} with dilation {r!r}"
                                 + (f" (spans {r * (k - 1) + 1})" if type(r) is int else ""))
        if len(set(zip(kernel_sizes, dilations))) != len(kernel_sizes):
            raise ValueError(f"each (kernel size, dilation) pair may appear once (branches are named by it); got "
                             f"{list(zip(kernel_sizes, dilations))}")
        self.kernel_size = kernel_size
        self.kernel_sizes, self.dilations = tuple(kernel_sizes), tuple(dilations)
        factory = dict(device=device, dtype=dtype)
        self.lk_origin = make_conv(channels, channels, kernel_size, 1, kernel_size // 2, 1, channels, bias=deploy,
                                   **factory)
        if deploy:
            return
        self.origin_bn = norm_layer(channels, **factory)
        for k, r in zip(self.kernel_sizes, self.dilations):
            setattr(self, f"dil_conv_k{k}_{r}",
                    make_conv(channels, channels, k, 1, r * (k - 1) // 2, r, channels, bias=False, **factory))
            setattr(self, f"dil_bn_k{k}_{r}", norm_layer(channels, **factory))

    @property
    def merged(self) -> bool:
        """Whether the branches have been merged into one conv."""
        return not hasattr(self, "origin_bn")

    def _branches(self):
        for k, r in zip(self.kernel_sizes, self.dilations):
            yield r, getattr(self, f"dil_conv_k{k}_{r}"), getattr(self, f"dil_bn_k{k}_{r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The large kernel's conv-BN plus the dilated branches' conv-BNs, or the merged conv."""
        if self.merged:
            return self.lk_origin(x)
        out = self.origin_bn(self.lk_origin(x))
        for _, conv, bn in self._branches():
            out = out + bn(conv(x))
        return out

    def equivalent_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The merged K×K (weight, bias), dilated branches made dense; differentiable."""
        if self.merged:
            return self.lk_origin.weight, self.lk_origin.bias
        branches = [fuse_conv_bn(self.lk_origin.weight, self.lk_origin.bias, self.origin_bn)]
        for r, conv, bn in self._branches():
            weight, bias = fuse_conv_bn(conv.weight, conv.bias, bn)
            branches.append((dilated_to_dense(weight, r), bias))
        return merge_branches(branches, self.kernel_size)

    def _merge(self) -> None:
        weight, bias = self.equivalent_kernel_bias()
        self.lk_origin = merged_conv_like(self.lk_origin, weight, bias)
        del self.origin_bn
        for k, r in zip(self.kernel_sizes, self.dilations):
            delattr(self, f"dil_conv_k{k}_{r}")
            delattr(self, f"dil_bn_k{k}_{r}")

