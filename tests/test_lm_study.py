"""benchmarks/lm_study.py end to end on a tiny setting: the tuning phase on its own seed, the confirmation on fresh
seeds, the JSON's paired per-seed values, ``--confirm`` rerunning the chosen settings exactly, and ``--compress``
adding each budget's best QSR method with compressed deltas, paired against it (rerun, or reused)."""

import dataclasses
import json
import math
import sys
from pathlib import Path

import pytest
import torch


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _common
import lm_study

from qsr_hf import QSRConfig
from qsr_hf.analysis.planner import plan


TINY = (
    "--steps 16 --h 4 8 --h-base 2 --max-files 6 --vocab-size 300 --hidden 16 --layers 1 --global-batch 8 "
    "--val-blocks 8 --evals 1 --lr-grid 0.004 0.008 --jobs 1"
)
GRID = ["plain", "nesterov_0.4_0.9", "slowmo_1.0_0.5", "roundlr_nesterov_0.7_0.9"]


def test_tuning_then_confirmation_then_confirm_rerun(tmp_path, monkeypatch):
    monkeypatch.setattr(_common, "RESULTS_DIR", _common.RESULTS_DIR)  # main() points it at --out-dir: restored after
    monkeypatch.setattr(lm_study, "OUTER_GRID", {k: lm_study.OUTER_GRID[k] for k in GRID})
    out = ["--out-dir", str(tmp_path)]
    record = lm_study.main([*TINY.split(), "--seeds", "1", "2", "--name", "tiny", *out])
    assert json.loads((tmp_path / "tiny.json").read_text())["paired"] == record["paired"]
    assert (tmp_path / "tiny.md").read_text().startswith("# Language-model study")

    # tuning: seed 0 only, every lr for every method, then the whole grid for both rules at both budgets
    tuning = record["tuning_runs"]
    assert {r["seed"] for r in tuning} == {0} and {r["seed"] for r in record["runs"]} == {1, 2}
    for method in ("ddp", "constant_h4_plain", "qsr_h4_plain"):
        assert sorted(r["lr"] for r in tuning if r["method"] == method) == [0.004, 0.008]
    round_lr = {"qsr_outer_scaling", "qsr_outer_momentum_warmup"} <= {f.name for f in dataclasses.fields(QSRConfig)}
    runnable = GRID if round_lr else GRID[:-1]
    assert record["outer_grid"] == runnable
    if not round_lr:
        assert any("skipped outer setting roundlr_nesterov_0.7_0.9" in n for n in record["notes"])
    for h in (4, 8):
        for rule in ("constant", "qsr"):
            assert {r["method"] for r in tuning if r["method"].startswith(f"{rule}_h{h}_")} == {
                f"{rule}_h{h}_{o}" for o in runnable
            }
    assert {r["tokens"] for r in [*tuning, *record["runs"]]} == {16 * 8 * 32}, "equal token budget"

    # the settings: each method's tuned lr; each rule's best outer setting; QSR communicates as constant H
    settings = record["settings"]
    roles = {v["role"] for v in settings.values()}
    assert roles == {"ddp"} | {
        f"{r}_h{h}_{k}" for r in ("constant", "qsr") for h in (4, 8) for k in ("plain", "outer")
    }
    args = lm_study.make_parser().parse_args(TINY.split())
    for method, s in settings.items():
        if s["config"] is not None:
            config = QSRConfig(**s["config"])
            h = int(method.split("_")[1][1:])
            lrs, warmup = lm_study.lr_schedule(args, s["lr"]), lm_study.warmup_steps(args)
            assert plan(config, lrs, warmup).comm_volume_vs_ddp <= 1 / h + 1e-9
            assert not method.endswith("_plain") or config.qsr_outer_optimizer == "none"
    for h in (4, 8):
        for rule in ("constant", "qsr"):
            outer = [m for m, s in settings.items() if s["role"] == f"{rule}_h{h}_outer"]
            grid = [r for r in tuning if r["method"].startswith(f"{rule}_h{h}_") and not r["method"].endswith("plain")]
            assert outer == [min(grid, key=lambda r: r["val_loss"])["method"]], "the tuning seed's best"

    # the paired values: one per confirmation seed, per budget
    assert set(record["paired"]) == {"h4", "h8"}
    for p in record["paired"].values():
        for key in ("qsr_vs_constant", "qsr_vs_ddp_pct", "qsr_vs_constant_outer"):
            assert set(p[key]) == {"1", "2"} and all(math.isfinite(v) for v in p[key].values()), key
        runs = {(r["method"], r["seed"]): r["val_loss"] for r in record["runs"]}
        assert p["qsr_vs_constant"]["2"] == pytest.approx(runs[p["best_qsr"], 2] - runs[p["best_constant"], 2])
        assert p["criterion"]["met"] is False, "never on fewer than 3 seeds"

    # --confirm: the tuning run's setup and settings on the seeds given, nothing tuned again; seed 2 reproduces
    confirmed = lm_study.main(
        ["--confirm", str(tmp_path / "tiny.json"), "--seeds", "2", "--name", "again", "--jobs", "1", *out]
    )
    assert (tmp_path / "again.json").exists() and (tmp_path / "tiny.json").exists()
    assert confirmed["settings"] == settings and confirmed["tuning_runs"] == tuning
    assert confirmed["args"]["steps"] == 16 and confirmed["args"]["h"] == [4, 8], "the setup comes from the JSON"
    assert {r["seed"] for r in confirmed["runs"]} == {2}
    first = {r["method"]: r["val_loss"] for r in record["runs"] if r["seed"] == 2}
    assert {r["method"]: r["val_loss"] for r in confirmed["runs"]} == first
    assert set(confirmed["paired"]["h8"]["qsr_vs_ddp_pct"]) == {"2"}
    assert not any("compressed" in p for p in confirmed["paired"].values()), "unchanged without --compress"

    # --compress int8 --only-compressed-pair: data-parallel, each budget's best QSR method and its twin with int8
    # deltas, paired on the same seed; the uncompressed runs reproduce the confirmation's, the twins differ
    compressed = lm_study.main(
        ["--confirm", str(tmp_path / "tiny.json"), "--seeds", "2", "--name", "int8", "--jobs", "1", *out]
        + ["--compress", "int8", "--only-compressed-pair"]
    )
    assert compressed["settings"] == settings
    runs = {r["method"]: r for r in compressed["runs"]}
    best_qsr = [record["paired"][k]["best_qsr"] for k in ("h4", "h8")]
    assert set(runs) == {"ddp", *best_qsr, *(f"{m}_int8" for m in best_qsr)}
    assert {m: r["val_loss"] for m, r in runs.items() if not m.endswith("_int8")} == {
        m: first[m] for m in ("ddp", *best_qsr)
    }
    for key, m in zip(("h4", "h8"), best_qsr, strict=True):
        z = compressed["paired"][key]["compressed"]
        twin = compressed["compressed_settings"][f"{m}_int8"]
        assert (z["method"], z["of"], z["format"], z["error_feedback"]) == (f"{m}_int8", m, "int8", False)
        assert twin["config"] == {**settings[m]["config"], "qsr_compress_delta": True, "qsr_compress_format": "int8"}
        assert z["minus_uncompressed"] == {"2": runs[f"{m}_int8"]["val_loss"] - runs[m]["val_loss"]}
        assert z["minus_uncompressed"]["2"] != 0 and z["mean"] == z["minus_uncompressed"]["2"], "int8 reached it"
        assert runs[f"{m}_int8"]["comm_vs_ddp"] < runs[m]["comm_vs_ddp"] / 3, "1.016 instead of 4 B/param"
        assert set(z["vs_ddp_pct"]) == {"2"}
    assert [r["method"] for r in compressed["summary"]][-2:] == [f"{m}_int8" for m in best_qsr]
    assert "compressed deltas (int8)" in (tmp_path / "int8.md").read_text()

    # --reuse-confirmed: the uncompressed runs taken from tiny.json, only the twins run; the same pairing
    reused = lm_study.main(
        ["--confirm", str(tmp_path / "tiny.json"), "--seeds", "2", "--name", "reuse", "--jobs", "1", *out]
        + ["--compress", "int8", "--only-compressed-pair", "--reuse-confirmed"]
    )
    assert reused["paired"] == compressed["paired"] and reused["summary"] == compressed["summary"]
    assert any("not rerun" in n for n in reused["notes"])


def test_inner_adamw_clips_each_workers_gradient_before_its_step():
    args = lm_study.make_parser().parse_args([])
    assert (args.beta2, args.clip) == (0.95, 1.0)
    model = torch.nn.Linear(4, 4)
    optimizer = lm_study.optimizer_fns(args, 1e-3)[0](model)
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.95)
    for p in model.parameters():
        p.grad = torch.full_like(p, 100.0)
    optimizer.step()  # the pre-hook clipped the gradient in place, as the Trainer does before each rank's step
    norm = torch.linalg.vector_norm(torch.cat([p.grad.view(-1) for p in model.parameters()]))
    assert norm == pytest.approx(1.0, rel=1e-5)
