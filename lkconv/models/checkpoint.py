"""Loading published checkpoints: unwraps the usual containers and DataParallel prefixes, never unpickles code."""

import argparse
import os
from collections.abc import Mapping
from typing import Optional, Union

import torch
from torch import nn

# Keys under which training scripts nest the weights (official RepLKNet/RepVGG/timm/DeiT-style checkpoints).
WRAPPER_KEYS = ("model", "state_dict", "model_state_dict", "module")
# Names only the merged form of a block has (RepLKNet/SLaK, RepVGG).
MERGED_NAMES = ("lkb_reparam", "rbr_reparam")


def clean_state_dict(checkpoint: Mapping, key: Optional[str] = None) -> dict[str, torch.Tensor]:
    """The bare state dict inside `checkpoint`: a {"model": ...}-style wrapper removed, a `module.` prefix stripped
    (DataParallel's, or an EMA's: AveragedModel's update count is dropped).

    `key` picks a wrapper explicitly, e.g. "model_ema" for EMA weights saved beside the model's.
    """
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"checkpoint must be a mapping (a state dict or a wrapper around one); "
                        f"got {type(checkpoint).__name__}")
    state = checkpoint
    if key is not None:
        if not isinstance(checkpoint.get(key), Mapping):
            raise ValueError(f"key must name a state dict in the checkpoint; got {key!r}, keys are "
                             f"{sorted(checkpoint, key=str)}")
        state = checkpoint[key]
    # A training script's wrapper keeps the weights under one of WRAPPER_KEYS beside metadata, which may hold tensors
    # too (the PyTorch ImageNet example's best_acc1); a state dict's own values are never mappings.
    while (inner := next((state[k] for k in WRAPPER_KEYS if isinstance(state.get(k), Mapping)), None)) is not None:
        state = inner
    if (bad := next((k for k in state if not isinstance(k, str)), None)) is not None:
        raise TypeError(f"a state dict's keys must be strings; got the key {bad!r} ({type(bad).__name__})")
    if not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"checkpoint holds no tensors; its keys are {sorted(state)[:10]} and none of "
                         f"{WRAPPER_KEYS} wraps a state dict (pass key= to pick one)")
    prefix = "module."
    # torch.optim.swa_utils.AveragedModel (an EMA) saves its update count beside the averaged model's weights.
    if "n_averaged" in state and all(k.startswith(prefix) for k in state if k != "n_averaged"):
        state = {k: v for k, v in state.items() if k != "n_averaged"}
    if all(k.startswith(prefix) for k in state):
        state = {k[len(prefix):]: v for k, v in state.items()}
    return dict(state)


def load_checkpoint(model: nn.Module, path: Union[str, os.PathLike], strict: bool = True, map_location="cpu",
                    key: Optional[str] = None):
    """Loads the weights in file `path` into `model`; returns load_state_dict's result.

    The file is read with torch.load(weights_only=True), which also accepts the argparse.Namespace training
    scripts save beside the weights. Training-time and merged checkpoints both load, into a model of the same
    form: a mismatch says which form the checkpoint is in.
    """
    with torch.serialization.safe_globals([argparse.Namespace]):
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    state = clean_state_dict(checkpoint, key)
    try:
        return model.load_state_dict(state, strict=strict)
    except RuntimeError as error:
        saved_merged, model_merged = _is_merged(state), _is_merged(model.state_dict())
        if saved_merged != model_merged:
            form = "merged (build the model with deploy=True)" if saved_merged else \
                "training-time (build the model without deploy=True, then merge it)"
            raise RuntimeError(f"the checkpoint {os.fspath(path)!r} is in {form} form; the model is not.\n{error}") \
                from None
        raise


def _is_merged(state: Mapping) -> bool:
    return any(name in k for k in state for name in MERGED_NAMES)
