"""Structural re-parameterization algebra: pure, differentiable functions on conv kernels (ARCHITECTURE.md §7).

Each function returns new tensors in the dtype and on the device of the kernel it is given and never changes its
arguments, so the same code merges a trained block for deployment and, inside autograd, builds the equivalent
kernel during training (for example to put a penalty on it).
"""

from collections.abc import Sequence
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .arguments import pair

Branch = tuple[torch.Tensor, Optional[torch.Tensor]]


def _check_kernel(kernel: torch.Tensor, name: str = "kernel") -> None:
    if not isinstance(kernel, torch.Tensor) or kernel.dim() != 4:
        shape = tuple(kernel.shape) if isinstance(kernel, torch.Tensor) else type(kernel).__name__
        raise ValueError(f"{name} must be a 4-D conv weight (out_channels, in_channels/groups, kh, kw); got {shape}")


def fuse_conv_bn(weight: torch.Tensor, bias: Optional[torch.Tensor], bn: nn.Module) -> Branch:
    """The (weight, bias) of one conv that equals conv(weight, bias) followed by `bn` in eval mode.

    Works for any groups (BN scales whole output channels) and for a conv with or without a bias. `bn` is a
    BatchNorm (or a frozen one, such as torchvision's FrozenBatchNorm2d: anything with running_mean, running_var,
    eps and optional weight/bias) that tracks running statistics; without them its output depends on the batch and
    no single conv equals it. The arithmetic runs in at least float32 and the result comes back in `weight`'s dtype.
    """
    _check_kernel(weight, "weight")
    if not all(hasattr(bn, name) for name in ("running_mean", "running_var", "eps")):
        raise TypeError(f"bn must be a BatchNorm module (with running_mean, running_var and eps); got {type(bn).__name__}")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("bn must track running statistics (track_running_stats=True) to be fused into a conv")
    if bn.running_mean.numel() != weight.shape[0]:
        raise ValueError(f"bn must have the conv's out_channels {weight.shape[0]} features; "
                         f"got {bn.running_mean.numel()}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},); got {tuple(bias.shape)}")
    dtype = torch.promote_types(weight.dtype, torch.float32)
    mean = bn.running_mean.to(weight.device, dtype)
    std = (bn.running_var.to(weight.device, dtype) + bn.eps).sqrt()
    gamma = bn.weight.to(weight.device, dtype) if getattr(bn, "weight", None) is not None else torch.ones_like(mean)
    beta = bn.bias.to(weight.device, dtype) if getattr(bn, "bias", None) is not None else torch.zeros_like(mean)
    scale = gamma / std
    fused_weight = weight.to(dtype) * scale.reshape(-1, 1, 1, 1)
    shift = bias.to(weight.device, dtype) - mean if bias is not None else -mean
    fused_bias = beta + shift * scale
    return fused_weight.to(weight.dtype), fused_bias.to(weight.dtype)


