"""The outer optimizer (``qsr_outer_optimizer``) on real gloo groups with the real Accelerator and DDP.

One run per world size checks, for LocalOptimizer: ``sgd`` with lr 1 and momentum 0 is the plain average bit for
bit; ``nesterov`` matches ``torch.optim.SGD(nesterov=True)`` stepped in the test on the recorded pre-sync parameters
(buffers: the plain mean); the evaluation view is the outer-updated model and leaves training bitwise unchanged; a
mid-round resume is bitwise; a rank whose outer state differs stops every rank; with ``qsr_compress_delta`` the
outer step takes the compressed mean change.
"""

import dataclasses

import pytest
import torch
from accelerate import Accelerator
from testing_utils import BNMLP, flat_params, nesterov_reference, rank_batches, record_averages, run_distributed
from torch import nn

from qsr_hf import LocalOptimizer, QSRConfig
from qsr_hf.sync.agreement import EXTRA_SYNC
from qsr_hf.sync.compressed import compressed_average


STEPS, H, CUT, VIEW = 10, 3, 5, 4  # syncs after steps 3, 6, 9, 10; save at 5, an evaluation view at 4 (mid-round)
NESTEROV = QSRConfig(qsr_rule="constant", qsr_h_base=H, qsr_outer_optimizer="nesterov")


def _params(module):
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def _buffers(module):
    return torch.cat([b.detach().float().reshape(-1) for b in module.buffers() if b.is_floating_point()])


def _build(seed, config, accelerator):
    torch.manual_seed(seed)
    model = BNMLP()
    opt = torch.optim.AdamW(model.parameters(), lr=0.02)
    model, opt = accelerator.prepare(model, opt)
    return model, LocalOptimizer(opt, model, config, num_training_steps=STEPS)


def _snapshot(model):
    return _params(model.module), _buffers(model.module)


def _train(config, accelerator, batches, seed=0, view=False, log=None, save=None, load=None):
    model, local = _build(seed, config, accelerator)
    if load is not None:
        local.load_local_state(load)
    if log is not None:
        record_averages(local, lambda: _snapshot(model), log)
    per_step, norms = [], []
    first = STEPS - len(batches) + 1
    for i, (x, y) in enumerate(batches, first):
        nn.functional.cross_entropy(model(x), y).backward()
        local.step()
        local.zero_grad()
        per_step.append(flat_params(model.module))
        norms.append(local.stats.to_logs().get("qsr/pseudo_grad_norm"))
        if view and i == VIEW:
            local.synchronizer.enter_averaged_view()
            local.synchronizer.leave_averaged_view()
        if save is not None and i == CUT:
            local.save_local_state(save)
            return model, local, per_step, norms
    return model, local, per_step, norms


def _outer_runs(rank, world_size, tmp):
    accelerator = Accelerator()
    batches = rank_batches(rank, STEPS)
    out = {"init": _params(_build(0, NESTEROV, accelerator)[0].module)}
    plain = _train(QSRConfig(qsr_rule="constant", qsr_h_base=H), accelerator, batches)[2]
    unit = dataclasses.replace(NESTEROV, qsr_outer_optimizer="sgd", qsr_outer_lr=1.0, qsr_outer_momentum=0.0)
    unit_run = _train(unit, accelerator, batches)[2]
    out["sgd_unit_equals_plain"] = [torch.equal(a, b) for a, b in zip(plain, unit_run, strict=True)]
    out["log"] = []
    _, local, out["nesterov"], out["norms"] = _train(NESTEROV, accelerator, batches, view=True, log=out["log"])
    out["logs"] = local.stats.to_logs()
    # a mid-round checkpoint, resumed into a fresh model with another init: bitwise the run above (which had a view)
    _train(NESTEROV, accelerator, batches, save=tmp)
    out["resumed"] = _train(NESTEROV, accelerator, batches[CUT:], seed=123, load=tmp)[2]
    # a rank whose outer state differs (here: its momentum) stops every rank at the start check
    _, local = _build(0, NESTEROV, accelerator)
    local.load_local_state(tmp)
    if rank == 1:
        local.synchronizer.synced.momentum[0] += 1e-3
    try:
        local.synchronizer.check_start()
    except RuntimeError as error:
        out["differs"] = str(error)
    # qsr_compress_delta + nesterov: the outer step takes anchor + the bf16 mean change
    out["compress_log"] = []
    _train(dataclasses.replace(NESTEROV, qsr_compress_delta=True), accelerator, batches[:H], log=out["compress_log"])
    return out


