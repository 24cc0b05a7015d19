"""Before training, the round schedule replayed over the lr of every step (`qsr_hf.core.lr_scheduler.planned_lrs`):
a schedule whose lr reaches 0 where a round would start, or that the rule cannot follow, is refused before the first
step, not at that round."""

from qsr_hf.analysis.planner import plan
from qsr_hf.core.config import RULE_EXPONENTS, QSRConfig


def check_planned_lrs(config: QSRConfig, lrs: list[float] | None, warmup_steps: int) -> None:
    """Replay the round schedule of ``config`` over ``lrs`` before training (nothing to do when ``lrs`` is `None`).

    Raises:
        `ValueError`: for a power rule (qsr/linear/cubic), an lr <= 0 after the warm-up and before the end (the rule
            is undefined there), or any error the run would raise at a round start.
    """
    if lrs is None:
        return
    zero = next((step for step in range(warmup_steps, len(lrs)) if not lrs[step] > 0), None)
    if config.qsr_rule in RULE_EXPONENTS and zero is not None:
        raise ValueError(
            f"qsr_hf: the lr schedule, replayed before training, reaches lr={lrs[zero]} at optimizer step {zero} of "
            f"{len(lrs)}: qsr_rule={config.qsr_rule!r} computes H from the lr, which must stay > 0 until the end. "
            "Use a schedule with a minimum lr (e.g. cosine_with_min_lr), end training earlier, or qsr_rule='constant'"
        )
    try:
        plan(config, lrs, warmup_steps)
    except ValueError as error:
        raise ValueError(f"qsr_hf: the lr schedule, replayed before training, would fail: {error}") from None
