"""lkconv: fast large-kernel depthwise convolution for PyTorch.

``depthwise_conv2d`` / ``DepthwiseConv2d`` compute exactly what ``F.conv2d(..., groups=C)`` / ``nn.Conv2d`` do,
on block-wise implicit-GEMM Triton kernels where they apply and on PyTorch's own convs everywhere else.
``lkconv.reparam`` (kernel algebra), ``lkconv.blocks`` (re-param blocks) and ``lkconv.models`` (RepLKNet, RepVGG)
build on them.
"""

from . import blocks, models, reparam
from .backends import BackendUnavailableError, available_backends, set_backend, use_backend
from .blocks import reparameterize_model
from .modules import DepthwiseConv2d, convert, revert
from .ops import Explanation, depthwise_conv2d, explain

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "DepthwiseConv2d",
    "Explanation",
    "available_backends",
    "blocks",
    "convert",
    "depthwise_conv2d",
    "explain",
    "models",
    "reparam",
    "reparameterize_model",
    "revert",
    "set_backend",
    "use_backend",
]
