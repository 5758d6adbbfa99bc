"""Training under DistributedDataParallel (gloo, two CPU processes) and SyncBatchNorm conversion.

What is checked, for a tiny RepLKNet (whose large depthwise convs are lkconv.DepthwiseConv2d, i.e. run through the
custom ops `torch.ops.lkconv.*` and their autograd) and a tiny RepVGG, all in float64:

- DDP gradients: two spawned processes each take half of a fixed random batch, run forward, mean cross-entropy and
  backward under DDP. The all-reduced (averaged) gradient of every parameter, the large-kernel conv weights
  included, must equal the gradient of the full batch in one process, computed independently in the parent
  process on a copy of the model whose DepthwiseConv2d layers are reverted to plain nn.Conv2d. A few SGD steps
  (momentum) must leave both ranks with bit-identical parameters equal to the single-process run's.
- The same data-parallel run with SyncBatchNorm, built both by `nn.SyncBatchNorm.convert_sync_batchnorm` and by
  `create_model(..., use_sync_bn=True)`, loaded from the BatchNorm2d model's state_dict. DDP's constructor
  refuses any model holding a SyncBatchNorm on CPU ("SyncBatchNorm layers only work with GPU modules", whatever
  the mode), so for these the workers do what DDP does by hand: broadcast rank 0's state, all-reduce and average
  the gradients after each backward. The test accepts only that DDP error and uses DDP once torch allows it.
- Single-process: conversion puts a SyncBatchNorm exactly where the model had a BatchNorm2d, the official
  state_dict keys are unchanged (loading is strict both ways), and `reparameterize_model` on the SyncBN model
  gives the unmerged model's eval outputs (float64, relative error <= 1e-10).

Why BatchNorm runs in eval mode here: a per-rank BatchNorm in training mode normalises with statistics of its
half of the batch, so plain DDP cannot match the single-process full-batch gradient, and SyncBatchNorm, which
would fix that, refuses CPU tensors in training mode once a process group exists (torch raises
"SyncBatchNorm expected input tensor to be on GPU ..."; `aten::batch_norm_stats` has no CPU kernel either).
So the models train as in fine-tuning with frozen BN: everything in train mode except the BatchNorm layers,
which use running statistics (of random data, with random affine terms) and still learn their weight and bias.
Eval-mode SyncBatchNorm does not synchronise and runs on CPU; training-mode SyncBatchNorm needs GPUs.

All DDP work for the whole module happens in one spawn of two workers (a module-scoped fixture), so the file costs
one process start-up; a worker that raises fails the tests with its traceback, and a hung one hits a timeout.
"""

import copy
import datetime
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

import lkconv
from conftest import TOLERANCE, assert_close
from lkconv.blocks import ReparamBlock
from lkconv.models import create_model

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with the gloo backend")

WORLD_SIZE = 2
DTYPE = torch.float64
TOL = TOLERANCE[DTYPE]
NUM_CLASSES = 5
BATCH = 4  # split in two halves of 2 across the ranks
STEPS = 3
LR, MOMENTUM = 0.01, 0.9
PROCESS_GROUP_TIMEOUT = datetime.timedelta(seconds=60)
JOIN_TIMEOUT_S = 180.0

# Tiny configurations: RepLKNet with three lkconv.DepthwiseConv2d large kernels (13, 9, 7; 5 stays nn.Conv2d).
MODELS = {
    "replknet_31b": dict(large_kernel_sizes=(13, 9, 7, 5), layers=(1, 1, 1, 1), channels=(8, 16, 16, 16),
                         small_kernel=5, num_classes=NUM_CLASSES),
    "repvgg_a0": dict(width_multiplier=(0.25, 0.25, 0.25, 0.25), num_blocks=(1, 1, 1, 1), num_classes=NUM_CLASSES),
}
# How the normalisation layers of the DDP model are made.
VARIANTS = ("batchnorm", "convert_sync_batchnorm", "use_sync_bn")
# What torch 2.13 says about SyncBatchNorm on CPU: in a training-mode forward, and in DDP's constructor (any mode).
DDP_SYNCBN_CPU_ERROR = "SyncBatchNorm layers only work with GPU modules"


