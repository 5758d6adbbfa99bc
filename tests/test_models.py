"""The model zoo (lkconv.models): official configurations and names, merge equivalence, training and loading.

Full-size models are built on the meta device (shapes only) to count parameters; everything that computes runs
on reduced widths and depths with the official kernel sizes.
"""

import copy
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lkconv
from conftest import TOLERANCE, assert_close
from lkconv.models import (RepLKNet, RepVGG, clean_state_dict, create_model, list_models, load_checkpoint,
                           register_model)

REPLKNETS = ["replknet_31b", "replknet_31l", "replknet_xl"]
REPVGGS = [name for name in list_models() if name.startswith("repvgg")]

# Parameters after the merge in millions (REFERENCE.md §5, from the RepVGG paper); B3 and its grouped variants and
# D2se are not in the table.
REPVGG_MERGED_PARAMS = {
    "repvgg_a0": 8.30, "repvgg_a1": 12.78, "repvgg_a2": 25.49, "repvgg_b0": 14.33, "repvgg_b1": 51.82,
    "repvgg_b1g2": 41.36, "repvgg_b1g4": 36.12, "repvgg_b2": 80.31, "repvgg_b2g4": 55.77,
}
# Parameters before the merge in millions, from the RepLKNet paper, and how precisely it states them.
REPLKNET_PARAMS = {"replknet_31b": (79.9, 0.05), "replknet_31l": (172, 1), "replknet_xl": (335, 1)}


def tiny(name: str, **kwargs) -> nn.Module:
    """`name` at reduced width and depth: the official kernel sizes, groups and branches, cheap on a CPU."""
    if name.startswith("replknet"):
        small = dict(layers=(1, 1, 1, 1), channels=(8, 16, 16, 16), num_classes=5)
    else:
        small = dict(width_multiplier=(0.25, 0.25, 0.25, 0.25), num_classes=5)
        if name == "repvgg_d2se":
            small["num_blocks"] = (2, 2, 2, 1)
    return create_model(name, **{**small, **kwargs})


def randomize_batchnorm(model: nn.Module) -> nn.Module:
    """Random running statistics and affine parameters, so a merge that ignores any of them fails."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    return model


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_list_models_names_every_family():
    names = list_models()
    assert set(REPLKNETS) <= set(names)
    expected = {"repvgg_a0", "repvgg_a1", "repvgg_a2", "repvgg_b0", "repvgg_b1", "repvgg_b2", "repvgg_b3",
                "repvgg_b1g2", "repvgg_b1g4", "repvgg_b2g4", "repvgg_d2se"}
    assert expected <= set(names)
    with pytest.raises(ValueError, match="name must be one of"):
        create_model("replknet_31x")


@pytest.mark.parametrize("name", REPLKNETS + REPVGGS)
def test_full_configuration_builds_counts_and_merges(name):
    """Every official configuration is built (on meta) and counted; the merged model equals deploy=True's."""
    with torch.device("meta"):
        model = create_model(name)
        merged = lkconv.reparameterize_model(model)
        deployed = create_model(name, deploy=True)
    assert model.training and isinstance(model, RepLKNet if name.startswith("replknet") else RepVGG)
    head = model.head if name.startswith("replknet") else model.linear
    assert head.out_features == 1000
    assert {k: v.shape for k, v in merged.state_dict().items()} == {k: v.shape for k, v in deployed.state_dict().items()}
    if name in REPLKNET_PARAMS:
        published, precision = REPLKNET_PARAMS[name]
        assert count(model) / 1e6 == pytest.approx(published, abs=precision)
        assert count(merged) < count(model)
    if name in REPVGG_MERGED_PARAMS:
        assert count(merged) / 1e6 == pytest.approx(REPVGG_MERGED_PARAMS[name], abs=0.01)


def test_replknet_31b_parameters_and_macs_match_the_paper():
    with torch.device("meta"):
        model = create_model("replknet_31b").eval()
        with torch.utils.flop_counter.FlopCounterMode(display=False) as counter:
            model(torch.empty(1, 3, 224, 224))
    assert count(model) / 1e6 == pytest.approx(79.9, abs=0.05)
    # The paper's 15.3G counts multiply-adds; FlopCounterMode counts 2 per multiply-add.
    assert counter.get_total_flops() / 2e9 == pytest.approx(15.3, rel=0.02)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", REPLKNETS + REPVGGS)
