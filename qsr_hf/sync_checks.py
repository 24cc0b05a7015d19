"""The checks a synchronization point runs before anything is averaged, for the [`Synchronizer`].

What every rank must agree on (`qsr_hf.agreement`), the non-finite policy (``qsr_on_nonfinite``), and the start
check (same settings, step and world size; identical parameters, and identical synced state, within each averaging
group). The collectives themselves live in `qsr_hf.agreement`.
"""

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from qsr_hf import agreement
from qsr_hf.agreement import END, START, exchange
from qsr_hf.averaging import ParameterAverager, Transform
from qsr_hf.fragments import in_sync
from qsr_hf.logging_utils import get_logger
from qsr_hf.sync_header import average_with_header


if TYPE_CHECKING:
    from qsr_hf.synchronizer import Synchronizer


logger = get_logger(__name__)


def agreement_values(sync: "Synchronizer", kind: int) -> list[int]:
    """What every rank must agree on at a synchronization point of ``kind`` (see `qsr_hf.agreement.COMMON`)."""
    clock = sync.clock
    h = sync.stats.round_length if kind == agreement.ROUND_END else clock.round_length
    tensors = sync.averager.tensors if sync.averager is not None else sync.local_tensors()
    total = -1 if clock.total_steps is None else clock.total_steps
    return [
        kind,
        clock.step,
        clock.round_index,
        h,
        total,
        sync.config.fingerprint(),
        agreement.layout_fingerprint(tensors),
        dist.get_world_size(),
    ]


def averaging_members(sync: "Synchronizer") -> list[int]:
    """The global ranks of this rank's averaging group."""
    group = sync.engine.process_group
    return dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))


def exclude_nonfinite(sync: "Synchronizer", bad: list[int], storage: list[torch.Tensor]) -> int | None:
    """Apply ``qsr_on_nonfinite`` when ranks ``bad`` hold NaN/inf; return the divisor of the average.

    Args:
        sync ([`Synchronizer`]): the runtime (step, config, counters).
        bad (`list[int]`): ranks whose tensors to average are not all finite.
        storage (`list[torch.Tensor]`): where this rank's values to average live (zeroed on a bad rank).

    Returns:
        `int` or `None`: the number of ranks that count, or `None` when every rank is finite.
    """
    divisor = report_nonfinite(sync, bad)
    if divisor is not None and dist.get_rank() in bad:
        for t in storage:
            t.zero_()  # contributes nothing; receives the finite ranks' average
    return divisor


def report_nonfinite(sync: "Synchronizer", bad: list[int]) -> int | None:
    """Raise (``qsr_on_nonfinite="error"``, or no finite rank) or log that ranks ``bad`` do not count; return the
    number of ranks that do (`None` when ``bad`` is empty)."""
    if not bad:
        return None
    step = sync.clock.step
    where = f"rank(s) {bad} hold NaN/inf in the tensors to average at optimizer step {step}"
    finite = [r for r in averaging_members(sync) if r not in bad]
    if sync.config.qsr_on_nonfinite == "error" or not finite:
        raise RuntimeError(
            f"qsr_hf: {where}; every rank stops here so that they do not spread through the average. Lower the "
            "learning rate or enable gradient clipping, resume from the last checkpoint, or set "
            "qsr_on_nonfinite='skip_rank' to average the finite ranks only"
            + ("" if finite else " (no rank of this averaging group is finite)")
        )
    if dist.get_rank() in bad:
        logger.warning(
            f"qsr_hf: rank {dist.get_rank()} holds NaN/inf at optimizer step {step}: its tensors are replaced by the "
            f"average of ranks {finite} (qsr_on_nonfinite='skip_rank')",
            main_process_only=False,
        )
    else:
        logger.warning(f"qsr_hf: {where}; averaging ranks {finite} only (qsr_on_nonfinite='skip_rank')")
    sync.stats.nonfinite_syncs += 1
    return len(finite)


def exchange_then_average(
    sync: "Synchronizer",
    kind: int,
    storage: list[torch.Tensor],
    transform: Transform,
    overlap: bool,
    buckets: list[int] | None = None,
) -> int | None:
    """The separate check (one all-gather: agreement values and a non-finite flag), then the average.

    Args:
        overlap (`bool`): start the average overlapped (``qsr_overlap_sync``) if every rank is finite.
        buckets (`list[int]`, *optional*): the averager's buckets to average (``qsr_fragments``); `None`: all.

    Returns:
        `int` or `None`: bytes this rank contributed; `None` when the average was started overlapped.
    """
    measure = overlap and sync.overlap.auto  # qsr_overlap_auto: the measurements ride along until it chose
    local = [int(not agreement.all_finite(storage))] + (sync.overlap.measurement_us() if measure else [])
    rows = exchange(agreement_values(sync, kind), local)
    divisor = exclude_nonfinite(sync, [r for r, row in enumerate(rows) if row[0]], storage)
    if measure:
        sync.overlap.choose([row[1:] for row in rows])
    if overlap and divisor is None:
        sync.overlap.start(transform)
        sync.stats.overlap_steps = sync.overlap.steps
        return None
    if buckets is not None:  # only a ParameterAverager selects buckets (fragments are DDP only)
        return sync.averager.average(divisor, transform=transform, buckets=buckets)
    return sync.averager.average(divisor, transform=transform)


