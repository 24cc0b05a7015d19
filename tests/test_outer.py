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
from qsr_hf.sync.wire_codec import compressed_average


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


# -- qsr_outer_scaling="round_lr" and qsr_outer_momentum_warmup ----------------------------------------------------
# a different lr at every step (0.02 x these), the first round's all 0 in one variant: S_r from the wrong steps (one
# off) changes every S_r; rounds of 3: syncs after 3, 6, 9, 10 (and an evaluation view at 4, mid-round)
FACTORS = [0.3, 1.0, 0.6, 0.9, 0.2, 0.8, 0.5, 1.0, 0.4, 0.7]
WARM = 8  # the ramp: μ_t = 0.9 t / 8 at the syncs after steps 3 and 6 (and the view at 4), 0.9 after
SCALED = dataclasses.replace(NESTEROV, qsr_outer_scaling="round_lr", qsr_outer_momentum_warmup=WARM)
VARIANTS = {
    "nesterov_round_lr_ramp": (SCALED, FACTORS),
    "sgd_round_lr": (dataclasses.replace(SCALED, qsr_outer_optimizer="sgd", qsr_outer_momentum_warmup=0), FACTORS),
    "nesterov_ramp": (dataclasses.replace(SCALED, qsr_outer_scaling="none"), FACTORS),
    "zero_first_round": (SCALED, [0.0, 0.0, 0.0, *FACTORS[3:]]),  # S_r = 0: the plain average, m untouched
}


def _train_lrs(config, accelerator, batches, lrs, seed=0, log=None, save=None, load=None, view=False, first=None):
    """``_train`` with the inner lr of step i set to ``lrs[i - 1]``; ``log``: (step, commit, before, after).
    ``first``: the step of ``batches[0]`` (default: the batches are the last ones of the run)."""
    model, local = _build(seed, config, accelerator)
    if load is not None:
        local.load_local_state(load)
    sync = local.synchronizer
    if log is not None:
        original = sync.average

        def recorded(kind, commit=True, buckets=None):
            before = _params(model.module).clone()
            original(kind, commit, buckets)
            log.append((sync.clock.step, commit, before, _params(model.module).clone()))

        sync.average = recorded
    per_step = []
    for i, (x, y) in enumerate(batches, first or STEPS - len(batches) + 1):
        for group in local.optimizer.param_groups:
            group["lr"] = lrs[i - 1]
        nn.functional.cross_entropy(model(x), y).backward()
        local.step()
        local.zero_grad()
        per_step.append(flat_params(model.module))
        if view and i == VIEW:
            sync.enter_averaged_view()
            sync.leave_averaged_view()
        if save is not None and i == CUT:
            local.save_local_state(save)
            break
    return per_step, local


def _scaled_runs(rank, world_size, tmp):
    accelerator = Accelerator()
    batches = rank_batches(rank, STEPS)
    lrs = [0.02 * f for f in FACTORS]
    out = {"init": _params(_build(0, NESTEROV, accelerator)[0].module)}
    for name, (config, factors) in VARIANTS.items():
        out[name] = []
        _train_lrs(config, accelerator, batches, [0.02 * f for f in factors], log=out[name], view=True)
    # with μ = 0 the scales cancel: round_lr is the unscaled step, bit for bit
    unit = dataclasses.replace(SCALED, qsr_outer_optimizer="sgd", qsr_outer_lr=1.0, qsr_outer_momentum=0.0)
    plain = _train_lrs(QSRConfig(qsr_rule="constant", qsr_h_base=H), accelerator, batches, lrs)[0]
    out["mu0_equals_plain"] = all(map(torch.equal, plain, _train_lrs(unit, accelerator, batches, lrs)[0]))
    # a mid-round checkpoint resumed into another init: bitwise the uninterrupted run (lr sum and marks restored)
    full, local = _train_lrs(SCALED, accelerator, batches, lrs)
    out["clock_lr_sum"] = local.synchronizer.clock.lr_sum
    _train_lrs(SCALED, accelerator, batches, lrs, save=tmp)
    resumed = _train_lrs(SCALED, accelerator, batches[CUT:], lrs, seed=123, load=tmp)[0]
    out["resumed_bitwise"] = [torch.equal(a, b) for a, b in zip(full[CUT:], resumed, strict=True)]
    # compression: two rounds, so that the second sync's step depends on S_2 / S_1
    out["compress"] = []
    _train_lrs(
        dataclasses.replace(SCALED, qsr_compress_delta=True),
        accelerator,
        batches[:6],
        lrs,
        log=out["compress"],
        first=1,
    )
    return out


