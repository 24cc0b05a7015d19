"""What the one-process simulations share: a global batch split into K worker shards, and the callables they take."""

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler


LossFn = Callable[[nn.Module, Any], torch.Tensor]
OptimizerFn = Callable[[nn.Module], torch.optim.Optimizer]
SchedulerFn = Callable[[torch.optim.Optimizer], LRScheduler]


def shard_batch(batch: Any, num_workers: int) -> list[Any]:
    """Split a global batch into ``num_workers`` contiguous, disjoint shards along dimension 0.

    Args:
        batch (`torch.Tensor`, `tuple`, `list` or `dict` of tensors): the global batch of size B.
        num_workers (`int`): K; B must be divisible by K (each worker gets B/K examples).

    Returns:
        `list`: K shards with the structure of ``batch``; shard k holds examples ``k*B/K`` to ``(k+1)*B/K - 1``.
    """
    if isinstance(batch, torch.Tensor):
        if batch.shape[0] % num_workers:
            raise ValueError(f"global batch size {batch.shape[0]} is not divisible by num_workers={num_workers}")
        return list(batch.chunk(num_workers))
    if isinstance(batch, dict):
        parts = {key: shard_batch(value, num_workers) for key, value in batch.items()}
        return [{key: value[k] for key, value in parts.items()} for k in range(num_workers)]
    if isinstance(batch, (tuple, list)):
        parts = [shard_batch(value, num_workers) for value in batch]
        return [type(batch)(p[k] for p in parts) for k in range(num_workers)]
    raise TypeError(f"cannot shard a batch of type {type(batch).__name__}; use tensors, tuples, lists or dicts")


def trainable_bytes(model: nn.Module) -> int:
    """Bytes of the trainable parameters: what one data-parallel gradient all-reduce moves per step."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
