"""reparameterize_model: merges every re-param block of a model, lkconv's own and foreign ones, for inference."""

import copy
import inspect
from typing import Optional

from torch import nn

from ..modules import check_model, replace_modules
from .conv_bn import ReparamBlock

# Merge methods of other re-param code, tried in this order: timm's (`reparameterize` in MobileOne, FastViT and
# byobnet's RepVGG; `fuse` returning a replacement in LeViT and EfficientViT), official RepVGG's
# `switch_to_deploy`, official RepLKNet's and SLaK's `merge_kernel`, UniRepLKNet's `merge_dilated_branches`.
FOREIGN_METHODS = ("reparameterize", "switch_to_deploy", "merge_kernel", "merge_dilated_branches", "fuse")


def reparameterize_model(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Returns `model` with every re-param block merged into a single conv; use the returned module.

    - lkconv blocks are replaced by their `deployed()` form: merged in place, or for `RefConv` its plain conv.
    - Other modules merge through the first of `FOREIGN_METHODS` they define that takes no arguments; a module
      returned by `fuse()` replaces the original.
    - A parent is merged before its children, so a block that consumes its own branches sees them intact.
    - A module reachable along several paths is merged once, and its replacement stays shared.
    - With ``inplace=False`` the model is deep-copied first and left untouched.
    The merge uses BatchNorm running statistics: the result equals the original model in eval mode.
    """
    check_model(model)
    if not inplace:
        model = copy.deepcopy(model)
    return replace_modules(model, _merge_one)


def _merge_one(module: nn.Module) -> nn.Module:
    if isinstance(module, ReparamBlock):
        return module.deployed()
    if _is_lkconv(module):
        # lkconv's models and helpers merge only through their blocks, never a second time here.
        return module
    name = _foreign_method(module)
    if name is None or _foreign_already_merged(module, name):
        return module
    result = getattr(module, name)()
    return result if name == "fuse" and isinstance(result, nn.Module) else module


def _foreign_method(module: nn.Module) -> Optional[str]:
    """The first merge method `module` defines that can be called without arguments. A VAE's
    `reparameterize(mu, logvar)` is not a merge, nor a child layer that happens to be named `fuse` (a fusion head's):
    only the module's own methods count."""
    for name in FOREIGN_METHODS:
        method = getattr(module, name, None)
        if inspect.ismethod(method) and _takes_no_arguments(method):
            return name
    return None


def _foreign_already_merged(module: nn.Module, name: str) -> bool:
    """Whether a foreign block is already in its merged form. Official RepLKNet's and SLaK's `merge_kernel()` has no
    guard of its own: a second call (or one on a block built merged, `small_kernel_merged=True`) fails on the
    deleted `lkb_origin`. Their merged form is known by its names, `lkb_reparam` present and `lkb_origin` gone."""
    return name == "merge_kernel" and hasattr(module, "lkb_reparam") and not hasattr(module, "lkb_origin")


def _takes_no_arguments(method) -> bool:
    try:
        parameters = inspect.signature(method).parameters.values()
    except (TypeError, ValueError):
        return False
    return all(p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in parameters)


def _is_lkconv(module: nn.Module) -> bool:
    return type(module).__module__.split(".")[0] == "lkconv"
