"""What a synchronization point checks before anything is averaged, read from a [`SyncRuntime`].

What every rank must agree on (`qsr_hf.sync.agreement`), the non-finite policy (``qsr_on_nonfinite``), and the start
check (same settings, step and world size; identical parameters, and identical synced state, within each averaging
group). The collectives themselves live in `qsr_hf.sync.agreement`; how a sync runs them is `qsr_hf.runtime.paths`.
"""

from typing import NamedTuple

import torch
import torch.distributed as dist

from qsr_hf.core.logging_utils import get_logger
from qsr_hf.runtime.protocol import SyncRuntime
from qsr_hf.sync import agreement
from qsr_hf.sync.agreement import START, SyncPoint, exchange
from qsr_hf.sync.fragments import in_sync


logger = get_logger(__name__)


class StartRow(NamedTuple):
    """One rank's values in the start check's exchange."""

    parameters_checksum: int
    synced_checksum: int
    group_leader: int  # the first global rank of this rank's averaging group


def agreement_values(rt: SyncRuntime, kind: SyncPoint) -> list[int]:
    """What every rank must agree on at a synchronization point of ``kind`` (see `qsr_hf.sync.agreement.COMMON`)."""
    clock = rt.clock
    h = rt.stats.round_length if kind == agreement.ROUND_END else clock.round_length
    tensors = rt.averager.tensors if rt.averager is not None else rt.local_tensors()
    total = -1 if clock.total_steps is None else clock.total_steps
    return [
        int(kind),
        clock.step,
        clock.round_index,
        h,
        total,
        rt.config.fingerprint(),
        agreement.layout_fingerprint(tensors),
        dist.get_world_size(),
    ]


def averaging_members(rt: SyncRuntime) -> list[int]:
    """The global ranks of this rank's averaging group."""
    group = rt.engine.process_group
    return dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))


def exclude_nonfinite(rt: SyncRuntime, bad: list[int], storage: list[torch.Tensor]) -> int | None:
    """Apply ``qsr_on_nonfinite`` when ranks ``bad`` hold NaN/inf; return the divisor of the average.

    Args:
        rt ([`SyncRuntime`]): the runtime (step, config, counters).
        bad (`list[int]`): ranks whose tensors to average are not all finite.
        storage (`list[torch.Tensor]`): where this rank's values to average live (zeroed on a bad rank).

    Returns:
        `int` or `None`: the number of ranks that count, or `None` when every rank is finite.
    """
    divisor = report_nonfinite(rt, bad)
    if divisor is not None and dist.get_rank() in bad:
        for t in storage:
            t.zero_()  # contributes nothing; receives the finite ranks' average
    return divisor


def report_nonfinite(rt: SyncRuntime, bad: list[int]) -> int | None:
    """Raise (``qsr_on_nonfinite="error"``, or no finite rank) or log that ranks ``bad`` do not count; return the
    number of ranks that do (`None` when ``bad`` is empty)."""
    if not bad:
        return None
    step = rt.clock.step
    where = f"rank(s) {bad} hold NaN/inf in the tensors to average at optimizer step {step}"
    finite = [r for r in averaging_members(rt) if r not in bad]
    if rt.config.qsr_on_nonfinite == "error" or not finite:
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
    rt.stats.record_nonfinite_sync()
    return len(finite)


def parameters_must_agree(rt: SyncRuntime) -> bool:
    """Whether every rank must hold identical parameters now: before training, at a round boundary or right after a
    whole-model average (`qsr_hf.sync.fragments.in_sync`); inside a round each rank holds its own."""
    return in_sync(rt.clock, rt.config.qsr_fragments, rt.synced_at) or rt.synced_at == rt.clock.step


def check_start(rt: SyncRuntime) -> RuntimeError | None:
    """Compare settings, step and world size (raises at once) and the starting values (returned, to defer).

    Parameters must be identical within an averaging group when training starts or resumes at a sync (inside a
    round they differ); the synced state (outer optimizer, compression anchor) must be identical always.

    Returns:
        `RuntimeError` or `None`: the parameter/synced-state difference, the same on every rank.
    """
    # parameters only: buffers (BatchNorm statistics) already differ after a first forward pass on per-rank data
    parameters = [p for p in rt.engine.module.parameters() if p.requires_grad]
    synced = rt.synced.tensors() if rt.synced is not None else []
    mine = StartRow(
        agreement.tensors_checksum(parameters), agreement.tensors_checksum(synced), min(averaging_members(rt))
    )
    rows = [StartRow(*row) for row in exchange(agreement_values(rt, START), mine)]
    leaders = [row.group_leader for row in rows]
    try:
        if parameters_must_agree(rt):
            agreement.require_identical_start([row.parameters_checksum for row in rows], leaders)
        synced_sums = [row.synced_checksum for row in rows]
        agreement.require_identical_start(synced_sums, leaders, what="synced state (outer optimizer)")
    except RuntimeError as error:
        return error
    return None
