"""What every model in the zoo shares: the choice of BatchNorm class and activation checkpointing of blocks."""

import contextlib
from typing import Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .. import backends


def batchnorm_class(use_sync_bn: bool) -> type:
    """SyncBatchNorm for multi-GPU training that asks for it, BatchNorm2d otherwise."""
    return nn.SyncBatchNorm if use_sync_bn else nn.BatchNorm2d


def run_block(module: nn.Module, x: torch.Tensor, use_checkpoint: bool) -> torch.Tensor:
    """Runs `module`, recomputing its activations in backward instead of storing them when asked to.

    The recomputation runs with BatchNorm statistics frozen: otherwise every checkpointed BatchNorm would update
    its running statistics twice per step, and the merge, which reads them, would see a different model. It also
    runs under the forward's `lkconv.use_backend`, which the backward (where it happens) does not see.
    """
    if use_checkpoint and torch.is_grad_enabled():
        request = backends.scoped_request()

        def contexts():
            return contextlib.nullcontext(), _recompute_context(module, request)

        return checkpoint(module, x, use_reentrant=False, context_fn=contexts)
    return module(x)


@contextlib.contextmanager
def _recompute_context(module: nn.Module, backend_request: Optional[str]):
    with _frozen_batchnorm_statistics(module), \
            (backends.scope(backend_request) if backend_request is not None else contextlib.nullcontext()):
        yield


@contextlib.contextmanager
def _frozen_batchnorm_statistics(module: nn.Module):
    """Momentum 0 leaves running_mean/var exactly as they are; the batch counter is put back afterwards."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m, m.momentum, m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum, count in saved:
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)
