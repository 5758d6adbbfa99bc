"""RepLKNet (Ding et al., CVPR 2022): large-kernel depthwise CNNs whose 31x31 convs run on lkconv.

Module and parameter names are the official ones (`stem`, `stages.i.blocks.j.*`, `transitions`,
`lkb_origin.conv/bn`, `small_conv.conv/bn`, merged `lkb_reparam`), so official checkpoints load strictly.
"""

from collections.abc import Sequence
from typing import Optional, Union

import torch
from torch import nn

from ..arguments import pair, positive_number, probability, whole_number
from ..blocks import ConvBN, DropPath, ReparamLargeKernelConv, reparameterize_model
from .common import batchnorm_class, run_block
from .registry import register_model



class RepLKBlock(nn.Module):
    """BN -> 1x1 conv-BN-ReLU -> large-kernel depthwise conv (+ small kernel) -> ReLU -> 1x1 conv-BN, residual."""

    def __init__(self, in_channels: int, dw_channels: int, block_lk_size: int, small_kernel: Optional[int],
                 drop_path: float, deploy: bool = False, norm_layer: type = nn.BatchNorm2d, **factory) -> None:
        super().__init__()
        self.pw1 = ConvBN(in_channels, dw_channels, 1, activation=nn.ReLU(), norm_layer=norm_layer, **factory)
        self.pw2 = ConvBN(dw_channels, in_channels, 1, norm_layer=norm_layer, **factory)
        self.large_kernel = ReparamLargeKernelConv(dw_channels, dw_channels, block_lk_size, 1, dw_channels,
                                                   small_kernel, deploy, norm_layer, **factory)
        self.lk_nonlinear = nn.ReLU()
        self.prelkb_bn = norm_layer(in_channels, **factory)
        self.drop_path = DropPath(drop_path) if drop_path != 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x plus the large-kernel branch of the class docstring, the branch dropped per sample in training."""
        out = self.pw2(self.lk_nonlinear(self.large_kernel(self.pw1(self.prelkb_bn(x)))))
        return x + self.drop_path(out)


class ConvFFN(nn.Module):
    """BN -> 1x1 conv-BN to `internal_channels` -> GELU -> 1x1 conv-BN back, residual."""

    def __init__(self, in_channels: int, internal_channels: int, out_channels: int, drop_path: float,
                 norm_layer: type = nn.BatchNorm2d, **factory) -> None:
        super().__init__()
        self.drop_path = DropPath(drop_path) if drop_path != 0 else nn.Identity()
        self.preffn_bn = norm_layer(in_channels, **factory)
        self.pw1 = ConvBN(in_channels, internal_channels, 1, norm_layer=norm_layer, **factory)
        self.pw2 = ConvBN(internal_channels, out_channels, 1, norm_layer=norm_layer, **factory)
        self.nonlinear = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x plus the 1x1-conv feed-forward branch, dropped per sample in training."""
        return x + self.drop_path(self.pw2(self.nonlinear(self.pw1(self.preffn_bn(x)))))


class RepLKNetStage(nn.Module):
    """`num_blocks` pairs of (RepLKBlock, ConvFFN); `norm` is a BN for multi-scale outputs, or an identity."""

    def __init__(self, channels: int, num_blocks: int, stage_lk_size: int, drop_path: Sequence[float],
                 small_kernel: Optional[int], dw_ratio: float = 1, ffn_ratio: float = 4, use_checkpoint: bool = False,
                 deploy: bool = False, norm_intermediate_features: bool = False, norm_layer: type = nn.BatchNorm2d,
                 **factory) -> None:
        super().__init__()
        self.use_checkpoint = use_checkpoint
        blocks = []
        for rate in drop_path:
            blocks.append(RepLKBlock(channels, int(channels * dw_ratio), stage_lk_size, small_kernel, rate, deploy,
                                     norm_layer, **factory))
            blocks.append(ConvFFN(channels, int(channels * ffn_ratio), channels, rate, norm_layer, **factory))
        self.blocks = nn.ModuleList(blocks)
        self.norm = norm_layer(channels, **factory) if norm_intermediate_features else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The stage's blocks in order, with activation checkpointing in training where asked."""
        for block in self.blocks:
            x = run_block(block, x, self.use_checkpoint and self.training)
        return x


