"""Checks of `QSRConfig` field combinations (pure): each raises a `ValueError` naming the field and the fix."""

import math
from typing import Protocol


class Settings(Protocol):
    """The `QSRConfig` fields these checks read by name (the checks run from its ``__post_init__``, so they take it
    through this protocol rather than importing it)."""

    qsr_average_optimizer_state: bool
    qsr_compress_delta: bool
    qsr_compress_format: str
    qsr_compress_error_feedback: bool
    qsr_fragments: int
    qsr_outer_lr: float
    qsr_outer_momentum: float
    qsr_outer_state_on_cpu: bool
    qsr_overlap_auto: bool
    qsr_overlap_steps: int
    qsr_overlap_sync: bool
    qsr_outer_optimizer: str
    qsr_outer_scaling: str
    qsr_outer_momentum_warmup: int
    qsr_bn_reestimate_batches: int
    qsr_average_buffers: bool


def check_options(config: Settings) -> None:
    """The checks of this module, and those of the BatchNorm options, in ``QSRConfig.__post_init__``'s order."""
    if not isinstance(config.qsr_bn_reestimate_batches, int) or config.qsr_bn_reestimate_batches < 0:
        raise ValueError(
            f"qsr_bn_reestimate_batches must be an integer >= 0 (0: off), got {config.qsr_bn_reestimate_batches!r}"
        )
    if config.qsr_bn_reestimate_batches and config.qsr_average_buffers:
        raise ValueError(
            "qsr_bn_reestimate_batches > 0 is the official code's BatchNorm handling, which keeps the statistics "
            "local between syncs: set qsr_average_buffers=False with it (or qsr_bn_reestimate_batches=0)"
        )
    check_overlap(config)
    check_fragments(config)
    check_compress_delta(config)
    check_outer_optimizer(config)


def _check_outer_schedule(config: Settings) -> None:
    # qsr_outer_scaling / qsr_outer_momentum_warmup: in range, and only where there is an outer step to shape
    warmup = config.qsr_outer_momentum_warmup
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(
            f"qsr_outer_momentum_warmup must be an integer >= 0 (optimizer steps over which the outer momentum ramps "
            f"from 0 to qsr_outer_momentum; 0: no ramp), got {warmup!r}"
        )
    if config.qsr_outer_optimizer != "none":
        return
    for name, value, off in (
        ("qsr_outer_scaling", config.qsr_outer_scaling, "none"),
        ("qsr_outer_momentum_warmup", warmup, 0),
    ):
        if value != off:
            raise ValueError(
                f"{name}={value!r} shapes the outer optimizer's step, but qsr_outer_optimizer='none' takes no outer "
                f"step: set qsr_outer_optimizer='sgd' or 'nesterov', or {name}={off!r}"
            )


def check_outer_optimizer(config: Settings) -> None:
    """Refuse outer-optimizer settings that are out of range or combined with what it does not support."""
    _check_outer_schedule(config)
    if config.qsr_outer_optimizer == "none":
        return
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
    """Refuse the combinations ``qsr_compress_delta`` does not work with, and its options without it, naming the
    field to change."""
    for name, off in (("qsr_compress_format", "bf16"), ("qsr_compress_error_feedback", False)):
        value = getattr(config, name)
        if value != off and not config.qsr_compress_delta:
            raise ValueError(
                f"{name}={value!r} sets how qsr_compress_delta sends the round's change, but qsr_compress_delta="
                f"False sends the parameters in full: set qsr_compress_delta=True, or {name}={off!r}"
            )
    if not config.qsr_compress_delta:
        return
    conflicts = {
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
