"""Tests for the structural re-parameterization blocks in lkconv.blocks and for reparameterize_model.

For every block (RepLKNet, SLaK, UniRepLKNet, RepVGG, RefConv) with random BatchNorm statistics and affine
parameters, in eval mode: the output before and after `reparameterize()` / `reparameterize_model()` agrees, the
merge is idempotent, `deploy=True` builds the merged form directly (same state_dict keys and shapes, strict
loading, identical output), the official parameter names are used, large depthwise kernels run on
lkconv.DepthwiseConv2d, padding is right in every form, gradients reach every parameter, and
`equivalent_kernel_bias()` is differentiable and equals the merged weights. Also RefConv's construction from a
conv and back, ConvBN, DropPath, merging of foreign modules, and the constructors' error messages.
"""

import copy
from dataclasses import dataclass
from functools import partial
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lkconv
from lkconv.blocks import (
    ConvBN,
    DecomposedLargeKernelConv,
    DilatedReparamBlock,
    DropPath,
    RefConv,
    ReparamLargeKernelConv,
    RepVGGBlock,
    SEBlock,
    reparameterize_model,
)
from lkconv.blocks.merge import reparameterize_model as reparameterize_model_from_merge

from conftest import TOLERANCE, assert_close, relative_error

F64 = TOLERANCE[torch.float64]
BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


# --------------------------------------------------------------------------------------------------------------
# helpers


def randomize_bn(module: nn.Module) -> nn.Module:
    """Random running statistics and affine parameters (never the defaults) for every BatchNorm in `module`."""
    with torch.no_grad():
        for bn in module.modules():
            if isinstance(bn, nn.modules.batchnorm._BatchNorm):
                n = bn.num_features
                bn.running_mean.copy_(torch.randn(n))
                bn.running_var.copy_(torch.rand(n) * 2 + 0.2)
                if bn.affine:
                    bn.weight.copy_(torch.randn(n))
                    bn.bias.copy_(torch.randn(n))
    return module


def randomize_refconv(module: nn.Module) -> nn.Module:
    """Random base kernel, refocusing kernel and bias for every RefConv (the refocusing kernel starts at zero)."""
    with torch.no_grad():
        for ref in module.modules():
            if isinstance(ref, RefConv) and not ref.merged:
                ref.weight.copy_(torch.randn_like(ref.weight))
                ref.convmap.weight.copy_(torch.randn_like(ref.convmap.weight) * 0.2)
                if ref.bias is not None:
                    ref.bias.copy_(torch.randn_like(ref.bias))
    return module


def keep_se_alive(module: nn.Module) -> nn.Module:
    """Small `down` weights and a positive `down` bias for each SE block: with a single internal neuron
    (8 channels // 16) whose input is dominated by the random BN shifts, a random init can leave its ReLU dead for
    every sample, and then no gradient reaches `se.down` for a reason that has nothing to do with the block."""
    with torch.no_grad():
        for se in module.modules():
            if isinstance(se, SEBlock):
                se.down.weight.mul_(0.1)
                se.down.bias.copy_(torch.rand_like(se.down.bias) + 1.0)
    return module


