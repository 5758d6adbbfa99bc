"""The torch.ops.lkconv custom ops as the framework sees them: opcheck, gradcheck, double backward, torch.compile,
autocast, torch.export, torch.func and forward-mode AD, and the deterministic weight grad."""

import gc
import io
import re
import weakref

import pytest
import torch
import torch.nn.functional as F

import lkconv
from lkconv.backends import torch_backend, triton_backend

from conftest import TOLERANCE, TRITON_DEVICE, assert_close, reference

ops = torch.ops.lkconv
STRIDE, PADDING, DILATION = [2, 1], [1, 2, 2, 0], [1, 2]  # asymmetric padding (top, left, bottom, right)


def op_inputs(dtype, device="cpu", channels_last=False, requires_grad=True):
    x = torch.randn(2, 3, 7, 8, dtype=dtype, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(6, 1, 3, 4, dtype=dtype, device=device)
    b = torch.randn(6, dtype=dtype, device=device)
    return [t.requires_grad_(requires_grad) for t in (x, w, b)]


def grad_output_for(x, w, dtype):
    y = ops.depthwise_conv2d(x.detach(), w.detach(), None, STRIDE, PADDING, DILATION)
    return torch.randn(y.shape, dtype=dtype, device=x.device).contiguous(memory_format=lkconv.arguments.output_memory_format(y))


@pytest.mark.parametrize("backend,dtype", [("torch", torch.float64), ("torch", torch.float32), ("triton", torch.float32)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_opcheck_every_op(backend, dtype, channels_last):
    with lkconv.use_backend(backend):
        x, w, b = op_inputs(dtype, TRITON_DEVICE if backend == "triton" else "cpu", channels_last)
        dy = grad_output_for(x, w, dtype).requires_grad_()
        torch.library.opcheck(ops.depthwise_conv2d.default, (x, w, b, STRIDE, PADDING, DILATION))
        torch.library.opcheck(ops.depthwise_conv2d.default, (x, w, None, STRIDE, PADDING, DILATION))
        torch.library.opcheck(ops.depthwise_conv2d_input_grad.default, (dy, w, list(x.shape), STRIDE, PADDING, DILATION))
        for bias in (True, False):
            torch.library.opcheck(
                ops.depthwise_conv2d_weight_grad.default, (dy, x, [3, 4], STRIDE, PADDING, DILATION, bias)
            )


def test_gradcheck_and_gradgradcheck_in_float64():
    x, w, b = op_inputs(torch.float64)

    def conv(x, w, b):
        return lkconv.depthwise_conv2d(x, w, b, stride=(2, 1), padding=(1, 2), dilation=(1, 2))

    assert torch.autograd.gradcheck(conv, (x, w, b))
    assert torch.autograd.gradgradcheck(conv, (x, w, b))


def test_batched_grads_match_float64():
    """autograd.grad with is_grads_batched (PyTorch's legacy vmap over the backward ops, one call per grad_output)."""
    x, w, b = op_inputs(torch.float32)
    y = lkconv.depthwise_conv2d(x, w, b, stride=(2, 1), padding=(1, 2), dilation=(1, 2))
    grad_outputs = torch.randn(4, *y.shape)
    grads = torch.autograd.grad(y, (x, w, b), grad_outputs, is_grads_batched=True)
    for i in range(4):
        expected = reference(x, w, b, (2, 1), (1, 2), (1, 2), grad_outputs[i])[1:]
        for actual, wanted, what in zip(grads, expected, ("input", "weight", "bias")):
            assert_close(actual[i], wanted, TOLERANCE[torch.float32], f"batched {what} grad {i}")


LAYOUTS = {
    "channels_last x": lambda x, w: (x.contiguous(memory_format=torch.channels_last), w),
    "channels_last x, sliced weight": lambda x, w: (x.contiguous(memory_format=torch.channels_last),
                                                    torch.cat([w, w], 3)[..., ::2]),
    "NCHW x, channels_last weight": lambda x, w: (x, w.contiguous(memory_format=torch.channels_last)),
    # A batched weight grad of multiplier 1 is a strided view of the batching rule's channels: not the weight's strides.
    "NCHW x, multiplier 1": lambda x, w: (x, w[::2].contiguous()),
}
TRANSFORMS = {
    # vmap over the backward: the batched dy, dx and dw have only their logical (NCHW) layout.
    "hessian": lambda conv, x, w, b: torch.func.hessian(lambda x: conv(x, w, b).square().sum())(x),
    "vmap of grad (per-sample grads)": lambda conv, x, w, b: torch.func.vmap(
        torch.func.grad(lambda w, x: conv(x.unsqueeze(0), w, b).square().sum()), in_dims=(None, 0))(w, x),
    "vmap of vjp (jacrev)": lambda conv, x, w, b: torch.func.jacrev(lambda w, b: conv(x, w, b), argnums=(0, 1))(w, b),
    "vmap of a bias-only jvp": lambda conv, x, w, b: torch.func.vmap(
        lambda tb: torch.func.jvp(lambda b: conv(x, w, b), (b,), (tb,))[1])(torch.randn(2, *b.shape, dtype=b.dtype)),
    "is_grads_batched": lambda conv, x, w, b: torch.autograd.grad(
        conv(x, w, b), (x, w), torch.randn(2, *conv(x, w, b).shape, dtype=x.dtype), is_grads_batched=True),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_vmapped_derivatives_of_channels_last_and_strided_operands(transform, layout):
    """vmap's batched tensors can neither be asked whether they are channels_last nor be copied into that layout or
    into an unbatched tensor: the backward's and jvp's layout steps (dy and dx in x's layout, dw in the weight's
    strides) stand aside under vmap. These raised before; the results match the same transform of F.conv2d."""
    torch.manual_seed(0)
    x, w = LAYOUTS[layout](torch.randn(2, 3, 6, 7, dtype=torch.float64), torch.randn(6, 1, 3, 4, dtype=torch.float64))
    b = torch.randn(w.shape[0], dtype=torch.float64)
    x, w, b = (t.requires_grad_() for t in (x, w, b))
    torch.manual_seed(1)
    with lkconv.use_backend("torch"):
        actual = TRANSFORMS[transform](lambda x, w, b: lkconv.depthwise_conv2d(x, w, b, (2, 1), (1, 2), (1, 2)),
                                       x, w, b)
    torch.manual_seed(1)
    expected = TRANSFORMS[transform](lambda x, w, b: F.conv2d(x, w, b, (2, 1), (1, 2), (1, 2), groups=3), x, w, b)
    for got, wanted in zip(torch.utils._pytree.tree_leaves(actual), torch.utils._pytree.tree_leaves(expected),
                           strict=True):
        assert_close(got, wanted, TOLERANCE[torch.float64], transform)


def test_gradcheck_and_gradgradcheck_of_the_backward_ops():
    x, w, _ = op_inputs(torch.float64)
    dy = grad_output_for(x, w, torch.float64).requires_grad_()

    def input_grad(dy, w):
        return ops.depthwise_conv2d_input_grad(dy, w, list(x.shape), STRIDE, PADDING, DILATION)

    def weight_grad(dy, x):
        return ops.depthwise_conv2d_weight_grad(dy, x, [3, 4], STRIDE, PADDING, DILATION, True)

    for fn, args in ((input_grad, (dy, w)), (weight_grad, (dy, x))):
        assert torch.autograd.gradcheck(fn, args)
        assert torch.autograd.gradgradcheck(fn, args)


def test_double_backward_through_triton_kernels():
    """Grad of (grad_input . v) w.r.t. weight and grad_output, computed by the triton ops, against float64 F.conv2d."""
    x, w, b = op_inputs(torch.float32, TRITON_DEVICE)
    v = torch.randn(x.shape, device=TRITON_DEVICE)
    grad_output = torch.randn(2, 6, 4, 6, device=TRITON_DEVICE)  # y's shape: a random dy, so its indexing matters
    results = {}
    for name, dtype, conv in (
        ("lkconv", torch.float32, lambda x, w, b: lkconv.depthwise_conv2d(x, w, b, (2, 1), (1, 2), (1, 2))),
        ("reference", torch.float64, lambda x, w, b: F.conv2d(x, w, b, (2, 1), (1, 2), (1, 2), groups=3)),
    ):
        xs, ws, bs = (t.detach().to(dtype).requires_grad_() for t in (x, w, b))
        with lkconv.use_backend("triton"):
            y = conv(xs, ws, bs)
            dy = grad_output.to(dtype).requires_grad_()
            (grad_x,) = torch.autograd.grad(y, xs, dy, create_graph=True)
            results[name] = torch.autograd.grad((grad_x * v.to(dtype)).sum(), (ws, dy))
    for actual, expected in zip(results["lkconv"], results["reference"]):
        assert_close(actual, expected, TOLERANCE[torch.float32], "double backward")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_weight_grad_is_bit_identical_over_runs_and_matches_the_reference(backend):
    """Repeated weight grads are bit-identical. On triton they are summed from several fixed-order partial sums, as
    on a GPU (where the splits run in parallel; the interpreter would otherwise take one): an order that varies
    shows."""
    x = torch.randn(3, 4, 12, 11, dtype=torch.float64)
    dy = torch.randn(3, 4, 12, 11, dtype=torch.float64)
    zeros = torch.zeros(4, dtype=torch.float64)
    _, _, grad_w, grad_b = reference(x, torch.zeros(4, 1, 7, 5, dtype=torch.float64), zeros, 1, (3, 2), 1, dy)
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    x, dy = (t.float().to(device) for t in (x, dy))
    if backend == "triton":
        runs = [triton_backend.weight_grad(dy, x, (7, 5), (1, 1), (3, 2, 3, 2), (1, 1), True, splits=5)
                for _ in range(5)]
    else:
        with lkconv.use_backend(backend):
            runs = [ops.depthwise_conv2d_weight_grad(dy, x, [7, 5], [1, 1], [3, 2, 3, 2], [1, 1], True)
                    for _ in range(5)]
    assert_close(runs[0][0], grad_w, TOLERANCE[torch.float32], "grad_weight")
    assert_close(runs[0][1], grad_b, TOLERANCE[torch.float32], "grad_bias")
    for grad_weight, grad_bias in runs[1:]:
        assert torch.equal(grad_weight, runs[0][0]) and torch.equal(grad_bias, runs[0][1])


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
def test_triton_weight_grad_splits_agree_with_reference(memory_format):
    """Several fixed-order partial sums (as on a GPU) give the same answer as one, in the per-channel and the
    channels_last kernel."""
    x = torch.randn(3, 4, 12, 11, dtype=torch.float64)
    w = torch.randn(4, 1, 7, 5, dtype=torch.float64)
    dy = torch.randn(3, 4, 12, 11, dtype=torch.float64)
    _, _, grad_w, grad_b = reference(x, w, torch.zeros(4, dtype=torch.float64), 1, (3, 2), 1, dy)
    x, dy = (t.float().to(TRITON_DEVICE).contiguous(memory_format=memory_format) for t in (x, dy))
    for splits in (1, 2, 5):
        got_w, got_b = triton_backend.weight_grad(dy, x, (7, 5), (1, 1), (3, 2, 3, 2), (1, 1), True, splits=splits)
        assert_close(got_w, grad_w, TOLERANCE[torch.float32], f"grad_weight, {splits} splits")
        assert_close(got_b, grad_b, TOLERANCE[torch.float32], f"grad_bias, {splits} splits")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_torch_compile_fullgraph_forward_and_backward(backend):
    torch._dynamo.reset()
    x, w, b = op_inputs(torch.float32, TRITON_DEVICE if backend == "triton" else "cpu")

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(x, w, b):
        y = lkconv.depthwise_conv2d(x, w, b, stride=(2, 1), padding=(1, 2), dilation=(1, 2))
        return torch.relu(y).sum()

    with lkconv.use_backend(backend):
        loss = step(x, w, b)
        grads = torch.autograd.grad(loss, (x, w, b))
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    ref_loss = torch.relu(F.conv2d(x64, w64, b64, (2, 1), (1, 2), (1, 2), groups=3)).sum()
    ref_grads = torch.autograd.grad(ref_loss, (x64, w64, b64))
    assert_close(loss, ref_loss, TOLERANCE[torch.float32], "loss")
    for actual, expected in zip(grads, ref_grads):
        assert_close(actual, expected, TOLERANCE[torch.float32], "compiled grad")


def test_torch_compile_traces_lkconvs_op_not_pytorchs_conv():
    """What torch.compile captures is lkconv's op, so the kernels run in compiled code too (the torch.func check in
    depthwise_conv2d stands aside while tracing)."""
    torch._dynamo.reset()
    graphs = []

    def recording_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module

    module = lkconv.DepthwiseConv2d(4, 5, padding=2)
    torch.compile(module, backend=recording_backend, fullgraph=True)(torch.randn(2, 4, 8, 8))
    targets = [node.target for graph in graphs for node in graph.graph.nodes if node.op == "call_function"]
    assert torch.ops.lkconv.depthwise_conv2d.default in targets or torch.ops.lkconv.depthwise_conv2d in targets, targets
    assert F.conv2d not in targets, targets


def test_torch_compile_with_inductor():
    torch._dynamo.reset()
    module = lkconv.DepthwiseConv2d(4, 7, padding=3)
    x = torch.randn(2, 4, 10, 10, requires_grad=True)
    compiled = torch.compile(module, fullgraph=True)
    y = compiled(x)
    grad_output = torch.randn_like(y)
    y.backward(grad_output)
    wanted = reference(x, module.weight, module.bias, 1, 3, 1, grad_output)
    for actual, expected, what in zip((y, x.grad, module.weight.grad, module.bias.grad), wanted,
                                      ("output", "input grad", "weight grad", "bias grad")):
        assert_close(actual, expected, TOLERANCE[torch.float32], f"inductor {what}")


def test_compiled_autograd_runs_the_backward_ops(monkeypatch):
    """Compiled autograd (what FSDP2 training often enables) traces the ops' backward, an autograd.Function of
    lkconv's own (op_registration.py), into a graph: the grads it computes match float64."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    x, w, b = op_inputs(torch.float32, TRITON_DEVICE)
    calls = []
    original = torch_backend.weight_grad
    monkeypatch.setattr(torch_backend, "weight_grad", lambda *args: calls.append(args) or original(*args))

    def step(x, w, b):
        y = lkconv.depthwise_conv2d(x, w, b, stride=(2, 1), padding=(1, 2), dilation=(1, 2))
        y.square().sum().backward()
        return y

    # config.patch, not monkeypatch: undoing a monkeypatched config entry hides it from every later compile. And
    # torch.compile reads the config when it wraps the function.
    with lkconv.use_backend("torch"), torch._dynamo.config.patch(compiled_autograd=True):
        y = torch.compile(step, backend="aot_eager")(x, w, b)
    assert counters["compiled_autograd"]["captures"] >= 1, "compiled autograd did not capture the backward"
    assert calls, "the weight-grad op did not run"
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    ref = F.conv2d(x64, w64, b64, (2, 1), (1, 2), (1, 2), groups=3)
    ref.square().sum().backward()
    assert_close(y, ref, TOLERANCE[torch.float32], "output")
    for actual, expected, what in ((x.grad, x64.grad, "input"), (w.grad, w64.grad, "weight"), (b.grad, b64.grad, "bias")):
        assert_close(actual, expected, TOLERANCE[torch.float32], f"compiled-autograd {what} grad")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_inference_mode_computes_without_recording_autograd(backend):
    """Under torch.inference_mode the ops' Autograd kernel is skipped: the output is an inference tensor, and right."""
    x, w, b = op_inputs(torch.float32, TRITON_DEVICE if backend == "triton" else "cpu")
    with lkconv.use_backend(backend), torch.inference_mode():
        y = lkconv.depthwise_conv2d(x, w, b, stride=(2, 1), padding=(1, 2), dilation=(1, 2))
    assert y.is_inference() and not y.requires_grad
    assert_close(y, reference(x, w, b, (2, 1), (1, 2), (1, 2))[0], TOLERANCE[torch.float32], "output")


def test_torch_export_keeps_the_op_with_dynamic_shapes_and_survives_save_and_load():
    model = torch.nn.Sequential(lkconv.DepthwiseConv2d(4, 7, padding=3), torch.nn.ReLU(),
                                lkconv.DepthwiseConv2d(4, (5, 3), stride=2, padding=1, depth_multiplier=2))
    dims = {0: torch.export.Dim("n"), 2: torch.export.Dim("h", min=8), 3: torch.export.Dim("w", min=8)}
    # torch.export reads cuDNN's legacy TF32 flag, which PyTorch 2.13 answers only while the conv and RNN settings
    # are both at their default, "tf32" (this suite's fixture sets the conv's to "ieee"). A CPU conv never uses TF32.
    torch.backends.cudnn.conv.fp32_precision = "tf32"
    exported = torch.export.export(model, (torch.randn(2, 4, 12, 12),), dynamic_shapes=(dims,))
    targets = [node.target for node in exported.graph.nodes if node.op == "call_function"]
    assert targets.count(torch.ops.lkconv.depthwise_conv2d.default) == 2, targets
    buffer = io.BytesIO()
    torch.export.save(exported, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer).module()
    x = torch.randn(3, 4, 20, 9)  # another batch and map size than the one exported with
    hidden = torch.relu(reference(x, model[0].weight, model[0].bias, 1, 3, 1)[0])
    expected = reference(hidden, model[2].weight, model[2].bias, 2, 1, 1)[0]
    assert_close(loaded(x), expected, TOLERANCE[torch.float32], "exported model")


@pytest.mark.parametrize("padding", [0, 2])
def test_torch_export_suggests_the_smallest_map_a_dynamic_range_may_start_at(padding):
    """A dynamic height whose range starts below what the kernel needs gets PyTorch's own "suggested fixes", with the
    same bound nn.Conv2d's export suggests. A Min() of both output sizes in lkconv's checks made PyTorch's error
    formatter fail on a fractional bound (AssertionError) instead."""
    torch.backends.cudnn.conv.fp32_precision = "tf32"  # see the export test above
    suggestions = []
    for layer in (torch.nn.Conv2d(4, 4, 7, padding=padding, groups=4), lkconv.DepthwiseConv2d(4, 7, padding=padding)):
        height = torch.export.Dim("height", min=2, max=64)
        with pytest.raises(torch._dynamo.exc.UserError) as raised:
            torch.export.export(layer, (torch.randn(2, 4, 16, 16),), dynamic_shapes=({2: height},))
        suggestions.append(re.search(r"height = Dim\('height', min=(\d+)", str(raised.value)))
    assert suggestions[0] is not None and suggestions[1] is not None, suggestions
    assert suggestions[1].group(1) == suggestions[0].group(1) == str(7 - 2 * padding)


class _DataDependentCrop(torch.nn.Module):
    """Keeps the first `rows` rows of the map, a number read from a tensor: an unbacked size for torch.export."""

    def __init__(self, conv):
        super().__init__()
        self.conv = conv

    def forward(self, x, rows):
        k = rows.item()
        torch._check(k >= 1)
        torch._check(k <= x.shape[2])
        return self.conv(x[:, :, :k])


def test_data_dependent_sizes_export_and_compile_as_with_f_conv2d():
    """Sizes computed from data (unbacked) cannot be decided while tracing. lkconv's checks and its output layout
    guarded on them, so export and fullgraph compile failed where nn.Conv2d's succeed; now the checks run in the
    graph and the layout is read without guards."""
    torch.backends.cudnn.conv.fp32_precision = "tf32"  # see the export test above
    layer = lkconv.DepthwiseConv2d(3, 3, padding=1)
    x = torch.randn(2, 3, 7, 8)
    exported = torch.export.export(_DataDependentCrop(layer), (x, torch.tensor(5))).module()
    for rows in (5, 3):
        expected = reference(x[:, :, :rows], layer.weight, layer.bias, 1, 1, 1)[0]
        assert_close(exported(x, torch.tensor(rows)), expected, TOLERANCE[torch.float32], f"exported, {rows} rows")
    w = torch.randn(3, 1, 3, 3)
    for dim, layout in ((0, torch.channels_last), (2, torch.contiguous_format), (3, torch.contiguous_format)):
        torch._dynamo.reset()
        x = torch.randn(4, 3, 7, 8).contiguous(memory_format=layout)
        torch._dynamo.decorators.mark_unbacked(x, dim)
        y = torch.compile(lambda t: lkconv.depthwise_conv2d(t, w, padding=1), fullgraph=True, backend="eager")(x)
        assert_close(y, reference(x, w, None, 1, 1, 1)[0], TOLERANCE[torch.float32], f"unbacked dim {dim}")
        assert y.is_contiguous(memory_format=layout), (dim, y.stride())


def _float64_conv(x, w, b=None):
    return F.conv2d(x.double(), w.double(), None if b is None else b.double(), (2, 1), (1, 2), (1, 2), groups=x.shape[1])


def _counted_passes(monkeypatch, module=triton_backend):
    """Counts the calls of each pass of a backend, to show which computed a result."""
    counts = {"forward": 0, "input_grad": 0, "weight_grad": 0}
    for name in counts:
        def counted(*args, _name=name, _original=getattr(module, name)):
            counts[_name] += 1
            return _original(*args)

        monkeypatch.setattr(module, name, counted)
    return counts


def test_torch_func_per_sample_gradients_run_the_kernels_once_per_batch(monkeypatch):
    """vmap of grad, as per-sample-gradient code computes them: the backward ops' batching rules fold the samples
    into the channels, so one weight-grad launch answers the whole batch, and each sample's grads match float64
    autograd on that sample alone (triton forced: no PyTorch conv may answer)."""
    module = lkconv.DepthwiseConv2d(3, (3, 4), stride=(2, 1), padding=(1, 2), dilation=(1, 2), depth_multiplier=2)
    module.to(TRITON_DEVICE)
    x = torch.randn(4, 3, 7, 8, device=TRITON_DEVICE)
    params = {name: p.detach() for name, p in module.named_parameters()}

    def loss(p, sample):
        return (torch.func.functional_call(module, p, (sample.unsqueeze(0),)) ** 2).sum()

    counts = _counted_passes(monkeypatch)
    with lkconv.use_backend("triton"):
        per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)
    assert counts == {"forward": 1, "input_grad": 0, "weight_grad": 1}, counts
    for i in range(x.shape[0]):
        w, b = (t.detach().double().requires_grad_() for t in (module.weight, module.bias))
        expected = torch.autograd.grad((_float64_conv(x[i:i + 1], w, b) ** 2).sum(), (w, b))
        assert_close(per_sample["weight"][i], expected[0], TOLERANCE[torch.float32], f"sample {i} weight grad")
        assert_close(per_sample["bias"][i], expected[1], TOLERANCE[torch.float32], f"sample {i} bias grad")


@pytest.mark.parametrize("mode", ["torch.func.jvp", "forward_ad"])
@pytest.mark.parametrize("tangents", ["all", "input", "weight", "bias"])
def test_forward_mode_derivatives_are_the_directional_derivative_on_the_kernels(mode, tangents, monkeypatch):
    """The forward op's jvp: the tangent is conv(tx, w) + conv(x, tw) + tb, computed by the ops, for any subset of
    inputs carrying a tangent (triton forced)."""
    x, w, b = op_inputs(torch.float32, TRITON_DEVICE, requires_grad=False)
    tx, tw, tb = (torch.randn_like(t) if tangents in ("all", name) else None
                  for t, name in ((x, "input"), (w, "weight"), (b, "bias")))

    def conv(x, w, b):
        return lkconv.depthwise_conv2d(x, w, b, stride=(2, 1), padding=(1, 2), dilation=(1, 2))

    counts = _counted_passes(monkeypatch)
    with lkconv.use_backend("triton"):
        if mode == "torch.func.jvp":
            primals = tuple(p for p, t in ((x, tx), (w, tw), (b, tb)) if t is not None)
            def partial(*varying):
                it = iter(varying)
                return conv(*(next(it) if t is not None else p for p, t in ((x, tx), (w, tw), (b, tb))))
            output, tangent = torch.func.jvp(partial, primals, tuple(t for t in (tx, tw, tb) if t is not None))
        else:
            with torch.autograd.forward_ad.dual_level():
                dual = conv(*(p if t is None else torch.autograd.forward_ad.make_dual(p, t)
                              for p, t in ((x, tx), (w, tw), (b, tb))))
                output, tangent = torch.autograd.forward_ad.unpack_dual(dual)
    # The primal, plus one conv per tangent term (a bias tangent alone is only added).
    convs = {"all": 3, "input": 2, "weight": 2, "bias": 1}[tangents]
    assert counts == {"forward": convs, "input_grad": 0, "weight_grad": 0}, counts
    assert_close(output, _float64_conv(x, w, b), TOLERANCE[torch.float32], f"{mode} output")
    expected = torch.zeros_like(_float64_conv(x, w))
    if tx is not None:
        expected += _float64_conv(tx, w)
    if tw is not None:
        expected += _float64_conv(x, tw)
    if tb is not None:
        expected += tb.double().view(1, -1, 1, 1)
    assert_close(tangent, expected, TOLERANCE[torch.float32], f"{mode} tangent")


def test_forward_over_reverse_carries_the_tangents_of_dual_grads(monkeypatch):
    """Forward-mode AD through a backward (dual grad_outputs): the backward ops' own jvps carry the tangents, so
    the tangent of each grad is the grad of the tangent, computed by the kernels."""
    x, w, b = op_inputs(torch.float32, TRITON_DEVICE)
    counts = _counted_passes(monkeypatch)
    with lkconv.use_backend("triton"):
        y = lkconv.depthwise_conv2d(x, w, b, stride=(2, 1), padding=(1, 2), dilation=(1, 2))
        dy, tangent = torch.randn_like(y), torch.randn_like(y)
        with torch.autograd.forward_ad.dual_level():
            grads = torch.autograd.grad(y, (x, w, b), torch.autograd.forward_ad.make_dual(dy, tangent))
            tangents = [torch.autograd.forward_ad.unpack_dual(grad).tangent for grad in grads]
    assert counts == {"forward": 1, "input_grad": 2, "weight_grad": 2}, counts
    for actual, expected, what in zip(tangents, reference(x, w, b, (2, 1), (1, 2), (1, 2), tangent)[1:],
                                      ("input", "weight", "bias")):
        assert actual is not None, f"the {what} grad lost its tangent"
        assert_close(actual, expected, TOLERANCE[torch.float32], f"tangent of the {what} grad")


def test_forward_mode_ad_under_cpu_bfloat16_autocast_keeps_the_float32_workaround():
    """Under autocast, dual tensors pass the ops' autocast kernels like any others, so the torch backend's CPU
    bfloat16 workaround (float32, then rounding) holds for the output and its tangent: with autocast on inside, they
    would come from PyTorch's broken CPU bf16 conv."""
    x, w = torch.randn(1, 1, 9, 1), torch.randn(1, 1, 9, 2)
    tangent = torch.randn_like(x)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.forward_ad.dual_level():
        dual = lkconv.depthwise_conv2d(torch.autograd.forward_ad.make_dual(x, tangent), w, stride=2, padding=(4, 1))
        output, output_tangent = torch.autograd.forward_ad.unpack_dual(dual)
    w = w.bfloat16().double()
    expected = F.conv2d(x.bfloat16().double(), w, stride=2, padding=(4, 1))
    assert output.dtype == output_tangent.dtype == torch.bfloat16
    assert_close(output, expected, TOLERANCE[torch.bfloat16], "bf16 autocast output under forward-mode AD")
    expected_tangent = F.conv2d(tangent.bfloat16().double(), w, stride=2, padding=(4, 1))
    assert_close(output_tangent, expected_tangent, TOLERANCE[torch.bfloat16], "its tangent")


@pytest.mark.parametrize("transform", ["hessian", "jacfwd", "jacrev", "jvp of grad"])
@pytest.mark.parametrize("argument", ["input", "weight"])
def test_torch_func_second_order_and_jacobians_match_float64(transform, argument):
    """Nested transforms mix the ops' backward, jvp and batching rules at several levels; every result must be
    PyTorch's derivative of the float64 conv (triton forced)."""
    x, w, b = op_inputs(torch.float32, TRITON_DEVICE, requires_grad=False)
    x, w = x[:1, :, :5, :5].contiguous(), w[:, :, :2, :3].contiguous()

    def scalar(conv):
        def f(t):
            args = (t, w, b) if argument == "input" else (x, t, b)
            return (conv(*args) ** 3).sum()
        return f

    def vector(conv):
        return lambda t: conv(*((t, w, b) if argument == "input" else (x, t, b)))

    lk = lambda x, w, b: lkconv.depthwise_conv2d(x, w, b, stride=(2, 1), padding=(1, 2), dilation=(1, 2))
    ref = lambda x, w, b: _float64_conv(x, w, b)
    primal = x if argument == "input" else w
    if transform == "hessian":
        compute = lambda conv, p: torch.func.hessian(scalar(conv))(p)
    elif transform == "jvp of grad":
        direction = torch.randn_like(primal)
        compute = lambda conv, p: torch.func.jvp(torch.func.grad(scalar(conv)), (p,), (direction.to(p.dtype),))[1]
    else:
        compute = lambda conv, p: getattr(torch.func, transform)(vector(conv))(p)
    with lkconv.use_backend("triton"):
        actual = compute(lk, primal)
    expected = compute(ref, primal.double())
    assert_close(actual, expected, TOLERANCE[torch.float32], f"{transform} in the {argument}")


@pytest.mark.parametrize("differentiated,direction", [("input", "weight"), ("weight", "input")])
def test_mixed_second_derivatives_use_each_backward_op_s_jvp_in_both_operands(differentiated, direction):
    """d/d(direction) of the gradient in `differentiated`: the tangent reaches the input grad through its weight
    and the weight grad through its input, the terms the other tests leave at zero (triton forced)."""
    x, w, b = op_inputs(torch.float32, TRITON_DEVICE, requires_grad=False)
    tangent = torch.randn_like(w if direction == "weight" else x)

    def gradient(conv, x, w):
        def loss(x, w):
            return (conv(x, w) ** 3).sum()
        return torch.func.grad(loss, argnums=0 if differentiated == "input" else 1)(x, w)

    def directional(conv, x, w, tangent):
        if direction == "weight":
            return torch.func.jvp(lambda w: gradient(conv, x, w), (w,), (tangent,))[1]
        return torch.func.jvp(lambda x: gradient(conv, x, w), (x,), (tangent,))[1]

    with lkconv.use_backend("triton"):
        actual = directional(lambda x, w: lkconv.depthwise_conv2d(x, w, b, (2, 1), (1, 2), (1, 2)), x, w, tangent)
    expected = directional(lambda x, w: _float64_conv(x, w, b), x.double(), w.double(), tangent.double())
    assert_close(actual, expected, TOLERANCE[torch.float32], f"d/d{direction} of the {differentiated} grad")


def test_one_forward_mode_transform_inside_another_takes_pytorch_s_conv():
    """A jvp formula runs with forward mode off, so an outer jvp would get no derivative through the ops (silently
    zero): the public function answers such calls with PyTorch's conv (explain says so), and the op itself
    refuses them."""
    x, w, b = op_inputs(torch.float64, requires_grad=False)
    tx, tw = torch.randn_like(x), torch.randn_like(w)
    lk = lambda x, w: lkconv.depthwise_conv2d(x, w, b, (2, 1), (1, 2), (1, 2))
    ref = lambda x, w: _float64_conv(x, w, b)
    # d/dw (d/dx conv(x, w) . tx) . tw = conv(tx, tw), without the bias
    actual = torch.func.jvp(lambda w: torch.func.jvp(lambda x: lk(x, w), (x,), (tx,))[1], (w,), (tw,))[1]
    assert_close(actual, _float64_conv(tx, tw), TOLERANCE[torch.float64], "jvp of jvp")
    jacobian = torch.func.jacfwd(torch.func.jacfwd(lambda x: (lk(x, w) ** 2).sum()))(x[:1, :, :4, :4])
    expected = torch.func.jacfwd(torch.func.jacfwd(lambda x: (ref(x, w) ** 2).sum()))(x[:1, :, :4, :4])
    assert_close(jacobian, expected, TOLERANCE[torch.float64], "jacfwd of jacfwd")
    reasons = []
    torch.func.jvp(lambda w: torch.func.jvp(lambda x: reasons.append(lkconv.explain(x, w).reason) or lk(x, w),
                                            (x,), (tx,))[1], (w,), (tw,))
    assert "forward-mode transform inside another" in reasons[0], reasons
    op = lambda x: ops.depthwise_conv2d(x, w, b, STRIDE, PADDING, DILATION)
    with pytest.raises(RuntimeError, match="forward-mode transform .* inside another"):
        torch.func.jvp(lambda x: torch.func.jvp(op, (x,), (tx,))[1], (x,), (tx,))


def test_a_transform_under_no_grad_records_no_graph_and_keeps_nothing_alive():
    """torch.func.jvp under no_grad, with parameters that require grad: the lower levels keep the caller's grad
    mode, so the output records no graph and holds on to no input, as nn.Conv2d's does."""
    layer = lkconv.DepthwiseConv2d(3, (3, 4), stride=(2, 1), padding=(1, 2), dilation=(1, 2))
    x, direction = torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8)
    alive = weakref.ref(x)
    with torch.no_grad():
        output, tangent = torch.func.jvp(layer, (x,), (direction,))
    assert not output.requires_grad and not tangent.requires_grad
    assert_close(tangent, _float64_conv(direction, layer.weight), TOLERANCE[torch.float32], "tangent under no_grad")
    del x
    gc.collect()
    assert alive() is None, "the output keeps its input alive"


def test_gradcheck_in_every_mode_in_float64():
    """Finite differences agree with reverse mode, forward mode, their batched forms, and with forward-over-reverse
    and reverse-over-reverse second derivatives, all through the ops."""
    x, w, b = op_inputs(torch.float64)

    def conv(x, w, b):
        return lkconv.depthwise_conv2d(x, w, b, stride=(2, 1), padding=(1, 2), dilation=(1, 2))

    assert torch.autograd.gradcheck(conv, (x, w, b), check_forward_ad=True, check_batched_grad=True,
                                    check_batched_forward_grad=True)
    assert torch.autograd.gradgradcheck(conv, (x, w, b), check_fwd_over_rev=True, check_batched_grad=True)


@pytest.mark.parametrize("mode", ["grad", "jvp", "forward_ad", "vmap"])
def test_torch_func_and_forward_mode_ad_inside_torch_compile(mode):
    """Compiled, forward-mode AD through lkconv's ops fails to trace, and Dynamo cannot tell which transform is
    active: so inside torch.compile any torch.func transform, and forward-mode AD, take PyTorch's conv, and their
    derivatives must not be lost (jvp and dual tensors once silently were)."""
    torch._dynamo.reset()
    x, w, b = op_inputs(torch.float32, requires_grad=False)
    tx = torch.randn_like(x)

    def conv(x):
        return lkconv.depthwise_conv2d(x, w, b, stride=(2, 1), padding=(1, 2), dilation=(1, 2))

    def dual_tangent(x, tx):
        with torch.autograd.forward_ad.dual_level():
            return torch.autograd.forward_ad.unpack_dual(conv(torch.autograd.forward_ad.make_dual(x, tx))).tangent

    if mode == "grad":
        actual = torch.compile(torch.func.grad(lambda x: (conv(x) ** 2).sum()), backend="aot_eager")(x)
        x64 = x.double().requires_grad_()
        expected = torch.autograd.grad((_float64_conv(x64, w, b) ** 2).sum(), x64)[0]
    elif mode == "vmap":
        actual = torch.compile(torch.func.vmap(conv), backend="aot_eager")(x.unsqueeze(1)).squeeze(1)
        expected = _float64_conv(x, w, b)
    else:
        compiled = torch.compile((lambda x, tx: torch.func.jvp(conv, (x,), (tx,))[1]) if mode == "jvp" else dual_tangent,
                                 backend="aot_eager")
        actual, expected = compiled(x, tx), _float64_conv(tx, w)
    assert_close(actual, expected, TOLERANCE[torch.float32], f"compiled {mode}")


@pytest.mark.parametrize("multiplier", [1, 2])
@pytest.mark.parametrize("batched", ["maps", "filters", "both"])
def test_vmap_runs_the_op_once_for_the_whole_batch(batched, multiplier, monkeypatch):
    """vmap over maps (folded into the images), over filters on one map, as an ensemble of models runs on one batch
    (folded into the depth multiplier: the map itself goes to the kernel), or over both (folded into the channels):
    one forward call, each member's output and its grads through the vmap as float64 autograd gives."""
    calls = []
    original = torch_backend.forward
    monkeypatch.setattr(torch_backend, "forward", lambda *args: calls.append(args) or original(*args))
    members = 3
    x = torch.randn(members if batched != "filters" else 1, 2, 3, 7, 8, requires_grad=True)
    w = torch.randn(members if batched != "maps" else 1, 3 * multiplier, 1, 3, 4, requires_grad=True)
    b = torch.randn(members if batched != "maps" else 1, 3 * multiplier, requires_grad=True)
    in_dims = (0 if batched != "filters" else None, 0 if batched != "maps" else None, 0 if batched != "maps" else None)
    args = [t if dim == 0 else t[0] for t, dim in zip((x, w, b), in_dims)]
    output = torch.func.vmap(lambda x, w, b: lkconv.depthwise_conv2d(x, w, b, (2, 1), (1, 2), (1, 2)),
                             in_dims=in_dims)(*args)
    assert len(calls) == 1
    if batched == "filters":
        assert calls[0][0].data_ptr() == x.data_ptr() and calls[0][0].shape == x.shape[1:], "the map was copied"
    dy = torch.randn_like(output)
    grads = torch.autograd.grad(output, (x, w, b), dy)
    for i in range(members):
        member = [t[i if dim == 0 else 0] for t, dim in zip((x, w, b), in_dims)]
        expected = reference(*member, (2, 1), (1, 2), (1, 2), dy[i])
        assert_close(output[i], expected[0], TOLERANCE[torch.float32], f"member {i} output")
        if batched != "filters":
            assert_close(grads[0][i], expected[1], TOLERANCE[torch.float32], f"member {i} input grad")
        if batched != "maps":
            assert_close(grads[1][i], expected[2], TOLERANCE[torch.float32], f"member {i} weight grad")
            assert_close(grads[2][i], expected[3], TOLERANCE[torch.float32], f"member {i} bias grad")


@pytest.mark.parametrize("op_name,with_bias", [("input_grad", False), ("weight_grad", True), ("weight_grad", False)])
@pytest.mark.parametrize("in_dims", [(0, None), (None, 0), (0, 0)])
def test_the_backward_ops_batching_rules_match_a_loop_over_members(op_name, with_bias, in_dims, monkeypatch):
    """vmap of each backward op (what torch.func's nested transforms call) is one call for the whole batch, and
    each member's result is float64 F.conv2d's gradient for that member alone. (in_dims (0, None) is jacrev in the
    weight: the weight grad folds the members into the depth multiplier there, the others into the channels.)"""
    members, kernel_size = 3, [3, 4]
    x = torch.randn(members, 2, 3, 7, 8)
    w = torch.randn(members, 6, 1, *kernel_size)
    dy = torch.randn(members, 2, 6, 4, 4)
    if op_name == "input_grad":
        op = lambda dy, w: ops.depthwise_conv2d_input_grad(dy, w, [2, 3, 7, 8], STRIDE, PADDING, DILATION)
        operands = (dy, w)
    else:
        op = lambda dy, x: ops.depthwise_conv2d_weight_grad(dy, x, kernel_size, STRIDE, PADDING, DILATION, with_bias)
        operands = (dy, x)
    args = [t if dim == 0 else t[0] for t, dim in zip(operands, in_dims)]
    counts = _counted_passes(monkeypatch, torch_backend)
    batched = torch.func.vmap(op, in_dims=in_dims)(*args)
    assert counts[op_name] == 1, counts
    top, left, bottom, right = PADDING
    for i in range(members):
        member_dy, member_operand = (t[i] if dim == 0 else t for t, dim in zip(args, in_dims))
        map_ = member_operand if op_name == "weight_grad" else torch.zeros(2, 3, 7, 8)
        filters = w[0] if op_name == "weight_grad" else member_operand  # the weight grad does not read the filters
        _, padded_grad, grad_weight, grad_bias = reference(F.pad(map_, (left, right, top, bottom)), filters,
                                                           torch.zeros(6), STRIDE, 0, DILATION, member_dy)
        if op_name == "input_grad":
            expected = [padded_grad[:, :, top:top + 7, left:left + 8]]
        else:
            expected = [grad_weight, grad_bias if with_bias else torch.zeros(0, dtype=torch.float64)]
        for actual, wanted in zip(batched if op_name == "weight_grad" else [batched], expected, strict=True):
            assert actual[i].shape == wanted.shape, (actual.shape, wanted.shape)
            assert_close(actual[i], wanted, TOLERANCE[torch.float32], f"member {i} of vmap({op_name})")


def test_torch_function_modes_and_tensor_subclasses_see_one_call():
    """Like F.conv2d, the public function takes part in __torch_function__: a mode or subclass sees one call of
    lkconv.depthwise_conv2d with the caller's arguments (not its inner ops), and the result is still the conv."""
    x, w, b = op_inputs(torch.float32, requires_grad=False)
    seen = []

    class Recording(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append((func, kwargs))
            return func(*args, **(kwargs or {}))

    class Subclass(torch.Tensor):
        pass

    with Recording():
        output = lkconv.depthwise_conv2d(x, w, b, stride=(2, 1), padding=(1, 2), dilation=(1, 2))
    assert seen[0] == (lkconv.depthwise_conv2d, {"stride": (2, 1), "padding": (1, 2), "dilation": (1, 2)}), seen[0]
    assert sum(func is lkconv.depthwise_conv2d for func, _ in seen) == 1, seen
    expected = reference(x, w, b, (2, 1), (1, 2), (1, 2))[0]
    assert_close(output, expected, TOLERANCE[torch.float32], "output under a torch function mode")
    subclassed = lkconv.depthwise_conv2d(x.as_subclass(Subclass), w, b, stride=(2, 1), padding=(1, 2), dilation=(1, 2))
    assert type(subclassed) is Subclass
    assert_close(subclassed.as_subclass(torch.Tensor), expected, TOLERANCE[torch.float32], "subclass output")


def test_autocast_computes_in_the_autocast_dtype_like_nn_conv2d():
    module = lkconv.DepthwiseConv2d(3, 5, padding=2)
    plain = torch.nn.Conv2d(3, 3, 5, padding=2, groups=3)
    plain.load_state_dict(module.state_dict())
    x = torch.randn(2, 3, 9, 9, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = module(x)
        expected = plain(x)
    assert y.dtype == expected.dtype == torch.bfloat16
    grad_output = torch.randn(y.shape).bfloat16()
    y.backward(grad_output)
    assert x.grad.dtype == torch.float32 and module.weight.grad.dtype == torch.float32
    # Autocast rounds x, the weight and the bias to bfloat16 and computes from those, as nn.Conv2d does.
    wanted = reference(*(t.bfloat16() for t in (x, module.weight, module.bias)), 1, 2, 1, grad_output)
    computed = (y, x.grad, module.weight.grad, module.bias.grad)
    for actual, expected, what in zip(computed, wanted, ("output", "input grad", "weight grad", "bias grad"),
                                      strict=True):
        assert_close(actual, expected, TOLERANCE[torch.bfloat16], f"autocast {what}")


def test_float64_stays_float64_under_autocast():
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64)
    w = torch.randn(2, 1, 3, 3, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lkconv.depthwise_conv2d(x, w, padding=1)
    assert y.dtype == torch.float64
    assert_close(y, F.conv2d(x, w, padding=1, groups=2), TOLERANCE[torch.float64])


def test_autocast_accepts_mixed_input_and_weight_dtypes_like_f_conv2d():
    """model.bfloat16() fed float32 activations under autocast: F.conv2d casts both; so must lkconv."""
    x = torch.randn(2, 3, 9, 9)
    w = torch.randn(3, 1, 5, 5).to(torch.bfloat16)
    b = torch.randn(3).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lkconv.depthwise_conv2d(x, w, b, padding=2)
        expected = F.conv2d(x, w, b, padding=2, groups=3)
    assert y.dtype == expected.dtype == torch.bfloat16
    assert_close(y, reference(x, w, b, 1, 2, 1)[0], TOLERANCE[torch.bfloat16], "mixed-dtype autocast")


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_the_ops_called_directly_follow_autocast_too(compiled, dtype):
    """torch.ops.lkconv.* under autocast, as torch.compile and other libraries call them: the region's dtype, eager
    and compiled alike, and a backward that works."""
    x = torch.randn(2, 3, 9, 8, requires_grad=True)
    w = torch.randn(3, 1, 5, 5, requires_grad=True)
    b = torch.randn(3, requires_grad=True)

    def conv(x, w, b):
        return torch.ops.lkconv.depthwise_conv2d(x, w, b, [1, 1], [2, 2, 2, 2], [1, 1])

    # PyTorch 2.11's compiled-graph caches leave the autocast dtype out of their keys: a graph compiled under bf16, in
    # this run or an earlier one, would come back under fp16 (nn.Conv2d's too). Each case compiles afresh.
    torch._dynamo.reset()
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False), \
            torch.autocast("cpu", dtype=dtype):
        y = (torch.compile(conv, fullgraph=True) if compiled else conv)(x, w, b)
        grad_input = torch.ops.lkconv.depthwise_conv2d_input_grad(y, w, list(x.shape), [1, 1], [2, 2, 2, 2], [1, 1])
    assert y.dtype == grad_input.dtype == dtype
    expected = reference(x.to(dtype), w.to(dtype), b.to(dtype), 1, 2, 1)[0]
    assert_close(y, expected, TOLERANCE[dtype], "output under autocast")
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, w, b), dy)
    assert [g.dtype for g in grads] == [torch.float32] * 3  # autograd casts back to the leaves' dtype
    for actual, wanted in zip(grads, reference(x.to(dtype), w.to(dtype), b.to(dtype), 1, 2, 1, dy)[1:]):
        assert_close(actual, wanted, TOLERANCE[dtype], "grads under autocast")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ops_called_directly_reject_inconsistent_shapes(backend):
    """The ops are public: shapes that do not form a depthwise conv raise instead of reading out of bounds."""
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    dy = torch.randn(1, 2, 6, 6, device=device)
    w = torch.randn(4, 1, 3, 3, device=device)
    x = torch.randn(1, 2, 6, 6, device=device)
    same = [1, 1, 1, 1]
    with lkconv.use_backend(backend):
        with pytest.raises(ValueError, match=r"depthwise_conv2d_input_grad: .* give output \(1, 4, 6, 6\); "
                                             r"got \(1, 2, 6, 6\)"):
            ops.depthwise_conv2d_input_grad(dy, w, [1, 2, 6, 6], [1, 1], same, [1, 1])  # dy has 2 channels, w 4
        with pytest.raises(ValueError, match=r"depthwise_conv2d_input_grad: .* give output \(1, 2, 9, 6\); "
                                             r"got \(1, 2, 6, 6\)"):
            ops.depthwise_conv2d_input_grad(dy, w[:2], [1, 2, 9, 6], [1, 1], same, [1, 1])  # dy too short for H=9
        with pytest.raises(ValueError, match=r"depthwise_conv2d_weight_grad: input must be \(N, C, H, W\) and weight "
                                             r"\(C\*m, 1, kh, kw\); got input \(1, 3, 6, 6\), weight \(2, 1, 3, 3\)"):
            ops.depthwise_conv2d_weight_grad(dy, x[:, :1].repeat(1, 3, 1, 1), [3, 3], [1, 1], same, [1, 1], True)
        with pytest.raises(ValueError, match=r"depthwise_conv2d_weight_grad: input must match grad_output in dtype"):
            ops.depthwise_conv2d_weight_grad(dy.double(), x, [3, 3], [1, 1], same, [1, 1], True)
        with pytest.raises(ValueError, match=r"grad_output must be \(N, C\*m, OH, OW\); got \(2, 6, 6\)"):
            ops.depthwise_conv2d_weight_grad(dy[0], x, [3, 3], [1, 1], same, [1, 1], True)  # dy of one image, unbatched
        with pytest.raises(ValueError, match=r"lkconv::depthwise_conv2d: input must be .* got input \(1, 2, 6, 6\), "
                                             r"weight \(3, 1, 3, 3\)"):
            ops.depthwise_conv2d(x, w[:3], None, [1, 1], same, [1, 1])  # 3 is not a multiple of 2 channels
        with pytest.raises(ValueError, match=r"bias must have shape \(4,\); got \(3,\)"):
            ops.depthwise_conv2d(x, w, torch.randn(3, device=device), [1, 1], same, [1, 1])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_real_and_fake_outputs_have_identical_strides_even_for_size_one_dims(backend):
    """A 1x1 output of a channels_last input: torch.empty's strides, in eager and under FakeTensorMode alike."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    device = TRITON_DEVICE if backend == "triton" else "cpu"
    for shape, kernel in (((2, 3, 4, 4), 4), ((1, 3, 5, 5), 5), ((2, 1, 6, 6), 3), ((0, 3, 4, 4), 3)):
        x = torch.randn(shape, device=device).contiguous(memory_format=torch.channels_last)
        w = torch.randn(shape[1], 1, kernel, kernel, device=device)
        with lkconv.use_backend(backend):
            real = ops.depthwise_conv2d(x, w, None, [1, 1], [0, 0, 0, 0], [1, 1])
            dy = torch.randn_like(real)
            grad = ops.depthwise_conv2d_input_grad(dy, w, list(shape), [1, 1], [0, 0, 0, 0], [1, 1])
        mode = FakeTensorMode()
        fake_x, fake_w, fake_dy = mode.from_tensor(x), mode.from_tensor(w), mode.from_tensor(dy)
        with mode:
            fake = ops.depthwise_conv2d(fake_x, fake_w, None, [1, 1], [0, 0, 0, 0], [1, 1])
            fake_grad = ops.depthwise_conv2d_input_grad(fake_dy, fake_w, list(shape), [1, 1], [0, 0, 0, 0], [1, 1])
        assert real.stride() == fake.stride(), (shape, real.stride(), fake.stride())
        assert grad.stride() == fake_grad.stride(), (shape, grad.stride(), fake_grad.stride())


def test_flop_counter_counts_every_pass_as_one_multiply_add_per_output_tap():
    """FlopCounterMode sees the custom ops: forward as aten's conv counts it, and each backward pass the same."""
    from torch.utils.flop_counter import FlopCounterMode

    x, w, b = op_inputs(torch.float32)
    with FlopCounterMode(display=False) as counter:
        ops.depthwise_conv2d(x, w, b, STRIDE, PADDING, DILATION).sum().backward()
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    y_numel = ops.depthwise_conv2d(x, w, b, STRIDE, PADDING, DILATION).numel()
    expected = 2 * y_numel * w.shape[-2] * w.shape[-1]
    assert counts == {"lkconv.depthwise_conv2d": expected, "lkconv.depthwise_conv2d_input_grad": expected,
                      "lkconv.depthwise_conv2d_weight_grad": expected}
    padded = F.pad(x.detach(), (PADDING[1], PADDING[3], PADDING[0], PADDING[2]))
    with FlopCounterMode(display=False) as aten_counter:
        F.conv2d(padded, w.detach(), None, STRIDE, 0, DILATION, groups=x.shape[1])
    assert aten_counter.get_total_flops() == expected
