"""lkconv.DepthwiseConv2d as a drop-in nn.Conv2d(groups=C), and lkconv.convert / lkconv.revert on whole models."""

import copy
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lkconv
from conftest import TOLERANCE, assert_close, reference

DTYPES = [torch.float64, torch.float32]
PADDING_MODES = ["zeros", "reflect", "replicate", "circular"]


@pytest.fixture(autouse=True)
def reset_backend():
    yield
    lkconv.set_backend(None)


def equivalent_conv2d(in_channels, kernel_size, depth_multiplier=1, **kwargs):
    return nn.Conv2d(in_channels, in_channels * depth_multiplier, kernel_size, groups=in_channels, **kwargs)


def run_with_grads(module, x, grad_output):
    """Output and (input, weight, bias) grads of `module` on a fresh leaf copy of `x`."""
    x = x.detach().clone().requires_grad_()
    module.zero_grad(set_to_none=True)
    y = module(x)
    y.backward(grad_output)
    return y.detach(), x.grad, module.weight.grad, None if module.bias is None else module.bias.grad


def fp64_reference(conv, x, grad_output):
    """The same layer as a float64 nn.Conv2d (F.pad + F.conv2d) and its autograd: output and grads."""
    ref = nn.Conv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
        groups=conv.groups, bias=conv.bias is not None, padding_mode=conv.padding_mode, dtype=torch.float64,
    )
    ref.load_state_dict({k: v.double() for k, v in conv.state_dict().items()})
    return run_with_grads(ref, x.double(), grad_output.double())


def assert_matches_reference(module, x, what):
    """Runs `module` forward and backward and compares output and every grad with the float64 nn.Conv2d."""
    with torch.no_grad():
        out_shape = module(x).shape
    grad_output = torch.randn(out_shape, dtype=x.dtype)
    actual = run_with_grads(module, x, grad_output)
    expected = fp64_reference(module, x, grad_output)
    tolerance = TOLERANCE[x.dtype]
    for name, a, e in zip(("output", "grad_input", "grad_weight", "grad_bias"), actual, expected):
        if e is None:
            assert a is None, f"{what}: {name} should be None"
            continue
        assert a is not None, f"{what}: {name} missing"
        assert a.dtype == x.dtype, f"{what}: {name} has dtype {a.dtype}"
        assert_close(a, e, tolerance, f"{what} {name}")


# --- structure: type, parameters, initialisation, repr ------------------------------------------------------------


@pytest.mark.parametrize("depth_multiplier", [1, 2, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_is_an_nn_conv2d_with_depthwise_groups(depth_multiplier, bias):
    layer = lkconv.DepthwiseConv2d(5, (7, 3), bias=bias, depth_multiplier=depth_multiplier)
    assert isinstance(layer, nn.Conv2d)
    assert layer.groups == layer.in_channels == 5
    assert layer.out_channels == 5 * depth_multiplier
    assert layer.depth_multiplier == depth_multiplier
    assert tuple(layer.weight.shape) == (5 * depth_multiplier, 1, 7, 3)
    assert (layer.bias is not None) == bias


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kernel_size=7),
        dict(kernel_size=(13, 5), depth_multiplier=2, bias=False),
        dict(kernel_size=(4, 6), padding="same", padding_mode="reflect", depth_multiplier=3),
        dict(kernel_size=5, stride=2, padding=(2, 1), dilation=(1, 2), padding_mode="circular"),
    ],
)
def test_parameter_names_and_shapes_match_nn_conv2d(kwargs):
    kwargs = dict(kwargs)
    kernel_size = kwargs.pop("kernel_size")
    multiplier = kwargs.pop("depth_multiplier", 1)
    layer = lkconv.DepthwiseConv2d(6, kernel_size, depth_multiplier=multiplier, **kwargs)
    conv = equivalent_conv2d(6, kernel_size, multiplier, **kwargs)
    assert [(n, p.shape) for n, p in layer.named_parameters()] == [(n, p.shape) for n, p in conv.named_parameters()]
    assert [(k, v.shape) for k, v in layer.state_dict().items()] == [(k, v.shape) for k, v in conv.state_dict().items()]


@pytest.mark.parametrize("depth_multiplier", [1, 2])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kernel_size", [7, (13, 5)])
def test_initialisation_is_bit_identical_to_nn_conv2d_under_the_same_seed(depth_multiplier, bias, kernel_size):
    torch.manual_seed(1234)
    layer = lkconv.DepthwiseConv2d(8, kernel_size, bias=bias, depth_multiplier=depth_multiplier)
    torch.manual_seed(1234)
    conv = equivalent_conv2d(8, kernel_size, depth_multiplier, bias=bias)
    assert torch.equal(layer.weight, conv.weight)
    if bias:
        assert torch.equal(layer.bias, conv.bias)
    # The init is random, not a constant: a different seed gives different weights.
    torch.manual_seed(4321)
    other = lkconv.DepthwiseConv2d(8, kernel_size, bias=bias, depth_multiplier=depth_multiplier)
    assert not torch.equal(other.weight, layer.weight)