def state(module: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same_state(actual: dict, expected: dict) -> None:
    assert list(actual) == list(expected)
    for key in expected:
        assert actual[key].dtype == expected[key].dtype, key
        assert torch.equal(actual[key], expected[key]), f"{key} changed"


def shapes(module: nn.Module) -> dict:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def bn_keys(prefix: str) -> set:
    return {f"{prefix}.{k}" for k in BN_KEYS}


def merged_copy(block: nn.Module) -> nn.Module:
    merged = copy.deepcopy(block)
    merged.reparameterize()
    return merged


@dataclass
class Case:
    """One block configuration: `make(deploy=..., dtype=...)` builds it; stride/groups/kernel describe the one conv
    it merges into (used to check the equivalent kernel independently of the block's own merged conv)."""

    name: str
    make: Callable
    in_channels: int
    stride: int
    groups: int
    deploy: bool = True  # whether the constructor has a deploy flag

    def build(self, dtype=torch.float64, deploy=False):
        block = self.make(deploy=True, dtype=dtype) if deploy else self.make(dtype=dtype)
        randomize_bn(block)
        randomize_refconv(block)
        keep_se_alive(block)
        return block.eval()

    def __repr__(self):
        return self.name


CASES = [
    Case("replk-k13-s5", partial(ReparamLargeKernelConv, 8, 8, 13, small_kernel=5), 8, 1, 8),
    Case("replk-k7-s3-stride2", partial(ReparamLargeKernelConv, 8, 8, 7, stride=2, small_kernel=3), 8, 2, 8),
    Case("replk-k9-multiplier2", partial(ReparamLargeKernelConv, 4, 8, 9, small_kernel=3), 4, 1, 4),
    Case("replk-k7-groups2", partial(ReparamLargeKernelConv, 8, 8, 7, groups=2, small_kernel=3), 8, 1, 2),
    Case("replk-k9x5-nonsquare", partial(ReparamLargeKernelConv, 8, 8, (9, 5), small_kernel=(3, 5)), 8, 1, 8),
    Case("replk-k11-no-small", partial(ReparamLargeKernelConv, 8, 8, 11), 8, 1, 8),
    Case("slak-k13", partial(DecomposedLargeKernelConv, 8, 13), 8, 1, 8),
    Case("slak-k7-s3-stride2", partial(DecomposedLargeKernelConv, 8, 7, 3, stride=2), 8, 2, 8),
    Case("dilated-k5", partial(DilatedReparamBlock, 8, 5), 8, 1, 8),
    Case("dilated-k9", partial(DilatedReparamBlock, 8, 9), 8, 1, 8),
    Case("dilated-k13", partial(DilatedReparamBlock, 8, 13), 8, 1, 8),
    Case("dilated-k17", partial(DilatedReparamBlock, 8, 17), 8, 1, 8),
    Case("dilated-k19-custom", partial(DilatedReparamBlock, 8, 19, kernel_sizes=(7, 3), dilations=(3, 9)), 8, 1, 8),
    Case("repvgg", partial(RepVGGBlock, 8, 8), 8, 1, 1),
    Case("repvgg-out16", partial(RepVGGBlock, 8, 16), 8, 1, 1),
    Case("repvgg-stride2", partial(RepVGGBlock, 8, 8, stride=2), 8, 2, 1),
    Case("repvgg-groups2", partial(RepVGGBlock, 8, 8, groups=2), 8, 1, 2),
    Case("repvgg-depthwise", partial(RepVGGBlock, 8, 8, groups=8), 8, 1, 8),
    Case("repvgg-se", partial(RepVGGBlock, 8, 8, use_se=True), 8, 1, 1),
    Case("repvgg-droppath", partial(RepVGGBlock, 8, 8, drop_path=0.3), 8, 1, 1),
    Case("refconv-depthwise-k7", partial(RefConv, 8, 8, 7, groups=8), 8, 1, 8),
    Case("refconv-depthwise-k9-multiplier2", partial(RefConv, 4, 8, 9, groups=4, bias=True), 4, 1, 4),
    Case("refconv-grouped", partial(RefConv, 8, 8, 3, groups=2, bias=True), 8, 1, 2),
    Case("refconv-dense-stride2", partial(RefConv, 4, 6, 3, stride=2), 4, 2, 1),
]
DEPLOY_CASES = [case for case in CASES if case.deploy]
MAP_SIZES = [(13, 11), (5, 3)]  # the second is smaller than most kernels


def random_input(case, dtype=torch.float64, size=(13, 11), batch=2):
    return torch.randn(batch, case.in_channels, *size, dtype=dtype)


def equivalent_forward(block, x, weight, bias, case):
    """The block's eval output computed with F.conv2d from a given (weight, bias) and the case's configuration."""
    padding = (weight.shape[-2] // 2, weight.shape[-1] // 2)
    y = F.conv2d(x, weight, bias, case.stride, padding, groups=case.groups)
    if isinstance(block, RepVGGBlock):
        y = block.nonlinearity(block.se(y))
    return y


def is_plain_conv(module):
    return type(module) is nn.Conv2d


# --------------------------------------------------------------------------------------------------------------
# merging keeps the output


@pytest.mark.parametrize("case", CASES, ids=repr)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("size", MAP_SIZES)
def test_reparameterize_keeps_output(case, dtype, size):
    torch.manual_seed(0)
    block = case.build(dtype)
    x = random_input(case, dtype, size)
    before = block(x)
    assert not block.merged
    block.reparameterize()
    assert block.merged
    after = block(x)
    assert after.dtype == dtype
    assert_close(after, before, TOLERANCE[dtype], f"{case.name} {dtype}")


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_reparameterize_model_returns_merged_copy(case):
    torch.manual_seed(1)
    block = case.build()
    x = random_input(case)
    before_state, before = state(block), block(x)

    merged = reparameterize_model(block)
    assert merged is not block
    if isinstance(block, RefConv):
        assert isinstance(merged, nn.Conv2d) and not isinstance(merged, RefConv)
    else:
        assert type(merged) is type(block) and merged.merged
    assert_close(merged(x), before, F64, f"{case.name} reparameterize_model")

    # the original is untouched: still multi-branch, same parameters, same output
    assert not block.merged
    assert_same_state(state(block), before_state)
    assert torch.equal(block(x), before)


@pytest.mark.parametrize("case", [c for c in CASES if c.name in ("replk-k13-s5", "repvgg", "refconv-dense-stride2")],
                         ids=repr)
def test_reparameterize_model_inplace(case):
    torch.manual_seed(2)
    block = case.build()
    x = random_input(case)
    before = block(x)
    merged = reparameterize_model_from_merge(block, inplace=True)
    if isinstance(block, RefConv):
        assert isinstance(merged, nn.Conv2d)  # a RefConv is replaced by its plain conv
    else:
        assert merged is block and block.merged
    assert_close(merged(x), before, F64, case.name)


def test_reparameterize_model_rejects_non_module():
    with pytest.raises(TypeError, match=r"model must be an nn\.Module; got Tensor"):
        reparameterize_model(torch.zeros(1))


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_reparameterize_is_idempotent(case):
    torch.manual_seed(3)
    block = case.build()
    x = random_input(case)
    block.reparameterize()
    first_state, first = state(block), block(x)
    parameters = [id(p) for p in block.parameters()]
    block.reparameterize()
    assert_same_state(state(block), first_state)
    assert [id(p) for p in block.parameters()] == parameters
    assert torch.equal(block(x), first)


# --------------------------------------------------------------------------------------------------------------
# deploy=True


@pytest.mark.parametrize("case", DEPLOY_CASES, ids=repr)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_deploy_builds_the_merged_form(case, dtype):
    torch.manual_seed(4)
    merged = merged_copy(case.build(dtype))
    deployed = case.build(dtype, deploy=True)
    assert deployed.merged
    assert shapes(deployed) == shapes(merged)
    assert list(deployed.state_dict()) == list(merged.state_dict())
    # the same module classes in the same places (e.g. lkconv.DepthwiseConv2d for large depthwise kernels)
    assert {n: type(m) for n, m in deployed.named_modules()} == {n: type(m) for n, m in merged.named_modules()}
    for name, tensor in deployed.state_dict().items():
        assert tensor.dtype == merged.state_dict()[name].dtype, name

    deployed.load_state_dict(merged.state_dict(), strict=True)
    x = random_input(case, dtype)
    assert torch.equal(deployed(x), merged(x))


@pytest.mark.parametrize("case", DEPLOY_CASES, ids=repr)
def test_deploy_block_reparameterize_is_a_no_op(case):
    deployed = case.build(deploy=True)
    before = state(deployed)
    deployed.reparameterize()
    assert_same_state(state(deployed), before)


# --------------------------------------------------------------------------------------------------------------
# official parameter names


def test_names_reparam_large_kernel_conv():
    block = ReparamLargeKernelConv(8, 8, 13, small_kernel=5)
    assert set(block.state_dict()) == {"lkb_origin.conv.weight", "small_conv.conv.weight"} | bn_keys(
        "lkb_origin.bn") | bn_keys("small_conv.bn")
    block.reparameterize()
    assert set(block.state_dict()) == {"lkb_reparam.weight", "lkb_reparam.bias"}
    without_small = ReparamLargeKernelConv(8, 8, 13)
    assert set(without_small.state_dict()) == {"lkb_origin.conv.weight"} | bn_keys("lkb_origin.bn")


@pytest.mark.parametrize("in_channels,out_channels,stride,identity", [
    (8, 8, 1, True), (8, 8, (1, 1), True), (8, 16, 1, False), (8, 8, 2, False), (8, 8, (1, 2), False),
])
def test_names_repvgg(in_channels, out_channels, stride, identity):
    block = RepVGGBlock(in_channels, out_channels, stride=stride)
    expected = {"rbr_dense.conv.weight", "rbr_1x1.conv.weight"} | bn_keys("rbr_dense.bn") | bn_keys("rbr_1x1.bn")
    if identity:
        expected |= bn_keys("rbr_identity")
        assert isinstance(block.rbr_identity, nn.BatchNorm2d)
    else:
        assert block.rbr_identity is None
    assert set(block.state_dict()) == expected
    block.reparameterize()
    assert set(block.state_dict()) == {"rbr_reparam.weight", "rbr_reparam.bias"}


def test_names_repvgg_se():
    block = RepVGGBlock(8, 8, use_se=True)
    se = {"se.down.weight", "se.down.bias", "se.up.weight", "se.up.bias"}
    assert se <= set(block.state_dict())
    block.reparameterize()
    assert set(block.state_dict()) == {"rbr_reparam.weight", "rbr_reparam.bias"} | se


@pytest.mark.parametrize("kernel_size,branches", [
    (13, ["k5_1", "k7_2", "k3_3", "k3_4", "k3_5"]),
    (17, ["k5_1", "k9_2", "k3_4", "k3_5", "k3_7"]),
    (15, ["k5_1", "k7_2", "k3_3", "k3_5", "k3_7"]),
    (11, ["k5_1", "k5_2", "k3_3", "k3_4", "k3_5"]),
    (9, ["k5_1", "k5_2", "k3_3", "k3_4"]),
    (7, ["k5_1", "k3_2", "k3_3"]),
    (5, ["k3_1", "k3_2"]),
])
def test_names_dilated_reparam_block(kernel_size, branches):
    block = DilatedReparamBlock(8, kernel_size)
    expected = {"lk_origin.weight"} | bn_keys("origin_bn")
    for branch in branches:
        expected |= {f"dil_conv_{branch}.weight"} | bn_keys(f"dil_bn_{branch}")
    assert set(block.state_dict()) == expected
    assert block.lk_origin.bias is None
    block.reparameterize()
    assert set(block.state_dict()) == {"lk_origin.weight", "lk_origin.bias"}
    assert block.lk_origin.weight.shape == (8, 1, kernel_size, kernel_size)


def test_names_decomposed_large_kernel_conv():
    block = DecomposedLargeKernelConv(8, 13)
    expected = set()
    for name in ("LoRA1", "LoRA2", "small_conv"):
        expected |= {f"{name}.conv.weight"} | bn_keys(f"{name}.bn")
    assert set(block.state_dict()) == expected
    assert block.LoRA1.conv.weight.shape == (8, 1, 13, 5)
    assert block.LoRA2.conv.weight.shape == (8, 1, 5, 13)
    assert block.small_conv.conv.weight.shape == (8, 1, 5, 5)
    block.reparameterize()
    assert set(block.state_dict()) == {"lkb_reparam.weight", "lkb_reparam.bias"}
    assert block.lkb_reparam.weight.shape == (8, 1, 13, 13)


# --------------------------------------------------------------------------------------------------------------
# which conv class runs each kernel


def test_conv_classes_reparam_large_kernel_conv():
    block = ReparamLargeKernelConv(8, 8, 13, small_kernel=5)
    assert isinstance(block.lkb_origin.conv, lkconv.DepthwiseConv2d)
    assert is_plain_conv(block.small_conv.conv)
    assert isinstance(merged_copy(block).lkb_reparam, lkconv.DepthwiseConv2d)
    assert isinstance(ReparamLargeKernelConv(8, 8, 13, small_kernel=5, deploy=True).lkb_reparam, lkconv.DepthwiseConv2d)
    # depth multiplier 2 is still depthwise
    multiplier = ReparamLargeKernelConv(4, 8, 7, small_kernel=3)
    assert isinstance(multiplier.lkb_origin.conv, lkconv.DepthwiseConv2d)
    assert isinstance(merged_copy(multiplier).lkb_reparam, lkconv.DepthwiseConv2d)
    # small or non-depthwise kernels stay on nn.Conv2d in every form
    small = ReparamLargeKernelConv(8, 8, 5, small_kernel=3)
    assert is_plain_conv(small.lkb_origin.conv) and is_plain_conv(merged_copy(small).lkb_reparam)
    grouped = ReparamLargeKernelConv(8, 8, 13, groups=2, small_kernel=5)
    assert is_plain_conv(grouped.lkb_origin.conv) and is_plain_conv(merged_copy(grouped).lkb_reparam)


def test_conv_classes_decomposed_and_dilated():
    slak = DecomposedLargeKernelConv(8, 13)
    assert isinstance(slak.LoRA1.conv, lkconv.DepthwiseConv2d)
    assert isinstance(slak.LoRA2.conv, lkconv.DepthwiseConv2d)
    assert is_plain_conv(slak.small_conv.conv)
    assert isinstance(merged_copy(slak).lkb_reparam, lkconv.DepthwiseConv2d)
    assert isinstance(DecomposedLargeKernelConv(8, 13, deploy=True).lkb_reparam, lkconv.DepthwiseConv2d)

    dilated = DilatedReparamBlock(8, 13)
    assert isinstance(dilated.lk_origin, lkconv.DepthwiseConv2d)
    assert isinstance(dilated.dil_conv_k7_2, lkconv.DepthwiseConv2d)  # a 7x7 kernel, dilated
    for name in ("dil_conv_k5_1", "dil_conv_k3_3", "dil_conv_k3_4", "dil_conv_k3_5"):
        assert is_plain_conv(getattr(dilated, name)), name
    assert isinstance(merged_copy(dilated).lk_origin, lkconv.DepthwiseConv2d)
    assert isinstance(DilatedReparamBlock(8, 13, deploy=True).lk_origin, lkconv.DepthwiseConv2d)
    small = DilatedReparamBlock(8, 5)
    assert is_plain_conv(small.lk_origin) and is_plain_conv(merged_copy(small).lk_origin)


def test_conv_classes_repvgg():
    for groups in (1, 2, 8):
        block = RepVGGBlock(8, 8, groups=groups)
        assert is_plain_conv(block.rbr_dense.conv) and is_plain_conv(block.rbr_1x1.conv)
        assert is_plain_conv(merged_copy(block).rbr_reparam)
        assert is_plain_conv(RepVGGBlock(8, 8, groups=groups, deploy=True).rbr_reparam)


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_a_reverted_block_merges_into_plain_convs_with_the_same_output(case):
    """After lkconv.revert (for export), merging must not bring DepthwiseConv2d back: the merged conv keeps the
    class of the conv it is built like (RefConv, not a conv itself, is not reverted and keeps its own rule)."""
    block = case.build()
    x = random_input(case)
    expected = block(x)
    merged = reparameterize_model(lkconv.revert(block))
    if not isinstance(block, RefConv):
        assert not [type(m).__name__ for m in merged.modules() if isinstance(m, lkconv.DepthwiseConv2d)]
    assert_close(merged(x), expected, F64, f"{case} reverted, then merged")


@pytest.mark.parametrize("case", CASES, ids=repr)
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("frozen", [False, True])
def test_merged_convs_take_the_blocks_mode_and_frozen_state(case, train, frozen):
    """A merged conv is a new module: it takes its block's train/eval mode, and a frozen block merges into a
    frozen conv (while a block with anything trainable merges into a trainable one)."""
    block = case.build().train(train).requires_grad_(not frozen)
    merged = reparameterize_model(block)
    assert {m.training for m in merged.modules()} == {train}
    assert {p.requires_grad for p in merged.parameters()} == {not frozen}


# --------------------------------------------------------------------------------------------------------------
# padding in every form


def replk_reference(block, x, stride):
    """RepLKNet's large + small conv-BN computed directly with F.conv2d and F.batch_norm (eval)."""
    def conv_bn(pair, padding):
        y = F.conv2d(x, pair.conv.weight, None, stride, padding, groups=x.shape[1])
        bn = pair.bn
        return F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)

    return conv_bn(block.lkb_origin, 6) + conv_bn(block.small_conv, 2)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [(16, 16), (15, 15), (16, 15), (14, 9), (5, 9), (4, 7), (1, 2)])