def folds_checks(sync: "Synchronizer", buckets: list[int] | None = None) -> bool:
    """Whether this sync's checks ride on its averaging collective (`qsr_hf.sync_header`): a plain
    [`ParameterAverager`] over every rank with float32/float64 values (in ``buckets``, `None`: all), no overlap.
    Otherwise (compression, overlap, hierarchical, FSDP2, torchft, a single averaged tensor as DeepSpeed's) a separate
    all-gather checks first."""
    averager = sync.averager
    return (
        type(averager) is ParameterAverager
        and averager.header_index(buckets) is not None
        and sync.overlap is None
        and dist.get_world_size(averager.process_group) == dist.get_world_size()
    )


def average_checked(
    sync: "Synchronizer",
    kind: int,
    storage: list[torch.Tensor],
    transform: Transform,
    divisor: int | None = None,
    buckets: list[int] | None = None,
) -> int:
    """Average with the checks in the same collective (`qsr_hf.sync_header.average_with_header`); the detailed
    exchange runs only when the summed header shows a disagreement or a rank that does not count, and raises or logs
    exactly as the separate check does.

    A rank whose values are not finite contributes zeros whatever the policy. In-place averaging has written the
    sum into the tensors by the time a check fails: after such a stop the model in memory is not the local one, and
    training resumes from the last checkpoint (which holds every rank's local state).

    Returns:
        `int`: bytes this rank contributed.
    """
    values = agreement_values(sync, kind)

    def unhealthy(finite: bool) -> int | None:
        rows = exchange(values, [int(not finite)])  # raises on every rank, naming what differs
        return report_nonfinite(sync, [r for r, (bad,) in enumerate(rows) if bad])

    return average_with_header(sync.averager, values, storage, unhealthy, divisor, transform, buckets)


def check_end(sync: "Synchronizer") -> None:
    """The end-of-training check: every rank ends at the same step.

    With folded checks, a rank that ends on the run's last step right after its sync has nothing to check (that
    sync's header compared every rank at this step). A rank that ends elsewhere after a sync (an early stop) checks
    in a collective shaped like a sync, so that it pairs with another rank's sync: rank 0 sends its tensors and the
    others -0.0 (``x + (-0.0) == x`` bitwise), so on a healthy end nothing changes. Otherwise, the separate exchange.
    """
    clock = sync.clock
    if not folds_checks(sync) or sync.synced_at != clock.step:
        exchange(agreement_values(sync, END))
    elif clock.total_steps is None or clock.step != clock.total_steps:
        sync.averager.ensure_views()
        storage = sync.averaged_storage()
        if dist.get_rank() != 0:
            for t in storage:
                t.fill_(-0.0)
        average_checked(sync, END, storage, transform=None, divisor=1)
        sync.engine.after_average()


def parameters_must_agree(sync: "Synchronizer") -> bool:
    """Whether every rank must hold identical parameters now: before training, at a round boundary or right after a
    whole-model average (`qsr_hf.fragments.in_sync`); inside a round each rank holds its own."""
    return in_sync(sync.clock, sync.config.qsr_fragments, sync.synced_at) or sync.synced_at == sync.clock.step


def check_start(sync: "Synchronizer") -> RuntimeError | None:
    """Compare settings, step and world size (raises at once) and the starting values (returned, to defer).

    Parameters must be identical within an averaging group when training starts or resumes at a sync (inside a
    round they differ); the synced state (outer optimizer, compression anchor) must be identical always.

    Returns:
        `RuntimeError` or `None`: the parameter/synced-state difference, the same on every rank.
    """
    # parameters only: buffers (BatchNorm statistics) already differ after a first forward pass on per-rank data
    parameters = [p for p in sync.engine.module.parameters() if p.requires_grad]
    synced = sync.synced.tensors() if sync.synced is not None else []
    local = [agreement.tensors_checksum(parameters), agreement.tensors_checksum(synced), min(averaging_members(sync))]
    rows = exchange(agreement_values(sync, START), local)
    leaders = [row[2] for row in rows]
    try:
        if parameters_must_agree(sync):
            agreement.require_identical_start([row[0] for row in rows], leaders)
        agreement.require_identical_start([row[1] for row in rows], leaders, what="synced state (outer optimizer)")
    except RuntimeError as error:
        return error
    return None
