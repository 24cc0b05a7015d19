"""Synchronization schedules: how many local optimizer steps the next round lasts.

Pure Python, no torch. A schedule maps (global optimizer step, learning rate of that step) to a round length
H >= 1. The position inside training (which step starts a round, clipping to the steps left) is kept by
:class:`qsr_hf.core.clock.SyncClock`, so every front end and the planner share one implementation.
"""

import math
from typing import Protocol, runtime_checkable


@runtime_checkable
class SyncSchedule(Protocol):
    """Anything that gives the length H of a round that starts at ``step`` with learning rate ``lr``."""

    def round_length(self, step: int, lr: float) -> int:
        """Return H (optimizer steps, >= 1) of the round that starts at global optimizer step ``step``."""
        ...


def _check_lr(step: int, lr: float) -> None:
    if not lr > 0 or math.isinf(lr):
        raise ValueError(
            f"the learning rate at the start of the round at step {step} is {lr}; the sync rule needs lr > 0. "
            "Use an lr schedule that stays above 0 (e.g. cosine with a minimum lr), or qsr_rule='constant'."
        )


class PowerSchedule:
    """Power-law rule ``H = min(h_max, max(h_base, floor((coefficient / lr) ** exponent)))``.

    ``exponent=2`` is QSR (Gu et al., ICLR 2024), ``1`` the linear rule and ``3`` the cubic rule. During the
    lr warm-up (``step < warmup_steps``) the round length is ``h_base``, as in the official QSR code: the warm-up
    lr starts near 0 and the rule would give absurd rounds.

    Args:
        coefficient (`float`):
            α in H = max(H_base, ⌊(α/η)^γ⌋), in learning-rate units.
        exponent (`int`):
            γ: 2 for QSR, 1 linear, 3 cubic.
        h_base (`int`):
            H_base, the smallest round length, in optimizer steps.
        h_max (`int` or `None`):
            Largest round length in optimizer steps, `None` for no cap.
        warmup_steps (`int`):
            Optimizer steps of lr warm-up during which H = H_base.
    """

    def __init__(self, coefficient: float, exponent: int, h_base: int, h_max: int | None, warmup_steps: int) -> None:
        self.coefficient = coefficient
        self.exponent = exponent
        self.h_base = h_base
        self.h_max = h_max
        self.warmup_steps = warmup_steps

    def round_length(self, step: int, lr: float) -> int:
        """Return H for a round that starts at ``step`` with learning rate ``lr``."""
        if step < self.warmup_steps:
            return self.h_base
        _check_lr(step, lr)
        ratio = (self.coefficient / lr) ** self.exponent
        # floor() of a huge float is fine; guard only against overflow to inf
        rule = math.floor(ratio) if math.isfinite(ratio) else 2**62
        h = max(self.h_base, rule)
        return h if self.h_max is None else min(h, self.h_max)


class ConstantSchedule:
    """Fixed round length: Local SGD/AdamW with period ``h``; ``h=1`` is data-parallel training.

    Args:
        h (`int`): round length H in optimizer steps.
    """

    def __init__(self, h: int) -> None:
        self.h = h

    def round_length(self, step: int, lr: float) -> int:
        """Return the constant H."""
        return self.h


class PostLocalSchedule:
    """Post-local SGD (Lin et al., 2020): H = 1 before ``switch_step``, then a constant ``h``.

    Args:
        switch_step (`int`): first optimizer step that runs local rounds.
        h (`int`): round length after the switch, in optimizer steps.
    """

    def __init__(self, switch_step: int, h: int) -> None:
        self.switch_step = switch_step
        self.h = h

    def round_length(self, step: int, lr: float) -> int:
        """Return 1 before the switch step, ``h`` after it (a round never crosses the switch step)."""
        if step < self.switch_step:
            return 1
        return self.h