def test_device_and_dtype_arguments_are_honoured():
    layer = lkconv.DepthwiseConv2d(3, 5, dtype=torch.float64)
    assert layer.weight.dtype == layer.bias.dtype == torch.float64
    meta = lkconv.DepthwiseConv2d(3, 5, device="meta")
    assert meta.weight.device.type == "meta" and meta.bias.device.type == "meta"


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kernel_size=7),
        dict(kernel_size=(13, 5), depth_multiplier=2, bias=False, padding=(6, 2)),
        dict(kernel_size=(4, 6), padding="same", padding_mode="reflect"),
        dict(kernel_size=5, stride=2, padding=2, dilation=(1, 2), padding_mode="circular", depth_multiplier=3),
        dict(kernel_size=3, padding="valid", padding_mode="replicate"),
    ],
)
def test_repr_equals_nn_conv2d_repr_apart_from_class_name(kwargs):
    kwargs = dict(kwargs)
    kernel_size = kwargs.pop("kernel_size")
    multiplier = kwargs.pop("depth_multiplier", 1)
    layer = lkconv.DepthwiseConv2d(4, kernel_size, depth_multiplier=multiplier, **kwargs)
    conv = equivalent_conv2d(4, kernel_size, multiplier, **kwargs)
    assert repr(layer).startswith("DepthwiseConv2d(")
    assert repr(layer) == "Depthwise" + repr(conv)


@pytest.mark.parametrize("depth_multiplier", [0, -1, 1.5, True, "2", None])
def test_bad_depth_multiplier_raises_value_error_naming_it(depth_multiplier):
    with pytest.raises(ValueError, match=r"depth_multiplier.*" + re.escape(repr(depth_multiplier))):
        lkconv.DepthwiseConv2d(4, 7, depth_multiplier=depth_multiplier)


def test_numpy_integers_are_accepted_like_nn_conv2d_and_stored_as_ints():
    layer = lkconv.DepthwiseConv2d(np.int64(4), (np.int64(5), 3), depth_multiplier=np.int32(2))
    assert layer.weight.shape == (8, 1, 5, 3) and layer.depth_multiplier == 2
    assert type(layer.in_channels) is int and all(type(k) is int for k in layer.kernel_size)
    # uint8 arithmetic would wrap 128 * 2 to 0 channels: the sizes are converted before they multiply.
    assert lkconv.DepthwiseConv2d(np.uint8(128), 3, depth_multiplier=np.uint8(2)).weight.shape == (256, 1, 3, 3)
    assert lkconv.DepthwiseConv2d(4, np.array([5, 3])).kernel_size == (5, 3)


@pytest.mark.parametrize("in_channels", [0, -2, 2.0, True, None, torch.tensor(4.0)])
def test_bad_in_channels_raises_value_error_naming_it(in_channels):
    """nn.Conv2d would blame `groups`, which the caller never passed."""
    with pytest.raises(ValueError, match=r"in_channels.*" + re.escape(repr(in_channels))):
        lkconv.DepthwiseConv2d(in_channels, 7)


@pytest.mark.parametrize("kernel_size", [0, (3, 0), -1, (3,), (3, 3, 3), 2.5, (3, True)])
def test_bad_kernel_size_raises_value_error_naming_it(kernel_size):
    """At construction, where nn.Conv2d accepts 0 and fails only in forward."""
    with pytest.raises(ValueError, match=r"kernel_size.*" + re.escape(repr(kernel_size))):
        lkconv.DepthwiseConv2d(4, kernel_size)


# --- state_dict interchange ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("depth_multiplier", [1, 2])
def test_state_dict_loads_from_nn_conv2d_and_outputs_match_f_conv2d(dtype, bias, depth_multiplier):
    conv = equivalent_conv2d(5, (9, 5), depth_multiplier, padding=(4, 2), bias=bias, dtype=dtype)
    torch.manual_seed(7)
    layer = lkconv.DepthwiseConv2d(5, (9, 5), padding=(4, 2), bias=bias, depth_multiplier=depth_multiplier, dtype=dtype)
    assert not torch.equal(layer.weight, conv.weight)
    layer.load_state_dict(conv.state_dict(), strict=True)
    assert torch.equal(layer.weight, conv.weight)
    x = torch.randn(2, 5, 11, 10, dtype=dtype)
    expected = reference(x, conv.weight, conv.bias, 1, (4, 2), 1)[0]
    assert_close(layer(x), expected, TOLERANCE[dtype], "DepthwiseConv2d after loading nn.Conv2d's state_dict")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("depth_multiplier", [1, 3])
