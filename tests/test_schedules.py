"""Schedules, clock and config: pure, table-driven."""

import pytest

from qsr_hf import ConstantSchedule, PostLocalSchedule, PowerSchedule, QSRConfig
from qsr_hf.analysis.planner import plan
from qsr_hf.core.clock import SyncClock
from qsr_hf.core.config import make_config


# (config kwargs, lr per step, warmup, expected round lengths)
SCHEDULE_CASES = [
    # QSR: H = max(2, floor((0.1/lr)^2)); lr of the round's first step decides
    (
        {"qsr_rule": "qsr", "qsr_alpha": 0.1, "qsr_h_base": 2},
        [0.1] * 4 + [0.05] * 4 + [0.02] * 30,
        0,
        [2, 2, 4, 25, 5],
    ),
    # linear: floor(0.1/lr)
    ({"qsr_rule": "linear", "qsr_alpha": 0.1, "qsr_h_base": 2}, [0.1] * 4 + [0.02] * 12, 0, [2, 2, 5, 5, 2]),
    # cubic: floor((0.1/0.05)^3) = 8
    ({"qsr_rule": "cubic", "qsr_alpha": 0.1, "qsr_h_base": 2}, [0.1] * 2 + [0.05] * 10, 0, [2, 8, 2]),
    # warm-up: H_base while step < warmup even though the lr is tiny
    ({"qsr_rule": "qsr", "qsr_alpha": 0.1, "qsr_h_base": 3}, [1e-6] * 6 + [0.05] * 6, 6, [3, 3, 4, 2]),
    # h_max caps the rule
    ({"qsr_rule": "qsr", "qsr_alpha": 0.1, "qsr_h_base": 2, "qsr_h_max": 3}, [0.01] * 8, 0, [3, 3, 2]),
    ({"qsr_rule": "constant", "qsr_h_base": 4}, [0.1] * 10, 0, [4, 4, 2]),
    ({"qsr_rule": "ddp"}, [0.1] * 3, 0, [1, 1, 1]),
    ({"qsr_rule": "post_local", "qsr_switch_step": 3, "qsr_h_base": 4}, [0.1] * 9, 0, [1, 1, 1, 4, 2]),
]


@pytest.mark.parametrize(("kwargs", "lrs", "warmup", "expected"), SCHEDULE_CASES)
def test_round_lengths(kwargs, lrs, warmup, expected):
    assert plan(QSRConfig(**kwargs), lrs, warmup).round_lengths == expected


def test_last_round_is_clipped_to_the_end():
    result = plan(QSRConfig(qsr_alpha=1.0, qsr_h_base=2), [0.01] * 50)
    assert result.round_lengths == [50] and result.sync_steps == [50]


def test_power_schedule_formula():
    s = PowerSchedule(coefficient=0.0175, exponent=2, h_base=4, h_max=None, warmup_steps=0)
    assert s.round_length(0, 0.008) == 4  # (0.0175/0.008)^2 = 4.78 -> 4
    assert s.round_length(0, 0.001) == 306  # 306.25 -> 306
    assert ConstantSchedule(7).round_length(5, 0.1) == 7
    assert PostLocalSchedule(10, 8).round_length(9, 0.1) == 1
    assert PostLocalSchedule(10, 8).round_length(10, 0.1) == 8


@pytest.mark.parametrize("lr", [0.0, -1e-3, float("inf")])
def test_non_positive_lr_at_round_start_is_an_error(lr):
    with pytest.raises(ValueError, match="needs lr > 0"):
        PowerSchedule(0.1, 2, 2, None, 0).round_length(5, lr)