def test_merged_model_gives_the_same_eval_outputs(name, dtype):
    torch.manual_seed(0)
    model = randomize_batchnorm(tiny(name)).to(dtype).eval()
    x = torch.randn(2, 3, 64, 64, dtype=dtype)
    with torch.no_grad():
        expected = model(x)
        merged = lkconv.reparameterize_model(model)
        actual = merged(x)
        again = model(x)
    assert_close(actual, expected, TOLERANCE[dtype], f"{name} merged")
    assert torch.equal(again, expected), "inplace=False must leave the original model untouched"
    assert not any(isinstance(m, lkconv.blocks.ReparamBlock) and not m.merged for m in merged.modules())


@pytest.mark.parametrize("name", ["replknet_31b", "replknet_xl"])
def test_large_kernels_run_on_lkconv_before_and_after_the_merge(name):
    model = tiny(name)
    merged = lkconv.reparameterize_model(model)
    for form in (model, merged):
        large = [m for m in form.modules() if isinstance(m, nn.Conv2d) and max(m.kernel_size) >= 7]
        assert large and all(isinstance(m, lkconv.DepthwiseConv2d) for m in large)
    assert sorted({m.kernel_size[0] for m in merged.modules() if isinstance(m, lkconv.DepthwiseConv2d)}) == \
        ([13, 27, 29, 31] if name == "replknet_31b" else [13, 27])


def test_torch_fx_traces_replknet_with_lkconv_layers():
    """Feature extraction and graph tools trace models with torch.fx: every lkconv layer becomes one call in the
    graph, and the traced model gives the model's outputs."""
    model = randomize_batchnorm(tiny("replknet_31b")).eval()
    traced = torch.fx.symbolic_trace(model)
    calls = [node for node in traced.graph.nodes if node.target is lkconv.depthwise_conv2d]
    assert len(calls) == sum(isinstance(m, lkconv.DepthwiseConv2d) for m in model.modules()) > 0
    x = torch.randn(2, 3, 64, 64)
    assert_close(traced(x), model(x), TOLERANCE[torch.float32], "traced RepLKNet output")


@pytest.mark.parametrize("name", ["replknet_31b", "repvgg_a0"])
def test_the_export_route_traces_and_exports_the_merged_reverted_model_on_plain_convs(name):
    """The README's route to runtimes that do not know lkconv's op: merge, revert, then torch.jit.trace or
    torch.export. Both give the model's outputs from PyTorch's own convs only."""
    model = randomize_batchnorm(tiny(name)).eval()
    plain = lkconv.revert(lkconv.reparameterize_model(model))
    assert not any(isinstance(m, lkconv.DepthwiseConv2d) for m in plain.modules())
    x = torch.randn(2, 3, 64, 64)
    expected = model(x)
    with pytest.warns(DeprecationWarning, match="torch.jit"), torch.no_grad():
        traced = torch.jit.trace(plain, x)
    assert_close(traced(x), expected, TOLERANCE[torch.float32], f"traced {name}")
    torch.backends.cudnn.conv.fp32_precision = "tf32"  # what torch.export needs here: see test_ops' export test
    exported = torch.export.export(plain, (x,))
    targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert not [target for target in targets if "lkconv" in target], targets
    assert_close(exported.module()(x), expected, TOLERANCE[torch.float32], f"exported {name}")


@pytest.mark.parametrize("name", REPLKNETS + REPVGGS)
def test_gradients_flow_to_every_parameter_in_training(name):
    torch.manual_seed(0)
    model = tiny(name, drop_path_rate=0.1).train()
    logits = model(torch.randn(4, 3, 64, 64))
    F.cross_entropy(logits, torch.randint(0, 5, (4,))).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient reached {missing[:5]}"


