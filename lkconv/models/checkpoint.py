"""Loading published checkpoints: unwraps the usual containers and DataParallel prefixes, never unpickles code."""

import os
from collections.abc import Mapping
from typing import Union

import torch
from torch import nn

# Keys under which training scripts nest the weights (official RepLKNet/RepVGG/timm/DeiT-style checkpoints).
WRAPPER_KEYS = ("model", "state_dict", "model_state_dict", "module")


def clean_state_dict(checkpoint: Mapping) -> dict[str, torch.Tensor]:
    """The bare state dict inside `checkpoint`: a {"model": ...}-style wrapper removed, a `module.` prefix stripped."""
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"checkpoint must be a mapping (a state dict or a wrapper around one); got {type(checkpoint).__name__}")
    state = checkpoint
    while not any(isinstance(v, torch.Tensor) for v in state.values()):
        inner = next((state[k] for k in WRAPPER_KEYS if isinstance(state.get(k), Mapping)), None)
        if inner is None:
            raise ValueError(f"checkpoint holds no tensors; its keys are {sorted(state)[:10]} and none of "
                             f"{WRAPPER_KEYS} wraps a state dict")
        state = inner
    prefix = "module."
    if all(k.startswith(prefix) for k in state):
        state = {k[len(prefix):]: v for k, v in state.items()}
    return dict(state)


def load_checkpoint(model: nn.Module, path: Union[str, os.PathLike], strict: bool = True, map_location="cpu"):
    """Loads the weights in file `path` into `model` (with torch.load(weights_only=True)); returns load_state_dict's
    result. Works for training-time and merged checkpoints alike, as long as `model` is in the same form."""
    checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    return model.load_state_dict(clean_state_dict(checkpoint), strict=strict)
