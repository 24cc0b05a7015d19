"""`OverlappedSync`: the delayed parameter average (``qsr_overlap_sync``), off by default; with ``qsr_fragments``
one average in flight per fragment (Streaming DiLoCo's combination).

At the end of a round (with fragments: after each fragment's step of the round) the all-reduce of the parameters is
started asynchronously and training goes on: the next optimizer steps run on the local (not yet averaged) parameters
while the average travels. ``steps`` optimizer steps later the result is folded in, keeping the local change made
meanwhile on top of the average:

    params = average(params sent) + (params now - params sent)

With an outer optimizer the average is turned into its step's result (per fragment, on arrival) before the local
change is added back. This is not the exact QSR update: it is the delayed variant of overlapping communication with
computation, as in delayed / overlapped local SGD and Streaming DiLoCo. The schedule of each average in flight: it is
folded after ``steps`` optimizer steps, or at the first round end after its send if that comes sooner (before that
round end's own sends); with the last step of training the sync is blocking (the final model is an exact average),
and so is every sync before an evaluation or a checkpoint (``sync_now`` folds every average in flight first).

This object is the one owner of the averages in flight: one [`AverageHandle`] per start (a fragment's buckets, or
every bucket), each with its own age and timing.
"""

import math
import time
from collections.abc import Sequence
from typing import Any

from qsr_hf.core.logging_utils import get_logger
from qsr_hf.sync.averaging import AverageHandle, ParameterAverager, Transform
from qsr_hf.sync.compressed import CompressedAverager
from qsr_hf.sync.compressed_flight import CompressedFlight


logger = get_logger(__name__)

MAX_AUTO_STEPS = 64  # qsr_overlap_auto never delays an average by more optimizer steps than this


class _Flight:
    # one average in flight: its handle, the buckets it averages (None: all), its age in optimizer steps and its
    # timing (seconds: the start time, then the first step's and the arrival's durations since it)
    def __init__(self, handle: AverageHandle | CompressedFlight, buckets: Sequence[int] | None) -> None:
        self.handle, self.buckets, self.age = handle, None if buckets is None else list(buckets), 0
        self.started, self.first_step, self.arrived = time.perf_counter(), 0.0, 0.0

    def overlaps(self, buckets: Sequence[int]) -> bool:
        return self.buckets is None or not set(self.buckets).isdisjoint(buckets)

    def step_done(self) -> None:
        self.age += 1
        elapsed = time.perf_counter() - self.started
        self.first_step = self.first_step or elapsed
        if not self.arrived and self.handle.arrived:  # seen at a step's end: at most the steps that hid it
            self.arrived = elapsed


class OverlappedSync:
    """Start averages without waiting; fold each in ``steps`` optimizer steps later (or at the next round end).

    Args:
        averager ([`ParameterAverager`] or [`CompressedAverager`]): a plain one must be in copy mode (the parameters
            stay usable while the average is in flight); a compressed one built with ``overlap=True``.
        steps (`int`, defaults to 1): optimizer steps an average may take (``qsr_overlap_steps``), the same for
            every fragment.
        auto (`bool`, defaults to `False`): ``qsr_overlap_auto``: :meth:`choose` replaces ``steps`` once, from the
            measurements of every rank (each average in flight records its transfer time and one step's time; with
            fragments the first fragment folded after a step is measured, so the depth hides one fragment's
            transfer, and it applies to every fragment).

    Example:

    ```python
    overlap = OverlappedSync(ParameterAverager(tensors, mode="copy"))
    overlap.start()  # at the round end
    ...  # one more optimizer step on the local parameters
    overlap.step_done()  # params = average + the step's local change
    ```
    """

    def __init__(self, averager: "ParameterAverager | CompressedAverager", steps: int = 1, auto: bool = False) -> None:
        if averager.mode == "inplace":
            raise ValueError("qsr_overlap_sync needs ParameterAverager(mode='copy'): in-place buffers are in flight")
        self.averager = averager
        self.steps = steps
        self.auto = auto  # steps still to be chosen
        self._flights: list[_Flight] = []  # in start order
        self.measured: tuple[float, float] | None = None  # (transfer, one step) of the last average folded in, s

    @property
    def pending(self) -> bool:
        """Whether an average is in flight."""
        return bool(self._flights)

    @property
    def in_flight(self) -> list[list[int] | None]:
        """The buckets of each average in flight (`None`: every bucket), in start order."""
        return [None if f.buckets is None else list(f.buckets) for f in self._flights]

    def start(self, transform: Transform = None, buckets: Sequence[int] | None = None) -> int:
        """Start averaging the current values of ``buckets`` (`None`: all). An average of the same buckets must have
        been folded in first (:meth:`step_done`, :meth:`finish`): the averager refuses a bucket still in flight.

        Args:
            transform (`Callable[[int, torch.Tensor], None]`, *optional*): applied to each bucket's average when
                it arrives, before the local change is added back (the outer optimizer's step).
            buckets (`Sequence[int]`, *optional*): the averager's buckets (a fragment's); `None`: all of them.

        Returns:
            `int`: bytes this rank contributes to the collectives.
        """
        handle = self.averager.average(async_op=True, keep_local_change=True, transform=transform, buckets=buckets)
        self._flights.append(_Flight(handle, buckets))
        return self.averager.selection_bytes(buckets)

    def step_done(self, sending: Sequence[int] = ()) -> bool:
        """Count one optimizer step; fold in every average that has had its ``steps``, and every one of a bucket in
        ``sending`` (about to be averaged again: a round of H < F steps sent several fragments at its end, which the
        next round sends again at earlier steps). Returns whether one was folded."""
        for flight in self._flights:
            flight.step_done()
        return self._fold([f for f in self._flights if f.age >= self.steps or (sending and f.overlaps(sending))])

    def finish(self) -> bool:
        """Wait for every average in flight and fold it in. Returns whether there was one."""
        return self._fold(list(self._flights))

    def _fold(self, flights: list[_Flight]) -> bool:
        for flight in flights:  # in start order
            self._flights.remove(flight)
            flight.handle.wait()
            if flight.first_step:  # folded after at least one step (not at once by a round end): a measurement
                self.measured = (flight.arrived or time.perf_counter() - flight.started, flight.first_step)
        return bool(flights)

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
