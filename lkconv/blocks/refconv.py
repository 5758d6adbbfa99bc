"""RefConv: a frozen pre-trained kernel refocused by a learnable conv over the bank of its own 2-D kernels."""

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..arguments import pair
from ..ops import depthwise_conv2d
from ..reparam import refocused_kernel
from .conv_bn import LARGE_KERNEL, ReparamBlock, _size_2_t, is_frozen, make_conv, take_state


# nn.Module's registries of the hooks that see a call's input and output.
CALL_HOOKS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
              "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks", "_is_full_backward_hook")


class RefConv(ReparamBlock):
    """A conv whose kernel is W_t = W_b + W_b ⊛ W_r (REFERENCE.md §5), for depthwise, grouped and dense convs.

    - `weight`: the frozen base kernel W_b, a buffer (C_out, C_in/g, kh, kw), named as the conv it replaces.
    - `convmap`: the learnable refocusing conv W_r over the C_out·C_in/g base kernels, `map_k`×`map_k` with
      C_in·C_out/g² groups; for a depthwise conv it mixes all channels' kernels.
    - `bias`: the conv's own bias, if any, stays a learnable parameter.
    - `padding=None` (the default) keeps the map's size at stride 1 (see `same_padding_for`).

    `RefConv.from_conv(conv)` starts from a trained conv with W_r = 0, so the model starts exactly equal to it.
    `reparameterize()` bakes W_t into `weight` (now a parameter) and drops `convmap`; `deploy=True` builds that
    form directly. `to_conv()` returns the plain conv, which is what `lkconv.reparameterize_model` puts in the
    model; its state_dict keys are the same (`weight`, `bias`).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _size_2_t,
        stride: _size_2_t = 1,
        padding: Optional[_size_2_t] = None,
        dilation: _size_2_t = 1,
        groups: int = 1,
        bias: bool = False,
        map_k: int = 3,
        deploy: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        # A reference conv holds and checks the configuration; its weight becomes the base kernel.
        if padding is None:
            padding = same_padding_for(kernel_size, dilation, stride)
        template = make_conv(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                             device=device, dtype=dtype)
        if not isinstance(map_k, int) or isinstance(map_k, bool) or map_k < 1 or map_k % 2 == 0:
            raise ValueError(f"map_k must be an odd int >= 1; got {map_k!r}")
        for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups"):
            setattr(self, name, getattr(template, name))
        self.bias = template.bias
        if deploy:  # the merged form: W_t is an ordinary learnable kernel
            self.weight = template.weight
            return
        self.register_buffer("weight", template.weight.detach().clone())
        maps = out_channels * (in_channels // groups)
        self.convmap = nn.Conv2d(maps, maps, map_k, padding=map_k // 2, groups=in_channels * out_channels // groups**2,
                                 bias=False, device=device, dtype=dtype)
        nn.init.zeros_(self.convmap.weight)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, map_k: int = 3, zero_init: bool = True) -> "RefConv":
        """A RefConv whose base is `conv`'s (trained) kernel and whose bias is a copy of `conv`'s.

        With `zero_init` (the default) W_r starts at zero and the output equals `conv`'s exactly; otherwise W_r
        keeps PyTorch's default conv initialisation.
        """
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be an nn.Conv2d; got {type(conv).__name__}")
        if conv.padding_mode != "zeros":
            raise ValueError(f"conv.padding_mode must be 'zeros' for RefConv; got {conv.padding_mode!r}")
        weight = conv.weight
        ref = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                  conv.groups, conv.bias is not None, map_k, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            ref.weight.copy_(weight)
            if conv.bias is not None:
                ref.bias.copy_(conv.bias)
            if not zero_init:
                nn.init.kaiming_uniform_(ref.convmap.weight, a=5**0.5)
        return ref

    @property
    def merged(self) -> bool:
        """Whether the refocusing transform has been folded into a plain weight."""
        return not hasattr(self, "convmap")

    def refocused_weight(self) -> torch.Tensor:
        """W_t, differentiable with respect to the refocusing kernel."""
        if self.merged:
            return self.weight
        return refocused_kernel(self.weight, self.convmap.weight)

    def equivalent_kernel_bias(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(W_t, bias): the plain conv this block equals; differentiable."""
        return self.refocused_weight(), self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The conv with the refocused weight W_t (refocused_weight), on lkconv where it is a large depthwise conv."""
        weight = self.refocused_weight()
        if self._runs_on_lkconv():
            return depthwise_conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def _runs_on_lkconv(self) -> bool:
        return self.groups == self.in_channels and max(self.kernel_size) >= LARGE_KERNEL

    def _merge(self) -> None:
        weight = self.refocused_weight()
        del self.convmap
        del self.weight
        self.weight = nn.Parameter(weight.detach().clone())

    def deployed(self) -> nn.Module:
        """The plain conv: after training RefConv leaves no trace in the inference model. It takes over this layer's
        forward and backward hooks (the registries themselves, so their handles still remove them): it has the same
        input and output."""
        conv = self.to_conv()
        for name in CALL_HOOKS:
            setattr(conv, name, getattr(self, name))
        return conv

    def to_conv(self) -> nn.Conv2d:
        """The plain conv with W_t and the bias: an nn.Conv2d, or lkconv.DepthwiseConv2d for large depthwise; in this
        layer's train/eval mode, and frozen if all of this layer is."""
        weight = self.refocused_weight().detach()
        conv = make_conv(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, self.groups, self.bias is not None, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            conv.weight.copy_(weight)
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        take_state(conv, self, is_frozen(self))
        return conv

    def extra_repr(self) -> str:
        """The conv's settings and whether it is merged, for repr."""
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
                f"bias={self.bias is not None}, merged={self.merged}")



def same_padding_for(kernel_size: _size_2_t, dilation: _size_2_t, stride: _size_2_t) -> Union[tuple[int, int], str]:
    """RefConv's default padding, which keeps the map's size at stride 1: half the (dilated) kernel's span per side.

    The span is dilation·(kernel − 1). An odd one (an even kernel at dilation 1) cannot be split evenly: it gets
    'same' (PyTorch's rule puts the extra row and column after the map), which needs stride 1, so at a stride > 1
    the padding must be given.
    """
    sizes, rates = pair(kernel_size, "kernel_size", 1), pair(dilation, "dilation", 1)
    spans = [r * (k - 1) for k, r in zip(sizes, rates)]
    if all(span % 2 == 0 for span in spans):
        return spans[0] // 2, spans[1] // 2
    if pair(stride, "stride", 1) == (1, 1):
        return "same"
    raise ValueError(f"padding must be given for a kernel whose dilated span, dilation·(kernel − 1), is odd at "
                     f"stride > 1 (no symmetric padding fits it); got kernel_size={kernel_size!r}, "
                     f"dilation={dilation!r}, stride={stride!r}, padding=None")
