"""lkconv.DepthwiseConv2d, a drop-in nn.Conv2d(groups=C) that runs on lkconv's op, and model conversion both ways."""

import copy
import operator
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .arguments import check_input, whole_number
from .ops import depthwise_conv2d

_size_2_t = Union[int, tuple[int, int]]


def _kernel_pair(kernel_size) -> tuple[int, int]:
    """kernel_size as two Python ints >= 1, from an int or a sequence of two (tuple, list, array)."""
    try:
        try:
            sizes = [operator.index(kernel_size)] * 2
        except TypeError:
            sizes = list(kernel_size)
        if len(sizes) != 2 or any(isinstance(size, bool) for size in sizes + [kernel_size]):
            raise ValueError
        return tuple(whole_number(size, "kernel_size") for size in sizes)
    except (TypeError, ValueError):
        raise ValueError(f"kernel_size must be an int >= 1 or a pair of them; got {kernel_size!r}") from None


class DepthwiseConv2d(nn.Conv2d):
    """Depthwise conv layer: an ``nn.Conv2d`` with ``groups=in_channels`` whose forward runs ``lkconv.depthwise_conv2d``.

    Parameter names, shapes, initialisation, ``state_dict`` and ``repr`` are those of
    ``nn.Conv2d(in_channels, in_channels * depth_multiplier, kernel_size, ..., groups=in_channels)``, so weights
    move between the two freely. Every ``padding_mode`` works ('zeros', 'reflect', 'replicate', 'circular').
    """

    def __init__(
        self,
        in_channels: int,
        kernel_size: _size_2_t,
        stride: _size_2_t = 1,
        padding: Union[str, _size_2_t] = 0,
        dilation: _size_2_t = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        depth_multiplier: int = 1,
        device=None,
        dtype=None,
    ) -> None:
        in_channels = whole_number(in_channels, "in_channels")
        kernel_size = _kernel_pair(kernel_size)
        depth_multiplier = whole_number(depth_multiplier, "depth_multiplier")
        super().__init__(
            in_channels, in_channels * depth_multiplier, kernel_size, stride, padding, dilation,
            groups=in_channels, bias=bias, padding_mode=padding_mode, device=device, dtype=dtype,
        )

    @property
    def depth_multiplier(self) -> int:
        """Output channels per input channel (m): the weight is (in_channels * m, 1, kh, kw)."""
        return self.out_channels // self.in_channels

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        if self.groups != self.in_channels:  # set after construction: nn.Conv2d would compute a grouped conv
            raise ValueError(f"groups of a DepthwiseConv2d must stay in_channels = {self.in_channels}; got "
                             f"groups={self.groups} (for a grouped conv, use nn.Conv2d)")
        if isinstance(input, torch.Tensor) and input.dim() in (3, 4) and input.shape[-3] != self.in_channels:
            # depthwise_conv2d alone would read the filters with another depth multiplier wherever the channels
            # divide out_channels, and answer without an error.
            raise ValueError(f"input must have in_channels = {self.in_channels} channels (dimension -3) for "
                             f"{type(self).__name__}({self.extra_repr()}); got {input.shape[-3]} channels, input "
                             f"shape {tuple(input.shape)}")
        if self.padding_mode != "zeros":
            # As nn.Conv2d does: pad explicitly in the requested mode, then convolve without padding. The input is
            # checked first, so that a bad one gets lkconv's message rather than F.pad's (a tracer's proxy is not
            # a tensor to check).
            if not torch.overrides.has_torch_function_unary(input):
                check_input(input)
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return depthwise_conv2d(input, weight, bias, self.stride, 0, self.dilation)
        return depthwise_conv2d(input, weight, bias, self.stride, self.padding, self.dilation)

    def __prepare_scriptable__(self):
        """torch.jit.script asks this first: refuse with a clear error. TorchScript cannot compile lkconv's Python,
        and swapping in the nn.Conv2d this layer replaces would also swap it in the caller's own model (torch.jit
        writes what this returns back into the parent module)."""
        raise RuntimeError(
            f"torch.jit.script cannot compile lkconv.DepthwiseConv2d ({self.extra_repr()}): TorchScript cannot call "
            "lkconv's Python. Script (or, for lkconv's model zoo, trace) lkconv.revert(model) instead (a copy with "
            "plain nn.Conv2d layers, on PyTorch's conv), or use torch.compile or torch.export, which keep lkconv's op")

    @classmethod
    def from_conv2d(cls, conv: nn.Conv2d) -> "DepthwiseConv2d":
        """Builds a DepthwiseConv2d that shares `conv`'s parameters (so optimiser state stays valid).

        `conv` must be depthwise (groups == in_channels, out_channels a multiple of in_channels), and a plain
        ``nn.Conv2d`` or DepthwiseConv2d: a subclass may compute something else, and a parametrized conv (weight_norm,
        spectral_norm) keeps its weight in parametrizations a copy would not carry.
        """
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be an nn.Conv2d; got {type(conv).__name__}")
        _check_recastable(conv, (nn.Conv2d, DepthwiseConv2d), "conv")
        if not is_depthwise(conv):
            raise ValueError(
                f"conv must be depthwise (groups == in_channels, out_channels a multiple of in_channels); got "
                f"in_channels={conv.in_channels}, out_channels={conv.out_channels}, groups={conv.groups}"
            )
        return _recast(conv, cls, replaces=False)


