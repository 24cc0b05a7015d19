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

from qsr_hf.averaging import AverageHandle, ParameterAverager, Transform


class OverlappedSync:
    """Start a round's average without waiting; fold it in ``steps`` optimizer steps later.

    Args:
        averager ([`ParameterAverager`]): must be in copy mode (the parameters stay usable while the average is in
            flight).
        steps (`int`, defaults to 1): optimizer steps the average may take (``qsr_overlap_steps``).

    Example:

    ```python
    overlap = OverlappedSync(ParameterAverager(tensors, mode="copy"))
    overlap.start()  # at the round end
    ...  # one more optimizer step on the local parameters
    overlap.finish()  # params = average + the step's local change
    ```
    """

    def __init__(self, averager: ParameterAverager, steps: int = 1) -> None:
        if averager.mode != "copy":
            raise ValueError("qsr_overlap_sync needs ParameterAverager(mode='copy'): in-place buffers are in flight")
        self.averager = averager
        self.steps = steps
        self._handle: AverageHandle | None = None
        self._age = 0  # optimizer steps taken since the average in flight was started

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
        self._age = 0
        return self.averager.bytes_per_sync

    def step_done(self) -> bool:
        """Count one optimizer step; fold the average in if it has had its ``steps``. Returns whether it did."""
        if self._handle is None:
            return False
        self._age += 1
        return self._age >= self.steps and self.finish()

    def finish(self) -> bool:
        """Wait for the average in flight, if any, and fold it in. Returns whether there was one."""
        if self._handle is None:
            return False
        handle, self._handle = self._handle, None
        handle.wait()
        return True
