"""How a sync runs its checks and its average: one [`SyncPath`], chosen once when the [`Synchronizer`] is built.

- [`SeparateChecks`]: one all-gather of the agreement values and a non-finite flag (`qsr_hf.sync.agreement`), then
  the average. Compression, hierarchical, FSDP2 and torchft syncs, and DeepSpeed's single averaged tensor.
- [`FoldedChecks`]: the checks ride on the average's own collective (`qsr_hf.sync.header`) wherever the averaged
  selection has a float32/float64 bucket to carry them; the detailed all-gather runs only when the summed header
  shows a difference or a rank that does not count. A plain [`ParameterAverager`] over every rank (DDP, DeepSpeed).
- [`OverlappedChecks`]: the separate checks, then a round end's or a fragment's average started without waiting
  (``qsr_overlap_sync``) and folded in later (`qsr_hf.sync.overlap`); every other sync blocks.
"""

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from qsr_hf.runtime.checks import agreement_values, exclude_nonfinite, report_nonfinite
from qsr_hf.runtime.protocol import SyncRuntime
from qsr_hf.sync.agreement import END, FRAGMENT_SYNC, ROUND_END, SyncPoint, all_finite, exchange
from qsr_hf.sync.averaging import ParameterAverager, Transform


class SyncPath:
    """How the syncs of one [`SyncRuntime`] check and average (base class: :class:`SeparateChecks`' behaviour).

    Args:
        rt ([`SyncRuntime`]): the runtime whose syncs this path runs.
    """

    folds = False  # whether a sync's checks can ride on its average

    def __init__(self, rt: SyncRuntime) -> None:
        self.rt = rt

    def average(
        self, kind: SyncPoint, storage: list[torch.Tensor], transform: Transform, buckets: list[int] | None = None
    ) -> int | None:
        """Check, then average ``storage`` (the averager's, for ``buckets``; `None`: all).

        Returns:
            `int` or `None`: bytes this rank contributed; `None` when the average was started overlapped.
        """
        _, divisor = self._check(kind, storage)
        return self._average(divisor, transform, buckets)

    def _check(
        self, kind: SyncPoint, storage: list[torch.Tensor], extra: Sequence[int] = ()
    ) -> tuple[list[list[int]], int | None]:
        # the separate check: one all-gather of the agreement values, this rank's non-finite flag and ``extra``;
        # returns every rank's [flag, *extra] and the divisor the non-finite policy calls for
        rows = exchange(agreement_values(self.rt, kind), [int(not all_finite(storage)), *extra])
        return rows, exclude_nonfinite(self.rt, [r for r, row in enumerate(rows) if row[0]], storage)

    def _average(self, divisor: int | None, transform: Transform, buckets: list[int] | None) -> int:
        if buckets is not None:  # only a ParameterAverager selects buckets (fragments are DDP only)
            return self.rt.averager.average(divisor, transform=transform, buckets=buckets)
        return self.rt.averager.average(divisor, transform=transform)

    def check_end(self) -> None:
        """The end-of-training check: every rank ends at the same step (one all-gather)."""
        exchange(agreement_values(self.rt, END))


SeparateChecks = SyncPath


class OverlappedChecks(SyncPath):
    """The separate checks; a round end's or a fragment's average (not the last step's) starts overlapped
    (``qsr_overlap_sync``; with ``qsr_fragments`` several may be in flight), and with ``qsr_overlap_auto`` each rank's
    transfer and step times ride on the exchange until the depth is set."""

    def average(
        self, kind: SyncPoint, storage: list[torch.Tensor], transform: Transform, buckets: list[int] | None = None
    ) -> int | None:
        """See :meth:`SyncPath.average`."""
        rt, overlap = self.rt, self.rt.overlap
        clock = rt.clock
        last = clock.total_steps is not None and clock.step >= clock.total_steps
        if kind not in (ROUND_END, FRAGMENT_SYNC) or last:
            return super().average(kind, storage, transform, buckets)
        measure = overlap.auto
        rows, divisor = self._check(kind, storage, overlap.measurement_us() if measure else ())
        if measure:
            overlap.choose([row[1:] for row in rows])
        if divisor is not None:  # a rank left out: this sync blocks, every average in flight folded in first
            rt.finish_overlap()
            return self._average(divisor, transform, buckets)
        overlap.start(transform, buckets)
        rt.stats.record_overlap_depth(overlap.steps)
        return None


