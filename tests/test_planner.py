"""The planner reproduces the paper's schedule, and picks alpha from a target."""

import pytest

from qsr_hf import QSRConfig, plan
from qsr_hf.analysis.lr_schedule import lr_sequence
from qsr_hf.analysis.planner import (
    alpha_for_comm_budget,
    alpha_for_switch_fraction,
    sync_bytes,
)
from qsr_hf.analysis.scaling import predict_wall_clock
from qsr_hf.cli import plan_main
from qsr_hf.core.wire import wire_bytes


VIT_STEPS, VIT_WARMUP = (
    93_600,
    10_000,
)  # paper / official code (hmgxr128/QSR @ 0ac44f1): 300 epochs x 312 steps, 10k warm-up, cosine 8e-3 -> 1e-6


@pytest.fixture(scope="module")
def vit_lrs():
    return lr_sequence(0.008, VIT_STEPS, VIT_WARMUP, "cosine_with_min_lr", {"min_lr": 1e-6})


def test_vit_b_qsr_schedule_matches_the_paper(vit_lrs):
    result = plan(QSRConfig(qsr_alpha=0.0175, qsr_h_base=4), vit_lrs, VIT_WARMUP)
    assert result.syncs == 9_711  # replay of the official code: 10.375% ~ the paper's 10.4%
    assert round(100 * result.comm_volume_vs_ddp, 1) == 10.4
    assert result.first_step_above(4) == 17_876
    assert result.round_lengths[-1] == 8_142
    assert 2_769 in result.round_lengths


def test_constant_h4_communicates_a_quarter(vit_lrs):
    assert plan(QSRConfig(qsr_rule="constant", qsr_h_base=4), vit_lrs, VIT_WARMUP).comm_volume_vs_ddp == 0.25