def test_state_dict_loads_into_nn_conv2d_and_outputs_match(dtype, bias, depth_multiplier):
    layer = lkconv.DepthwiseConv2d(3, 7, padding=3, bias=bias, depth_multiplier=depth_multiplier, dtype=dtype)
    conv = equivalent_conv2d(3, 7, depth_multiplier, padding=3, bias=bias, dtype=dtype)
    conv.load_state_dict(layer.state_dict(), strict=True)
    x = torch.randn(2, 3, 9, 12, dtype=dtype)
    expected = reference(x, layer.weight, layer.bias, 1, 3, 1)[0]
    assert_close(conv(x), expected, TOLERANCE[dtype], "nn.Conv2d after loading DepthwiseConv2d's state_dict")
    assert_close(layer(x), expected, TOLERANCE[dtype], "DepthwiseConv2d")


# --- forward and backward against nn.Conv2d ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel_size", [(5, 3), (4, 6)])
@pytest.mark.parametrize("padding", [0, 2, (3, 1), "same", "valid"])
@pytest.mark.parametrize("padding_mode", PADDING_MODES)
def test_padding_modes_match_nn_conv2d_output_and_grads(padding_mode, padding, kernel_size, dtype):
    torch.manual_seed(0)
    layer = lkconv.DepthwiseConv2d(3, kernel_size, padding=padding, padding_mode=padding_mode, dtype=dtype)
    x = torch.randn(2, 3, 9, 10, dtype=dtype)
    assert_matches_reference(layer, x, f"padding_mode={padding_mode} padding={padding} kernel={kernel_size}")


