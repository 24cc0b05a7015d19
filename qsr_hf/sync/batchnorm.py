"""Re-estimate BatchNorm running statistics on training batches, as the official QSR code does before evaluation.

With ``qsr_average_buffers=False`` each rank's running statistics follow its own local model between syncs. The
official code does not average them at a sync; before each evaluation every worker recomputes them on a few training
batches with the averaged parameters, and those statistics are averaged across workers. [`reestimate_batchnorm`] is
the per-rank half; [`average_batchnorm_statistics`] the average.
"""

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.distributed import ProcessGroup

from qsr_hf.sync.averaging import ParameterAverager


ForwardFn = Callable[[nn.Module, Any], Any]


def batchnorm_layers(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers of ``module`` that track running statistics, in module order."""
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def batchnorm_statistics(module: nn.Module) -> list[torch.Tensor]:
    """The running means and variances of ``module``'s BatchNorm layers (what a re-estimation changes)."""
    return [t for layer in batchnorm_layers(module) for t in (layer.running_mean, layer.running_var)]


@torch.no_grad()
def reestimate_batchnorm(module: nn.Module, batches: Iterable[Any], forward: ForwardFn) -> int:
    """Recompute the running statistics of every BatchNorm layer as the plain average over ``batches``.

    The statistics are reset, each layer's momentum is set to `None` (cumulative average) for the passes and restored
    after; the module is run in training mode without gradients and put back in the mode it was in.

    Args:
        module (`nn.Module`): the unwrapped model (not the DDP wrapper, whose forward could broadcast buffers).
        batches (`Iterable`): training batches, e.g. ``itertools.islice(train_loader, 128)``.
        forward (`Callable[[nn.Module, Any], Any]`): runs the model on one batch, e.g. ``lambda m, b: m(b[0])``.

    Returns:
        `int`: the number of batches used (0 leaves the statistics reset to mean 0 / variance 1 if layers exist).
    """
    layers = batchnorm_layers(module)
    if not layers:
        return 0
    momenta = [layer.momentum for layer in layers]
    was_training = module.training
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None
    module.train()
    used = 0
    try:
        for batch in batches:
            forward(module, batch)
            used += 1
    finally:
        for layer, momentum in zip(layers, momenta, strict=True):
            layer.momentum = momentum
        module.train(was_training)
    return used


def average_batchnorm_statistics(module: nn.Module, process_group: ProcessGroup | None, fp32_average: bool) -> int:
    """Average ``module``'s BatchNorm statistics across ``process_group``; returns the bytes this rank contributed."""
    statistics = batchnorm_statistics(module)
    return ParameterAverager(statistics, process_group, fp32_average).average() if statistics else 0
