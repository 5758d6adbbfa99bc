"""Tests for the re-parameterization algebra in lkconv/reparam.py.

Every function is checked against a direct float64 computation with F.conv2d / BatchNorm in eval mode on random
inputs (random BN statistics and affine parameters), for dense, grouped and depthwise kernels. Also checked: the
dtype and device of the result, that results never alias the arguments and the arguments are left unchanged,
that gradients flow (gradcheck in float64), and that each documented error names the offending argument.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lkconv.reparam import dilated_to_dense, fuse_conv_bn, identity_kernel, merge_branches, pad_kernel, refocused_kernel

from conftest import TOLERANCE, assert_close

F64 = TOLERANCE[torch.float64]
DTYPES = [torch.float32, torch.float64, torch.bfloat16]


# --------------------------------------------------------------------------------------------------------------
# helpers


def random_bn(channels, affine=True, dtype=torch.float64, eps=1e-3):
    """An eval-mode BatchNorm2d whose running statistics and affine parameters are all random (never defaults)."""
    bn = nn.BatchNorm2d(channels, eps=eps, affine=affine, dtype=dtype)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(channels, dtype=dtype))
        bn.running_var.copy_(torch.rand(channels, dtype=dtype) * 2 + 0.1)
        if affine:
            bn.weight.copy_(torch.randn(channels, dtype=dtype))
            bn.bias.copy_(torch.randn(channels, dtype=dtype))
    return bn.eval()


def random_kernel(out_channels, in_channels, groups, kernel_size, dtype=torch.float64):
    kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
    return torch.randn(out_channels, in_channels // groups, kh, kw, dtype=dtype)


def same_padding(kernel):
    return kernel.shape[-2] // 2, kernel.shape[-1] // 2


def snapshot(*tensors):
    return [t.detach().clone() if t is not None else None for t in tensors]


def assert_unchanged(before, after):
    for old, new in zip(before, after):
        if old is None:
            assert new is None
        else:
            assert torch.equal(old, new.detach()), "an argument was modified by the call"


def assert_not_aliasing(result, *inputs):
    """The result shares no storage with any input tensor."""
    for tensor in inputs:
        if tensor is None:
            continue
        assert result.untyped_storage().data_ptr() != tensor.untyped_storage().data_ptr(), "result aliases an input"


def bn_state(bn):
    return snapshot(bn.running_mean, bn.running_var, bn.weight, bn.bias)


# (in_channels, out_channels, groups): dense, grouped, depthwise, depthwise with depth multiplier 2
CONV_CASES = [(4, 6, 1), (4, 6, 2), (6, 6, 6), (6, 12, 6)]


# --------------------------------------------------------------------------------------------------------------
# fuse_conv_bn


@pytest.mark.parametrize("in_channels,out_channels,groups", CONV_CASES)
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("kernel_size", [3, (5, 3)])
def test_fuse_conv_bn_equals_conv_then_bn(in_channels, out_channels, groups, with_bias, affine, kernel_size):
    weight = random_kernel(out_channels, in_channels, groups, kernel_size)
    bias = torch.randn(out_channels, dtype=torch.float64) if with_bias else None
    bn = random_bn(out_channels, affine=affine)
    x = torch.randn(2, in_channels, 9, 8, dtype=torch.float64)
    padding = same_padding(weight)

    expected = bn(F.conv2d(x, weight, bias, padding=padding, groups=groups))
    fused_weight, fused_bias = fuse_conv_bn(weight, bias, bn)
    assert fused_weight.shape == weight.shape and fused_bias.shape == (out_channels,)
    actual = F.conv2d(x, fused_weight, fused_bias, padding=padding, groups=groups)
    assert_close(actual, expected, F64, "conv(fused) vs bn(conv)")


def test_fuse_conv_bn_uses_eps():
    """A large eps must enter the fused result exactly as BatchNorm uses it."""
    weight = random_kernel(4, 4, 1, 3)
    bn = random_bn(4, eps=0.5)
    x = torch.randn(1, 4, 6, 6, dtype=torch.float64)
    fused_weight, fused_bias = fuse_conv_bn(weight, None, bn)
    assert_close(F.conv2d(x, fused_weight, fused_bias, padding=1), bn(F.conv2d(x, weight, padding=1)), F64, "eps")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_fuse_conv_bn_keeps_dtype_and_leaves_arguments_alone(dtype, with_bias):
    weight = random_kernel(6, 6, 6, 3, dtype=dtype)
    bias = torch.randn(6, dtype=dtype) if with_bias else None
    bn = random_bn(6, dtype=torch.float32)  # BN kept in float32, as in mixed-precision models
    before, bn_before = snapshot(weight, bias), bn_state(bn)

    fused_weight, fused_bias = fuse_conv_bn(weight, bias, bn)

    assert fused_weight.dtype == dtype and fused_bias.dtype == dtype
    assert fused_weight.device == weight.device and fused_bias.device == weight.device
    assert_unchanged(before, [weight, bias])
    assert_unchanged(bn_before, bn_state(bn))
    for result in (fused_weight, fused_bias):
        assert_not_aliasing(result, weight, bias, bn.running_mean, bn.running_var, bn.weight, bn.bias)
    # the values match batch norm's closed form in float64 to the dtype's precision: w·γ/σ and β + (b − μ)·γ/σ
    scale = bn.weight.double() / (bn.running_var.double() + bn.eps).sqrt()
    ref_weight = weight.double() * scale.view(-1, 1, 1, 1)
    ref_bias = bn.bias.double() + ((bias.double() if with_bias else 0) - bn.running_mean.double()) * scale
    assert_close(fused_weight, ref_weight, TOLERANCE[dtype], "fused weight")
    assert_close(fused_bias, ref_bias, TOLERANCE[dtype], "fused bias")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bn_dtype", [torch.float32, "same"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_fuse_conv_bn_low_precision_computes_in_float32(dtype, bn_dtype, with_bias):
    """The documented promise: for a half-precision weight the arithmetic runs in float32 and only the result is
    rounded, so it is bit-identical to fusing the float32-cast inputs and casting back."""
    weight = random_kernel(16, 8, 1, 3, dtype=dtype)
    bias = torch.randn(16, dtype=dtype) if with_bias else None
    bn = random_bn(16, dtype=dtype if bn_dtype == "same" else bn_dtype)

    fused_weight, fused_bias = fuse_conv_bn(weight, bias, bn)

    bn32 = nn.BatchNorm2d(16, eps=bn.eps, dtype=torch.float32)
    bn32.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in bn.state_dict().items()})
    ref_weight, ref_bias = fuse_conv_bn(weight.float(), bias.float() if with_bias else None, bn32.eval())
    assert fused_weight.dtype == dtype and fused_bias.dtype == dtype
    assert torch.equal(fused_weight, ref_weight.to(dtype)), "fused weight differs from the float32 computation"
    assert torch.equal(fused_bias, ref_bias.to(dtype)), "fused bias differs from the float32 computation"


def test_fuse_conv_bn_gradcheck_weight_and_bias():
    bn = random_bn(4)
    weight = random_kernel(4, 4, 2, 3).requires_grad_()
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w, b: fuse_conv_bn(w, b, bn), (weight, bias))


@pytest.mark.parametrize("with_bias", [True, False])
def test_fuse_conv_bn_gradients_match_conv_then_bn(with_bias):
    """Gradients w.r.t. the conv weight/bias and the BN affine parameters equal those of conv -> BN (eval)."""
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64)
    grad_out = torch.randn(2, 6, 7, 7, dtype=torch.float64)
    weight = random_kernel(6, 6, 6, 3).requires_grad_()
    bias = torch.randn(6, dtype=torch.float64, requires_grad=True) if with_bias else None
    bn = random_bn(6)
    leaves = [weight, bn.weight, bn.bias] + ([bias] if with_bias else [])

    direct = torch.autograd.grad(bn(F.conv2d(x, weight, bias, padding=1, groups=6)), leaves, grad_out)
    fused_weight, fused_bias = fuse_conv_bn(weight, bias, bn)
    fused = torch.autograd.grad(F.conv2d(x, fused_weight, fused_bias, padding=1, groups=6), leaves, grad_out)
    for name, got, want in zip(["weight", "bn.weight", "bn.bias", "bias"], fused, direct):
        assert got.abs().sum() > 0, f"no gradient reaches {name}"
        assert_close(got, want, F64, f"grad {name}")


def test_fuse_conv_bn_errors():
    weight = random_kernel(4, 4, 1, 3)
    with pytest.raises(ValueError, match=r"bn must track running statistics"):
        fuse_conv_bn(weight, None, nn.BatchNorm2d(4, track_running_stats=False, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"bn must have the conv's out_channels 4 features; got 5"):
        fuse_conv_bn(weight, None, random_bn(5))
    with pytest.raises(ValueError, match=r"bias must have shape \(4,\); got \(5,\)"):
        fuse_conv_bn(weight, torch.zeros(5, dtype=weight.dtype), random_bn(4))
    with pytest.raises(TypeError, match=r"bn must be a BatchNorm module \(with running_mean, running_var and eps\); got LayerNorm"):
        fuse_conv_bn(weight, None, nn.LayerNorm(4))
    with pytest.raises(ValueError, match=r"weight must be a 4-D conv weight"):
        fuse_conv_bn(weight[0], None, random_bn(4))


# --------------------------------------------------------------------------------------------------------------
# pad_kernel


@pytest.mark.parametrize(
    "kernel_size,size",
    [((3, 3), 7), ((3, 3), (7, 7)), ((3, 5), (7, 9)), ((1, 1), (5, 3)), ((5, 3), (5, 7)), ((3, 3), 3)],
)
@pytest.mark.parametrize("in_channels,out_channels,groups", [(4, 6, 1), (6, 6, 6)])
def test_pad_kernel_keeps_conv_output(kernel_size, size, in_channels, out_channels, groups):
    kernel = random_kernel(out_channels, in_channels, groups, kernel_size)
    x = torch.randn(2, in_channels, 8, 11, dtype=torch.float64)
    padded = pad_kernel(kernel, size)
    height, width = (size, size) if isinstance(size, int) else size
    assert padded.shape == (*kernel.shape[:2], height, width)
    grow_h, grow_w = (height - kernel.shape[-2]) // 2, (width - kernel.shape[-1]) // 2
    # the original sits in the centre and everything else is zero
    assert torch.equal(padded[..., grow_h:grow_h + kernel.shape[-2], grow_w:grow_w + kernel.shape[-1]], kernel)
    outside = padded.clone()
    outside[..., grow_h:grow_h + kernel.shape[-2], grow_w:grow_w + kernel.shape[-1]] = 0
    assert not outside.any()
    for padding in [(0, 0), same_padding(kernel), (1, 2)]:
        expected = F.conv2d(x, kernel, padding=padding, groups=groups)
        actual = F.conv2d(x, padded, padding=(padding[0] + grow_h, padding[1] + grow_w), groups=groups)
        assert_close(actual, expected, F64, f"padding {padding}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_pad_kernel_dtype_aliasing_and_gradient(dtype):
    kernel = random_kernel(4, 4, 4, 3, dtype=dtype)
    before = snapshot(kernel)
    for size in [3, 5]:
        padded = pad_kernel(kernel, size)
        assert padded.dtype == dtype and padded.device == kernel.device
        assert_not_aliasing(padded, kernel)
    assert_unchanged(before, [kernel])
    if dtype == torch.float64:
        leaf = kernel.clone().requires_grad_()
        assert torch.autograd.gradcheck(lambda k: pad_kernel(k, (5, 7)), (leaf,))


@pytest.mark.parametrize("size", [1, (3, 1), (5, 4), (4, 5), 6])
def test_pad_kernel_rejects_smaller_or_odd_growth(size):
    kernel = random_kernel(4, 4, 1, 3)
    with pytest.raises(ValueError, match=r"size must be at least the kernel's \(3, 3\)"):
        pad_kernel(kernel, size)


@pytest.mark.parametrize("size", [(5, 5, 5), "5", 5.0, (5, 5.0)])
def test_pad_kernel_rejects_non_int_size(size):
    with pytest.raises(TypeError, match=r"size must be an int or a pair of ints"):
        pad_kernel(random_kernel(4, 4, 1, 3), size)


# --------------------------------------------------------------------------------------------------------------
# identity_kernel


@pytest.mark.parametrize("channels,groups", [(6, 1), (6, 2), (6, 6)])
@pytest.mark.parametrize("kernel_size", [1, 3, (3, 5)])
def test_identity_kernel_returns_input(channels, groups, kernel_size):
    kernel = identity_kernel(channels, groups, kernel_size, dtype=torch.float64)
    kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
    assert kernel.shape == (channels, channels // groups, kh, kw)
    assert kernel.sum() == channels  # exactly one tap per output channel
    x = torch.randn(2, channels, 7, 9, dtype=torch.float64)
    y = F.conv2d(x, kernel, padding=(kh // 2, kw // 2), groups=groups)
    assert torch.equal(y, x)


@pytest.mark.parametrize("dtype", DTYPES)
def test_identity_kernel_dtype_and_device(dtype):
    kernel = identity_kernel(4, 2, 3, dtype=dtype, device="cpu")
    assert kernel.dtype == dtype and kernel.device == torch.device("cpu")
    assert identity_kernel(4).dtype == torch.get_default_dtype()


def test_identity_kernel_errors():
    with pytest.raises(ValueError, match=r"kernel_size must be odd"):
        identity_kernel(4, 1, 2)
    with pytest.raises(ValueError, match=r"kernel_size must be odd"):
        identity_kernel(4, 1, (3, 4))
    with pytest.raises(ValueError, match=r"channels must be divisible by groups; got channels=6, groups=4"):
        identity_kernel(6, 4, 3)
    with pytest.raises(ValueError, match=r"channels and groups must be positive ints"):
        identity_kernel(0, 1, 3)
    with pytest.raises(ValueError, match=r"channels and groups must be positive ints"):
        identity_kernel(4, 0, 3)
    with pytest.raises(ValueError, match=r"channels and groups must be positive ints; got channels=True"):
        identity_kernel(True, 1, 3)
    with pytest.raises(TypeError, match=r"kernel_size must be an int or a pair of ints"):
        identity_kernel(4, 1, (3, 3, 3))


# --------------------------------------------------------------------------------------------------------------
# dilated_to_dense


@pytest.mark.parametrize("kernel_size", [3, (5, 3), (1, 3)])
@pytest.mark.parametrize("dilation", [1, 2, 3, (2, 3), (1, 4)])
@pytest.mark.parametrize("in_channels,out_channels,groups", [(4, 6, 1), (6, 12, 6)])
def test_dilated_to_dense_equals_dilated_conv(kernel_size, dilation, in_channels, out_channels, groups):
    kernel = random_kernel(out_channels, in_channels, groups, kernel_size)
    dense = dilated_to_dense(kernel, dilation)
    dh, dw = (dilation, dilation) if isinstance(dilation, int) else dilation
    kh, kw = kernel.shape[-2:]
    assert dense.shape == (*kernel.shape[:2], dh * (kh - 1) + 1, dw * (kw - 1) + 1)
    x = torch.randn(2, in_channels, 16, 15, dtype=torch.float64)
    for padding in [(dh * (kh - 1) // 2, dw * (kw - 1) // 2), (0, 0), (1, 3)]:
        expected = F.conv2d(x, kernel, padding=padding, dilation=(dh, dw), groups=groups)
        actual = F.conv2d(x, dense, padding=padding, groups=groups)
        assert_close(actual, expected, F64, f"dilation {dilation} padding {padding}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_dilated_to_dense_dtype_and_aliasing(dtype):
    kernel = random_kernel(4, 4, 4, 3, dtype=dtype)
    before = snapshot(kernel)
    for dilation in [1, 2]:
        dense = dilated_to_dense(kernel, dilation)
        assert dense.dtype == dtype and dense.device == kernel.device
        assert_not_aliasing(dense, kernel)
    assert_unchanged(before, [kernel])


def test_dilated_to_dense_gradcheck():
    kernel = random_kernel(3, 3, 3, (3, 5)).requires_grad_()
    assert torch.autograd.gradcheck(lambda k: dilated_to_dense(k, (2, 3)), (kernel,))


@pytest.mark.parametrize("dilation", [0, (1, 0), (0, 2), -1])
def test_dilated_to_dense_rejects_dilation_below_one(dilation):
    with pytest.raises(ValueError, match=r"dilation must be >= 1"):
        dilated_to_dense(random_kernel(4, 4, 4, 3), dilation)


def test_dilated_to_dense_rejects_bad_kernel():
    with pytest.raises(ValueError, match=r"kernel must be a 4-D conv weight"):
        dilated_to_dense(torch.randn(4, 3, 3), 2)
    with pytest.raises(TypeError, match=r"dilation must be an int or a pair of ints"):
        dilated_to_dense(random_kernel(4, 4, 4, 3), 2.0)


# --------------------------------------------------------------------------------------------------------------
# merge_branches


@pytest.mark.parametrize("in_channels,out_channels,groups", CONV_CASES)
@pytest.mark.parametrize(
    "sizes,biases",
    [
        ([3, 1], [True, True]),
        ([5, 3, 1], [True, False, True]),
        ([(5, 3), (3, 5), 3], [False, False, True]),
        ([7], [True]),
    ],
)
def test_merge_branches_equals_sum_of_branches(in_channels, out_channels, groups, sizes, biases):
    branches = [
        (random_kernel(out_channels, in_channels, groups, size),
         torch.randn(out_channels, dtype=torch.float64) if has_bias else None)
        for size, has_bias in zip(sizes, biases)
    ]
    x = torch.randn(2, in_channels, 10, 9, dtype=torch.float64)
    expected = sum(F.conv2d(x, w, b, padding=same_padding(w), groups=groups) for w, b in branches)
    weight, bias = merge_branches(branches)
    largest = (max(w.shape[-2] for w, _ in branches), max(w.shape[-1] for w, _ in branches))
    assert weight.shape[-2:] == largest
    assert_close(F.conv2d(x, weight, bias, padding=same_padding(weight), groups=groups), expected, F64, "merged")

    # an explicit, larger kernel size gives the same conv
    weight9, bias9 = merge_branches(branches, (9, 11))
    assert weight9.shape[-2:] == (9, 11)
    assert_close(F.conv2d(x, weight9, bias9, padding=(4, 5), groups=groups), expected, F64, "merged to 9x11")


def test_merge_branches_bias_is_none_only_without_any_bias():
    w1, w2 = random_kernel(4, 4, 1, 3), random_kernel(4, 4, 1, 1)
    assert merge_branches([(w1, None), (w2, None)])[1] is None
    b2 = torch.randn(4, dtype=torch.float64)
    bias = merge_branches([(w1, None), (w2, b2)])[1]
    assert bias is not None and torch.equal(bias, b2)
    b1 = torch.randn(4, dtype=torch.float64)
    assert torch.allclose(merge_branches([(w1, b1), (w2, b2)])[1], b1 + b2, rtol=0, atol=1e-15)


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_branches_dtype_aliasing_and_arguments(dtype):
    w1, b1 = random_kernel(4, 4, 4, 3, dtype=dtype), torch.randn(4, dtype=dtype)
    w2, b2 = random_kernel(4, 4, 4, 1, dtype=dtype), torch.randn(4, dtype=dtype)
    before = snapshot(w1, b1, w2, b2)
    for branches in ([(w1, b1)], [(w1, b1), (w2, b2)]):
        weight, bias = merge_branches(branches)
        assert weight.dtype == dtype and bias.dtype == dtype
        assert_not_aliasing(weight, w1, w2, b1, b2)
        assert_not_aliasing(bias, w1, w2, b1, b2)
    assert_unchanged(before, [w1, b1, w2, b2])


def test_merge_branches_gradcheck():
    w1 = random_kernel(3, 3, 3, 3).requires_grad_()
    w2 = random_kernel(3, 3, 3, (1, 3)).requires_grad_()
    b1 = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: merge_branches([(a, c), (b, None)], 5), (w1, w2, b1))


def test_merge_branches_errors():
    with pytest.raises(ValueError, match=r"branches must hold at least one"):
        merge_branches([])
    w = random_kernel(4, 4, 1, 3)
    with pytest.raises(ValueError, match=r"branches must share \(out_channels, in_channels/groups\)"):
        merge_branches([(w, None), (random_kernel(4, 4, 2, 3), None)])
    with pytest.raises(ValueError, match=r"branches must share \(out_channels, in_channels/groups\)"):
        merge_branches([(w, None), (random_kernel(6, 4, 1, 3), None)])
    with pytest.raises(ValueError, match=r"branches\[1\] weight must be a 4-D conv weight"):
        merge_branches([(w, None), (torch.randn(4, 4, 3), None)])
    with pytest.raises(ValueError, match=r"size must be at least"):
        merge_branches([(random_kernel(4, 4, 1, 5), None), (w, None)], 3)
    with pytest.raises(ValueError, match=r"size must be at least"):
        merge_branches([(random_kernel(4, 4, 1, 5), None), (random_kernel(4, 4, 1, 2), None)])


# --------------------------------------------------------------------------------------------------------------
# refocused_kernel


def cross_correlate_same(image, kernel):
    """2-D cross-correlation of one (H, W) image with one (r_h, r_w) kernel, zero 'same' padding, by explicit taps."""
    r_h, r_w = kernel.shape
    padded = F.pad(image, (r_w // 2, r_w // 2, r_h // 2, r_h // 2))
    out = torch.zeros_like(image)
    height, width = image.shape
    for a, b in itertools.product(range(r_h), range(r_w)):
        out = out + kernel[a, b] * padded[a:a + height, b:b + width]
    return out


def refocused_reference(base, refocus):
    """W_b + W_b ⊛ W_r written out map by map: the base kernels form a bank of C_out·C_in/g 2-D maps; output map
    m of the refocusing conv reads the n input maps of its group (n = refocus.shape[1])."""
    maps = base.reshape(-1, *base.shape[-2:])
    n = refocus.shape[1]
    refocused = torch.zeros_like(maps)
    for m in range(maps.shape[0]):
        first = (m // n) * n  # groups of the refocusing conv hold n maps in and n maps out
        for j in range(n):
            refocused[m] += cross_correlate_same(maps[first + j], refocus[m, j])
    return base + refocused.reshape(base.shape)


# (in_channels, out_channels, groups, base kernel, refocus kernel): refocus is (maps, n, r_h, r_w) with
# n = maps / (C_in·C_out/g²) as RefConv builds it: depthwise mixes all C maps, dense refocuses each map alone.
REFOCUS_CASES = [
    pytest.param(5, 5, 5, 7, 3, id="depthwise"),
    pytest.param(4, 4, 4, (5, 7), 3, id="depthwise-nonsquare"),
    pytest.param(4, 6, 2, 3, 3, id="grouped"),
    pytest.param(3, 2, 1, 3, 3, id="dense"),
    pytest.param(3, 2, 1, 5, (5, 3), id="dense-r5x3"),
]


def make_refocus(in_channels, out_channels, groups, map_k):
    maps = out_channels * (in_channels // groups)
    n = maps // (in_channels * out_channels // groups**2)
    r_h, r_w = (map_k, map_k) if isinstance(map_k, int) else map_k
    return torch.randn(maps, n, r_h, r_w, dtype=torch.float64)


@pytest.mark.parametrize("in_channels,out_channels,groups,kernel_size,map_k", REFOCUS_CASES)
def test_refocused_kernel_matches_reference(in_channels, out_channels, groups, kernel_size, map_k):
    base = random_kernel(out_channels, in_channels, groups, kernel_size)
    refocus = make_refocus(in_channels, out_channels, groups, map_k)
    before = snapshot(base, refocus)
    result = refocused_kernel(base, refocus)
    assert result.shape == base.shape
    assert_close(result, refocused_reference(base, refocus), F64, "refocused kernel")
    assert_unchanged(before, [base, refocus])
    assert_not_aliasing(result, base, refocus)


def test_refocused_kernel_depthwise_refocus_shape():
    """For a depthwise base (C, 1, k, k) the refocusing kernel is (C, C, 3, 3): every map mixes all channels."""
    base = random_kernel(4, 4, 4, 5)
    refocus = torch.zeros(4, 4, 3, 3, dtype=torch.float64)
    refocus[0, 3, 1, 1] = 2.0  # map 0 gets twice map 3 added
    result = refocused_kernel(base, refocus)
    assert torch.equal(result[0, 0], base[0, 0] + 2 * base[3, 0])
    assert torch.equal(result[1:], base[1:])


def test_refocused_kernel_zero_refocus_gives_base():
    base = random_kernel(6, 6, 6, 7)
    assert torch.equal(refocused_kernel(base, torch.zeros(6, 6, 3, 3, dtype=torch.float64)), base)


@pytest.mark.parametrize("dtype", DTYPES)
def test_refocused_kernel_dtype(dtype):
    base = random_kernel(4, 4, 4, 5, dtype=dtype)
    refocus = torch.randn(4, 4, 3, 3, dtype=dtype)
    result = refocused_kernel(base, refocus)
    assert result.dtype == dtype and result.device == base.device
    expected = refocused_reference(base.double(), refocus.double())
    assert_close(result, expected, TOLERANCE[dtype], "refocused")


@pytest.mark.parametrize("in_channels,out_channels,groups,kernel_size,map_k", REFOCUS_CASES[:4])
def test_refocused_kernel_gradcheck(in_channels, out_channels, groups, kernel_size, map_k):
    base = random_kernel(out_channels, in_channels, groups, kernel_size).requires_grad_()
    refocus = make_refocus(in_channels, out_channels, groups, map_k).requires_grad_()
    assert torch.autograd.gradcheck(refocused_kernel, (base, refocus))


@pytest.mark.parametrize(
    "refocus_shape",
    [(5, 4, 3, 3), (4, 3, 3, 3), (4, 4, 2, 2), (4, 4, 3, 4), (8, 4, 3, 3)],
    ids=["wrong-maps", "n-not-dividing", "even-r", "even-rw", "too-many-maps"],
)
def test_refocused_kernel_rejects_bad_refocus_shape(refocus_shape):
    base = random_kernel(4, 4, 4, 5)
    with pytest.raises(ValueError, match=r"refocus must have shape \(4, n, r, r\)"):
        refocused_kernel(base, torch.randn(*refocus_shape, dtype=torch.float64))


def test_refocused_kernel_rejects_non_4d():
    with pytest.raises(ValueError, match=r"base must be a 4-D conv weight"):
        refocused_kernel(torch.randn(4, 5, 5), torch.randn(4, 4, 3, 3))
    with pytest.raises(ValueError, match=r"refocus must be a 4-D conv weight"):
        refocused_kernel(torch.randn(4, 1, 5, 5), torch.randn(4, 4, 3))


def test_fuse_conv_bn_accepts_a_frozen_batchnorm():
    """Detection backbones use FrozenBatchNorm2d-style modules: buffers only, no nn.BatchNorm base class."""

    class FrozenBatchNorm2d(nn.Module):
        def __init__(self, n):
            super().__init__()
            for name, value in (("weight", torch.rand(n) + 0.5), ("bias", torch.randn(n)),
                                ("running_mean", torch.randn(n)), ("running_var", torch.rand(n) + 0.5)):
                self.register_buffer(name, value.double())
            self.eps = 1e-5

        def forward(self, x):
            scale = self.weight / (self.running_var + self.eps).sqrt()
            return x * scale.view(1, -1, 1, 1) + (self.bias - self.running_mean * scale).view(1, -1, 1, 1)

    bn = FrozenBatchNorm2d(6)
    weight, x = torch.randn(6, 3, 3, 3, dtype=torch.float64), torch.randn(2, 3, 8, 8, dtype=torch.float64)
    fused_weight, fused_bias = fuse_conv_bn(weight, None, bn)
    assert_close(F.conv2d(x, fused_weight, fused_bias, padding=1), bn(F.conv2d(x, weight, padding=1)),
                 TOLERANCE[torch.float64], "frozen BN fuse")


def test_pairs_reject_bools():
    with pytest.raises(TypeError, match=r"kernel_size must be an int or a pair of ints"):
        identity_kernel(4, 1, (3, True))
    with pytest.raises(TypeError, match=r"size must be an int or a pair of ints"):
        pad_kernel(torch.zeros(2, 1, 3, 3), (True, 5))
