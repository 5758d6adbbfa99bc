"""RepVGG (Ding et al., CVPR 2021): a plain 3x3-conv stack trained with 1x1 and identity branches.

Names are the official ones (`stage0`, `stage1`..`stage4`, `rbr_dense`, `rbr_1x1`, `rbr_identity`, merged
`rbr_reparam`, `linear`), so official checkpoints load strictly in either form.
"""

from collections.abc import Mapping, Sequence
from typing import Optional, Union

import torch
from torch import nn

from ..arguments import probability, whole_number
from ..blocks import RepVGGBlock
from .common import batchnorm_class, run_block
from .registry import register_model


class RepVGG(nn.Module):
    """RepVGG with widths 64a, 128a, 256a, 512b (stage 0 min(64, 64a)) and `num_blocks` blocks in stages 1-4.

    - `override_groups_map`: {layer index: groups} for the g2/g4 variants (layers count from 1 after stage 0; keys past
      the last layer are ignored, as in official RepVGG, so the maps fit shallower variants too).
    - `out_indices`: return the listed stages' (1-4 as 0-3) features instead of logits.
    - `drop_path_rate`: stochastic depth on blocks with an identity branch, rising linearly (0 as in the paper).
    - `deploy`: build the merged form; `use_checkpoint`: activation checkpointing; `use_sync_bn`: SyncBatchNorm.
    """

    def __init__(
        self,
        num_blocks: Sequence[int],
        width_multiplier: Sequence[float],
        override_groups_map: Optional[Mapping[int, int]] = None,
        use_se: bool = False,
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_path_rate: float = 0.0,
        out_indices: Optional[Sequence[int]] = None,
        use_checkpoint: bool = False,
        deploy: bool = False,
        use_sync_bn: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if len(num_blocks) != 4 or len(width_multiplier) != 4:
            raise ValueError(f"num_blocks and width_multiplier must have 4 entries (stages 1-4); got "
                             f"{tuple(num_blocks)} and {tuple(width_multiplier)}")
        if out_indices is not None and any(not 0 <= i < 4 for i in out_indices):
            raise ValueError(f"out_indices must index the 4 stages (0-3); got {tuple(out_indices)}")
        probability(drop_path_rate, "drop_path_rate")
        for value in num_blocks:
            whole_number(value, "every entry of num_blocks")
        total = sum(num_blocks)
        groups_map = {}
        for layer, groups in dict(override_groups_map or {}).items():
            index = whole_number(layer, "override_groups_map's keys (layer indices, counting from 1 after stage 0)")
            # Layers past the last are ignored, as in official RepVGG: the g2/g4 maps fit shallower variants too.
            groups_map[index] = whole_number(groups, f"override_groups_map[{layer!r}]")
        whole_number(num_classes, "num_classes", 0)
        whole_number(in_chans, "in_chans")
        widths = [int(base * m) for base, m in zip((64, 128, 256, 512), width_multiplier)]
        if min(widths) < 1:
            raise ValueError(f"width_multiplier must give every stage at least one channel (64a, 128a, 256a, 512b); "
                             f"got {tuple(width_multiplier)}, i.e. widths {widths}")
        block_args = dict(deploy=deploy, use_se=use_se, norm_layer=batchnorm_class(use_sync_bn), device=device,
                          dtype=dtype)
        self.out_indices = None if out_indices is None else tuple(out_indices)
        self.use_checkpoint = use_checkpoint
        in_planes = min(64, int(64 * width_multiplier[0]))
        self.stage0 = RepVGGBlock(in_chans, in_planes, 3, 2, 1, **block_args)
        rates = iter([drop_path_rate * i / max(total - 1, 1) for i in range(total)])
        layer = 1
        for index, (blocks, base) in enumerate(zip(num_blocks, (64, 128, 256, 512))):
            planes = int(base * width_multiplier[index])
            stage = []
            for position in range(blocks):
                groups = groups_map.get(layer, 1)
                if in_planes % groups or planes % groups:
                    raise ValueError(f"override_groups_map[{layer}] must divide layer {layer}'s in and out channels "
                                     f"({in_planes}, {planes}); got {groups}")
                stage.append(RepVGGBlock(in_planes, planes, 3, 2 if position == 0 else 1, 1,
                                         groups=groups, drop_path=next(rates), **block_args))
                in_planes = planes
                layer += 1
            setattr(self, f"stage{index + 1}", nn.ModuleList(stage))
        if self.out_indices is None:
            self.gap = nn.AdaptiveAvgPool2d(1)
            self.linear = nn.Linear(in_planes, num_classes, device=device, dtype=dtype) if num_classes > 0 \
                else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> Union[torch.Tensor, list[torch.Tensor]]:
        """The last stage's feature map, or with `out_indices` the list of the chosen stages' maps."""
        checkpointing = self.use_checkpoint and self.training
        x = self.stage0(x)
        outputs = []
        for index in range(4):
            for block in getattr(self, f"stage{index + 1}"):
                x = run_block(block, x, checkpointing)
            if self.out_indices is not None and index in self.out_indices:
                outputs.append(x)
        return x if self.out_indices is None else outputs

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, list[torch.Tensor]]:
        """The logits, or the chosen stages' features where out_indices is set."""
        features = self.forward_features(x)
        if self.out_indices is not None:
            return features
        return self.linear(torch.flatten(self.gap(features), 1))


