"""The lr scheduler seen from the round schedule: replay it before training, keep every rank's lr on the global step.

- Before training, the round schedule is replayed over the lr of every step (`planned_lrs`, then
  `qsr_hf.frontends.lr_schedule_check`), so a schedule whose lr reaches 0 where a round would start is refused
  before the first step, not at that round.
- A GradScaler (or DeepSpeed fp16) overflow skips the optimizer step *and* the lr scheduler's step on the rank that
  overflowed. Under DDP every rank overflows together; with local steps only one does, its lr would lag from then on,
  and H, computed from the lr, would differ between ranks. `catch_up_scheduler` steps a lagging scheduler to the
  global step, which is what the official code's retry of an overflowed batch achieves.
"""

import warnings
from typing import Any

import torch

from qsr_hf.core.logging_utils import get_logger, process_rank


logger = get_logger(__name__)


def _torch_scheduler(scheduler: Any) -> torch.optim.lr_scheduler.LRScheduler | None:
    inner = getattr(scheduler, "scheduler", scheduler)  # accelerate's AcceleratedScheduler wraps the torch one
    if isinstance(inner, torch.optim.lr_scheduler.LRScheduler) and hasattr(inner, "last_epoch"):
        return None if isinstance(inner, torch.optim.lr_scheduler.ReduceLROnPlateau) else inner
    return None


def planned_lrs(scheduler: Any, total_steps: int) -> list[float] | None:
    """The lr of parameter group 0 at every optimizer step, replayed from a `LambdaLR` (every `transformers` schedule).

    Args:
        scheduler: the run's lr scheduler (possibly wrapped by accelerate).
        total_steps (`int`): optimizer steps of the run.

    Returns:
        `list[float]` or `None`: the lrs; `None` when the scheduler cannot be replayed without stepping it.
    """
    inner = _torch_scheduler(scheduler)
    if not isinstance(inner, torch.optim.lr_scheduler.LambdaLR) or total_steps <= 0:
        return None
    base, factor = inner.base_lrs[0], inner.lr_lambdas[0]
    return [base * factor(step) for step in range(total_steps)]


def catch_up_scheduler(scheduler: Any, target_steps: int) -> int:
    """Step a torch lr scheduler that fell behind (steps skipped on overflow on this rank only).

    Args:
        scheduler: the run's lr scheduler (possibly wrapped by accelerate); `None` does nothing.
        target_steps (`int`): where every rank's scheduler is now: the global optimizer step times the scheduler
            steps per optimizer step (1 for the Trainer; ``num_processes`` for a scheduler prepared by accelerate).

    Returns:
        `int`: how many steps it was behind (0 for a scheduler it cannot read, e.g. ReduceLROnPlateau).
    """
    inner = _torch_scheduler(scheduler)
    lag = 0 if inner is None else target_steps - inner.last_epoch
    step_scheduler(inner, lag, f"scheduler step {target_steps}")
    return max(lag, 0)


def step_scheduler(scheduler: Any, lag: int, where: str) -> None:
    """Step ``scheduler`` ``lag`` times (nothing if ``lag`` <= 0) and say so, printed by this rank."""
    if lag <= 0:
        return
    with warnings.catch_warnings():
        # torch warns when a scheduler steps without an optimizer step in between: here that is the point
        warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*", category=UserWarning)
        for _ in range(lag):
            scheduler.step()
    logger.warning(
        f"qsr_hf: rank {process_rank()}: the lr scheduler was {lag} step(s) behind {where} (optimizer steps skipped "
        "on this rank only, e.g. on fp16 overflow, or a step count taken from a peer: a torchft replica that healed); "
        "stepped it so that this rank's lr and round lengths stay those of the other ranks",
        main_process_only=False,
    )