def test_replk_padding_in_every_form(stride, size):
    torch.manual_seed(5)
    channels = 6
    block = randomize_bn(ReparamLargeKernelConv(channels, channels, 13, stride=stride, small_kernel=5,
                                                dtype=torch.float64)).eval()
    merged = merged_copy(block)
    deployed = ReparamLargeKernelConv(channels, channels, 13, stride=stride, small_kernel=5, deploy=True,
                                      dtype=torch.float64).eval()
    deployed.load_state_dict(merged.state_dict(), strict=True)
    x = torch.randn(2, channels, *size, dtype=torch.float64)

    weight, bias = merged.lkb_reparam.weight, merged.lkb_reparam.bias
    expected_shape = F.conv2d(x, weight, bias, stride, padding=13 // 2, groups=channels).shape
    reference = replk_reference(block, x, stride)
    assert reference.shape == expected_shape
    for form, module in [("unmerged", block), ("merged", merged), ("deploy", deployed)]:
        y = module(x)
        assert y.shape == expected_shape, form
        assert_close(y, reference, F64, form)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [(15, 16), (4, 7)])
def test_decomposed_padding_in_every_form(stride, size):
    torch.manual_seed(6)
    block = randomize_bn(DecomposedLargeKernelConv(6, 11, stride=stride, dtype=torch.float64)).eval()
    merged = merged_copy(block)
    x = torch.randn(2, 6, *size, dtype=torch.float64)
    expected_shape = F.conv2d(x, merged.lkb_reparam.weight, None, stride, 5, groups=6).shape
    reference = sum(
        F.batch_norm(F.conv2d(x, pair.conv.weight, None, stride, (pair.conv.weight.shape[-2] // 2,
                                                                    pair.conv.weight.shape[-1] // 2), groups=6),
                     pair.bn.running_mean, pair.bn.running_var, pair.bn.weight, pair.bn.bias, False, 0.0, pair.bn.eps)
        for pair in (block.LoRA1, block.LoRA2, block.small_conv)
    )
    for form, module in [("unmerged", block), ("merged", merged)]:
        y = module(x)
        assert y.shape == expected_shape == reference.shape, form
        assert_close(y, reference, F64, form)


# --------------------------------------------------------------------------------------------------------------
# gradients


@pytest.mark.parametrize("case", CASES, ids=repr)
@pytest.mark.parametrize("merged", [False, True])
def test_gradients_reach_every_parameter(case, merged):
    torch.manual_seed(7)
    block = case.build()
    if merged:
        block.reparameterize()
    block.train()
    x = random_input(case, batch=4)
    y = block(x)
    (y * torch.randn_like(y)).sum().backward()
    parameters = dict(block.named_parameters())
    assert parameters
    for name, parameter in parameters.items():
        assert parameter.grad is not None, f"{name} has no gradient"
        assert parameter.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


@pytest.mark.parametrize("case", CASES, ids=repr)
@pytest.mark.parametrize("merged", [False, True])
def test_state_dict_round_trips(case, merged):
    """A freshly built block of the same configuration loads the state strictly and computes the same output."""
    torch.manual_seed(3)
    block = case.build()
    fresh = case.make(dtype=torch.float64)
    if merged:
        block.reparameterize()
        fresh.reparameterize()
    fresh.load_state_dict(block.state_dict(), strict=True)
    fresh.eval()
    x = random_input(case)
    with torch.no_grad():
        assert torch.equal(fresh(x), block(x))


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_a_few_optimiser_steps_lower_the_loss(case):
    """Training-time blocks learn: fit a fixed random target of the block's output shape in a few Adam steps."""
    torch.manual_seed(11)
    block = case.build(dtype=torch.float32).train()
    x = random_input(case, torch.float32, batch=4)
    with torch.no_grad():
        target = torch.randn_like(block(x))
    optimizer = torch.optim.Adam(block.parameters(), lr=1e-2)
    losses = []
    for _ in range(10):
        loss = F.mse_loss(block(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], f"{case}: loss did not fall: {losses}"


@pytest.mark.parametrize("case", DEPLOY_CASES, ids=repr)
def test_equivalent_kernel_bias_is_differentiable_and_equals_merge(case):
    torch.manual_seed(8)
    block = case.build()
    x = random_input(case)
    weight, bias = block.equivalent_kernel_bias()
    assert weight.requires_grad and (bias is None or bias.requires_grad)  # a RefConv may have no bias
    y_block = block(x)
    y_equivalent = equivalent_forward(block, x, weight, bias, case)
    assert_close(y_equivalent, y_block, F64, "equivalent kernel output")

    # gradients through the equivalent kernel equal those through the branches (eval mode)
    grad_out = torch.randn_like(y_block)
    names, leaves = zip(*block.named_parameters())
    through_branches = torch.autograd.grad(y_block, leaves, grad_out)
    through_kernel = torch.autograd.grad(y_equivalent, leaves, grad_out)
    for name, got, want in zip(names, through_kernel, through_branches):
        assert want.abs().sum() > 0, name
        assert_close(got, want, F64, f"grad {name}")

    # and it is what the merge writes
    merged = merged_copy(block)
    merged_weight, merged_bias = merged.equivalent_kernel_bias()
    assert torch.equal(merged_weight, weight.detach())
    assert (merged_bias is None and bias is None) or torch.equal(merged_bias, bias.detach())


# --------------------------------------------------------------------------------------------------------------
# RefConv

# (in, out, kernel, groups, bias, stride, padding, dilation)
REFCONV_CONVS = [
    pytest.param(8, 8, 7, 8, False, 1, 3, 1, id="depthwise-k7"),
    pytest.param(4, 8, 9, 4, True, 2, 4, 1, id="depthwise-k9-multiplier2-stride2"),
    pytest.param(6, 6, 7, 6, True, 1, 6, 2, id="depthwise-k7-dilation2"),
    pytest.param(6, 6, 3, 6, False, 1, 1, 1, id="depthwise-k3"),
    pytest.param(8, 8, 3, 2, True, 1, 1, 1, id="grouped"),
    pytest.param(4, 6, 3, 1, True, 2, 0, 1, id="dense-stride2-pad0"),
    pytest.param(3, 5, (3, 5), 1, False, 1, (1, 2), 1, id="dense-3x5"),
]


def make_conv(in_channels, out_channels, kernel_size, groups, bias, stride, padding, dilation):
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                     dtype=torch.float64)
    with torch.no_grad():
        conv.weight.copy_(torch.randn_like(conv.weight))
        if bias:
            conv.bias.copy_(torch.randn_like(conv.bias))
    return conv


def conv_args(conv):
    return dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups)


def refocus_reference(base, refocus):
    """W_b + conv(W_b as a (1, C_out·C_in/g, kh, kw) map, W_r, 'same' padding, groups from W_r's shape)."""
    maps = base.shape[0] * base.shape[1]
    bank = base.reshape(1, maps, *base.shape[-2:])
    pad = (refocus.shape[-2] // 2, refocus.shape[-1] // 2)
    return base + F.conv2d(bank, refocus, padding=pad, groups=maps // refocus.shape[1]).reshape(base.shape)


@pytest.mark.parametrize("in_channels,out_channels,kernel_size,groups,bias,stride,padding,dilation", REFCONV_CONVS)
def test_refconv_from_conv_starts_equal(in_channels, out_channels, kernel_size, groups, bias, stride, padding,
                                        dilation):
    torch.manual_seed(9)
    conv = make_conv(in_channels, out_channels, kernel_size, groups, bias, stride, padding, dilation)
    conv_state = state(conv)
    ref = RefConv.from_conv(conv)
    assert_same_state(state(conv), conv_state)  # the conv is not changed
    for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups"):
        assert getattr(ref, name) == getattr(conv, name), name
    assert not ref.convmap.weight.any()
    maps = out_channels * (in_channels // groups)
    assert ref.convmap.weight.shape == (maps, groups, 3, 3)
    assert ref.weight.data_ptr() != conv.weight.data_ptr()
    x = torch.randn(2, in_channels, 12, 11, dtype=torch.float64)
    assert torch.equal(ref(x), conv(x))


@pytest.mark.parametrize("in_channels,out_channels,kernel_size,groups,bias,stride,padding,dilation", REFCONV_CONVS)
def test_refconv_forward_uses_refocused_kernel(in_channels, out_channels, kernel_size, groups, bias, stride,
                                               padding, dilation):
    torch.manual_seed(10)
    conv = make_conv(in_channels, out_channels, kernel_size, groups, bias, stride, padding, dilation)
    ref = randomize_refconv(RefConv.from_conv(conv))
    x = torch.randn(2, in_channels, 12, 11, dtype=torch.float64)
    kernel = refocus_reference(ref.weight, ref.convmap.weight)
    expected = F.conv2d(x, kernel, ref.bias, **conv_args(conv))
    assert_close(ref(x), expected, F64, "RefConv forward")
    assert_close(ref.refocused_weight(), kernel, F64, "refocused_weight")


@pytest.mark.parametrize("in_channels,out_channels,kernel_size,groups,bias,stride,padding,dilation", REFCONV_CONVS)
def test_refconv_only_convmap_and_bias_learn(in_channels, out_channels, kernel_size, groups, bias, stride, padding,
                                             dilation):
    torch.manual_seed(11)
    ref = randomize_refconv(RefConv.from_conv(
        make_conv(in_channels, out_channels, kernel_size, groups, bias, stride, padding, dilation)))
    assert set(dict(ref.named_parameters())) == {"convmap.weight"} | ({"bias"} if bias else set())
    assert "weight" in dict(ref.named_buffers()) and not ref.weight.requires_grad
    assert set(ref.state_dict()) == {"weight", "convmap.weight"} | ({"bias"} if bias else set())
    x = torch.randn(2, in_channels, 10, 9, dtype=torch.float64)
    y = ref(x)
    (y * torch.randn_like(y)).sum().backward()
    assert ref.weight.grad is None
    assert ref.convmap.weight.grad is not None and ref.convmap.weight.grad.abs().sum() > 0
    if bias:
        assert ref.bias.grad is not None and ref.bias.grad.abs().sum() > 0


@pytest.mark.parametrize("in_channels,out_channels,kernel_size,groups,bias,stride,padding,dilation", REFCONV_CONVS)
def test_refconv_reparameterize_and_to_conv(in_channels, out_channels, kernel_size, groups, bias, stride, padding,
                                            dilation):
    torch.manual_seed(12)
    ref = randomize_refconv(RefConv.from_conv(
        make_conv(in_channels, out_channels, kernel_size, groups, bias, stride, padding, dilation)))
    x = torch.randn(2, in_channels, 12, 11, dtype=torch.float64)
    before = ref(x)
    kernel = ref.refocused_weight().detach().clone()

    conv = ref.to_conv()
    large_depthwise = groups == in_channels and max(conv.kernel_size) >= 7
    if large_depthwise:
        assert isinstance(conv, lkconv.DepthwiseConv2d)
    else:
        assert is_plain_conv(conv)
    assert (conv.bias is not None) == bias
    assert torch.equal(conv.weight, kernel)
    assert_close(conv(x), before, F64, "to_conv")
    assert not ref.merged  # to_conv leaves the RefConv as it was

    ref.reparameterize()
    assert ref.merged
    assert set(ref.state_dict()) == {"weight"} | ({"bias"} if bias else set())
    assert isinstance(ref.weight, nn.Parameter)
    assert torch.equal(ref.weight, kernel)
    assert_close(ref(x), before, F64, "after reparameterize")
    merged_conv = ref.to_conv()
    assert type(merged_conv) is type(conv)
    assert_close(merged_conv(x), before, F64, "to_conv after reparameterize")
    # the merged state_dict is a plain conv's
    plain = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                      dtype=torch.float64)
    plain.load_state_dict(ref.state_dict(), strict=True)
    assert_close(plain(x), before, F64, "nn.Conv2d loaded from the merged RefConv")


def test_refconv_from_conv_zero_init_false_and_map_k():
    torch.manual_seed(13)
    conv = make_conv(8, 8, 7, 8, False, 1, 3, 1)
    assert RefConv.from_conv(conv, zero_init=False).convmap.weight.any()
    ref = RefConv.from_conv(conv, map_k=5)
    assert ref.convmap.weight.shape == (8, 8, 5, 5)


def test_refconv_from_lkconv_depthwise_conv():
    torch.manual_seed(14)
    conv = lkconv.DepthwiseConv2d(6, 9, padding=4, dtype=torch.float64)
    ref = randomize_refconv(RefConv.from_conv(conv))
    x = torch.randn(2, 6, 11, 10, dtype=torch.float64)
    expected = F.conv2d(x, refocus_reference(ref.weight, ref.convmap.weight), ref.bias, padding=4, groups=6)
    assert_close(ref(x), expected, F64, "RefConv from DepthwiseConv2d")


@pytest.mark.parametrize("in_channels,out_channels,kernel_size,groups,dilation", [
    pytest.param(4, 4, 7, 4, 1, id="depthwise-k7"),
    pytest.param(4, 4, 8, 4, 1, id="depthwise-k8"),
    pytest.param(4, 8, (8, 7), 4, (1, 2), id="depthwise-8x7-dilation1x2-multiplier2"),
    pytest.param(6, 6, 4, 3, 3, id="grouped-k4-dilation3"),
    pytest.param(3, 5, 4, 1, 1, id="dense-k4"),
])
def test_refconv_default_padding_keeps_the_map_s_size_for_odd_and_even_kernels(in_channels, out_channels,
                                                                                  kernel_size, groups, dilation):
    """Where no padding is given, the output has the input's size (an even kernel once came out a row and a column
    short), and the merged conv gives the same output."""
    torch.manual_seed(15)
    ref = randomize_refconv(RefConv(in_channels, out_channels, kernel_size, groups=groups, dilation=dilation,
                                    bias=True, dtype=torch.float64))
    x = torch.randn(2, in_channels, 11, 10, dtype=torch.float64)
    expected = F.conv2d(x, refocus_reference(ref.weight, ref.convmap.weight), ref.bias, padding="same",
                        dilation=dilation, groups=groups)
    assert expected.shape[-2:] == x.shape[-2:]
    assert_close(ref(x), expected, F64, "RefConv with its default padding")
    assert_close(ref.to_conv()(x), expected, F64, "RefConv's plain conv")


def test_refconv_errors():
    with pytest.raises(TypeError, match=r"conv must be an nn\.Conv2d; got Linear"):
        RefConv.from_conv(nn.Linear(3, 3))
    with pytest.raises(ValueError, match=r"map_k must be an odd int >= 1; got 4"):
        RefConv(4, 4, 3, map_k=4)
    with pytest.raises(ValueError, match=r"conv.padding_mode must be 'zeros' for RefConv; got 'reflect'"):
        RefConv.from_conv(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(ValueError, match=r"padding must be given .* is odd at stride > 1 .* got kernel_size=8, "
                                         r"dilation=1, stride=2, padding=None"):
        RefConv(4, 4, 8, stride=2, groups=4)


# --------------------------------------------------------------------------------------------------------------
# ConvBN and DropPath


@pytest.mark.parametrize("in_channels,out_channels,kernel_size,stride,groups,large_depthwise", [
    (8, 8, 7, 1, 8, True), (4, 8, (9, 3), 2, 4, True), (8, 8, 5, 1, 8, False), (8, 6, 3, 2, 2, False),
])
@pytest.mark.parametrize("activation", [None, nn.ReLU()])
def test_conv_bn(in_channels, out_channels, kernel_size, stride, groups, large_depthwise, activation):
    torch.manual_seed(15)
    block = randomize_bn(ConvBN(in_channels, out_channels, kernel_size, stride, groups=groups,
                                activation=activation, dtype=torch.float64)).eval()
    names = [name for name, _ in block.named_children()]
    assert names == (["conv", "bn", "nonlinear"] if activation is not None else ["conv", "bn"])
    assert set(block.state_dict()) == {"conv.weight"} | bn_keys("bn")
    assert isinstance(block.conv, lkconv.DepthwiseConv2d) if large_depthwise else is_plain_conv(block.conv)
    kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
    assert block.conv.padding == (kh // 2, kw // 2)

    x = torch.randn(2, in_channels, 11, 10, dtype=torch.float64)
    bn = block.bn
    expected = F.batch_norm(F.conv2d(x, block.conv.weight, None, stride, (kh // 2, kw // 2), groups=groups),
                            bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    weight, bias = block.fused_kernel_bias()
    fused = F.conv2d(x, weight, bias, stride, (kh // 2, kw // 2), groups=groups)
    if activation is not None:
        expected, fused = F.relu(expected), F.relu(fused)
    assert_close(block(x), expected, F64, "ConvBN")
    assert_close(fused, expected, F64, "fused_kernel_bias")


@pytest.mark.parametrize("kernel_size, dilation", [(3, 2), ((5, 3), (1, 3)), ((3, 1), 4)])
def test_conv_bn_default_padding_keeps_the_map_size_under_dilation(kernel_size, dilation):
    torch.manual_seed(17)
    block = randomize_bn(ConvBN(3, 3, kernel_size, dilation=dilation, groups=3, dtype=torch.float64)).eval()
    kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
    rh, rw = (dilation, dilation) if isinstance(dilation, int) else dilation
    assert block.conv.padding == (rh * (kh // 2), rw * (kw // 2))
    x = torch.randn(2, 3, 13, 12, dtype=torch.float64)
    bn = block.bn
    expected = F.batch_norm(F.conv2d(x, block.conv.weight, None, 1, "same", (rh, rw), groups=3),
                            bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    assert block(x).shape == x.shape
    assert_close(block(x), expected, F64, "dilated ConvBN")


def test_conv_bn_rejects_even_kernel_without_padding():
    with pytest.raises(ValueError, match=r"kernel_size must be an odd int or a pair of odd ints"):
        ConvBN(4, 4, 4)
    assert ConvBN(4, 4, 4, padding=0).conv.kernel_size == (4, 4)  # explicit padding allows any size


def test_drop_path_is_identity_in_eval_and_at_zero():
    x = torch.randn(4, 3, 5, 5)
    assert torch.equal(DropPath(0.5).eval()(x), x)
    assert torch.equal(DropPath(0.0).train()(x), x)


def test_drop_path_drops_whole_samples_and_rescales():
    torch.manual_seed(16)
    p = 0.4
    drop = DropPath(p).train()
    x = torch.rand(64, 3, 4, 4) + 0.5  # strictly positive, so a dropped sample is recognisable
    y = drop(x)
    dropped = (y == 0).flatten(1).all(1)
    kept = ~dropped
    assert dropped.any() and kept.any()
    assert not (y[kept] == 0).any()  # a sample is dropped whole or not at all
    assert torch.allclose(y[kept], x[kept] / (1 - p), rtol=1e-6, atol=0)
    assert "p=0.4" in repr(drop)


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5])
def test_drop_path_rejects_p_outside_unit_interval(p):
    with pytest.raises(ValueError, match=r"drop path probability p must be a number in \[0, 1\)"):
        DropPath(p)


def se_reference(x, down_weight, down_bias, up_weight, up_bias):
    """Squeeze-and-excitation written out: per-sample channel means, two dense layers (ReLU, sigmoid), gate."""
    squeezed = x.sum(dim=(2, 3)) / (x.shape[2] * x.shape[3])  # (N, C)
    hidden = (squeezed @ down_weight.flatten(1).T + down_bias).clamp(min=0)
    gate = 1 / (1 + torch.exp(-(hidden @ up_weight.flatten(1).T + up_bias)))
    return x * gate[:, :, None, None]


def test_se_block_matches_hand_computed_squeeze_excitation():
    torch.manual_seed(18)
    se = SEBlock(8, 4, dtype=torch.float64)
    with torch.no_grad():  # random parameters that leave some internal neurons active and some not
        for conv in (se.down, se.up):
            conv.weight.copy_(torch.randn_like(conv.weight))
            conv.bias.copy_(torch.randn_like(conv.bias))
    x = torch.randn(3, 8, 5, 7, dtype=torch.float64) + torch.randn(3, 8, 1, 1, dtype=torch.float64)
    expected = se_reference(x, se.down.weight.detach(), se.down.bias.detach(), se.up.weight.detach(),
                            se.up.bias.detach())
    hidden = x.mean(dim=(2, 3)) @ se.down.weight.detach().flatten(1).T + se.down.bias.detach()
    assert (hidden > 0).any() and (hidden < 0).any(), "the ReLU should matter for this input"
    with torch.no_grad():
        actual = se(x)
    assert_close(actual, expected, F64, "SEBlock")


def conv_bn_train_reference(x, conv_bn, stride=1, padding=0, groups=1):
    """conv -> training-mode BatchNorm (this batch's mean and biased variance) from the ConvBN's parameters."""
    y = F.conv2d(x, conv_bn.conv.weight.detach(), None, stride, padding, groups=groups)
    return bn_train_reference(y, conv_bn.bn)


def bn_train_reference(y, bn):
    mean = y.mean(dim=(0, 2, 3), keepdim=True)
    var = ((y - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    scale = bn.weight.detach()[None, :, None, None] / (var + bn.eps).sqrt()
    return (y - mean) * scale + bn.bias.detach()[None, :, None, None]


@pytest.mark.parametrize("groups", [1, 4])
def test_repvgg_drop_path_drops_the_conv_branches_per_sample_in_training(groups):
    """With an identity branch, training mode drops (dense + 1x1) per sample with probability p and scales the
    kept ones by 1/(1-p); the identity BN is always added, then the ReLU."""
    torch.manual_seed(19)
    p = 0.5
    block = randomize_bn(RepVGGBlock(8, 8, groups=groups, drop_path=p, dtype=torch.float64)).train()
    x = torch.randn(16, 8, 6, 5, dtype=torch.float64)
    convs = (conv_bn_train_reference(x, block.rbr_dense, padding=1, groups=groups)
             + conv_bn_train_reference(x, block.rbr_1x1, groups=groups))
    identity = bn_train_reference(x, block.rbr_identity)
    kept, dropped = F.relu(convs / (1 - p) + identity), F.relu(identity)
    with torch.no_grad():
        y = block(x)
    outcomes = []
    for i in range(x.shape[0]):
        is_kept = relative_error(y[i], kept[i]) <= F64
        is_dropped = relative_error(y[i], dropped[i]) <= F64
        assert is_kept != is_dropped, f"sample {i} is neither the kept nor the dropped output (or both)"
        outcomes.append(is_kept)
    assert any(outcomes) and not all(outcomes), f"p={p} over 16 samples should both keep and drop: {outcomes}"


def test_repvgg_drop_path_is_inactive_without_identity_branch_and_in_eval():
    """Without an identity branch (out != in) nothing is dropped in training; in eval DropPath is an identity."""
    torch.manual_seed(20)
    block = randomize_bn(RepVGGBlock(8, 16, drop_path=0.5, dtype=torch.float64)).train()
    x = torch.randn(8, 8, 5, 6, dtype=torch.float64)
    expected = F.relu(conv_bn_train_reference(x, block.rbr_dense, padding=1)
                      + conv_bn_train_reference(x, block.rbr_1x1))
    with torch.no_grad():
        assert_close(block(x), expected, F64, "RepVGGBlock without identity, training")

    block = randomize_bn(RepVGGBlock(8, 8, drop_path=0.5, dtype=torch.float64)).eval()
    expected = F.relu(sum(F.batch_norm(F.conv2d(x, branch.conv.weight, None, padding=pad), branch.bn.running_mean,
                                       branch.bn.running_var, branch.bn.weight, branch.bn.bias, False, 0.0,
                                       branch.bn.eps)
                          for branch, pad in ((block.rbr_dense, 1), (block.rbr_1x1, 0)))
                      + F.batch_norm(x, block.rbr_identity.running_mean, block.rbr_identity.running_var,
                                     block.rbr_identity.weight, block.rbr_identity.bias, False, 0.0,
                                     block.rbr_identity.eps))
    with torch.no_grad():
        assert_close(block(x), expected, F64, "RepVGGBlock with drop_path in eval")


# --------------------------------------------------------------------------------------------------------------
# reparameterize_model on mixed models with foreign re-param modules

CALLS = []  # (class name, tag) per merge call; module-level so deep copies log here too


class ForeignSwitch(nn.Module):
    """Official RepVGG/RepLKNet style: 3x3 + 1x1 conv branches, merged by `switch_to_deploy()` in place."""

    def __init__(self, channels, tag):
        super().__init__()
        self.tag = tag
        self.conv3 = nn.Conv2d(channels, channels, 3, padding=1, dtype=torch.float64)
        self.conv1 = nn.Conv2d(channels, channels, 1, dtype=torch.float64)

    def forward(self, x):
        if hasattr(self, "reparam"):
            return self.reparam(x)
        return self.conv3(x) + self.conv1(x)

    def switch_to_deploy(self):
        CALLS.append(("switch_to_deploy", self.tag))
        assert not hasattr(self, "reparam"), "switch_to_deploy called twice"
        self.reparam = nn.Conv2d(self.conv3.in_channels, self.conv3.out_channels, 3, padding=1, dtype=torch.float64)
        with torch.no_grad():
            self.reparam.weight.copy_(self.conv3.weight + F.pad(self.conv1.weight, (1, 1, 1, 1)))
            self.reparam.bias.copy_(self.conv3.bias + self.conv1.bias)
        del self.conv3, self.conv1


class ForeignFuse(nn.Module):
    """timm LeViT style: conv + BN whose `fuse()` returns a replacement nn.Conv2d."""

    def __init__(self, channels, tag):
        super().__init__()
        self.tag = tag
        self.c = nn.Conv2d(channels, channels, 3, padding=1, bias=False, dtype=torch.float64)
        self.bn = nn.BatchNorm2d(channels, dtype=torch.float64)

    def forward(self, x):
        return self.bn(self.c(x))

    def fuse(self):
        CALLS.append(("fuse", self.tag))
        fused = nn.Conv2d(self.c.in_channels, self.c.out_channels, 3, padding=1, dtype=torch.float64)
        scale = self.bn.weight / (self.bn.running_var + self.bn.eps).sqrt()
        with torch.no_grad():
            fused.weight.copy_(self.c.weight * scale.reshape(-1, 1, 1, 1))
            fused.bias.copy_(self.bn.bias - self.bn.running_mean * scale)
        return fused


class ForeignReparam(nn.Module):
    """timm MobileOne style: `reparameterize()` merges in place. Also defines `switch_to_deploy()` and `fuse()`,
    which must not be called since `reparameterize()` comes first."""

    def __init__(self, channels, tag):
        super().__init__()
        self.tag = tag
        self.a = nn.Conv2d(channels, channels, 1, dtype=torch.float64)
        self.b = nn.Conv2d(channels, channels, 1, dtype=torch.float64)
        self.merged = False

    def forward(self, x):
        return self.a(x) if self.merged else self.a(x) + self.b(x)

    def reparameterize(self):
        CALLS.append(("reparameterize", self.tag))
        assert not self.merged, "reparameterize called twice"
        with torch.no_grad():
            self.a.weight.add_(self.b.weight)
            self.a.bias.add_(self.b.bias)
        del self.b
        self.merged = True

    def switch_to_deploy(self):
        CALLS.append(("switch_to_deploy", self.tag))

    def fuse(self):
        CALLS.append(("fuse", self.tag))
        return nn.Identity()


class ForeignContainer(nn.Module):
    """A container with no merge method of its own: the blocks inside it must still be merged."""

    def __init__(self, channels):
        super().__init__()
        self.inner = nn.ModuleList([
            RepVGGBlock(channels, channels, dtype=torch.float64),
            ForeignFuse(channels, "nested-fuse"),
            nn.Sequential(ReparamLargeKernelConv(channels, channels, 9, small_kernel=3, dtype=torch.float64)),
        ])

    def forward(self, x):
        for module in self.inner:
            x = module(x)
        return x


class ForeignParent(nn.Module):
    """A foreign block merged by `switch_to_deploy()` that keeps a foreign child: parent must go before child."""

    def __init__(self, channels, tag):
        super().__init__()
        self.tag = tag
        self.child = ForeignFuse(channels, f"{tag}/child")
        self.scale = nn.Parameter(torch.rand(1, dtype=torch.float64) + 0.5)

    def forward(self, x):
        return self.child(x) * self.scale

    def switch_to_deploy(self):
        assert isinstance(self.child, ForeignFuse), "the child was merged before its parent"
        CALLS.append(("switch_to_deploy", self.tag))


class CountingRepVGG(RepVGGBlock):
    """A RepVGGBlock that logs each `reparameterize()` call."""

    def reparameterize(self):
        CALLS.append(("reparameterize", "counting-repvgg"))
        super().reparameterize()


def build_mixed_model(channels=6):
    model = nn.Sequential(
        ReparamLargeKernelConv(channels, channels, 11, small_kernel=5, dtype=torch.float64),
        ForeignSwitch(channels, "switch"),
        nn.ReLU(),
        ForeignFuse(channels, "fuse"),
        CountingRepVGG(channels, channels, dtype=torch.float64),
        ForeignReparam(channels, "reparam"),
        ForeignContainer(channels),
        ForeignParent(channels, "parent"),
        DilatedReparamBlock(channels, 7, dtype=torch.float64),
        ConvBN(channels, channels, 3, dtype=torch.float64),
        DropPath(0.2),
        RefConv(channels, channels, 7, groups=channels, dtype=torch.float64),
        DecomposedLargeKernelConv(channels, 9, dtype=torch.float64),
    )
    randomize_bn(model)
    randomize_refconv(model)
    return model.eval()


def test_reparameterize_model_merges_mixed_model_once():
    torch.manual_seed(17)
    model = build_mixed_model()
    x = torch.randn(2, 6, 12, 10, dtype=torch.float64)
    before_state, before = state(model), model(x)
    CALLS.clear()

    merged = reparameterize_model(model)

    assert sorted(CALLS) == sorted([
        ("switch_to_deploy", "switch"),
        ("fuse", "fuse"),
        ("reparameterize", "counting-repvgg"),
        ("reparameterize", "reparam"),
        ("fuse", "nested-fuse"),
        ("switch_to_deploy", "parent"),
        ("fuse", "parent/child"),
    ])
    assert CALLS.index(("switch_to_deploy", "parent")) < CALLS.index(("fuse", "parent/child"))

    # each block is merged
    assert merged[0].merged and hasattr(merged[1], "reparam") and not hasattr(merged[1], "conv3")
    assert is_plain_conv(merged[3])  # replaced by what fuse() returned
    assert merged[4].merged and merged[5].merged and not hasattr(merged[5], "b")
    inner = merged[6].inner
    assert inner[0].merged and is_plain_conv(inner[1]) and inner[2][0].merged
    assert is_plain_conv(merged[7].child)
    assert merged[8].merged
    assert isinstance(merged[9], ConvBN)  # ConvBN and DropPath have nothing to merge and stay
    assert isinstance(merged[10], DropPath)
    assert isinstance(merged[11], lkconv.DepthwiseConv2d) and not isinstance(merged[11], RefConv)
    assert merged[12].merged

    assert_close(merged(x), before, F64, "merged mixed model")
    # the original is untouched
    assert_same_state(state(model), before_state)
    assert isinstance(model[3], ForeignFuse) and hasattr(model[1], "conv3") and not model[0].merged
    assert isinstance(model[11], RefConv) and not model[11].merged
    assert torch.equal(model(x), before)


def test_reparameterize_model_inplace_on_mixed_model():
    torch.manual_seed(18)
    model = build_mixed_model()
    x = torch.randn(2, 6, 9, 11, dtype=torch.float64)
    before = model(x)
    CALLS.clear()
    merged = reparameterize_model(model, inplace=True)
    assert merged is model
    assert len(CALLS) == 7 and len(set(CALLS)) == 7
    assert is_plain_conv(model[3]) and model[0].merged
    assert_close(model(x), before, F64, "merged in place")


class ForeignMergeKernel(nn.Module):
    """Official RepLKNet/SLaK style: `merge_kernel()` builds `lkb_reparam` and deletes `lkb_origin`, with no guard
    against a second call; `merged=True` builds the merged form directly (`small_kernel_merged=True`)."""

    def __init__(self, channels, merged=False):
        super().__init__()
        if merged:
            self.lkb_reparam = nn.Conv2d(channels, channels, 5, padding=2, groups=channels, dtype=torch.float64)
        else:
            self.lkb_origin = nn.Conv2d(channels, channels, 5, padding=2, groups=channels, dtype=torch.float64)
            self.small_conv = nn.Conv2d(channels, channels, 3, padding=1, groups=channels, dtype=torch.float64)

    def forward(self, x):
        if hasattr(self, "lkb_reparam"):
            return self.lkb_reparam(x)
        return self.lkb_origin(x) + self.small_conv(x)

    def merge_kernel(self):
        CALLS.append(("merge_kernel", id(self)))
        origin, small = self.lkb_origin, self.small_conv
        self.lkb_reparam = nn.Conv2d(origin.in_channels, origin.out_channels, 5, padding=2, groups=origin.groups,
                                     dtype=torch.float64)
        with torch.no_grad():
            self.lkb_reparam.weight.copy_(origin.weight + F.pad(small.weight, (1, 1, 1, 1)))
            self.lkb_reparam.bias.copy_(origin.bias + small.bias)
        del self.lkb_origin, self.small_conv


def test_reparameterize_model_twice_or_on_a_foreign_block_built_merged_merges_nothing_again():
    torch.manual_seed(19)
    model = nn.Sequential(ForeignMergeKernel(4), nn.ReLU(), ForeignMergeKernel(4, merged=True)).eval()
    x = torch.randn(2, 4, 9, 8, dtype=torch.float64)
    before = model(x)
    CALLS.clear()
    once = reparameterize_model(model)
    assert len(CALLS) == 1 and not hasattr(once[0], "lkb_origin")  # only the unmerged block merges
    twice = reparameterize_model(once)
    assert len(CALLS) == 1
    assert_close(once(x), before, F64, "merge_kernel block merged once")
    assert torch.equal(twice(x), once(x))


# --------------------------------------------------------------------------------------------------------------
# constructor errors


@pytest.mark.parametrize("make,match", [
    (lambda: ReparamLargeKernelConv(8, 8, 12), r"kernel_size must be an odd int or a pair of odd ints"),
    (lambda: ReparamLargeKernelConv(8, 8, (13, 12)), r"kernel_size must be an odd int or a pair of odd ints"),
    (lambda: ReparamLargeKernelConv(8, 8, 13, small_kernel=4), r"small_kernel must be an odd int"),
    (lambda: ReparamLargeKernelConv(8, 8, 7, small_kernel=9), r"small_kernel must not exceed kernel_size 7; got 9"),
    (lambda: ReparamLargeKernelConv(8, 8, (9, 5), small_kernel=7), r"small_kernel must not exceed kernel_size"),
    (lambda: DecomposedLargeKernelConv(8, 12), r"kernel_size must be an odd int"),
    (lambda: DecomposedLargeKernelConv(8, 13, 4), r"small_kernel must be an odd int"),
    (lambda: DecomposedLargeKernelConv(8, 5, 7), r"small_kernel <= kernel_size"),
    (lambda: DilatedReparamBlock(8, 12), r"kernel_size must be an odd int"),
    (lambda: DilatedReparamBlock(8, 19), r"kernel_size must be one of \[5, 7, 9, 11, 13, 15, 17\]"),
    (lambda: DilatedReparamBlock(8, 3), r"kernel_size must be one of"),
    (lambda: DilatedReparamBlock(8, 9, kernel_sizes=(5,), dilations=(3,)),
     r"its branch must fit in the 9x9 kernel; got kernel 5 with dilation 3 \(spans 13\)"),
    (lambda: DilatedReparamBlock(8, 9, kernel_sizes=(3,), dilations=(0,)), r"each dilation must be an int >= 1"),
    (lambda: DilatedReparamBlock(8, 9, kernel_sizes=(4,), dilations=(1,)), r"kernel_sizes entries must be an odd"),
    (lambda: DilatedReparamBlock(8, 9, kernel_sizes=(3,)), r"kernel_sizes and dilations must be given together"),
    (lambda: DilatedReparamBlock(8, 9, kernel_sizes=(3, 3), dilations=(1,)),
     r"kernel_sizes and dilations must have the same length"),
    (lambda: RepVGGBlock(8, 8, kernel_size=5), r"RepVGGBlock needs kernel_size=3 and padding=1; got kernel_size=5"),
    (lambda: RepVGGBlock(8, 8, kernel_size=1, padding=0), r"RepVGGBlock needs kernel_size=3"),
    (lambda: RepVGGBlock(8, 8, drop_path=1.0), r"drop path probability p must be a number in \[0, 1\)"),
    (lambda: RepVGGBlock(8, 8, drop_path=-0.5), r"drop path probability p must be a number in \[0, 1\)"),
    (lambda: DilatedReparamBlock(8, 9, kernel_sizes=(3,), dilations=(True,)), r"each dilation must be an int >= 1"),
    (lambda: ReparamLargeKernelConv(0, 4, 7), r"in_channels must be an int >= 1; got 0"),
    (lambda: ReparamLargeKernelConv(4, 6, 7),
     r"in_channels and out_channels must be multiples of groups; got in_channels=4, out_channels=6, groups=4"),
    (lambda: RepVGGBlock(4, 4, groups=3), r"multiples of groups; got in_channels=4, out_channels=4, groups=3"),
    (lambda: RepVGGBlock(4, 4.0), r"out_channels must be an int >= 1; got 4.0"),
    (lambda: ConvBN(4, 4, 3, groups=0), r"groups must be an int >= 1; got 0"),
    (lambda: DecomposedLargeKernelConv(0, 13), r"channels must be an int >= 1; got 0"),
    (lambda: DilatedReparamBlock(-8, 9), r"channels must be an int >= 1; got -8"),
    (lambda: DropPath("a"), r"drop path probability p must be a number in \[0, 1\); got 'a'"),
], ids=lambda v: v if isinstance(v, str) else "make")
def test_constructor_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_reparameterize_model_keeps_shared_modules_shared():
    torch.manual_seed(0)
    shared_ref = RefConv(8, 8, 9, groups=8)
    shared_block = ReparamLargeKernelConv(8, 8, 9, small_kernel=3)
    model = randomize_bn(nn.Sequential(shared_ref, nn.ReLU(), shared_ref, shared_block, shared_block)).eval()
    merged = reparameterize_model(model)
    assert merged[0] is merged[2] and isinstance(merged[0], lkconv.DepthwiseConv2d)
    assert merged[3] is merged[4] and merged[3].merged
    x = torch.randn(2, 8, 12, 12)
    with torch.no_grad():
        assert_close(merged(x), model(x), TOLERANCE[torch.float32], "shared modules")


@pytest.mark.parametrize("inplace", [True, False])
def test_reparameterize_model_moves_a_refconvs_hooks_to_its_plain_conv(inplace):
    torch.manual_seed(0)
    model = randomize_refconv(nn.Sequential(RefConv(8, 8, 9, groups=8, bias=True), nn.ReLU()))
    seen = []
    pre = model[0].register_forward_pre_hook(lambda module, args: seen.append("pre"))
    post = model[0].register_forward_hook(lambda module, args, output: seen.append(tuple(output.shape)))
    x = torch.randn(2, 8, 12, 12)
    with torch.no_grad():
        expected = model(x)
        merged = reparameterize_model(model, inplace=inplace)
        assert isinstance(merged[0], lkconv.DepthwiseConv2d) and not isinstance(merged[0], RefConv)
        seen.clear()
        assert_close(merged(x), expected, TOLERANCE[torch.float32], "merged RefConv")
        assert seen == ["pre", (2, 8, 12, 12)]
        if inplace:  # the handles the user holds still remove the hooks
            pre.remove()
            post.remove()
            seen.clear()
            merged(x)
            assert seen == []


def test_reparameterize_model_calls_official_merge_names_and_skips_methods_with_arguments():
    calls = []

    class OfficialRepLK(nn.Module):  # official RepLKNet / SLaK name
        def merge_kernel(self):
            calls.append("merge_kernel")

    class OfficialUniRepLK(nn.Module):  # UniRepLKNet's dilated block
        def merge_dilated_branches(self):
            calls.append("merge_dilated_branches")

    class VariationalEncoder(nn.Module):  # a VAE's reparameterize(mu, logvar) is not a merge
        def reparameterize(self, mu, logvar):
            raise AssertionError("must not be called")

    class FusionHead(nn.Module):  # layers named like merge methods are layers, not merges
        def __init__(self):
            super().__init__()
            self.fuse = nn.Conv2d(4, 4, 1)
            self.reparameterize = nn.Identity()

        def forward(self, x):
            return self.fuse(self.reparameterize(x))

    head = FusionHead()
    model = nn.Sequential(OfficialRepLK(), OfficialUniRepLK(), VariationalEncoder(), head)
    assert reparameterize_model(model, inplace=True) is model
    assert calls == ["merge_kernel", "merge_dilated_branches"]
    assert model[3] is head and isinstance(head.fuse, nn.Conv2d) and isinstance(head.reparameterize, nn.Identity)


def test_validation_of_repeated_branches_and_list_strides():
    with pytest.raises(ValueError, match=r"each \(kernel size, dilation\) pair may appear once"):
        DilatedReparamBlock(8, 9, kernel_sizes=(3, 3), dilations=(2, 2))
    assert RepVGGBlock(8, 8, stride=[1, 1]).rbr_identity is not None
    assert RepVGGBlock(8, 8, stride=(2, 2)).rbr_identity is None


def test_decomposed_block_has_no_small_branch_when_it_equals_the_thin_kernels():
    block = DecomposedLargeKernelConv(8, 5, small_kernel=5)
    assert not hasattr(block, "small_conv")
    randomize_bn(block).eval()
    x = torch.randn(2, 8, 9, 9, dtype=torch.float32)
    with torch.no_grad():
        expected = block(x)
        block.reparameterize()
        assert_close(block(x), expected, TOLERANCE[torch.float32], "SLaK K=5 merge")


def test_reparameterize_model_keeps_replaced_modules_alive_until_the_walk_ends():
    """The walk remembers modules by id; a replaced module freed mid-walk could hand its id to a module created
    later (a merged conv), which would then be swapped for the stale replacement. CI once saw exactly that."""
    import weakref

    class Fusable(nn.Module):
        def fuse(self):
            return nn.Conv2d(2, 2, 1)

    seen = []

    class Probe(nn.Module):
        def switch_to_deploy(self):
            seen.append(alive() is not None)

    original = Fusable()
    alive = weakref.ref(original)
    model = nn.Sequential(nn.Sequential(original), Probe())
    del original
    reparameterize_model(model, inplace=True)
    assert seen == [True]
    assert isinstance(model[0][0], nn.Conv2d)