CONFIGS = [
    dict(kernel_size=7, padding=3),
    dict(kernel_size=7, padding=3, depth_multiplier=2),
    dict(kernel_size=(5, 3), padding=(2, 1), depth_multiplier=3),
    dict(kernel_size=7, padding=3, bias=False),
    dict(kernel_size=5, stride=2, padding=2),
    dict(kernel_size=(6, 3), stride=(2, 1), padding=(1, 2), depth_multiplier=2),
    dict(kernel_size=3, dilation=2, padding=2),
    dict(kernel_size=(3, 5), dilation=(3, 1), padding="same", padding_mode="reflect"),
    dict(kernel_size=(1, 7), padding=(0, 3)),
    dict(kernel_size=(9, 3), padding=(4, 1), padding_mode="circular"),
    dict(kernel_size=(13, 5), padding=(6, 2), stride=2, bias=False),
    dict(kernel_size=11, padding=5),  # kernel larger than the 7x8 map
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_configurations_match_nn_conv2d_output_and_grads(config, dtype):
    torch.manual_seed(1)
    layer = lkconv.DepthwiseConv2d(4, dtype=dtype, **config)
    x = torch.randn(2, 4, 7, 8, dtype=dtype)
    assert_matches_reference(layer, x, str(config))


@pytest.mark.parametrize("padding_mode", PADDING_MODES)
def test_forward_runs_lkconv_depthwise_conv2d_in_every_padding_mode(padding_mode, monkeypatch):
    calls = []
    original = lkconv.modules.depthwise_conv2d

    def spy(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(lkconv.modules, "depthwise_conv2d", spy)
    layer = lkconv.DepthwiseConv2d(3, 5, padding=2, padding_mode=padding_mode, dtype=torch.float64)
    x = torch.randn(1, 3, 6, 7, dtype=torch.float64)
    assert_matches_reference(layer, x, padding_mode)
    assert len(calls) == 2  # one for the shape, one for the checked forward


@pytest.mark.parametrize("padding_mode", PADDING_MODES)
def test_torch_fx_symbolic_trace_records_each_layer_as_one_call(padding_mode):
    """torch.fx traces into the module (it is not in torch.nn) and records lkconv.depthwise_conv2d as one call per
    layer, as it records F.conv2d; the traced graph computes what float64 PyTorch does, forward and backward."""
    model = nn.Sequential(
        lkconv.DepthwiseConv2d(3, 5, padding=2, padding_mode=padding_mode, dtype=torch.float64), nn.GELU(),
        lkconv.DepthwiseConv2d(3, (3, 4), stride=2, padding=1, padding_mode=padding_mode, depth_multiplier=2,
                               dtype=torch.float64),
    )
    traced = torch.fx.symbolic_trace(model)
    assert [node.target for node in traced.graph.nodes if node.target is lkconv.depthwise_conv2d] == \
        [lkconv.depthwise_conv2d] * 2
    plain = lkconv.revert(model)
    x = torch.randn(2, 3, 9, 10, dtype=torch.float64, requires_grad=True)
    actual, expected = traced(x), plain(x)
    assert_close(actual, expected, TOLERANCE[torch.float64], "traced output")
    grads = torch.autograd.grad(actual.sum(), (x, traced.get_submodule("2").weight))
    wanted = torch.autograd.grad(expected.sum(), (x, plain[2].weight))
    for got, want, what in zip(grads, wanted, ("input", "weight")):
        assert_close(got, want, TOLERANCE[torch.float64], f"traced {what} grad")


def test_torch_jit_script_refuses_clearly_and_leaves_the_model_alone():
    """TorchScript cannot compile lkconv's Python: scripting a model names the layer and the way out (revert),
    before anything in the model is touched; the reverted model scripts and computes the same conv."""
    model = nn.Sequential(nn.GELU(), lkconv.DepthwiseConv2d(3, (3, 4), stride=2, padding=1, depth_multiplier=2,
                                                            dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"torch.jit.script cannot compile lkconv.DepthwiseConv2d \(3, 6, "
                                           r"kernel_size=\(3, 4\).*lkconv.revert\(model\)"):
        torch.jit.script(model)
    assert isinstance(model[1], lkconv.DepthwiseConv2d)
    x = torch.randn(2, 3, 9, 10, dtype=torch.float64)
    scripted = torch.jit.script(lkconv.revert(model))
    assert_close(scripted(x), model(x), TOLERANCE[torch.float64], "scripted reverted model")


def test_torch_jit_trace_refuses_clearly_and_the_reverted_model_traces():
    model = nn.Sequential(lkconv.DepthwiseConv2d(3, 5, padding=2, dtype=torch.float64), nn.GELU())
    x = torch.randn(2, 3, 9, 10, dtype=torch.float64)
    for traced in (model, lambda t: lkconv.depthwise_conv2d(t, model[0].weight, None, 1, 2)):
        with pytest.raises(RuntimeError, match=r"torch.jit.trace cannot trace lkconv's depthwise conv: trace "
                                               r"lkconv.revert\(model\) instead"):
            torch.jit.trace(traced, x)
    plain = torch.jit.trace(lkconv.revert(model), x)
    assert_close(plain(x), model(x), TOLERANCE[torch.float64], "traced reverted model")


class SubclassedTensor(torch.Tensor):
    """A Tensor subclass (as torchvision's tv_tensors.Image is): it has __torch_function__, yet real sizes."""


def test_a_tensor_subclass_with_the_wrong_channel_count_is_refused():
    layer = lkconv.DepthwiseConv2d(3, 3, padding=1, depth_multiplier=2)
    with pytest.raises(ValueError, match=r"input must have in_channels = 3 channels \(dimension -3\) for "
                                         r"DepthwiseConv2d\(3, 6, .*got 6 channels"):
        layer(torch.randn(1, 6, 5, 5).as_subclass(SubclassedTensor))
    x = torch.randn(1, 3, 5, 5)
    assert torch.equal(layer(x.as_subclass(SubclassedTensor)).as_subclass(torch.Tensor), layer(x))


# --- from_conv2d ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("padding_mode", PADDING_MODES)
@pytest.mark.parametrize("bias", [True, False])
def test_from_conv2d_shares_parameters_and_gives_the_same_output(padding_mode, bias, dtype):
    conv = nn.Conv2d(4, 8, (7, 5), padding=(3, 2), groups=4, bias=bias, padding_mode=padding_mode, dtype=dtype)
    layer = lkconv.DepthwiseConv2d.from_conv2d(conv)
    assert type(layer) is lkconv.DepthwiseConv2d
    assert layer.weight is conv.weight
    assert layer.bias is conv.bias if bias else layer.bias is None
    assert layer.padding_mode == padding_mode and layer.depth_multiplier == 2
    assert list(layer.state_dict()) == list(conv.state_dict())
    x = torch.randn(2, 4, 9, 8, dtype=dtype)
    assert_matches_reference(layer, x, f"from_conv2d({padding_mode})")
    # Sharing is live: an in-place update to the conv's weight shows up in the layer.
    with torch.no_grad():
        conv.weight.mul_(-2.0)
    assert_close(layer(x), conv(x).detach(), TOLERANCE[dtype], "after an in-place update of the shared weight")
    assert type(conv) is nn.Conv2d


@pytest.mark.parametrize("not_a_conv2d", [nn.Linear(3, 3), nn.Conv1d(3, 3, 3, groups=3), nn.ConvTranspose2d(3, 3, 3, groups=3), "conv"])
def test_from_conv2d_rejects_non_conv2d_with_type_error(not_a_conv2d):
    with pytest.raises(TypeError, match=r"conv.*" + type(not_a_conv2d).__name__):
        lkconv.DepthwiseConv2d.from_conv2d(not_a_conv2d)


@pytest.mark.parametrize(
    "conv",
    [nn.Conv2d(3, 6, 7), nn.Conv2d(4, 8, 7, groups=2), nn.Conv2d(4, 2, 7, groups=2), nn.Conv2d(2, 2, 7)],
    ids=["dense", "grouped", "grouped-fewer-out", "dense-2ch"],
)
def test_from_conv2d_rejects_non_depthwise_with_value_error(conv):
    with pytest.raises(ValueError, match=rf"conv.*groups={conv.groups}"):
        lkconv.DepthwiseConv2d.from_conv2d(conv)


class _WeightStandardized(nn.Conv2d):
    """A conv subclass with its own forward, as weight-standardized convs are written."""

    def forward(self, x):
        return self._conv_forward(x, self.weight - self.weight.mean((1, 2, 3), keepdim=True), self.bias)


def test_from_conv2d_refuses_a_parametrized_conv_or_a_subclass_it_would_silently_change():
    """A parametrized conv keeps its weight in parametrizations, and a subclass may compute something else: a
    recast layer would drop both, so from_conv2d refuses them, naming the class."""
    parametrized = torch.nn.utils.parametrizations.weight_norm(nn.Conv2d(4, 4, 7, padding=3, groups=4))
    with pytest.raises(ValueError, match=r"conv \(ParametrizedConv2d.*is parametrized.*remove_parametrizations"):
        lkconv.DepthwiseConv2d.from_conv2d(parametrized)
    with pytest.raises(TypeError, match=r"conv must be exactly Conv2d or DepthwiseConv2d, not the subclass "
                                        r"_WeightStandardized"):
        lkconv.DepthwiseConv2d.from_conv2d(_WeightStandardized(4, 4, 7, padding=3, groups=4))
    # An exact DepthwiseConv2d is fine: the copy shares its parameters.
    layer = lkconv.DepthwiseConv2d(4, 7, padding=3)
    assert lkconv.DepthwiseConv2d.from_conv2d(layer).weight is layer.weight


# --- convert / revert -----------------------------------------------------------------------------------------------


class SubclassedConv(nn.Conv2d):
    """A user subclass of nn.Conv2d: convert must leave it alone."""


class Block(nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.large = nn.Conv2d(16, 16, 9, padding=4, groups=16, bias=False, padding_mode="reflect", dtype=dtype)
        self.norm = nn.BatchNorm2d(16, dtype=dtype)
        self.custom = SubclassedConv(16, 16, 7, padding=3, groups=16, dtype=dtype)

    def forward(self, x):
        return self.custom(self.norm(self.large(x))) + x


def make_model(dtype=torch.float64):
    model = nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1, dtype=dtype),  # dense
        nn.Conv2d(8, 8, 3, padding=1, groups=8, dtype=dtype),  # depthwise 3x3
        nn.BatchNorm2d(8, dtype=dtype),
        nn.ReLU(),
        nn.Sequential(
            nn.Conv2d(8, 8, 7, padding=3, groups=8, dtype=dtype),  # depthwise 7x7
            nn.Conv2d(8, 16, (13, 5), padding=(6, 2), groups=8, dtype=dtype),  # depthwise 13x5, multiplier 2
            nn.Conv2d(16, 16, 7, padding=3, groups=4, dtype=dtype),  # grouped, not depthwise
        ),
        Block(dtype),
    )
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn_like(m.running_mean))
                m.running_var.copy_(torch.rand_like(m.running_var) + 0.5)
                m.weight.copy_(torch.randn_like(m.weight))
                m.bias.copy_(torch.randn_like(m.bias))
    return model.eval()


DEPTHWISE_7_AND_UP = {"4.0", "4.1", "5.large"}


def eligible(module, min_kernel_size):
    return (
        type(module) is nn.Conv2d
        and module.groups == module.in_channels
        and module.out_channels % module.in_channels == 0
        and max(module.kernel_size) >= min_kernel_size
    )


def model_input(dtype=torch.float64):
    return torch.randn(2, 4, 12, 11, dtype=dtype)


def test_convert_replaces_exactly_the_large_depthwise_convs_by_default():
    model = make_model()
    converted = lkconv.convert(model)
    replaced = {name for name, m in converted.named_modules() if isinstance(m, lkconv.DepthwiseConv2d)}
    assert replaced == DEPTHWISE_7_AND_UP
    originals = dict(model.named_modules())
    for name, m in converted.named_modules():
        if name not in replaced:
            assert type(m) is type(originals[name]), name


@pytest.mark.parametrize("min_kernel_size", [1, 3, 7, 9, 13, 14, np.int64(7)])
def test_convert_respects_min_kernel_size(min_kernel_size):
    model = make_model()
    expected = {name for name, m in model.named_modules() if eligible(m, min_kernel_size)}
    converted = lkconv.convert(model, min_kernel_size=min_kernel_size)
    replaced = {name for name, m in converted.named_modules() if isinstance(m, lkconv.DepthwiseConv2d)}
    assert replaced == expected
    for name, m in converted.named_modules():
        if name in replaced:
            assert type(m) is lkconv.DepthwiseConv2d


@pytest.mark.parametrize("dtype", DTYPES)
def test_convert_not_inplace_leaves_the_original_untouched(dtype):
    model = make_model(dtype)
    x = model_input(dtype)
    types_before = {name: type(m) for name, m in model.named_modules()}
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    with lkconv.use_backend("torch"):
        before = model(x)
        converted = lkconv.convert(model, inplace=False)
        assert converted is not model
        assert {name: type(m) for name, m in model.named_modules()} == types_before
        assert not any(isinstance(m, lkconv.DepthwiseConv2d) for m in model.modules())
        assert torch.equal(model(x), before)
        assert torch.equal(converted(x), before)
    # The converted copy owns its parameters: changing them does not touch the original.
    with torch.no_grad():
        for p in converted.parameters():
            p.add_(1.0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state_before[k]), k


@pytest.mark.parametrize("dtype", DTYPES)
def test_convert_inplace_modifies_the_model_and_keeps_outputs_identical(dtype):
    model = make_model(dtype)
    x = model_input(dtype)
    parameters = {name: p for name, p in model.named_parameters()}
    with lkconv.use_backend("torch"):
        before = model(x)
        converted = lkconv.convert(model, inplace=True)
        assert converted is model
        assert {name for name, m in model.named_modules() if isinstance(m, lkconv.DepthwiseConv2d)} == DEPTHWISE_7_AND_UP
        assert all(p is parameters[name] for name, p in model.named_parameters())
        assert torch.equal(model(x), before)
    assert_close(before, reference_model_output(make_model_like(model), x), TOLERANCE[dtype], "converted model")


def make_model_like(model):
    """A float64 plain-PyTorch copy of `model` (every DepthwiseConv2d back to nn.Conv2d)."""
    plain = make_model(torch.float64)
    plain.load_state_dict({k: v.double() for k, v in model.state_dict().items()}, strict=True)
    return plain


def reference_model_output(plain_fp64, x):
    assert not any(isinstance(m, lkconv.DepthwiseConv2d) for m in plain_fp64.modules())
    return plain_fp64(x.double()).detach()


@pytest.mark.parametrize("dtype", DTYPES)
def test_revert_gives_plain_conv2d_with_same_state_dict_and_outputs(dtype):
    model = make_model(dtype)
    x = model_input(dtype)
    types_before = {name: type(m) for name, m in model.named_modules()}
    with lkconv.use_backend("torch"):
        converted = lkconv.convert(model)
        out_converted = converted(x)
        reverted = lkconv.revert(converted)
        # revert defaults to a copy: the converted model still holds its DepthwiseConv2d layers.
        assert {n for n, m in converted.named_modules() if isinstance(m, lkconv.DepthwiseConv2d)} == DEPTHWISE_7_AND_UP
        assert not any(isinstance(m, lkconv.DepthwiseConv2d) for m in reverted.modules())
        assert {name: type(m) for name, m in reverted.named_modules()} == types_before
        for name in DEPTHWISE_7_AND_UP:
            assert type(reverted.get_submodule(name)) is nn.Conv2d
        assert list(reverted.state_dict()) == list(converted.state_dict()) == list(model.state_dict())
        assert torch.equal(reverted(x), out_converted)
        assert torch.equal(model(x), out_converted)


def test_convert_revert_round_trip_preserves_state_dict_exactly():
    model = make_model(torch.float32)
    original = model.state_dict()
    round_trip = lkconv.revert(lkconv.convert(model)).state_dict()
    assert list(round_trip) == list(original)
    for key in original:
        assert round_trip[key].dtype == original[key].dtype
        assert torch.equal(round_trip[key], original[key]), key


@pytest.mark.parametrize("inplace", [False, True])
def test_convert_and_revert_a_root_depthwise_conv(inplace):
    conv = nn.Conv2d(3, 6, (7, 5), padding=(3, 2), groups=3, dtype=torch.float64)
    x = torch.randn(2, 3, 8, 9, dtype=torch.float64)
    expected = reference(x, conv.weight, conv.bias, 1, (3, 2), 1)[0]
    converted = lkconv.convert(conv, inplace=inplace)
    assert type(converted) is lkconv.DepthwiseConv2d
    assert type(conv) is nn.Conv2d
    assert_close(converted(x), expected, TOLERANCE[torch.float64], "converted root")
    reverted = lkconv.revert(converted, inplace=inplace)
    assert type(reverted) is nn.Conv2d
    assert_close(reverted(x), expected, TOLERANCE[torch.float64], "reverted root")


def test_revert_turns_a_directly_built_depthwise_conv2d_into_nn_conv2d():
    model = nn.Sequential(lkconv.DepthwiseConv2d(3, 7, padding=3, depth_multiplier=2, dtype=torch.float64), nn.ReLU())
    x = torch.randn(1, 3, 10, 9, dtype=torch.float64)
    expected = model(x).detach()
    reverted = lkconv.revert(model)
    assert type(reverted[0]) is nn.Conv2d
    assert isinstance(model[0], lkconv.DepthwiseConv2d)
    assert_close(reverted(x), expected, TOLERANCE[torch.float64], "reverted")


@pytest.mark.parametrize("inplace", [False, True])
def test_convert_and_revert_every_use_of_a_shared_layer_and_keep_it_shared(inplace):
    """A layer used at two places (tied weights) is one module listed once by named_children(): both uses are
    converted, and stay one shared layer, both ways."""
    conv = nn.Conv2d(4, 4, 7, padding=3, groups=4, dtype=torch.float64)
    model = nn.Sequential(conv, nn.Tanh(), conv)
    x = torch.randn(1, 4, 9, 8, dtype=torch.float64)
    expected = model(x).detach()
    converted = lkconv.convert(model, inplace=inplace)
    assert [type(layer) for layer in converted] == [lkconv.DepthwiseConv2d, nn.Tanh, lkconv.DepthwiseConv2d]
    assert converted[0] is converted[2]
    assert (converted[0].weight is conv.weight) == inplace
    assert_close(converted(x), expected, TOLERANCE[torch.float64], "converted")
    reverted = lkconv.revert(converted, inplace=inplace)
    assert [type(layer) for layer in reverted] == [nn.Conv2d, nn.Tanh, nn.Conv2d]
    assert reverted[0] is reverted[2]
    assert_close(reverted(x), expected, TOLERANCE[torch.float64], "reverted")


def test_revert_refuses_a_parametrized_or_subclassed_layer_and_names_where_it_is():
    class Recording(lkconv.DepthwiseConv2d):
        pass

    parametrized = torch.nn.utils.parametrizations.weight_norm(lkconv.DepthwiseConv2d(4, 7, padding=3))
    with pytest.raises(ValueError, match=r"model\.1 \(ParametrizedDepthwiseConv2d.*is parametrized"):
        lkconv.revert(nn.Sequential(nn.ReLU(), parametrized))
    model = nn.Sequential(nn.Sequential(Recording(4, 7)))
    with pytest.raises(TypeError, match=r"model\.0\.0 must be exactly DepthwiseConv2d, not the subclass Recording"):
        lkconv.revert(model, inplace=True)
    assert type(model[0][0]) is Recording, "a refused revert changed the model"


@pytest.mark.parametrize("function", [lkconv.convert, lkconv.revert])
@pytest.mark.parametrize("model", ["model", None, [nn.ReLU()]])
def test_convert_and_revert_refuse_what_is_not_a_module(function, model):
    with pytest.raises(TypeError, match=f"model must be an nn.Module; got {type(model).__name__}"):
        function(model)


@pytest.mark.parametrize("direction", ["convert", "revert"])
def test_hook_handles_and_compile_carry_over_an_inplace_conversion(direction):
    """The converted layer replaces the original in the model, so it takes over its hooks themselves: a handle the
    user holds still removes its hook (before, the removed hook kept zeroing the output). A layer compiled with
    Module.compile() is compiled again, as the new class (before, its compiled call ran the old class)."""
    layer = (nn.Conv2d(4, 4, 7, padding=3, groups=4, dtype=torch.float64) if direction == "convert"
             else lkconv.DepthwiseConv2d(4, 7, padding=3, dtype=torch.float64))
    model = nn.Sequential(layer)
    handle = layer.register_forward_hook(lambda module, args, output: output * 0)
    model[0].compile()
    converted = getattr(lkconv, direction)(model, inplace=True)
    new_class = lkconv.DepthwiseConv2d if direction == "convert" else nn.Conv2d
    assert type(converted[0]) is new_class
    assert converted[0]._compiled_call_impl._torchdynamo_orig_callable.__self__ is converted[0]
    converted[0]._compiled_call_impl = None  # compiling for real is slow on a CPU; the hooks are what is checked
    x = torch.randn(1, 4, 9, 8, dtype=torch.float64)
    assert not converted(x).any(), "the hook runs on the converted layer"
    handle.remove()
    assert_close(converted(x), reference(x, layer.weight, layer.bias, 1, 3, 1)[0], TOLERANCE[torch.float64],
                 "after the hook's removal")


def test_setting_groups_after_construction_raises_instead_of_being_ignored():
    layer = lkconv.DepthwiseConv2d(4, 5, padding=2)
    layer.groups = 2
    with pytest.raises(ValueError, match=r"groups of a DepthwiseConv2d must stay in_channels = 4; got groups=2"):
        layer(torch.randn(1, 4, 8, 8))


def test_a_channels_last_models_weight_grad_has_the_parameters_strides():
    """model.to(memory_format=torch.channels_last) gives the weight strides (kh·kw, 1, kw, 1); its grad must have
    them too, as nn.Conv2d's does, or DDP's gradient buckets warn and copy."""
    layer = lkconv.DepthwiseConv2d(4, 5, padding=2, dtype=torch.float64).to(memory_format=torch.channels_last)
    conv = equivalent_conv2d(4, 5, padding=2, dtype=torch.float64).to(memory_format=torch.channels_last)
    conv.load_state_dict(layer.state_dict())
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64).to(memory_format=torch.channels_last)
    for module in (layer, conv):
        module(x).square().sum().backward()
    assert layer.weight.grad.stride() == layer.weight.stride() == conv.weight.grad.stride()
    assert_close(layer.weight.grad, conv.weight.grad, TOLERANCE[torch.float64], "weight grad")


