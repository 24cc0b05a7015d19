"""`OverlappedSync`: the one-step-delayed parameter average (``qsr_overlap_sync``), off by default.

At the end of a round the all-reduce of the parameters is started asynchronously and training goes on: the next
optimizer step runs on the local (not yet averaged) parameters while the average travels. At the end of that step the
result is folded in, keeping the step's local change on top of the average:

    params = average(params sent at the round end) + (params now - params sent)

With an outer optimizer the average is turned into its step's result before the local change is added back.
This is not the exact QSR update (the step after a sync starts from local rather than averaged parameters): it is the
delayed variant of overlapping communication with computation, as in delayed / overlapped local SGD. The change is one
step of drift per round; with the last step of training the sync is blocking, so the final model is an exact average,
and so is every sync before an evaluation or a checkpoint (``sync_now`` folds any average in flight first).
"""

import math
import time
from typing import Any

from qsr_hf.core.logging_utils import get_logger
from qsr_hf.sync.averaging import AverageHandle, ParameterAverager, Transform


logger = get_logger(__name__)

MAX_AUTO_STEPS = 64  # qsr_overlap_auto never delays an average by more optimizer steps than this


class OverlappedSync:
    """Start a round's average without waiting; fold it in ``steps`` optimizer steps later.

    Args:
        averager ([`ParameterAverager`]): must be in copy mode (the parameters stay usable while the average is in
            flight).
        steps (`int`, defaults to 1): optimizer steps the average may take (``qsr_overlap_steps``).
        auto (`bool`, defaults to `False`): ``qsr_overlap_auto``: :meth:`choose` replaces ``steps`` once, from the
            measurements of every rank (each in-flight average records its transfer time and one step's time).

    Example:

    ```python
    overlap = OverlappedSync(ParameterAverager(tensors, mode="copy"))
    overlap.start()  # at the round end
    ...  # one more optimizer step on the local parameters
    overlap.finish()  # params = average + the step's local change
    ```
    """

    def __init__(self, averager: ParameterAverager, steps: int = 1, auto: bool = False) -> None:
        if averager.mode != "copy":
            raise ValueError("qsr_overlap_sync needs ParameterAverager(mode='copy'): in-place buffers are in flight")
        self.averager = averager
        self.steps = steps
        self.auto = auto  # steps still to be chosen
        self._handle: AverageHandle | None = None
        self._age = 0  # optimizer steps taken since the average in flight was started
        self._started = self._first_step = self._arrived = 0.0  # seconds: start time, then durations since it
        self.measured: tuple[float, float] | None = None  # (transfer, one step) of the last average folded in, s

    @property
    def pending(self) -> bool:
        """Whether an average is in flight."""
        return self._handle is not None

    def start(self, transform: Transform = None) -> int:
        """Start averaging the current values (folding in any average still in flight first).

        Args:
            transform (`Callable[[int, torch.Tensor], None]`, *optional*): applied to each bucket's average when
                it arrives, before the local change is added back (the outer optimizer's step).

        Returns:
            `int`: bytes this rank contributes to the collectives.
        """
        self.finish()
        self._handle = self.averager.average(async_op=True, keep_local_change=True, transform=transform)
        self._age, self._started, self._first_step, self._arrived = 0, time.perf_counter(), 0.0, 0.0
        return self.averager.bytes_per_sync

    def step_done(self) -> bool:
        """Count one optimizer step; fold the average in if it has had its ``steps``. Returns whether it did."""
        if self._handle is None:
            return False
        self._age += 1
        elapsed = time.perf_counter() - self._started
        self._first_step = self._first_step or elapsed
        if not self._arrived and self._handle.arrived:  # seen at a step's end: at most the steps that hid it
            self._arrived = elapsed
        return self._age >= self.steps and self.finish()

    def finish(self) -> bool:
        """Wait for the average in flight, if any, and fold it in. Returns whether there was one."""
        if self._handle is None:
            return False
        handle, self._handle = self._handle, None
        handle.wait()
        if self._first_step:  # folded after at least one step (not at once by a round end): a measurement
            self.measured = (self._arrived or time.perf_counter() - self._started, self._first_step)
        return True

    def measurement_us(self) -> list[int]:
        """This rank's last measurement for :meth:`choose`: [transfer, one step] in microseconds ([0, 0]: none)."""
        return [max(1, round(1e6 * t)) for t in self.measured] if self.measured else [0, 0]

    def choose(self, measurements: list[list[int]]) -> bool:
        """``qsr_overlap_auto``: set ``steps`` once every rank has measured: the steps that hide the transfer on the
        slowest rank, ``max(ceil(transfer / step))`` over ranks (at most `MAX_AUTO_STEPS`). The same on every rank
        when ``measurements`` (by rank, from `measurement_us`) are. Returns whether it chose."""
        if not self.auto or not all(t > 0 and s > 0 for t, s in measurements):
            return False
        self.steps = min(MAX_AUTO_STEPS, max(1, *(math.ceil(t / s) for t, s in measurements)))
        self.auto = False
        seconds = [f"{t / 1e6:.3f}/{s / 1e6:.3f}" for t, s in measurements]
        logger.info(
            f"qsr_hf: qsr_overlap_auto chose qsr_overlap_steps={self.steps} (transfer/step s by rank: {seconds})"
        )
        return True

    def state_dict(self) -> dict[str, Any]:
        """The depth and whether it is still to be chosen (checkpoints resume with the chosen one)."""
        return {"steps": self.steps, "auto": self.auto}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.steps, self.auto = int(state["steps"]), bool(state["auto"])