OFFICIAL_KEYS = {
    "replknet_31b": (
        ["stem.0.conv.weight", "stem.3.bn.running_var", "stages.0.blocks.0.prelkb_bn.weight",
         "stages.0.blocks.0.pw1.conv.weight", "stages.0.blocks.0.large_kernel.lkb_origin.conv.weight",
         "stages.0.blocks.0.large_kernel.small_conv.bn.running_mean", "stages.0.blocks.1.preffn_bn.bias",
         "stages.0.blocks.1.pw2.bn.weight", "transitions.0.0.conv.weight", "transitions.2.1.bn.bias",
         "norm.running_mean", "head.weight"],
        ["stages.3.blocks.0.large_kernel.lkb_reparam.weight", "stages.3.blocks.0.large_kernel.lkb_reparam.bias"],
    ),
    "repvgg_a0": (
        ["stage0.rbr_dense.conv.weight", "stage0.rbr_1x1.bn.running_mean", "stage1.1.rbr_identity.running_var",
         "stage4.0.rbr_dense.bn.weight", "linear.weight", "linear.bias"],
        ["stage0.rbr_reparam.weight", "stage3.13.rbr_reparam.bias"],
    ),
    "repvgg_d2se": (["stage1.0.se.down.weight", "stage1.0.se.up.bias"], ["stage1.0.se.down.weight"]),
}


@pytest.mark.parametrize("name", sorted(OFFICIAL_KEYS))
def test_state_dict_uses_official_names_and_round_trips_in_both_forms(name):
    torch.manual_seed(0)
    model = randomize_batchnorm(tiny(name)).eval()
    merged = lkconv.reparameterize_model(model)
    training_keys, merged_keys = OFFICIAL_KEYS[name]
    assert set(training_keys) <= set(model.state_dict())
    assert set(merged_keys) <= set(merged.state_dict())
    x = torch.randn(1, 3, 64, 64)
    for source, fresh in ((model, tiny(name)), (merged, tiny(name, deploy=True))):
        fresh.load_state_dict(source.state_dict(), strict=True)
        fresh.eval()
        with torch.no_grad():
            assert torch.equal(fresh(x), source(x))


@pytest.mark.parametrize("name", REPLKNETS + REPVGGS)
def test_state_dict_round_trips_in_both_forms(name):
    torch.manual_seed(0)
    model = randomize_batchnorm(tiny(name)).eval()
    x = torch.randn(1, 3, 64, 64)
    for source, fresh in ((model, tiny(name)), (lkconv.reparameterize_model(model), tiny(name, deploy=True))):
        fresh.load_state_dict(source.state_dict(), strict=True)
        with torch.no_grad():
            assert torch.equal(fresh.eval()(x), source(x))


@pytest.mark.parametrize("wrap", ["bare", "module_prefix", "model_wrapper", "both", "imagenet_example",
                                  "averaged_model_ema"])
