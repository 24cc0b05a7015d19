"""Plan a run: replay the sync schedule over a learning-rate sequence. Pure Python, same `SyncClock` as training.

Also picks α from a target ("leave H_base at X% of training", "communicate at most Y% of data-parallel's rounds").
"""

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from qsr_hf.core.clock import SyncClock
from qsr_hf.core.config import QSRConfig
from qsr_hf.core.wire import bytes_per_value, wire_bytes


@dataclass
class Plan:
    """The rounds of a run.

    Args:
        total_steps (`int`): optimizer steps.
        round_starts (`list[int]`): first step of each round.
        round_lengths (`list[int]`): H of each round.
    """

    total_steps: int
    round_starts: list[int] = field(default_factory=list)
    round_lengths: list[int] = field(default_factory=list)

    @property
    def syncs(self) -> int:
        """Number of parameter averages (one per round)."""
        return len(self.round_lengths)

    @property
    def sync_steps(self) -> list[int]:
        """Optimizer step count after which each sync happens."""
        return [s + h for s, h in zip(self.round_starts, self.round_lengths, strict=True)]

    @property
    def comm_volume_vs_ddp(self) -> float:
        """Syncs per step: communication relative to data-parallel (one gradient all-reduce per step)."""
        return self.syncs / self.total_steps if self.total_steps else 0.0

    def first_step_above(self, h: int) -> int | None:
        """First step at which a round longer than ``h`` starts, or `None`."""
        return next((s for s, n in zip(self.round_starts, self.round_lengths, strict=True) if n > h), None)


def plan(config: QSRConfig, lrs: Sequence[float], warmup_steps: int = 0) -> Plan:
    """Replay ``config``'s schedule over the learning rate of every optimizer step.

    Args:
        config ([`QSRConfig`]): the sync rule.
        lrs (`Sequence[float]`): lr used by optimizer step 0, 1, ... (its length is the number of steps).
        warmup_steps (`int`, defaults to 0): lr warm-up steps (H = H_base during them).

    Returns:
        [`Plan`]: round starts and lengths; the last round is clipped to end with training.
    """
    clock = SyncClock(config.build_schedule(warmup_steps), len(lrs))
    result = Plan(total_steps=len(lrs))
    for step, lr in enumerate(lrs):
        opens_round = not clock.in_round
        h = clock.begin_step(lr)
        if opens_round:
            result.round_starts.append(step)
            result.round_lengths.append(h)
        clock.end_step()
    return result


def _bisect_alpha(
    config: QSRConfig, lrs: Sequence[float], warmup_steps: int, too_small: Callable[[Plan], bool]
) -> float:
    """Smallest α (to 1e-6 relative) for which ``too_small(plan)`` is False; ``too_small`` must be monotone in α."""
    lo, hi = min(lrs[warmup_steps:] or lrs) * 1e-3, max(lrs) * 1e3
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        if too_small(plan(dataclasses.replace(config, qsr_alpha=mid), lrs, warmup_steps)):
            lo = mid
        else:
            hi = mid
        if hi / lo < 1 + 1e-6:
            break
    return hi


def alpha_for_comm_budget(
    config: QSRConfig, lrs: Sequence[float], max_comm_volume_vs_ddp: float, warmup_steps: int = 0
) -> float:
    """Smallest α whose plan communicates at most ``max_comm_volume_vs_ddp`` of data-parallel's all-reduces (syncs/steps).

    Args:
        config ([`QSRConfig`]): rule (qsr/linear/cubic), H_base, h_max.
        lrs (`Sequence[float]`): lr per optimizer step.
        max_comm_volume_vs_ddp (`float`): e.g. 0.10 for "at most 10% of data-parallel's rounds".
        warmup_steps (`int`, defaults to 0): lr warm-up steps.

    Returns:
        `float`: α.
    """
    floor_ratio = plan(dataclasses.replace(config, qsr_alpha=max(lrs) * 1e3), lrs, warmup_steps).comm_volume_vs_ddp
    if max_comm_volume_vs_ddp < floor_ratio:
        raise ValueError(
            f"max_comm_volume_vs_ddp={max_comm_volume_vs_ddp} is below what H_base/warm-up allow ({floor_ratio:.4f}); raise it"
        )
    return _bisect_alpha(config, lrs, warmup_steps, lambda p: p.comm_volume_vs_ddp > max_comm_volume_vs_ddp)


def alpha_for_switch_fraction(
    config: QSRConfig, lrs: Sequence[float], fraction: float, warmup_steps: int = 0
) -> float:
    """Smallest α whose first round longer than H_base starts at or before ``fraction`` of training.

    Args:
        config ([`QSRConfig`]): rule (qsr/linear/cubic), H_base, h_max.
        lrs (`Sequence[float]`): lr per optimizer step.
        fraction (`float`): in (0, 1), e.g. 0.2 for "leave H_base after 20% of the steps".
        warmup_steps (`int`, defaults to 0): lr warm-up steps.

    Returns:
        `float`: α.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    target = fraction * len(lrs)

    def too_small(p: Plan) -> bool:
        first = p.first_step_above(config.qsr_h_base)
        return first is None or first > target

    return _bisect_alpha(config, lrs, warmup_steps, too_small)


def sync_bytes(config: QSRConfig, numel: float | None = None, world_size: int | None = None) -> dict[str, object]:
    """What one sync sends, as `SyncStats` records it (the all-reduce-equivalent buffer): the wire format and its
    bytes per parameter (scales included, padding left out: `qsr_hf.core.wire`), against fp32's 4; with ``numel``
    and ``world_size`` the bytes of one sync of ``numel`` values over that many ranks, padding included.

    ``sync_note`` names what does not change those bytes: error feedback (``qsr_compress_error_feedback``) and the
    average in flight (``qsr_overlap_sync``, every format: the same bytes, sent while training goes on).

    Returns:
        `dict`: ``sync_format``, ``sync_bytes_per_param``, ``sync_bytes_vs_fp32``, ``sync_note`` and maybe
        ``sync_bytes``.
    """
    fmt = config.qsr_compress_format if config.qsr_compress_delta else "fp32"
    per_param = 4.0 if fmt == "fp32" else bytes_per_value(fmt)
    depth = "qsr_overlap_auto" if config.qsr_overlap_auto else f"{config.qsr_overlap_steps} step(s)"
    notes = [
        *(["error feedback"] if config.qsr_compress_error_feedback else []),
        *([f"in flight, folded in {depth} later"] if config.qsr_overlap_sync else []),
    ]
    out: dict[str, object] = {
        "sync_format": fmt,
        "sync_bytes_per_param": per_param,
        "sync_bytes_vs_fp32": per_param / 4,
        "sync_note": "; ".join(notes),
    }
    if numel is not None and world_size is not None:
        n = int(numel)
        out["sync_bytes"] = 4 * n if fmt == "fp32" else wire_bytes(n, world_size, fmt)
        out["sync_bytes_vs_fp32"] = out["sync_bytes"] / (4 * n)
    return out