@pytest.mark.parametrize("world_size", [2, 3])
def test_outer_optimizer_local_optimizer(world_size, tmp_path):
    ranks = run_distributed(_outer_runs, world_size=world_size, tmp=str(tmp_path))
    r0 = ranks[0]
    for r in ranks:
        assert all(r["sgd_unit_equals_plain"]), "sgd with lr 1, momentum 0 must be the plain average bit for bit"
        assert len(r["sgd_unit_equals_plain"]) == STEPS
        for step, (full, resumed) in enumerate(zip(r["nesterov"][CUT:], r["resumed"], strict=True), CUT + 1):
            assert torch.equal(full, resumed), f"step {step}: resumed (no view) differs from the run with a view"
        assert "different synced state (outer optimizer)" in r["differs"], "every rank must report the difference"
        assert r["logs"]["qsr/outer_lr"] == 0.7
    for step in range(1, STEPS + 1):
        same = all(torch.equal(r["nesterov"][step - 1], r0["nesterov"][step - 1]) for r in ranks)
        assert same == (step % H == 0 or step == STEPS), f"step {step}: ranks equal only right after a sync"
    # replay the syncs: plain mean of the pre-sync values, then the reference Nesterov step on the anchor
    anchor, momentum = r0["init"], None
    kinds = [entry[0] for entry in r0["log"]]
    assert kinds.count(EXTRA_SYNC) == 1 and len(kinds) == 5, kinds  # 4 scheduled syncs + the view's average
    for i, (kind, commit, *_) in enumerate(r0["log"]):
        mean_params = torch.stack([r["log"][i][2] for r in ranks]).mean(0)
        mean_buffers = torch.stack([r["log"][i][3] for r in ranks]).mean(0)
        expected, new_momentum = nesterov_reference(anchor, mean_params, momentum)
        for r in ranks:
            where = f"average {i} (kind {kind}) on a rank"
            torch.testing.assert_close(r["log"][i][4], expected, rtol=1e-5, atol=1e-6, msg=where)
            torch.testing.assert_close(r["log"][i][5], mean_buffers, rtol=1e-5, atol=1e-6, msg=where)
            assert torch.equal(r["log"][i][4], r0["log"][i][4]), f"{where}: ranks differ after the average"
        if commit:  # the view's average (commit=False) leaves anchor and momentum as they were
            norm = float((anchor - mean_params).norm())
            anchor, momentum = r0["log"][i][4], new_momentum
        else:
            assert kind == EXTRA_SYNC
    assert r0["norms"][-1] == pytest.approx(norm, rel=1e-4), "qsr/pseudo_grad_norm is the last sync's ||g||"
    # compression: the plain average is anchor + the bf16 mean change; the outer step is taken on it
    pre = [r["compress_log"][0][2] for r in ranks]
    average = compressed_average(r0["init"], pre, world_size)
    expected, _ = nesterov_reference(r0["init"], average, None)
    for r in ranks:
        torch.testing.assert_close(r["compress_log"][0][4], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"qsr_outer_optimizer": "adam"}, "qsr_outer_optimizer must be one of"),
        ({"qsr_outer_optimizer": "nesterov", "qsr_outer_lr": 0.0}, "qsr_outer_lr must be > 0"),
        ({"qsr_outer_optimizer": "nesterov", "qsr_outer_momentum": 1.0}, r"qsr_outer_momentum must be in \[0, 1\)"),
        ({"qsr_outer_optimizer": "sgd", "qsr_average_optimizer_state": True}, "qsr_average_optimizer_state=False"),
        (
            {"qsr_outer_optimizer": "sgd", "qsr_outer_state_on_cpu": True, "qsr_compress_delta": True},
            "qsr_outer_state_on_cpu=True is not implemented with qsr_compress_delta",
        ),
    ],
)
def test_outer_config_refusals(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QSRConfig(qsr_rule="constant", **kwargs)