def test_load_checkpoint_unwraps_and_strips_prefixes(tmp_path, wrap):
    torch.manual_seed(0)
    source = randomize_batchnorm(tiny("replknet_31b")).eval()
    state, key = source.state_dict(), None
    if wrap in ("module_prefix", "both", "imagenet_example"):
        state = {f"module.{k}": v for k, v in state.items()}
    if wrap in ("model_wrapper", "both"):
        state = {"model": state, "epoch": 300}
    if wrap == "imagenet_example":  # PyTorch's ImageNet example (and official RepVGG's train.py): metadata tensors
        state = {"epoch": 120, "arch": "replknet_31b", "state_dict": state, "best_acc1": torch.tensor(71.2),
                 "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]}}
    if wrap == "averaged_model_ema":  # torch.optim.swa_utils.AveragedModel saved beside the model's weights
        ema = torch.optim.swa_utils.AveragedModel(source)
        state, key = {"model": {}, "model_ema": ema.state_dict(), "epoch": torch.tensor(3)}, "model_ema"
    path = tmp_path / "checkpoint.pth"
    torch.save(state, path)
    target = tiny("replknet_31b").eval()
    result = load_checkpoint(target, path, key=key)
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(target(x), source(x))


def test_load_checkpoint_refuses_pickled_code(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": nn.Linear(2, 2)}, path)  # a module object, not a state dict: needs full unpickling
    with pytest.raises(Exception, match="[Ww]eights only"):
        load_checkpoint(tiny("repvgg_a0"), path)


def test_clean_state_dict_errors_name_the_problem():
    with pytest.raises(TypeError, match="checkpoint must be a mapping"):
        clean_state_dict([1, 2])
    with pytest.raises(ValueError, match="holds no tensors"):
        clean_state_dict({"epoch": 3, "args": {"lr": 0.1}})
    with pytest.raises(TypeError, match=r"a state dict's keys must be strings; got the key 0 \(int\)"):
        clean_state_dict({"state_dict": {"conv.weight": torch.ones(1), 0: torch.ones(1)}})
    with pytest.raises(ValueError, match=r"key must name a state dict in the checkpoint; got 'ema', keys are \[0, "):
        clean_state_dict({0: 1, "model": {"w": torch.ones(1)}}, key="ema")


@pytest.mark.parametrize("name", REPLKNETS + REPVGGS)
def test_a_few_optimiser_steps_lower_the_loss(name):
    """A synthetic task the model can fit: the class is which quadrant of the image is bright."""
    torch.manual_seed(0)
    model = tiny(name, num_classes=4)
    images = torch.randn(16, 3, 32, 32) * 0.1
    labels = torch.arange(16) % 4
    for index, label in enumerate(labels.tolist()):
        row, col = divmod(label, 2)
        images[index, :, row * 16:(row + 1) * 16, col * 16:(col + 1) * 16] += 1.0
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(10):
        loss = F.cross_entropy(model.train()(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], f"loss did not fall: {losses}"


def test_torch_compile_runs_a_merged_replknet():
    torch.manual_seed(0)
    model = lkconv.reparameterize_model(randomize_batchnorm(tiny("replknet_31b")).eval())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        actual = torch.compile(model, fullgraph=True)(x)
    assert_close(actual, expected, 1e-4, "compiled merged RepLKNet")


@pytest.mark.parametrize("name", ["replknet_31b", "repvgg_b1g2"])
def test_channels_last_gives_the_same_outputs_and_grads(name):
    torch.manual_seed(0)
    model = randomize_batchnorm(tiny(name)).double()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    # A random projection: the plain sum of a head behind a training-mode BatchNorm has no gradient.
    projection = torch.randn(2, 5, dtype=torch.float64)
    outputs = []
    for memory_format in (torch.contiguous_format, torch.channels_last):
        candidate = copy.deepcopy(model).to(memory_format=memory_format)
        out = candidate(x.to(memory_format=memory_format))
        (out * projection).sum().backward()
        # All grads as one vector: some (biases before a training-mode BatchNorm) are zero up to rounding.
        outputs.append((out, torch.cat([p.grad.flatten() for p in candidate.parameters()])))
    assert_close(outputs[1][0], outputs[0][0], TOLERANCE[torch.float64], "channels_last output")
    assert_close(outputs[1][1], outputs[0][1], TOLERANCE[torch.float64], "channels_last grads")


@pytest.mark.parametrize("name", ["replknet_31b", "repvgg_a0"])
def test_out_indices_return_multi_scale_features(name):
    model = tiny(name, out_indices=(0, 1, 2, 3)).eval()
    with torch.no_grad():
        features = model(torch.randn(1, 3, 64, 64))
    assert isinstance(features, list) and len(features) == 4
    assert [f.shape[-1] for f in features] == ([16, 8, 4, 2] if name.startswith("replknet") else [16, 8, 4, 2])
    with pytest.raises(ValueError, match="out_indices"):
        tiny(name, out_indices=(4,))


def test_replknet_intermediate_norms_are_batchnorms_when_asked():
    model = tiny("replknet_31b", out_indices=(1, 3), norm_intermediate_features=True)
    assert [isinstance(stage.norm, nn.BatchNorm2d) for stage in model.stages] == [False, True, False, True]
    assert "stages.1.norm.running_mean" in model.state_dict()
    outputs = model(torch.randn(2, 3, 64, 64))
    sum(o.sum() for o in outputs).backward()
    assert all(p.grad is not None for p in model.parameters()), "every parameter is used"
    with pytest.raises(ValueError, match="norm_intermediate_features=True .* pass out_indices"):
        tiny("replknet_31b", norm_intermediate_features=True)


def test_repvgg_rejects_widths_of_zero_channels():
    with pytest.raises(ValueError, match=r"width_multiplier must give every stage at least one channel"):
        tiny("repvgg_a0", width_multiplier=(0.01, 1, 1, 1))


@pytest.mark.parametrize("name,options,message", [
    ("replknet_31b", dict(channels=(8, 0, 16, 16)), "every entry of channels must be an int >= 1; got 0"),
    ("replknet_31b", dict(layers=(1, -1, 1, 1)), "every entry of layers must be an int >= 1; got -1"),
    ("replknet_31b", dict(dw_ratio=0), "dw_ratio must be a number > 0; got 0"),
    ("replknet_31b", dict(ffn_ratio=0.01), "ffn_ratio must give every stage at least one channel; got 0.01"),
    ("replknet_31b", dict(num_classes=-1), "num_classes must be an int >= 0; got -1"),
    ("replknet_31b", dict(num_classes=2.5), "num_classes must be an int >= 0; got 2.5"),
    ("replknet_31b", dict(in_chans=0), "in_chans must be an int >= 1; got 0"),
    ("repvgg_a0", dict(num_classes=-1), "num_classes must be an int >= 0; got -1"),
    ("repvgg_a0", dict(num_blocks=(1, 0, 1, 1)), "every entry of num_blocks must be an int >= 1; got 0"),
    ("replknet_31b", dict(large_kernel_sizes=(31, 29, 6, 13)),
     "large_kernel_sizes[2] must be an odd int or a pair of odd ints (the small kernel shares its centre); got 6"),
    ("replknet_31b", dict(large_kernel_sizes=(31, 29, (7, 4), 13)), "large_kernel_sizes[2] must be an odd int or a"),
    ("replknet_31b", dict(large_kernel_sizes=(7, 0, 7, 7)), "large_kernel_sizes[1] must be"),
    ("replknet_31b", dict(large_kernel_sizes=(7, 7, (7, 3), 7)),
     "small_kernel must not exceed any stage's large kernel; got small_kernel=5 and large_kernel_sizes[2]=(7, 3)"),
    ("replknet_31b", dict(large_kernel_sizes=(7, 3, 7, 7)),
     "small_kernel must not exceed any stage's large kernel; got small_kernel=5 and large_kernel_sizes[1]=3"),
    ("replknet_31b", dict(drop_path_rate="0.1"), "drop_path_rate must be a number in [0, 1); got '0.1'"),
    ("repvgg_a0", dict(drop_path_rate=1.0), "drop_path_rate must be a number in [0, 1); got 1.0"),
    ("repvgg_a0", dict(override_groups_map={2: 5}),
     "override_groups_map[2] must divide layer 2's in and out channels (16, 16); got 5"),
    ("repvgg_a0", dict(override_groups_map={2: 0}), "override_groups_map[2] must be an int >= 1; got 0"),
    ("repvgg_a0", dict(override_groups_map={0: 2}),
     "override_groups_map's keys (layer indices, counting from 1 after stage 0) must be an int >= 1; got 0"),
    ("repvgg_a0", dict(override_groups_map={"2": 2}),
     "override_groups_map's keys (layer indices, counting from 1 after stage 0) must be an int >= 1; got '2'"),
])

def test_bad_model_options_name_the_option_and_the_value(name, options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        tiny(name, **options)


def test_model_options_take_kernel_pairs_and_group_maps_past_a_shallower_variant_s_layers():
    """Kernel pairs reach the blocks, and official g2/g4 maps (layers 2-26) fit a variant overridden to fewer layers,
    as in official RepVGG, while their layers within it are grouped."""
    model = tiny("replknet_31b", large_kernel_sizes=(7, 7, (7, 5), 7), small_kernel=(3, 3))
    assert model.stages[2].blocks[0].large_kernel.lkb_origin.conv.kernel_size == (7, 5)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 5)
    model = create_model("repvgg_b1g4", num_blocks=(2, 4, 14, 1), width_multiplier=(0.25, 0.25, 0.25, 0.25),
                         override_groups_map={np.int64(2): 4, 22: 4, 26: 4}, num_classes=5)
    assert model.stage1[1].rbr_dense.conv.groups == 4 and model.stage1[0].rbr_dense.conv.groups == 1


def test_register_model_takes_named_functions_and_never_replaces_another_model():
    def replknet_31b(**kwargs):
        return nn.Identity()

    with pytest.raises(ValueError, match="a model named 'replknet_31b' is already registered"):
        register_model(replknet_31b)
    for builder in (lambda **kwargs: nn.Identity(), "my_model"):
        with pytest.raises(TypeError, match="builder must be a named function"):
            register_model(builder)
    assert create_model("replknet_31b", **dict(layers=(1, 1, 1, 1), channels=(8, 8, 8, 8))).__class__.__name__ == \
        "RepLKNet"


def test_forward_features_feed_the_head():
    model = tiny("replknet_31b").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = model.forward_features(x)
        logits = model(x)
        by_hand = model.head(torch.flatten(model.avgpool(model.norm(features)), 1))
    assert features.shape == (2, 16, 2, 2)
    assert torch.equal(logits, by_hand)


@pytest.mark.parametrize("name", ["replknet_31b", "repvgg_a0"])
def test_activation_checkpointing_gives_the_same_gradients(name):
    torch.manual_seed(0)
    plain = tiny(name).double()
    checkpointed = tiny(name, use_checkpoint=True).double()
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    grads = []
    for model in (plain, checkpointed):
        model(x).square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert_close(grads[1], grads[0], TOLERANCE[torch.float64], "checkpointed grads")
    # The recomputation must not update BatchNorm statistics a second time: the merge reads them.
    for (n, b), c in zip(plain.named_buffers(), checkpointed.buffers()):
        assert torch.equal(c, b), f"checkpointing changed {n}"


@pytest.mark.parametrize("name", ["replknet_31b", "repvgg_a0"])
def test_sync_batchnorm_and_in_chans_options(name):
    model = tiny(name, use_sync_bn=True, in_chans=1, num_classes=0).eval()
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and all(isinstance(m, nn.SyncBatchNorm) for m in norms)
    with torch.no_grad():
        features = model(torch.randn(2, 1, 64, 64))
    assert features.shape == (2, 16 if name.startswith("replknet") else 128)


@pytest.mark.parametrize("rate", [0.4, np.float32(0.4)])  # a config file's NumPy float too
def test_drop_path_rates_rise_linearly_over_all_blocks(rate):
    model = tiny("replknet_31b", layers=(1, 2, 1, 1), drop_path_rate=rate)
    rates = [block.drop_path.p if hasattr(block.drop_path, "p") else 0.0
             for stage in model.stages for block in stage.blocks[::2]]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    with pytest.raises(ValueError, match="drop_path_rate"):
        tiny("replknet_31b", drop_path_rate=1.0)


def test_structural_reparam_is_the_official_in_place_alias():
    torch.manual_seed(0)
    model = randomize_batchnorm(tiny("replknet_31b")).eval()
    merged_copy = lkconv.reparameterize_model(model)
    model.structural_reparam()
    assert model.state_dict().keys() == merged_copy.state_dict().keys()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), merged_copy(x))
    assert all(block.large_kernel.merged for stage in model.stages for block in stage.blocks[::2])


def test_load_checkpoint_reads_training_script_checkpoints_with_args_and_ema(tmp_path):
    import argparse

    torch.manual_seed(0)
    source = randomize_batchnorm(tiny("repvgg_a0")).eval()
    path = tmp_path / "training.pth"
    torch.save({"model": {}, "model_ema": source.state_dict(), "args": argparse.Namespace(lr=0.1)}, path)
    target = tiny("repvgg_a0").eval()
    load_checkpoint(target, path, key="model_ema")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(target(x), source(x))
    with pytest.raises(ValueError, match="key must name a state dict in the checkpoint; got 'ema'"):
        load_checkpoint(target, path, key="ema")


@pytest.mark.parametrize("saved_merged", [True, False])
def test_load_checkpoint_names_the_form_on_a_mismatch(tmp_path, saved_merged):
    source = tiny("replknet_31b")
    if saved_merged:
        source = lkconv.reparameterize_model(source)
    path = tmp_path / "checkpoint.pth"
    torch.save(source.state_dict(), path)
    with pytest.raises(RuntimeError, match="merged" if saved_merged else "training-time"):
        load_checkpoint(tiny("replknet_31b", deploy=not saved_merged), path)
