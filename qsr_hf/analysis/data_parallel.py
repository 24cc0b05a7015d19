"""`DataParallelSimulation`: the data-parallel baseline (DDP's arithmetic) for K workers in one process."""

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from qsr_hf.analysis.sharding import LossFn, OptimizerFn, SchedulerFn, trainable_bytes
from qsr_hf.core.accounting import SyncStats


class DataParallelSimulation:
    """Data-parallel training of K workers in one process: gradients averaged every step, one optimizer.

    Equivalent to DDP: each worker's shard gives a gradient, which is scaled by 1/K and summed in rank order (DDP's
    reducer), and one optimizer steps on the result, so optimizer states are those of the averaged gradient. Buffers
    (BatchNorm statistics) are those worker 0's forward produced, as DDP's ``broadcast_buffers`` leaves them on rank 0.

    Args:
        model (`nn.Module`):
            The initial model (deep-copied).
        optimizer_fn (`Callable[[nn.Module], torch.optim.Optimizer]`):
            Builds the optimizer.
        num_workers (`int`):
            K, the number of simulated workers (ranks).
        scheduler_fn (`Callable[[torch.optim.Optimizer], LRScheduler]`, *optional*):
            Builds the lr scheduler, stepped once per optimizer step.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer_fn: OptimizerFn,
        num_workers: int,
        scheduler_fn: SchedulerFn | None = None,
    ) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self.num_workers = num_workers
        self.model = copy.deepcopy(model)
        self.optimizer = optimizer_fn(self.model)
        self.scheduler = scheduler_fn(self.optimizer) if scheduler_fn is not None else None
        self._params = [p for p in self.model.parameters() if p.requires_grad]
        self._buffers = [b for b in self.model.buffers() if b is not None]
        self.stats = SyncStats(grad_bytes_per_step=trainable_bytes(model))

    @property
    def lr(self) -> float:
        """Learning rate the next optimizer step uses."""
        return self.optimizer.param_groups[0]["lr"]

    def step(self, shards: Sequence[Any], loss_fn: LossFn) -> bool:
        """One data-parallel optimizer step on the K shards of a global batch.

        Args:
            shards (`Sequence`): K shards of one global batch (see [`shard_batch`]).
            loss_fn (`Callable[[nn.Module, Any], torch.Tensor]`): the mean loss of a model on one shard.

        Returns:
            `bool`: always `True` (gradients are all-reduced every step).
        """
        if len(shards) != self.num_workers:
            raise ValueError(f"expected {self.num_workers} shards, got {len(shards)}")
        scale = 1.0 / self.num_workers
        start = [b.detach().clone() for b in self._buffers]
        total, worker0 = [torch.zeros_like(p) for p in self._params], start
        for k, shard in enumerate(shards):
            with torch.no_grad():  # every rank's forward starts from rank 0's broadcast buffers
                for b, s in zip(self._buffers, start, strict=True):
                    b.copy_(s)
            grads = torch.autograd.grad(loss_fn(self.model, shard), self._params, allow_unused=True)
            for i, g in enumerate(grads):
                if g is not None:  # DDP's reducer: each rank's gradient times 1/K, summed in rank order
                    total[i] = g.mul(scale) if k == 0 else total[i].add_(g.mul(scale))
            if k == 0:
                worker0 = [b.detach().clone() for b in self._buffers]
        with torch.no_grad():
            for b, s in zip(self._buffers, worker0, strict=True):
                b.copy_(s)
        for p, g in zip(self._params, total, strict=True):
            p.grad = g
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()
        self.stats.record_steps(self.stats.steps + 1)
        self.stats.record_sync(self.stats.grad_bytes_per_step, scheduled=True)  # one gradient all-reduce per step
        return True

    def averaged_model(self) -> nn.Module:
        """The model (already identical on every worker)."""
        return self.model