def _reference_step(anchor, mean, m, work, mu, nesterov, scaled, lr=0.7):
    """The formula of docs/outer-optimizer.md in plain torch: g = θ - avg; d = g / S (round_lr) or g; m = μ m + d;
    u = d + μ m (nesterov) or m; θ' = avg + (g - η S u) (round_lr) or avg + (g - η u); S = 0: avg, m unchanged."""
    g = anchor - mean
    if scaled and work == 0:
        return mean.clone(), m
    d = g / work if scaled else g
    m = mu * m + d
    u = d + mu * m if nesterov else m
    return mean + (g - (lr * work if scaled else lr) * u), m


def _replay(r0, ranks, name, config, factors, shift=0, ramp=True):
    """Replay the recorded syncs of ``name`` with the reference: the expected values after each average, and the
    largest difference from what the ranks hold. ``shift``: S_r from the steps ``shift`` later (a planted error)."""
    lrs = [0.02 * f for f in factors] + [0.0] * abs(shift)
    anchor, m, last, worst = r0["init"], torch.zeros_like(r0["init"]), 0, 0.0
    warm = config.qsr_outer_momentum_warmup if ramp else 0
    for i, (step, commit, _, after) in enumerate(r0[name]):
        mean = torch.stack([r[name][i][2] for r in ranks]).mean(0)
        work = sum(lrs[last + shift : step + shift])
        mu = 0.9 * min(1.0, step / warm) if warm else 0.9
        scaled = config.qsr_outer_scaling == "round_lr"
        expected, new_m = _reference_step(anchor, mean, m, work, mu, config.qsr_outer_optimizer == "nesterov", scaled)
        worst = max(worst, float((expected - after).abs().max()))
        if commit:
            anchor, m, last = after, new_m, step
    return worst


@pytest.mark.parametrize("world_size", [2, 3])
def test_outer_round_lr_and_momentum_warmup(world_size, tmp_path):
    ranks = run_distributed(_scaled_runs, world_size=world_size, tmp=str(tmp_path))
    r0 = ranks[0]
    for r in ranks:
        assert r["mu0_equals_plain"], "round_lr with momentum 0 must be the plain average bit for bit"
        assert all(r["resumed_bitwise"]) and len(r["resumed_bitwise"]) == STEPS - CUT, r["resumed_bitwise"]
        assert r["clock_lr_sum"] == pytest.approx(0.02 * sum(FACTORS), rel=1e-12)
        for name in VARIANTS:
            steps = [(e[0], e[1]) for e in r[name]]
            assert steps == [(3, True), (4, False), (6, True), (9, True), (10, True)], (name, steps)
            for i, entry in enumerate(r[name]):
                assert torch.equal(entry[3], r0[name][i][3]), f"{name}: ranks differ after average {i}"
    for name, (config, factors) in VARIANTS.items():
        assert _replay(r0, ranks, name, config, factors) < 1e-5, f"{name}: the outer step is not the formula's"
        if config.qsr_outer_scaling == "round_lr":  # the check sees S_r taken one step early or late
            for shift in (-1, 1):
                assert _replay(r0, ranks, name, config, factors, shift=shift) > 1e-4, f"{name}: shift {shift} passes"
        if config.qsr_outer_momentum_warmup:  # and the ramp left out
            assert _replay(r0, ranks, name, config, factors, ramp=False) > 1e-4, f"{name}: no ramp passes"
    # the first round at lr 0: its sync is the plain mean of the ranks
    zero = r0["zero_first_round"][0]
    torch.testing.assert_close(zero[3], torch.stack([r["zero_first_round"][0][2] for r in ranks]).mean(0))
    # compression + round_lr: the outer step on anchor + the bf16 mean change, S_r of each round
    anchor, m, last = r0["init"], torch.zeros_like(r0["init"]), 0
    lrs = [0.02 * f for f in FACTORS]
    for i, (step, _, _, after) in enumerate(r0["compress"]):
        average = compressed_average(anchor, [r["compress"][i][2] for r in ranks], world_size)
        mu = 0.9 * min(1.0, step / WARM)
        expected, m = _reference_step(anchor, average, m, sum(lrs[last:step]), mu, True, True)
        torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-6, msg=f"compressed sync {i}")
        anchor, last = after, step
    assert len(r0["compress"]) == 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"qsr_outer_scaling": "lr"}, "qsr_outer_scaling must be one of"),
        ({"qsr_outer_scaling": "round_lr"}, "qsr_outer_optimizer='none' takes no outer step"),
        ({"qsr_outer_momentum_warmup": 100}, "qsr_outer_momentum_warmup=100 shapes the outer optimizer's step"),
        ({"qsr_outer_optimizer": "sgd", "qsr_outer_momentum_warmup": -1}, "must be an integer >= 0"),
        ({"qsr_outer_optimizer": "sgd", "qsr_outer_momentum_warmup": 2.5}, "qsr_outer_momentum_warmup must be int"),
    ],
)
def test_outer_scaling_config_refusals(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QSRConfig(qsr_rule="constant", **kwargs)