def pad_kernel(kernel: torch.Tensor, size: Union[int, Sequence[int]]) -> torch.Tensor:
    """`kernel` zero-padded on every side to `size` (int or (height, width)), keeping its centre where it was.

    A conv with the padded kernel and padding grown by the same amount computes the same output. Each side must
    grow by an even amount, otherwise the centre would move by half a pixel.
    """
    _check_kernel(kernel)
    height, width = pair(size, "size", 1)
    kh, kw = kernel.shape[-2:]
    grow_h, grow_w = height - kh, width - kw
    if grow_h < 0 or grow_w < 0 or grow_h % 2 or grow_w % 2:
        raise ValueError(
            f"size must be at least the kernel's ({kh}, {kw}) and differ from it by even amounts so the centre "
            f"stays put; got ({height}, {width})"
        )
    return F.pad(kernel, (grow_w // 2, grow_w // 2, grow_h // 2, grow_h // 2))


def identity_kernel(
    channels: int,
    groups: int = 1,
    kernel_size: Union[int, Sequence[int]] = 1,
    *,
    dtype: Optional[torch.dtype] = None,
    device: Optional[Union[str, torch.device]] = None,
) -> torch.Tensor:
    """The (channels, channels/groups, kh, kw) kernel of a conv that returns its input unchanged.

    Each output channel reads its own input channel through a 1 at the kernel's centre, so the kernel sizes must
    be odd. Used to merge an identity (or identity-BN) branch into a conv.
    """
    kh, kw = pair(kernel_size, "kernel_size", 1)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (channels, groups)):
        raise ValueError(f"channels and groups must be positive ints; got channels={channels!r}, groups={groups!r}")
    if channels % groups:
        raise ValueError(f"channels must be divisible by groups; got channels={channels}, groups={groups}")
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"kernel_size must be odd so the kernel has a centre; got ({kh}, {kw})")
    per_group = channels // groups
    kernel = torch.zeros(channels, per_group, kh, kw, dtype=dtype, device=device)
    out_channels = torch.arange(channels, device=kernel.device)
    kernel[out_channels, out_channels % per_group, kh // 2, kw // 2] = 1
    return kernel


def dilated_to_dense(kernel: torch.Tensor, dilation: Union[int, Sequence[int]]) -> torch.Tensor:
    """The dense kernel of size d(k-1)+1 that equals `kernel` applied with `dilation` d: the taps with zeros between.

    A conv with the dense kernel, dilation 1 and the same padding computes the same output.
    """
    _check_kernel(kernel)
    dh, dw = pair(dilation, "dilation", 1)
    kh, kw = kernel.shape[-2:]
    dense = kernel.new_zeros(*kernel.shape[:2], dh * (kh - 1) + 1, dw * (kw - 1) + 1)
    dense[..., ::dh, ::dw] = kernel
    return dense


def merge_branches(branches: Sequence[Branch], kernel_size: Optional[Union[int, Sequence[int]]] = None) -> Branch:
    """Sums parallel conv branches (each a (weight, bias-or-None)) into one (weight, bias).

    Every weight is centre-padded to `kernel_size`, or to the largest branch's size when it is None, so the
    branches must be centred alike (odd sizes with 'same' padding, as re-param blocks use). The bias is None only
    when no branch has one.
    """
    if not branches:
        raise ValueError("branches must hold at least one (weight, bias) pair")
    for index, (weight, _) in enumerate(branches):
        _check_kernel(weight, f"branches[{index}] weight")
    if kernel_size is None:
        kernel_size = (max(w.shape[-2] for w, _ in branches), max(w.shape[-1] for w, _ in branches))
    shapes = {tuple(w.shape[:2]) for w, _ in branches}
    if len(shapes) != 1:
        raise ValueError(f"branches must share (out_channels, in_channels/groups); got {sorted(shapes)}")
    weight = sum(pad_kernel(w, kernel_size) for w, _ in branches)
    biases = [b for _, b in branches if b is not None]
    return weight, (sum(biases) if biases else None)


def refocused_kernel(base: torch.Tensor, refocus: torch.Tensor) -> torch.Tensor:
    """RefConv's kernel W_b + W_b ⊛ W_r: the base kernels refocused by a conv over the bank of base kernels.

    The base kernel (C_out, C_in/g, kh, kw) is read as a one-image feature map with C_out·C_in/g channels and
    convolved, 'same' padded, by `refocus` (C_out·C_in/g, n, r, r), whose group count follows from its shape.
    """
    _check_kernel(base, "base")
    _check_kernel(refocus, "refocus")
    maps = base.shape[0] * base.shape[1]
    r_h, r_w = refocus.shape[-2:]
    if refocus.shape[0] != maps or maps % refocus.shape[1] or r_h % 2 == 0 or r_w % 2 == 0:
        raise ValueError(
            f"refocus must have shape ({maps}, n, r, r) with n dividing {maps} and r odd for a base of shape "
            f"{tuple(base.shape)}; got {tuple(refocus.shape)}"
        )
    bank = base.reshape(1, maps, *base.shape[-2:])
    groups = maps // refocus.shape[1]
    refocused = F.conv2d(bank, refocus.to(base.dtype), padding=(r_h // 2, r_w // 2), groups=groups)
    return base + refocused.reshape(base.shape)