# --- shared by the parent process and the workers -------------------------------------------------------------------


def build(name: str, variant: str = "batchnorm") -> nn.Module:
    model = create_model(name, **MODELS[name], use_sync_bn=variant == "use_sync_bn", dtype=DTYPE)
    if variant == "convert_sync_batchnorm":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


@torch.no_grad()
def randomize_batchnorms(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """BatchNorms as a trained model has them: running statistics of (random) data and non-default affine terms.

    The statistics come from training-mode forwards (cumulative average); made-up ones would leave whole ReLU
    channels dead, and with them the gradients of the large kernels behind them.
    """
    batchnorms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    momenta = [bn.momentum for bn in batchnorms]
    training = model.training
    for bn in batchnorms:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    for _ in range(2):
        model(torch.randn(8, 3, 32, 32, generator=generator, dtype=DTYPE))
    model.train(training)
    for bn, momentum in zip(batchnorms, momenta):
        bn.momentum = momentum
        bn.weight.copy_(1 + 0.2 * torch.randn(bn.weight.shape, generator=generator, dtype=DTYPE))
        bn.bias.copy_(0.1 * torch.randn(bn.bias.shape, generator=generator, dtype=DTYPE))
    return model


def finetune_mode(model: nn.Module) -> nn.Module:
    """Train mode with every BatchNorm frozen in eval mode (running statistics, learnable affine)."""
    model.train()
    for module in model.modules():
        if isinstance(module, _BatchNorm):
            module.eval()
    return model


def run_steps(model: nn.Module, named: nn.Module, inputs, targets, average_grads=None):
    """SGD steps of mean cross-entropy on (inputs[i], targets[i]); `model` may be the DDP wrapper of `named`.

    `average_grads`, if given, is called after each backward (manual data parallelism). Returns the first step's
    gradients, the parameters after the last step and the losses, keyed by the names of `named`'s parameters.
    """
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    first_grads, losses = None, []
    for x, y in zip(inputs, targets):
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        if average_grads is not None:
            average_grads(named)
        losses.append(loss.detach().clone())
        if first_grads is None:
            first_grads = {n: p.grad.detach().clone() for n, p in named.named_parameters()}
        optimizer.step()
    params = {n: p.detach().clone() for n, p in named.named_parameters()}
    return first_grads, params, torch.stack(losses)


def large_kernel_convs(model: nn.Module) -> list:
    return [n for n, m in model.named_modules() if isinstance(m, lkconv.DepthwiseConv2d)]


# --- the DDP worker -------------------------------------------------------------------------------------------------


def _broadcast_state(model: nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank, as DDP's constructor does."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor, src=0)


def _all_reduce_grads(model: nn.Module) -> None:
    """Averages the gradients over the ranks, as DDP's reducer does (without buckets or overlap)."""
    for parameter in model.parameters():
        dist.all_reduce(parameter.grad)
        parameter.grad.div_(dist.get_world_size())


def _worker(rank: int, world_size: int, port: int, workdir: str) -> None:
    torch.set_num_threads(1)  # two processes on two cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=PROCESS_GROUP_TIMEOUT)
    try:
        results = {}
        for name in MODELS:
            case = torch.load(os.path.join(workdir, f"{name}.pt"))
            per_rank = BATCH // world_size
            shard = slice(rank * per_rank, (rank + 1) * per_rank)
            inputs = [x[shard] for x in case["inputs"]]
            targets = [y[shard] for y in case["targets"]]
            for variant in VARIANTS:
                model = build(name, variant)
                model.load_state_dict(case["state_dict"], strict=True)
                finetune_mode(model)
                norms = sorted({type(m).__name__ for m in model.modules() if isinstance(m, _BatchNorm)})
                try:
                    ddp = DistributedDataParallel(model)
                except ValueError as error:  # DDP refuses SyncBatchNorm on CPU; average the gradients by hand
                    ddp_error = str(error)
                    _broadcast_state(model)
                    grads, params, losses = run_steps(model, model, inputs, targets, _all_reduce_grads)
                else:
                    ddp_error = None
                    grads, params, losses = run_steps(ddp, model, inputs, targets)
                    del ddp
                results[f"{name}/{variant}"] = dict(grads=grads, params=params, losses=losses, norms=norms,
                                                    ddp_error=ddp_error, large_kernel_convs=large_kernel_convs(model))
        torch.save(results, os.path.join(workdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _spawn(workdir: str) -> None:
    """Runs _worker on WORLD_SIZE processes; a worker's exception is re-raised here with its traceback."""
    context = mp.start_processes(_worker, args=(WORLD_SIZE, _free_port(), workdir), nprocs=WORLD_SIZE, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    try:
        while not context.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                pytest.fail(f"DDP workers did not finish within {JOIN_TIMEOUT_S:.0f} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join(5)


# --- single-process references and the module's one DDP run ----------------------------------------------------------


def make_case(name: str, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = randomize_batchnorms(build(name), generator)
    inputs = [torch.randn(BATCH, 3, 32, 32, generator=generator, dtype=DTYPE) for _ in range(STEPS)]
    targets = [torch.randint(0, NUM_CLASSES, (BATCH,), generator=generator) for _ in range(STEPS)]
    return dict(state_dict=model.state_dict(), inputs=inputs, targets=targets)


def reference_model(name: str, case: dict) -> nn.Module:
    """The BatchNorm2d model on plain PyTorch convs (lkconv.DepthwiseConv2d reverted to nn.Conv2d)."""
    model = lkconv.revert(build(name), inplace=True)
    model.load_state_dict(case["state_dict"], strict=True)
    assert not large_kernel_convs(model)
    return model


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny float64 convs: with 2 intra-op threads on a busy 2-core machine one call can take 100x longer."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ddp")
    cases = {name: make_case(name, seed=100 + i) for i, name in enumerate(MODELS)}
    for name, case in cases.items():
        torch.save(case, workdir / f"{name}.pt")
    _spawn(str(workdir))
    ranks = [torch.load(workdir / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]
    references = {}
    for name, case in cases.items():
        model = finetune_mode(reference_model(name, case))
        grads, params, losses = run_steps(model, model, case["inputs"], case["targets"])
        references[name] = dict(grads=grads, params=params, losses=losses)
    return dict(cases=cases, ranks=ranks, references=references)


# --- tests ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", list(MODELS))
def test_ddp_matches_single_process(ddp_run, name, variant):
    expected = ddp_run["references"][name]
    results = [ranks[f"{name}/{variant}"] for ranks in ddp_run["ranks"]]
    norms = ["SyncBatchNorm"] if variant != "batchnorm" else ["BatchNorm2d"]
    for rank, result in enumerate(results):
        assert result["norms"] == norms, f"rank {rank}: normalisation layers {result['norms']}"
        # DDP wraps the BatchNorm2d model; it refuses SyncBatchNorm on CPU, whose gradients are then all-reduced
        # by hand. Any other DDP error fails.
        if result["ddp_error"] is not None:
            assert variant != "batchnorm" and DDP_SYNCBN_CPU_ERROR in result["ddp_error"], \
                f"rank {rank}: DDP failed: {result['ddp_error']}"
        assert result["grads"].keys() == expected["grads"].keys(), f"rank {rank}: parameter names differ"
    if name.startswith("replknet"):
        convs = results[0]["large_kernel_convs"]
        assert len(convs) == 3, f"the DDP model should run three large kernels on lkconv; got {convs}"
        assert all(f"{conv}.weight" in expected["grads"] for conv in convs)
    # Gradients are real everywhere (the large kernels' included), not zeros matching zeros.
    dead = [n for n, grad in expected["grads"].items() if not grad.abs().max() > 0]
    assert not dead, f"parameters without gradient in the single-process run: {dead}"

    # Every rank holds the same averaged gradient, equal to the full batch's gradient in one process.
    for parameter, grad in expected["grads"].items():
        for rank, result in enumerate(results):
            assert_close(result["grads"][parameter], grad, TOL, f"rank {rank} grad of {parameter}")
        assert torch.equal(results[0]["grads"][parameter], results[1]["grads"][parameter]), \
            f"ranks disagree on the all-reduced grad of {parameter}"

    # The per-rank losses average to the full batch's loss.
    assert_close((results[0]["losses"] + results[1]["losses"]) / 2, expected["losses"], TOL, "mean of rank losses")

    # After the SGD steps the ranks are bit-identical and equal to the single-process run.
    initial = ddp_run["cases"][name]["state_dict"]
    for parameter, value in expected["params"].items():
        assert not torch.equal(value, initial[parameter]), f"{parameter} did not change in {STEPS} SGD steps"
        for rank, result in enumerate(results):
            assert_close(result["params"][parameter], value, TOL, f"rank {rank} {parameter} after {STEPS} steps")
        assert torch.equal(results[0]["params"][parameter], results[1]["params"][parameter]), \
            f"ranks hold different {parameter} after {STEPS} steps"


@pytest.mark.parametrize("name", list(MODELS))
def test_syncbn_conversion_keeps_structure_and_state_dict(name):
    generator = torch.Generator().manual_seed(7)
    torch.manual_seed(7)
    plain = randomize_batchnorms(build(name), generator).eval()
    batchnorms = {n for n, m in plain.named_modules() if type(m) is nn.BatchNorm2d}
    assert batchnorms and batchnorms == {n for n, m in plain.named_modules() if isinstance(m, _BatchNorm)}
    x = torch.randn(2, 3, 32, 32, generator=generator, dtype=DTYPE)
    expected = plain(x)

    converted = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(plain))
    built = build(name, "use_sync_bn")
    for how, model in (("convert_sync_batchnorm", converted), ("use_sync_bn=True", built)):
        syncs = {n for n, m in model.named_modules() if type(m) is nn.SyncBatchNorm}
        assert syncs == batchnorms, f"{how}: SyncBatchNorm at {sorted(syncs ^ batchnorms)} differs from BatchNorm2d"
        assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules()), f"{how}: a BatchNorm2d is left"
        assert large_kernel_convs(model) == large_kernel_convs(plain), f"{how}: large-kernel convs changed"
        assert list(model.state_dict()) == list(plain.state_dict()), f"{how}: state_dict keys changed"
    # Strict loading both ways: official BatchNorm2d checkpoints load into the SyncBN model and back.
    built.load_state_dict(plain.state_dict(), strict=True)
    back = build(name)
    back.load_state_dict(built.state_dict(), strict=True)
    for how, model in (("converted", converted), ("built and loaded", built), ("loaded back", back)):
        assert_close(model.eval()(x), expected, TOL, f"{name} {how} eval output")


@pytest.mark.parametrize("name", list(MODELS))
def test_reparameterize_syncbn_model(name):
    generator = torch.Generator().manual_seed(11)
    torch.manual_seed(11)
    model = randomize_batchnorms(build(name, "use_sync_bn"), generator).eval()
    x = torch.randn(2, 3, 32, 32, generator=generator, dtype=DTYPE)
    expected = model(x)
    merged = lkconv.reparameterize_model(model)
    blocks = [m for m in merged.modules() if isinstance(m, ReparamBlock)]
    assert blocks and all(block.merged for block in blocks)
    assert not any(block.merged for block in model.modules() if isinstance(block, ReparamBlock)), \
        "inplace=False changed the original model"
    if name.startswith("replknet"):  # the merged large kernels still run on lkconv
        assert len(large_kernel_convs(merged)) == 3
        assert all(n.endswith("lkb_reparam") for n in large_kernel_convs(merged))
    syncs = sum(isinstance(m, nn.SyncBatchNorm) for m in merged.modules())
    assert syncs < sum(isinstance(m, nn.SyncBatchNorm) for m in model.modules()), "no BatchNorm was merged"
    assert_close(merged(x), expected, TOL, f"{name} merged SyncBN model eval output")
