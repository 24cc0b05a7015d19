"""`SyncClock`: where training stands in the round schedule. Pure Python, shared by every front end and the planner.

The protocol, per optimizer step: ``begin_step(lr)`` with the learning rate this step uses, then the optimizer steps,
then ``end_step()``, which says whether the round is over and the parameters must be averaged now. The length of a
round is fixed at its first step, from that step's lr: the official QSR code averages, steps the lr scheduler, and
only then computes H, so H is set by the lr of the first step of the new round.
"""

from typing import Any

from qsr_hf.core.schedules import SyncSchedule


class SyncClock:
    """Position of training in the round schedule.

    Args:
        schedule ([`SyncSchedule`]): gives the length of each round.
        total_steps (`int` or `None`): total optimizer steps of the run; when known, a round never runs past the end,
            so training ends on a sync and the final model is an averaged one (as the official code does).
    """

    def __init__(self, schedule: SyncSchedule, total_steps: int | None) -> None:
        self.schedule = schedule
        self.total_steps = total_steps
        self.step = 0  # optimizer steps completed
        self.round_index = 0  # rounds completed (= scheduled syncs done)
        self.round_start = 0  # step at which the current round began
        self.round_length = 0  # H of the current round; 0 while no round is open
        self.lr_sum = 0.0  # the lrs of the optimizer steps completed, summed in order (qsr_outer_scaling)
        self._lr = 0.0  # the lr of the step begun

    @property
    def in_round(self) -> bool:
        """Whether a round is open (its length is known)."""
        return self.round_length > 0

    @property
    def steps_into_round(self) -> int:
        """Optimizer steps taken in the current round."""
        return self.step - self.round_start if self.in_round else 0

    def begin_step(self, lr: float) -> int:
        """Start an optimizer step that uses learning rate ``lr``; opens a round if none is open.

        Returns:
            `int`: H of the round this step belongs to.
        """
        self._lr = float(lr)
        if not self.in_round:
            h = self.schedule.round_length(self.step, lr)
            if self.total_steps is not None and self.step < self.total_steps:
                h = min(h, self.total_steps - self.step)
            self.round_length = max(1, h)
            self.round_start = self.step
        return self.round_length

    def end_step(self) -> bool:
        """Finish the optimizer step. Returns `True` when the round is over and the parameters must be averaged."""
        if not self.in_round:
            raise RuntimeError("end_step() called without begin_step(lr): call begin_step before each optimizer step")
        self.step += 1
        self.lr_sum += self._lr
        if self.step - self.round_start >= self.round_length:
            self.round_index += 1
            self.round_length = 0
            return True
        return False

    def point(self) -> tuple[float, int]:
        """``(lr_sum, step)`` now: where a sync that ends here stands (the outer step's scale and momentum ramp)."""
        return self.lr_sum, self.step

    def reset_to(self, step: int) -> None:
        """Continue from optimizer step ``step`` with a new round (used when no saved position exists)."""
        self.step = step
        self.round_start = step
        self.round_length = 0

    def state_dict(self) -> dict[str, Any]:
        """Return the position (all plain ints) for checkpoints."""
        return {
            "step": self.step,
            "round_index": self.round_index,
            "round_start": self.round_start,
            "round_length": self.round_length,
            "total_steps": self.total_steps,
            "lr_sum": self.lr_sum,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position saved by :meth:`state_dict`."""
        self.step = int(state["step"])
        self.round_index = int(state["round_index"])
        self.round_start = int(state["round_start"])
        self.round_length = int(state["round_length"])
        self.lr_sum = float(state.get("lr_sum", 0.0))