def test_alpha_for_comm_budget(vit_lrs):
    config = QSRConfig(qsr_alpha=1.0, qsr_h_base=4)
    alpha = alpha_for_comm_budget(config, vit_lrs[::10], 0.15, VIT_WARMUP // 10)
    assert plan(QSRConfig(qsr_alpha=alpha, qsr_h_base=4), vit_lrs[::10], VIT_WARMUP // 10).comm_volume_vs_ddp <= 0.15
    slightly_less = QSRConfig(qsr_alpha=alpha * 0.999, qsr_h_base=4)
    assert plan(slightly_less, vit_lrs[::10], VIT_WARMUP // 10).comm_volume_vs_ddp > 0.15
    with pytest.raises(ValueError, match="below what H_base"):
        # warm-up rounds alone (1,000 steps / H_base 4 of 9,360) already need 2.7%
        alpha_for_comm_budget(config, vit_lrs[::10], 0.01, VIT_WARMUP // 10)


def test_alpha_for_switch_fraction():
    lrs = [0.1 * (1 - i / 1000) + 1e-4 for i in range(1000)]
    config = QSRConfig(qsr_alpha=1.0, qsr_h_base=2)
    alpha = alpha_for_switch_fraction(config, lrs, 0.5)
    first = plan(QSRConfig(qsr_alpha=alpha, qsr_h_base=2), lrs).first_step_above(2)
    assert first <= 500
    later = plan(QSRConfig(qsr_alpha=alpha * 0.99, qsr_h_base=2), lrs).first_step_above(2)
    assert later is None or later > 500


def test_plan_cli_flags(capsys):
    summary = plan_main(
        ["--peak-lr", "0.008", "--total-steps", "9360", "--warmup-steps", "1000", "--min-lr", "1e-6", "--alpha",
         "0.0175", "--h-base", "4", "--json"]
    )  # fmt: skip
    assert (
        summary["syncs"]
        == plan(
            QSRConfig(qsr_alpha=0.0175, qsr_h_base=4),
            lr_sequence(0.008, 9360, 1000, "cosine_with_min_lr", {"min_lr": 1e-6}),
            1000,
        ).syncs
    )
    assert '"syncs"' in capsys.readouterr().out


def test_plan_cli_step_decay_and_plot(tmp_path):
    out = tmp_path / "plan.png"
    summary = plan_main(
        ["--peak-lr", "0.8", "--total-steps", "900", "--decay", "step", "--milestones", "300", "600", "--rule",
         "qsr", "--alpha", "1.0", "--h-base", "2", "--plot", str(out)]
    )  # fmt: skip
    assert out.stat().st_size > 1000
    h = {row["step"]: row["H"] for row in summary["profile"]}
    # lr 0.8 until step 300, 0.08 until 600, then 0.008: H = 2; then (1/0.08)^2 = 156 (rounds at 300, 456); the round
    # starting at 612 has lr 0.008 (H = 15,625), clipped to the 288 steps left
    assert (h[0], h[360], h[720]) == (2, 156, 900 - 612)


def test_plan_cli_predicts_wall_clock(capsys):
    flags = ["--peak-lr", "0.008", "--total-steps", "9360", "--warmup-steps", "1000", "--min-lr", "1e-6", "--alpha",
             "0.0175", "--h-base", "4"]  # fmt: skip
    wall = ["--workers", "16", "--bandwidth-gbps", "25", "--compute-s-per-step", "0.75", "--model-params", "86.6e6"]
    summary = plan_main(flags + wall)
    expected = predict_wall_clock(
        plan(QSRConfig(qsr_alpha=0.0175, qsr_h_base=4), lr_sequence(0.008, 9360, 1000, "cosine_with_min_lr",
             {"min_lr": 1e-6}), 1000),
        0.75, 4 * 86.6e6, 25e9, 16,
    )  # fmt: skip
    assert summary["wall_clock"] == expected.to_dict()
    assert summary["wall_clock"]["ddp_h"] > summary["wall_clock"]["local_h"]
    assert "predicted wall clock: data-parallel" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--compute-s-per-step"):
        plan_main([*flags, "--workers", "16"])


def test_plan_cli_constant_recipe_prints_memory(capsys):
    # the constant rule has no alpha; an outer optimizer's synced state is 8 B/param
    summary = plan_main(["recipes/llama150m_c4/diloco.yaml"])
    out = capsys.readouterr().out
    assert summary["syncs"] == 176 and "alpha=- " in out
    # an outer optimizer's anchor and momentum (8 B/value) and its work buffers (tests/test_sync_memory.py)
    assert "extra memory per averaged value: 8 B (anchor 4, outer momentum 4), + at most 32 MiB" in out


@pytest.mark.parametrize(("workers", "fmt"), [(2, "int8"), (3, "int8"), (3, "fp8"), (8, "bf16")])
def test_plan_cli_shows_the_sync_format_and_its_bytes(capsys, workers, fmt):
    # the bytes come from qsr_hf.core.wire, the formula the averager sizes its buffers with (test_compression_formats)
    n = 86_600_000
    flags = ["--peak-lr", "0.008", "--total-steps", "1000", "--alpha", "0.0175", "--compress-format", fmt]
    wall = ["--workers", str(workers), "--model-params", str(n), "--bandwidth-gbps", "1", "--compute-s-per-step", "1"]
    summary = plan_main([*flags, *wall])
    assert summary["sync_format"] == fmt and summary["sync_bytes"] == wire_bytes(n, workers, fmt)
    assert summary["sync_bytes_vs_fp32"] <= (0.27 if fmt != "bf16" else 0.5 + 1e-6)
    assert summary["sync_bytes_per_param"] == (1 + 4 / 256 if fmt != "bf16" else 2)
    assert f"sync format: {fmt}" in capsys.readouterr().out
    plain = plan_main(["--peak-lr", "0.008", "--total-steps", "1000", "--alpha", "0.0175"])
    assert plain["sync_format"] == "fp32" and plain["sync_bytes_vs_fp32"] == 1 and plain["sync_note"] == ""


def test_plan_names_error_feedback_and_the_average_in_flight():
    # the same bytes per sync in flight; the plan says so next to the format (issue 28)
    config = QSRConfig(
        qsr_alpha=0.0175, qsr_compress_delta=True, qsr_compress_format="int8", qsr_compress_error_feedback=True,
        qsr_overlap_sync=True, qsr_overlap_steps=2,
    )  # fmt: skip
    summary = sync_bytes(config, 86_600_000, 4)
    assert summary["sync_note"] == "error feedback; in flight, folded in 2 step(s) later"
    assert summary["sync_bytes"] == wire_bytes(86_600_000, 4, "int8")