class FoldedChecks(SyncPath):
    """The checks in the average's own collective (`qsr_hf.sync.header`) where the selection can carry them."""

    folds = True

    def average(
        self, kind: SyncPoint, storage: list[torch.Tensor], transform: Transform, buckets: list[int] | None = None
    ) -> int | None:
        """See :meth:`SyncPath.average`; a selection without a float32/float64 bucket takes the separate checks."""
        if self.rt.averager.header_index(buckets) is None:
            return super().average(kind, storage, transform, buckets)
        return self._average_checked(kind, storage, transform, buckets=buckets)

    def _average_checked(
        self,
        kind: SyncPoint,
        storage: list[torch.Tensor],
        transform: Transform,
        divisor: int | None = None,
        buckets: list[int] | None = None,
    ) -> int:
        # A rank whose values are not finite contributes zeros whatever the policy. In-place averaging has written
        # the sum into the tensors by the time a check fails: after such a stop the model in memory is not the local
        # one, and training resumes from the last checkpoint (which holds every rank's local state).
        rt = self.rt
        values = agreement_values(rt, kind)

        def unhealthy(finite: bool) -> int | None:
            rows = exchange(values, [int(not finite)])  # raises on every rank, naming what differs
            return report_nonfinite(rt, [r for r, (bad,) in enumerate(rows) if bad])

        return average_with_header(rt.averager, values, storage, unhealthy, divisor, transform, buckets)

    def check_end(self) -> None:
        """Every rank ends at the same step. A rank that ends on the run's last step right after its sync has
        nothing to check (that sync's header compared every rank at this step). A rank that ends elsewhere after a
        sync (an early stop) checks in a collective shaped like a sync, so that it pairs with another rank's sync:
        rank 0 sends its tensors and the others -0.0 (``x + (-0.0) == x`` bitwise), so on a healthy end nothing
        changes. Otherwise, the separate exchange."""
        rt, clock = self.rt, self.rt.clock
        if rt.averager.header_index() is None or rt.synced_at != clock.step:
            super().check_end()
        elif clock.total_steps is None or clock.step != clock.total_steps:
            rt.averager.ensure_views()
            storage = rt.averager.storage()
            if dist.get_rank() != 0:
                for t in storage:
                    t.fill_(-0.0)
            self._average_checked(END, storage, transform=None, divisor=1)
            rt.after_average()


def average_with_header(
    averager: ParameterAverager,
    values: Sequence[int],
    storage: Sequence[torch.Tensor],
    on_unhealthy: Callable[[bool], int | None],
    divisor: int | None = None,
    transform: Transform = None,
    buckets: Sequence[int] | None = None,
) -> int:
    """Check this rank's values for NaN/inf, then average with the header of ``values`` in the same collective.

    A rank whose values are not finite contributes zeros (``storage``, where its values to average live, is zeroed)
    and does not count. ``on_unhealthy(finite)`` runs on every rank when the summed headers show a difference or a
    rank that does not count (``finite``: this rank's own verdict); it raises or returns the divisor. ``buckets``:
    the averager's buckets to average (`None`: all), ``storage`` being theirs.

    Returns:
        `int`: bytes this rank contributed.
    """
    finite = all_finite(storage)
    if not finite:
        for t in storage:
            t.zero_()
    header = averager.make_header(values, finite, lambda: on_unhealthy(finite), buckets)
    return averager.average(divisor, transform=transform, header=header, buckets=buckets)


def choose_path(rt: SyncRuntime, path_class: type[SyncPath] | None = None) -> SyncPath:
    """The one [`SyncPath`] of ``rt``'s syncs (called once, at construction): ``path_class`` when given (a runtime
    with its own, such as torchft's), else from the averager and the overlap."""
    averager = rt.averager
    if path_class is not None:
        return path_class(rt)
    if rt.overlap is not None:
        return OverlappedChecks(rt)
    if (
        type(averager) is ParameterAverager
        and averager.header_index() is not None
        and dist.get_world_size(averager.process_group) == dist.get_world_size()
    ):
        return FoldedChecks(rt)
    return SeparateChecks(rt)


def folds_checks(path: SyncPath) -> bool:
    """Whether a sync of every bucket on ``path`` carries its checks on its average (a healthy sync is its
    all-reduces)."""
    return path.folds and path.rt.averager.header_index() is not None
