"""Checks of `QSRConfig` field combinations (pure): each raises a `ValueError` naming the field and the fix."""

import math
from typing import Protocol


class Settings(Protocol):
    """The `QSRConfig` fields these checks read by name (the checks run from its ``__post_init__``, so they take it
    through this protocol rather than importing it)."""

    qsr_average_optimizer_state: bool
    qsr_compress_delta: bool
    qsr_fragments: int
    qsr_outer_lr: float
    qsr_outer_momentum: float
    qsr_outer_state_on_cpu: bool
    qsr_overlap_auto: bool
    qsr_overlap_steps: int
    qsr_overlap_sync: bool


def check_outer_optimizer(config: Settings) -> None:
    """Refuse outer-optimizer settings that are out of range or combined with what it does not support."""
    if not (config.qsr_outer_lr > 0 and math.isfinite(config.qsr_outer_lr)):
        raise ValueError(f"qsr_outer_lr must be > 0 and finite (DiLoCo: 0.7), got {config.qsr_outer_lr!r}")
    if not 0 <= config.qsr_outer_momentum < 1:
        raise ValueError(f"qsr_outer_momentum must be in [0, 1) (DiLoCo: 0.9), got {config.qsr_outer_momentum!r}")
    if config.qsr_average_optimizer_state:
        raise ValueError(
            "qsr_outer_optimizer steps the parameters with the averaged round change; averaging the inner optimizer's "
            "state as well is not supported (DiLoCo keeps it local): set qsr_average_optimizer_state=False"
        )
    if config.qsr_outer_state_on_cpu and config.qsr_compress_delta:
        raise ValueError(
            "qsr_outer_state_on_cpu=True is not implemented with qsr_compress_delta=True (its all-to-all reads the "
            "synced parameters on the device): set one of them to False"
        )


def _refuse_conflicts(setting: str, off: str, conflicts: dict[str, str], config: Settings) -> None:
    # ``setting`` (e.g. "qsr_compress_delta=True") does not work with any of ``conflicts`` ({field: why}) switched on
    for name, why in conflicts.items():
        value = getattr(config, name)
        if value is True or (name == "qsr_worker" and value != "process"):
            raise ValueError(
                f"{setting} does not work with {name}={value!r} ({why}): set "
                f"{name}={'False' if value is True else repr('process')} or {off}"
            )


def check_compress_delta(config: Settings) -> None:
    """Refuse the combinations ``qsr_compress_delta`` does not work with, naming the field to change."""
    conflicts = {
        "qsr_overlap_sync": "not implemented: the compressed average is blocking",
        "qsr_average_optimizer_state": "bf16 changes of Adam's second moments can round below zero",
        "qsr_worker": "not implemented for the hierarchical engine",
    }
    _refuse_conflicts("qsr_compress_delta=True", "qsr_compress_delta=False", conflicts, config)


def check_fragments(config: Settings) -> None:
    """Refuse a fragment count below 1, and ``qsr_fragments > 1`` with what it does not work with."""
    count = config.qsr_fragments
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"qsr_fragments must be an integer >= 1 (1: the whole model at each sync), got {count!r}")
    conflicts = {
        "qsr_overlap_sync": "not implemented: a fragment's average is blocking",
        "qsr_compress_delta": "not implemented: the compressed average sends the whole model",
        "qsr_average_optimizer_state": "not implemented: the optimizer state is not split into fragments",
        "qsr_worker": "not implemented for the hierarchical engine",
    }
    if count > 1:
        _refuse_conflicts(f"qsr_fragments={count}", "qsr_fragments=1", conflicts, config)


def check_overlap(config: Settings) -> None:
    """Refuse overlap depths that are not a number of optimizer steps, and depth settings without the overlap."""
    steps = config.qsr_overlap_steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"qsr_overlap_steps must be an integer >= 1 (optimizer steps), got {steps!r}")
    for name, on in (("qsr_overlap_steps", steps > 1), ("qsr_overlap_auto", config.qsr_overlap_auto)):
        if on and not config.qsr_overlap_sync:
            raise ValueError(f"{name}={getattr(config, name)} needs qsr_overlap_sync=True (set it, or unset {name})")