# Official layers that become grouped convs in the g2/g4 variants.
GROUPWISE_LAYERS = tuple(range(2, 27, 2))
G2 = {layer: 2 for layer in GROUPWISE_LAYERS}
G4 = {layer: 4 for layer in GROUPWISE_LAYERS}

# name: (blocks per stage, width multipliers, groups map, SE), from the RepVGG paper and official code.
REPVGG_CONFIGS = {
    "repvgg_a0": ((2, 4, 14, 1), (0.75, 0.75, 0.75, 2.5), None, False),
    "repvgg_a1": ((2, 4, 14, 1), (1, 1, 1, 2.5), None, False),
    "repvgg_a2": ((2, 4, 14, 1), (1.5, 1.5, 1.5, 2.75), None, False),
    "repvgg_b0": ((4, 6, 16, 1), (1, 1, 1, 2.5), None, False),
    "repvgg_b1": ((4, 6, 16, 1), (2, 2, 2, 4), None, False),
    "repvgg_b1g2": ((4, 6, 16, 1), (2, 2, 2, 4), G2, False),
    "repvgg_b1g4": ((4, 6, 16, 1), (2, 2, 2, 4), G4, False),
    "repvgg_b2": ((4, 6, 16, 1), (2.5, 2.5, 2.5, 5), None, False),
    "repvgg_b2g2": ((4, 6, 16, 1), (2.5, 2.5, 2.5, 5), G2, False),
    "repvgg_b2g4": ((4, 6, 16, 1), (2.5, 2.5, 2.5, 5), G4, False),
    "repvgg_b3": ((4, 6, 16, 1), (3, 3, 3, 5), None, False),
    "repvgg_b3g2": ((4, 6, 16, 1), (3, 3, 3, 5), G2, False),
    "repvgg_b3g4": ((4, 6, 16, 1), (3, 3, 3, 5), G4, False),
    "repvgg_d2se": ((8, 14, 24, 1), (2.5, 2.5, 2.5, 5), None, True),
}


def _builder(name: str, num_blocks, width_multiplier, groups_map, use_se):
    def build(**kwargs) -> RepVGG:
        defaults = dict(num_blocks=num_blocks, width_multiplier=width_multiplier, override_groups_map=groups_map,
                        use_se=use_se)
        return RepVGG(**{**defaults, **kwargs})

    build.__name__ = build.__qualname__ = name
    build.__doc__ = (f"{name}: blocks {num_blocks}, width multipliers {width_multiplier}"
                     f"{', grouped layers ' + str(sorted(set(groups_map.values()))) if groups_map else ''}"
                     f"{', with SE' if use_se else ''}.")
    return build


for _name, _config in REPVGG_CONFIGS.items():
    globals()[_name] = register_model(_builder(_name, *_config))
