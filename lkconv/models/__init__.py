"""The model zoo: RepLKNet and RepVGG with official names, built by name through create_model."""

from . import replknet, repvgg  # noqa: F401  (registers the builders)
from .checkpoint import clean_state_dict, load_checkpoint
from .registry import create_model, list_models, register_model
from .replknet import RepLKNet
from .repvgg import RepVGG

__all__ = ["RepLKNet", "RepVGG", "clean_state_dict", "create_model", "list_models", "load_checkpoint",
           "register_model"]
