"""The checks a synchronization point runs before anything is averaged, for the [`Synchronizer`].

What every rank must agree on (`qsr_hf.agreement`), the non-finite policy (``qsr_on_nonfinite``), and the start
check (same settings, step and world size; identical parameters, and identical synced state, within each averaging
group). The collectives themselves live in `qsr_hf.agreement`.
"""

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from qsr_hf import agreement
from qsr_hf.agreement import START, exchange
from qsr_hf.logging_utils import get_logger


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
        for t in storage:
            t.zero_()  # contributes nothing; receives the finite ranks' average
        logger.warning(
            f"qsr_hf: rank {dist.get_rank()} holds NaN/inf at optimizer step {step}: its tensors are replaced by the "
            f"average of ranks {finite} (qsr_on_nonfinite='skip_rank')",
            main_process_only=False,
        )
    else:
        logger.warning(f"qsr_hf: {where}; averaging ranks {finite} only (qsr_on_nonfinite='skip_rank')")
    sync.stats.nonfinite_syncs += 1
    return len(finite)


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
        if not sync.clock.in_round or sync.synced_at == sync.clock.step:
            agreement.require_identical_start([row[0] for row in rows], leaders)
        agreement.require_identical_start([row[1] for row in rows], leaders, what="synced state (outer optimizer)")
    except RuntimeError as error:
        return error
    return None