def test_a_quantized_input_is_refused_with_the_way_to_quantize():
    """torch.ao's eager quantization leaves lkconv's float layer in place and hands it a quantized tensor."""
    x = torch.quantize_per_tensor(torch.randn(1, 4, 8, 8), 0.1, 0, torch.quint8)
    with pytest.raises(TypeError, match=r"got torch.quint8\. lkconv's layers are float only.*lkconv.revert\(model\)"):
        lkconv.DepthwiseConv2d(4, 5, padding=2)(x)


@pytest.mark.parametrize("min_kernel_size", [0, -3, 2.5, "7", None, True])
def test_convert_rejects_bad_min_kernel_size(min_kernel_size):
    with pytest.raises(ValueError, match="min_kernel_size"):
        lkconv.convert(make_model(), min_kernel_size=min_kernel_size)


def test_training_a_converted_model_updates_shared_parameters_like_the_original():
    torch.manual_seed(3)
    model = make_model(torch.float64).train()
    twin = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    twin_optimizer = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    lkconv.convert(model, inplace=True)
    converted_weights = [model.get_submodule(name).weight for name in sorted(DEPTHWISE_7_AND_UP)]
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert all(id(w) in optimised for w in converted_weights)
    for _ in range(3):
        x = model_input()
        target = torch.randn(2, 16, 12, 11, dtype=torch.float64)
        for net, opt in ((model, optimizer), (twin, twin_optimizer)):
            opt.zero_grad()
            F.mse_loss(net(x), target).backward()
            opt.step()
    for name in DEPTHWISE_7_AND_UP:
        key = name + ".weight"
        assert not torch.equal(model.state_dict()[key], initial[key]), f"{key} did not train"
    twin_state = twin.state_dict()
    for key, value in model.state_dict().items():
        assert_close(value, twin_state[key], TOLERANCE[torch.float64], f"{key} after 3 SGD steps")


