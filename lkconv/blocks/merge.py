"""reparameterize_model: merges every re-param block of a model, lkconv's own and foreign ones, for inference."""

import copy

from torch import nn

from .conv_bn import ReparamBlock
from .refconv import RefConv

# Merge methods of other re-param code, tried in this order: timm (MobileOne, FastViT, RepVGG in byobnet) and
# official RepVGG/RepLKNet-style code. `fuse()` may return a replacement module (timm's LeViT, EfficientViT).
FOREIGN_METHODS = ("reparameterize", "switch_to_deploy", "fuse")


def reparameterize_model(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Returns `model` with every re-param block merged into a single conv; use the returned module.

    - lkconv blocks call `reparameterize()`; a `RefConv` is replaced by its plain conv.
    - Other modules merge through the first of `reparameterize()`, `switch_to_deploy()` or `fuse()` they define;
      a module returned by `fuse()` replaces the original.
    - A parent is merged before its children, so a block that consumes its own branches sees them intact.
    - With ``inplace=False`` the model is deep-copied first and left untouched.
    The merge uses BatchNorm running statistics: the result equals the original model in eval mode.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module; got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    return _merge(model)


def _merge(module: nn.Module) -> nn.Module:
    module = _merge_one(module)
    for name, child in list(module.named_children()):
        merged = _merge(child)
        if merged is not child:
            setattr(module, name, merged)
    return module


def _merge_one(module: nn.Module) -> nn.Module:
    if isinstance(module, RefConv):
        return module.to_conv()
    if isinstance(module, ReparamBlock):
        module.reparameterize()
        return module
    if _is_lkconv(module):
        # lkconv's models and helpers merge only through their blocks, never a second time here.
        return module
    for name in FOREIGN_METHODS:
        method = getattr(module, name, None)
        if callable(method):
            result = method()
            return result if name == "fuse" and isinstance(result, nn.Module) else module
    return module


def _is_lkconv(module: nn.Module) -> bool:
    return type(module).__module__.split(".")[0] == "lkconv"