class RepLKNet(nn.Module):
    """RepLKNet with the official structure (REFERENCE.md §5).

    - `num_classes`: the head's classes; 0 keeps norm and pooling but no linear layer.
    - `out_indices`: return the listed stages' features (after `stages.i.norm`) instead of logits, for detection
      and segmentation backbones; the model then has no head. `norm_intermediate_features=True` makes those
      stages' norms BatchNorms, as the official backbones do (only stages in `out_indices` get one).
    - Defaults differ from the official builders' (drop_path_rate 0.3, use_checkpoint True) in being inference
      friendly: `drop_path_rate=0.0`, `use_checkpoint=False`. The architecture is the same.
    - `deploy`: build the merged form directly (the official `small_kernel_merged`).
    - `use_checkpoint`: activation checkpointing of every block in training; `use_sync_bn`: SyncBatchNorm.
    """

    def __init__(
        self,
        large_kernel_sizes: Sequence[int],
        layers: Sequence[int],
        channels: Sequence[int],
        drop_path_rate: float = 0.0,
        small_kernel: Optional[int] = 5,
        dw_ratio: float = 1,
        ffn_ratio: float = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        out_indices: Optional[Sequence[int]] = None,
        use_checkpoint: bool = False,
        deploy: bool = False,
        use_sync_bn: bool = False,
        norm_intermediate_features: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if not (len(large_kernel_sizes) == len(layers) == len(channels)):
            raise ValueError(f"large_kernel_sizes, layers and channels must have one entry per stage; got lengths "
                             f"{len(large_kernel_sizes)}, {len(layers)}, {len(channels)}")
        if out_indices is not None and any(not 0 <= i < len(layers) for i in out_indices):
            raise ValueError(f"out_indices must index the {len(layers)} stages; got {tuple(out_indices)}")
        probability(drop_path_rate, "drop_path_rate")
        for name, values in (("channels", channels), ("layers", layers)):
            for value in values:
                whole_number(value, f"every entry of {name}")
        small = None if small_kernel is None else pair(small_kernel, "small_kernel", 1)
        for stage, kernel in enumerate(large_kernel_sizes):
            sides = pair(kernel, f"large_kernel_sizes[{stage}]", 1)
            if sides[0] % 2 == 0 or sides[1] % 2 == 0:
                raise ValueError(f"large_kernel_sizes[{stage}] must be an odd int or a pair of odd ints (the small "
                                 f"kernel shares its centre); got {kernel!r}")
            if small is not None and (small[0] > sides[0] or small[1] > sides[1]):
                raise ValueError(f"small_kernel must not exceed any stage's large kernel; got small_kernel="
                                 f"{small_kernel!r} and large_kernel_sizes[{stage}]={kernel!r} (small_kernel=None "
                                 "drops the small branch)")
        for name, ratio in (("dw_ratio", dw_ratio), ("ffn_ratio", ffn_ratio)):
            if min(int(width * positive_number(ratio, name)) for width in channels) < 1:
                raise ValueError(f"{name} must give every stage at least one channel; got {ratio!r} for channels "
                                 f"{tuple(channels)}")
        whole_number(num_classes, "num_classes", 0)
        whole_number(in_chans, "in_chans")
        if norm_intermediate_features and out_indices is None:
            raise ValueError("norm_intermediate_features=True normalises the out_indices stages' outputs; "
                             "pass out_indices too")
        factory = dict(device=device, dtype=dtype)
        norm_layer = batchnorm_class(use_sync_bn)
        self.num_stages = len(layers)
        self.out_indices = None if out_indices is None else tuple(out_indices)
        self.use_checkpoint = use_checkpoint
        width = channels[0]
        relu = nn.ReLU
        self.stem = nn.ModuleList([
            ConvBN(in_chans, width, 3, 2, 1, activation=relu(), norm_layer=norm_layer, **factory),
            ConvBN(width, width, 3, 1, 1, groups=width, activation=relu(), norm_layer=norm_layer, **factory),
            ConvBN(width, width, 1, 1, 0, activation=relu(), norm_layer=norm_layer, **factory),
            ConvBN(width, width, 3, 2, 1, groups=width, activation=relu(), norm_layer=norm_layer, **factory),
        ])
        total = sum(layers)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]  # rising linearly over all blocks
        self.stages = nn.ModuleList()
        self.transitions = nn.ModuleList()
        for index, (kernel, blocks) in enumerate(zip(large_kernel_sizes, layers)):
            first = sum(layers[:index])
            self.stages.append(RepLKNetStage(
                channels[index], blocks, kernel, rates[first:first + blocks], small_kernel, dw_ratio, ffn_ratio,
                use_checkpoint, deploy, norm_intermediate_features and index in self.out_indices, norm_layer,
                **factory))
            if index < self.num_stages - 1:
                following = channels[index + 1]
                self.transitions.append(nn.Sequential(
                    ConvBN(channels[index], following, 1, 1, 0, activation=relu(), norm_layer=norm_layer, **factory),
                    ConvBN(following, following, 3, 2, 1, groups=following, activation=relu(),
                           norm_layer=norm_layer, **factory),
                ))
        if self.out_indices is None:
            self.norm = norm_layer(channels[-1], **factory)
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.head = nn.Linear(channels[-1], num_classes, **factory) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> Union[torch.Tensor, list[torch.Tensor]]:
        """The last stage's feature map, or with `out_indices` the list of the chosen stages' normalised maps."""
        checkpointing = self.use_checkpoint and self.training
        x = self.stem[0](x)
        for layer in self.stem[1:]:
            x = run_block(layer, x, checkpointing)
        outputs = []
        for index, stage in enumerate(self.stages):
            x = stage(x)
            if self.out_indices is not None and index in self.out_indices:
                outputs.append(stage.norm(x))
            if index < self.num_stages - 1:
                x = self.transitions[index](x)
        return x if self.out_indices is None else outputs

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, list[torch.Tensor]]:
        """The logits, or the chosen stages' features where out_indices is set."""
        features = self.forward_features(x)
        if self.out_indices is not None:
            return features
        return self.head(torch.flatten(self.avgpool(self.norm(features)), 1))

    def structural_reparam(self) -> None:
        """The official name for merging every large-kernel block in place (lkconv.reparameterize_model does it too)."""
        reparameterize_model(self, inplace=True)


@register_model
def replknet_31b(**kwargs) -> RepLKNet:
    """RepLKNet-31B: kernels 31/29/27/13, channels 128-1024, ≈79.9M parameters before the merge."""
    return RepLKNet(**{**dict(large_kernel_sizes=(31, 29, 27, 13), layers=(2, 2, 18, 2),
                              channels=(128, 256, 512, 1024), small_kernel=5), **kwargs})


@register_model
def replknet_31l(**kwargs) -> RepLKNet:
    """RepLKNet-31L: RepLKNet-31B at 1.5x width (channels 192-1536)."""
    return RepLKNet(**{**dict(large_kernel_sizes=(31, 29, 27, 13), layers=(2, 2, 18, 2),
                              channels=(192, 384, 768, 1536), small_kernel=5), **kwargs})


@register_model
def replknet_xl(**kwargs) -> RepLKNet:
    """RepLKNet-XL: kernels 27/27/27/13, channels 256-2048, no small kernel, depthwise width 1.5x."""
    return RepLKNet(**{**dict(large_kernel_sizes=(27, 27, 27, 13), layers=(2, 2, 18, 2),
                              channels=(256, 512, 1024, 2048), small_kernel=None, dw_ratio=1.5), **kwargs})
