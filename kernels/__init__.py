"""Triton kernels of lkconv (installed as ``lkconv.kernels``): the block-wise implicit-GEMM depthwise conv.

- ``depthwise_rows_kernel``: forward and input grad, row form (a Toeplitz band per kernel row).
- ``depthwise_rows_channels_last_kernel``: the same for channels_last maps, a block of channels per program.
- ``depthwise_whole_map_kernel``: forward and input grad when the kernel covers the map (one dense GEMM).
- ``depthwise_weight_grad_kernel``: weight and bias grad, deterministic fp32 partials per split.
- ``depthwise_weight_grad_channels_last_kernel``: the same for channels_last maps, a block of channels per program.

The launch logic (block sizes, grids, dtypes) lives in ``lkconv.backends.triton_backend``.
"""

from .rows import depthwise_rows_kernel
from .rows_channels_last import depthwise_rows_channels_last_kernel
from .weight_grad import depthwise_weight_grad_kernel
from .weight_grad_channels_last import depthwise_weight_grad_channels_last_kernel
from .whole_map import depthwise_whole_map_kernel

__all__ = ["depthwise_rows_channels_last_kernel", "depthwise_rows_kernel", "depthwise_weight_grad_channels_last_kernel",
           "depthwise_weight_grad_kernel", "depthwise_whole_map_kernel"]
