"""Structural re-parameterization blocks: multi-branch for training, one conv for inference."""

from .conv_bn import ConvBN, ReparamBlock, make_conv
from .drop_path import DropPath
from .large_kernel import DecomposedLargeKernelConv, DilatedReparamBlock, ReparamLargeKernelConv
from .merge import reparameterize_model
from .refconv import RefConv
from .repvgg import RepVGGBlock, SEBlock

__all__ = [
    "ConvBN",
    "DecomposedLargeKernelConv",
    "DilatedReparamBlock",
    "DropPath",
    "RefConv",
    "RepVGGBlock",
    "ReparamBlock",
    "ReparamLargeKernelConv",
    "SEBlock",
    "make_conv",
    "reparameterize_model",
]
