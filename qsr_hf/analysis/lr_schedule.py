"""The learning rate of every optimizer step, produced by the same scheduler code the Trainer runs."""

from typing import Any

import torch
from transformers import get_scheduler


def lr_sequence(
    peak_lr: float,
    total_steps: int,
    warmup_steps: int = 0,
    scheduler_type: str = "cosine_with_min_lr",
    scheduler_kwargs: dict[str, Any] | None = None,
) -> list[float]:
    """Build a real scheduler on a dummy optimizer and return the lr that each optimizer step uses.

    Args:
        peak_lr (`float`): learning rate after warm-up (``TrainingArguments.learning_rate``).
        total_steps (`int`): optimizer steps.
        warmup_steps (`int`, defaults to 0): linear warm-up steps.
        scheduler_type (`str`, defaults to `"cosine_with_min_lr"`):
            any `transformers` scheduler type (``cosine``, ``linear``, ``constant_with_warmup``, ...) or ``step``
            (warm-up, then the lr times ``gamma`` at each of ``milestones``, as torch's MultiStepLR).
        scheduler_kwargs (`dict`, *optional*): extra arguments, e.g. ``{"min_lr": 1e-6}`` or
            ``{"milestones": [30000, 60000], "gamma": 0.1}`` for ``step``.

    Returns:
        `list[float]`: ``total_steps`` learning rates.
    """
    kwargs = dict(scheduler_kwargs or {})
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak_lr)
    if scheduler_type == "step":
        milestones = sorted(kwargs.pop("milestones", []))
        gamma = kwargs.pop("gamma", 0.1)

        def factor(step: int) -> float:
            if step < warmup_steps:
                return step / max(1, warmup_steps)
            return gamma ** sum(step >= m for m in milestones)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    else:
        scheduler = get_scheduler(
            scheduler_type,
            optimizer,
            num_warmup_steps=warmup_steps,
            num_training_steps=total_steps,
            scheduler_specific_kwargs=kwargs,
        )
    if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        raise TypeError(f"scheduler type {scheduler_type!r} is not a LambdaLR; qsr-hf plan cannot replay it")
    # LambdaLR sets lr = base_lr * lr_lambda(step) at step `step`: evaluate that directly, without stepping
    lr_lambda = scheduler.lr_lambdas[0]
    return [peak_lr * lr_lambda(step) for step in range(total_steps)]