def is_depthwise(conv: nn.Conv2d) -> bool:
    """One filter group per input channel (out_channels is then a multiple of in_channels)."""
    return conv.groups == conv.in_channels


def _recast(module: nn.Module, cls: type, replaces: bool) -> nn.Module:
    """A `cls` instance with `module`'s configuration, sharing its parameter and buffer tensors (no re-init).

    Where the recast module `replaces` the original in a model (convert, revert), it takes over the original's
    registries themselves, so hook handles the user holds still remove their hooks. Otherwise (from_conv2d, where
    both live on) the registries are copied, so that the two never share hooks. A module compiled with
    `Module.compile()` is compiled again: its compiled call would run the original's class."""
    recast = cls.__new__(cls)
    if replaces:
        recast.__dict__.update(module.__dict__)
    else:
        recast.__dict__.update({k: copy.copy(v) if isinstance(v, (dict, set)) else v
                                for k, v in module.__dict__.items()})
    if recast.__dict__.get("_compiled_call_impl") is not None:
        recast._compiled_call_impl = None
        recast.compile()
    return recast


def _check_recastable(module: nn.Module, allowed: tuple[type, ...], name: str) -> None:
    """Refuses what `_recast` cannot carry over: parametrizations, and subclasses of the `allowed` classes, whose
    own code the recast module would drop."""
    if torch.nn.utils.parametrize.is_parametrized(module):
        raise ValueError(
            f"{name} ({type(module).__name__}({module.extra_repr()})) is parametrized (weight_norm, spectral_norm, "
            f"...): its weight lives in parametrizations that a recast layer would not carry. Remove them first "
            f"(torch.nn.utils.parametrize.remove_parametrizations(layer, 'weight'))")
    if type(module) not in allowed:
        raise TypeError(f"{name} must be exactly {' or '.join(cls.__name__ for cls in allowed)}, not the subclass "
                        f"{type(module).__name__}, whose own code the recast layer would drop")


def replace_modules(model: nn.Module, replace_one: Callable[[nn.Module], Optional[nn.Module]]) -> nn.Module:
    """`model` with every module `replace_one` answers for (anything but None) replaced by that answer; returns the
    new root.

    Parents are visited before their children, and the walk goes on inside a replacement. A module reachable along
    several paths (a shared or tied layer) is replaced once, and its replacement stays shared. (named_children()
    would list it once, leaving the old module on the other paths.)"""
    done: dict[int, tuple[nn.Module, nn.Module]] = {}

    def visit(module: nn.Module) -> nn.Module:
        # done maps id(original) to (original, result). Holding the original keeps it alive for the whole walk, so
        # that its id cannot be reused by a module created later (a replacement).
        if id(module) in done:
            return done[id(module)][1]
        result = replace_one(module)
        result = module if result is None else result
        done[id(module)] = (module, result)
        done[id(result)] = (result, result)
        for name, child in list(result._modules.items()):
            if child is not None and (replacement := visit(child)) is not child:
                setattr(result, name, replacement)
        return result

    return visit(model)


def check_model(model, name: str = "model") -> None:
    """A TypeError naming `name` unless `model` is an nn.Module (what the model-wide functions take)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name} must be an nn.Module; got {type(model).__name__}")


def convert(model: nn.Module, min_kernel_size: int = 7, inplace: bool = False) -> nn.Module:
    """Replaces every depthwise ``nn.Conv2d`` whose larger kernel side is >= `min_kernel_size` by a DepthwiseConv2d.

    Only exact ``nn.Conv2d`` instances are converted (not subclasses, nor parametrized convs); parameters are
    shared, so outputs are unchanged. A layer used at several places stays one shared layer. With
    ``inplace=False`` the model is deep-copied first and the original is left untouched. Returns the new root.
    """
    check_model(model)
    min_kernel_size = whole_number(min_kernel_size, "min_kernel_size")
    if not inplace:
        model = copy.deepcopy(model)

    def convert_one(module):
        if type(module) is nn.Conv2d and is_depthwise(module) and max(module.kernel_size) >= min_kernel_size:
            return _recast(module, DepthwiseConv2d, replaces=True)
        return None

    return replace_modules(model, convert_one)


def revert(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Turns every DepthwiseConv2d back into a plain ``nn.Conv2d`` (for export); returns the new root.

    Each ``nn.Conv2d`` shares its DepthwiseConv2d's parameter tensors, which with ``inplace=False`` (the default)
    belong to a deep copy of the model: the original is left untouched. A parametrized DepthwiseConv2d, or a
    subclass of it, raises instead of losing what nn.Conv2d would not compute."""
    check_model(model)
    for path, module in model.named_modules():
        if isinstance(module, DepthwiseConv2d):
            _check_recastable(module, (DepthwiseConv2d,), f"model.{path}" if path else "model")
    if not inplace:
        model = copy.deepcopy(model)
    return replace_modules(model, lambda m: _recast(m, nn.Conv2d, replaces=True) if isinstance(m, DepthwiseConv2d)
                           else None)