BAD_CONFIGS = [
    ({"qsr_alpha": 0.0}, "qsr_alpha must be > 0"),
    ({"qsr_alpha": -1.0}, "qsr_alpha must be > 0"),
    ({"qsr_alpha": None}, "needs qsr_alpha"),
    ({"qsr_alpha": 0.1, "qsr_h_base": 0}, "qsr_h_base must be an integer >= 1"),
    ({"qsr_alpha": 0.1, "qsr_h_base": 4, "qsr_h_max": 2}, "qsr_h_max must be >= qsr_h_base"),
    ({"qsr_rule": "constant", "qsr_bn_reestimate_batches": -1}, "qsr_bn_reestimate_batches must be an integer"),
    ({"qsr_rule": "constant", "qsr_bn_reestimate_batches": 8}, "set qsr_average_buffers=False"),
    ({"qsr_rule": "quadratic"}, "qsr_rule must be one of"),
    ({"qsr_rule": "post_local"}, "needs qsr_switch_step"),
    ({"qsr_alpha": float("inf")}, "qsr_alpha must be > 0 and finite"),
    ({"qsr_alpha": float("nan")}, "qsr_alpha must be > 0 and finite"),
    ({"qsr_alpha": [0.02]}, r"qsr_alpha must be float or None, got \[0.02\] \(list\)"),
    ({"qsr_alpha": 0.1, "qsr_h_base": True}, r"qsr_h_base must be int, got True \(bool\)"),
    ({"qsr_alpha": 0.1, "qsr_h_base": 4.0}, "qsr_h_base must be int"),
    ({"qsr_rule": "constant", "qsr_average_buffers": 1}, "qsr_average_buffers must be bool"),
    ({"qsr_rule": "constant", "qsr_on_nonfinite": "ignore"}, "qsr_on_nonfinite must be one of"),
]


@pytest.mark.parametrize(("kwargs", "match"), BAD_CONFIGS)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QSRConfig(**kwargs)


def test_config_fingerprint_is_stable_and_sensitive():
    import subprocess
    import sys

    code = "from qsr_hf.core.config import QSRConfig; print(QSRConfig(qsr_alpha=0.02).fingerprint())"
    other_process = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert int(other_process) == QSRConfig(qsr_alpha=0.02).fingerprint()  # hash() would differ per process
    assert QSRConfig(qsr_alpha=0.02).fingerprint() != QSRConfig(qsr_alpha=0.021).fingerprint()


@pytest.mark.parametrize(
    ("lrs", "rule", "match"),
    [
        ([0.1] * 5 + [0.0] * 5, "qsr", "reaches lr=0.0 at optimizer step 5 of 10"),  # mid-round: still refused
        ([0.1] * 9 + [0.0], "linear", "at optimizer step 9 of 10"),
    ],
)
def test_lr_schedule_reaching_zero_is_refused_before_training(lrs, rule, match):
    from qsr_hf.frontends.lr_schedule_check import check_planned_lrs

    with pytest.raises(ValueError, match=match):
        check_planned_lrs(QSRConfig(qsr_rule=rule, qsr_alpha=0.1, qsr_h_base=2), lrs, warmup_steps=0)
    check_planned_lrs(QSRConfig(qsr_rule="constant"), lrs, warmup_steps=0)  # H does not depend on the lr
    check_planned_lrs(QSRConfig(qsr_alpha=0.1), [0.0, 0.1, 0.1], warmup_steps=1)  # warm-up from 0 is fine


def test_planned_lrs_replays_a_transformers_schedule():
    import torch
    from transformers import get_scheduler

    from qsr_hf.core.lr_scheduler import planned_lrs

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=2, num_training_steps=6)
    expected = []
    for _ in range(6):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert planned_lrs(scheduler, 6) == pytest.approx(expected)


def test_make_config_accepts_short_names():
    assert make_config(alpha=0.02, h_base=3) == QSRConfig(qsr_alpha=0.02, qsr_h_base=3)
    with pytest.raises(TypeError, match="unknown QSR option 'beta'"):
        make_config(beta=1)


def test_clock_state_round_trip():
    clock = SyncClock(ConstantSchedule(3), total_steps=10)
    for _ in range(4):
        clock.begin_step(0.1)
        clock.end_step()
    state = clock.state_dict()
    other = SyncClock(ConstantSchedule(3), total_steps=10)
    other.load_state_dict(state)
    steps = []
    for c in (clock, other):
        out = []
        while c.step < 10:
            c.begin_step(0.1)
            out.append(c.end_step())
        steps.append(out)
    assert steps[0] == steps[1] == [False, True, False, False, True, True]