def test_from_conv2d_hooks_on_the_new_layer_do_not_fire_on_the_original_conv():
    conv = nn.Conv2d(3, 3, 7, padding=3, groups=3, dtype=torch.float64)
    layer = lkconv.DepthwiseConv2d.from_conv2d(conv)
    fired = []
    layer.register_forward_hook(lambda module, args, output: fired.append(type(module).__name__))
    x = torch.randn(1, 3, 8, 9, dtype=torch.float64)
    assert_close(conv(x), reference(x, conv.weight, conv.bias, 1, 3, 1)[0], TOLERANCE[torch.float64], "conv")
    assert fired == [], "a hook registered on the DepthwiseConv2d ran on the original nn.Conv2d"
    layer(x)
    assert fired == ["DepthwiseConv2d"]


@pytest.mark.parametrize("channels,multiplier,shape", [(3, 1, (2, 1, 9, 9)), (1, 4, (2, 9, 9)), (4, 2, (2, 8, 9, 9))])
def test_an_input_with_other_channels_than_in_channels_is_refused_as_nn_conv2d_refuses_it(channels, multiplier, shape):
    """Without the module's check these inputs would run: their channels divide out_channels, so the function would
    read the filters with another depth multiplier and answer with the wrong conv."""
    layer = lkconv.DepthwiseConv2d(channels, 3, depth_multiplier=multiplier)
    x = torch.randn(shape)
    with pytest.raises(RuntimeError, match="channels"):
        F.conv2d(x, layer.weight, layer.bias, groups=layer.groups)  # what the nn.Conv2d it replaces runs
    message = (f"input must have in_channels = {channels} channels (dimension -3) for DepthwiseConv2d("
               f"{layer.extra_repr()}); got {shape[-3]} channels, input shape {shape}")
    with pytest.raises(ValueError, match=re.escape(message)):
        layer(x)
