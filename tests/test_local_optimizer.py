"""LocalOptimizer on real 2-process gloo groups with the real Accelerator and DDP.

The selected tests' 2-process scenarios run in one spawn (`run_distributed_batch`, the module fixture ``batch``),
each with a fresh Accelerator; a test names the scenarios it reads in its ``scenarios`` mark.
"""

import itertools

import pytest
import torch
import torch.distributed as dist
from accelerate import Accelerator
from testing_utils import (
    BNMLP,
    flat_params,
    rank_batches,
    run_distributed,
    run_distributed_batch,
    selected_scenarios,
)
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from qsr_hf import LocalOptimizer, QSRConfig
from qsr_hf.analysis.planner import plan


def _count_grad_allreduce(ddp):
    counter = {"n": 0}

    def hook(state, bucket):
        counter["n"] += 1
        return default_hooks.allreduce_hook(state, bucket)

    ddp.register_comm_hook(None, hook)
    return counter


class _AllReduceSpy:
    """Counts torch.distributed.all_reduce calls while still running them."""

    def __init__(self, monkeypatch_target=dist):
        self.calls = 0
        self._orig = dist.all_reduce

    def __enter__(self):
        def spy(*args, **kwargs):
            self.calls += 1
            return self._orig(*args, **kwargs)

        dist.all_reduce = spy
        return self

    def __exit__(self, *exc):
        dist.all_reduce = self._orig


def _inverse_decay(step):
    return 1.0 / (1 + step)


PLANNER_CONFIG = QSRConfig(qsr_rule="qsr", qsr_alpha=0.25, qsr_h_base=2)
RESUME_CUTS = [3, 7]
POST_LOCAL_SWITCH = 6
SCHEDULER_WARMUP, SCHEDULER_TOTAL = 4, 16


def _train(
    rank,
    world_size,
    config,
    steps,
    lr_fn=None,
    accumulation=1,
    optimizer="sgd",
    warmup=0,
    seed=0,
    precision="no",
    clip=False,
):
    torch.manual_seed(0)  # identical init on every rank (DDP broadcasts rank 0's anyway)
    accelerator = Accelerator(gradient_accumulation_steps=accumulation, mixed_precision=precision)
    model = BNMLP()
    opt = (
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        if optimizer == "sgd"
        else torch.optim.AdamW(model.parameters(), lr=0.01)
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_fn or (lambda s: 1.0))
    model, opt, sched = accelerator.prepare(model, opt, sched)
    counter = _count_grad_allreduce(model)
    local = LocalOptimizer(opt, model, config, num_training_steps=steps, num_warmup_steps=warmup)
    per_step, synced = [], []
    batches = rank_batches(rank, steps * accumulation, seed=seed)
    with _AllReduceSpy() as spy:
        for i, (x, y) in enumerate(batches):
            with accelerator.accumulate(model):
                loss = torch.nn.functional.cross_entropy(model(x), y)
                accelerator.backward(loss)
                if clip and accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), 1.0)
                local.step()
                sched.step()
                local.zero_grad()
            if (i + 1) % accumulation == 0:
                per_step.append(flat_params(model.module))
                synced.append(local.last_step_synced)
    moments = list(local.state.values())
    first_state = next(iter(moments)) if moments else {}
    momentum = first_state.get("momentum_buffer", first_state.get("exp_avg"))
    return {
        "params": per_step,
        "synced": synced,
        "grad_allreduces": counter["n"],
        "param_allreduces": spy.calls,
        "buckets": local.synchronizer.averager.num_buckets,
        "stats": local.stats.state_dict(),
        "momentum": momentum.clone() if momentum is not None else None,
        "state": local.state_dict()["qsr"],
    }


@pytest.mark.scenarios("constant_h")
def test_constant_h_local_steps_and_syncs(runs):
    steps, h = 7, 3  # the scenario's (`_scenarios`)
    r0, r1 = runs["constant_h"]
    expected_sync = [(i + 1) % h == 0 or i + 1 == steps for i in range(steps)]
    assert r0["synced"] == expected_sync
    assert r0["grad_allreduces"] == 0 and r1["grad_allreduces"] == 0, "DDP reduced gradients between syncs"
    for i in range(steps):
        if expected_sync[i]:
            assert torch.equal(r0["params"][i], r1["params"][i]), f"ranks differ right after the sync at step {i}"
        else:
            assert not torch.allclose(r0["params"][i], r1["params"][i]), f"ranks equal between syncs at step {i}"
    n_syncs = sum(expected_sync)
    assert r0["param_allreduces"] == n_syncs * r0["buckets"], "one all-reduce per bucket per sync"
    assert r0["stats"]["syncs"] == n_syncs
    # optimizer state stays local: momentum buffers differ across ranks
    assert not torch.allclose(r0["momentum"], r1["momentum"])


@pytest.mark.scenarios("optimizer_state")
def test_optimizer_state_averaged_when_configured(runs):
    r0, r1 = runs["optimizer_state"]
    assert r0["synced"] == [False, True, False, True, True]
    assert torch.equal(r0["momentum"], r1["momentum"]), "Adam moments differ after the final sync"
    assert torch.equal(r0["params"][-1], r1["params"][-1])
    model = BNMLP()
    params = sum(p.numel() for p in model.parameters()) * 4
    buffers = sum(b.numel() for b in model.buffers() if b.is_floating_point()) * 4
    # every sync sends parameters, BatchNorm statistics and both AdamW moments (exp_avg, exp_avg_sq)
    assert r0["stats"]["bytes_averaged"] == 3 * (3 * params + buffers)
    assert r0["grad_allreduces"] == 0


@pytest.mark.scenarios("planner")
def test_schedule_matches_planner_with_decaying_lr(runs):
    steps, lr_fn, config = 40, _inverse_decay, PLANNER_CONFIG  # the scenario's (`_scenarios`)
    r0, r1 = runs["planner"]
    lrs = [0.1 * lr_fn(s) for s in range(steps)]
    expected = plan(config, lrs)
    sync_steps = [i + 1 for i, s in enumerate(r0["synced"]) if s]
    assert sync_steps == expected.sync_steps
    assert r1["synced"] == r0["synced"]
    assert r0["param_allreduces"] == len(expected.sync_steps) * r0["buckets"]


@pytest.mark.scenarios("accumulation")
def test_gradient_accumulation_counts_optimizer_steps(runs):
    steps = 6  # the scenario's (`_scenarios`)
    r0, r1 = runs["accumulation"]
    assert r0["synced"] == [False, True] * 3
    assert r0["stats"]["steps"] == steps
    assert r0["grad_allreduces"] == 0
    assert torch.equal(r0["params"][-1], r1["params"][-1])


@pytest.mark.scenarios("bf16_clip")
def test_bf16_autocast_and_clipping_stay_local(runs):
    r0, r1 = runs["bf16_clip"]
    assert r0["grad_allreduces"] == 0 and r0["param_allreduces"] == 2 * r0["buckets"]
    assert not torch.equal(r0["params"][0], r1["params"][0]) and torch.equal(r0["params"][1], r1["params"][1])


def _ddp_reference(rank, world_size, steps, optimizer="sgd"):
    torch.manual_seed(0)
    accelerator = Accelerator()
    model = BNMLP()
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    model, opt = accelerator.prepare(model, opt)
    out = []
    for x, y in rank_batches(rank, steps):
        accelerator.backward(torch.nn.functional.cross_entropy(model(x), y))
        opt.step()
        opt.zero_grad()
        out.append(flat_params(model.module))
    return out


@pytest.mark.scenarios("h1_ours", "h1_ddp")
def test_h1_matches_ddp_with_sgd(runs):
    # H = 1 equals data parallel for SGD (update linear in the gradient); buffers differ (DDP broadcasts rank 0's)
    steps = 5  # the scenarios' (`_scenarios`)
    ours, ref = runs["h1_ours"], runs["h1_ddp"]
    n_params = sum(p.numel() for p in BNMLP().parameters())
    for i in range(steps):
        torch.testing.assert_close(ours[0]["params"][i][:n_params], ref[0][i][:n_params], rtol=1e-5, atol=1e-6)


def _accelerate_local_sgd(rank, world_size, steps, h):
    from accelerate.local_sgd import LocalSGD

    torch.manual_seed(0)
    accelerator = Accelerator()
    model = BNMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model, opt = accelerator.prepare(model, opt)
    with LocalSGD(accelerator=accelerator, model=model, local_sgd_steps=h, enabled=True) as local_sgd:
        for x, y in rank_batches(rank, steps):
            with accelerator.no_sync(model):  # LocalSGD expects the loop to skip gradient sync itself
                accelerator.backward(torch.nn.functional.cross_entropy(model(x), y))
            opt.step()
            opt.zero_grad()
            local_sgd.step()
    return flat_params(model.module)


@pytest.mark.slow  # kept out of the default run's 10-minute budget; `pytest -m slow`
def test_constant_h_matches_accelerate_local_sgd():
    steps, h = 6, 3  # LocalSGD averages parameters only: compare parameters with buffers kept local
    ours = run_distributed(
        _train, config=QSRConfig(qsr_rule="constant", qsr_h_base=h, qsr_average_buffers=False), steps=steps
    )
    ref = run_distributed(_accelerate_local_sgd, steps=steps, h=h)
    n_params = sum(p.numel() for p in BNMLP().parameters())
    torch.testing.assert_close(ours[0]["params"][-1][:n_params], ref[0][:n_params], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours[1]["params"][-1][:n_params], ref[1][:n_params], rtol=1e-6, atol=1e-7)


@pytest.mark.scenarios("buffers")
def test_buffers_averaged_by_default(runs):
    r0, r1 = runs["buffers"]
    assert torch.equal(r0["params"][-1], r1["params"][-1])  # includes BatchNorm running stats


def _bn_reestimate(rank, world_size):
    torch.manual_seed(0)
    accelerator = Accelerator()
    model = BNMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model, opt = accelerator.prepare(model, opt)
    config = QSRConfig(qsr_rule="constant", qsr_h_base=2, qsr_average_buffers=False, qsr_bn_reestimate_batches=3)
    local = LocalOptimizer(opt, model, config, num_training_steps=4)
    for x, y in rank_batches(rank, 4):
        accelerator.backward(torch.nn.functional.cross_entropy(model(x), y))
        local.step()
        local.zero_grad()
    bn = model.module.net[1]
    before = bn.running_mean.clone()
    batches = rank_batches(rank, 3, seed=7)
    with torch.no_grad():  # what this rank's re-estimate should see: the mean of its batches' pre-BN means
        local_mean = torch.stack([model.module.net[0](x).mean(0) for x, _ in batches]).mean(0)
    extra_before = local.stats.extra_syncs
    used = local.reestimate_batchnorm(batches, lambda m, b: m(b[0]))
    local.close()
    return {
        "used": used,
        "running_mean": bn.running_mean.clone(),
        "running_var": bn.running_var.clone(),
        "local_mean": local_mean,
        "before": before,
        "params_after": [p.detach().clone() for p in model.module.parameters()],
        "extra_syncs": local.stats.extra_syncs - extra_before,
        "training": model.module.training,
        "momentum": bn.momentum,
    }


@pytest.mark.scenarios("bn_reestimate")
def test_batchnorm_reestimated_then_averaged(runs):
    r0, r1 = runs["bn_reestimate"]
    assert r0["used"] == 3 and r0["extra_syncs"] == 1
    # statistics: recomputed from each rank's own batches, then averaged: equal on both ranks, the mean of the two
    torch.testing.assert_close(r0["running_mean"], (r0["local_mean"] + r1["local_mean"]) / 2)
    assert torch.equal(r0["running_mean"], r1["running_mean"]) and torch.equal(r0["running_var"], r1["running_var"])
    assert not torch.equal(r0["before"], r1["before"]), "statistics were local before"
    for a, b in zip(r0["params_after"], r1["params_after"], strict=True):
        assert torch.equal(a, b)
    assert r0["training"] and r0["momentum"] == 0.1, "mode and momentum restored"


def _resume(rank, world_size, steps, cut):
    config = QSRConfig(qsr_rule="qsr", qsr_alpha=0.25, qsr_h_base=2)
    lr_fn = _inverse_decay
    full = _train(rank, world_size, config, steps, lr_fn=lr_fn)
    # a run that stops at `cut`, saves, and a fresh wrapper that loads and continues
    torch.manual_seed(0)
    accelerator = Accelerator()
    model = BNMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_fn)
    model, opt, sched = accelerator.prepare(model, opt, sched)
    local = LocalOptimizer(opt, model, config, num_training_steps=steps)
    batches = rank_batches(rank, steps)
    for x, y in batches[:cut]:
        accelerator.backward(torch.nn.functional.cross_entropy(model(x), y))
        local.step()
        sched.step()
        local.zero_grad()
    saved = {"opt": local.state_dict(), "model": {k: v.clone() for k, v in model.module.state_dict().items()}}
    saved_sched = sched.state_dict()
    local.close()
    torch.manual_seed(123)
    model2 = BNMLP()
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lr_fn)
    model2, opt2, sched2 = accelerator.prepare(model2, opt2, sched2)
    model2.module.load_state_dict(saved["model"])
    local2 = LocalOptimizer(opt2, model2, config, num_training_steps=steps)
    local2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved_sched)
    for x, y in batches[cut:]:
        accelerator.backward(torch.nn.functional.cross_entropy(model2(x), y))
        local2.step()
        sched2.step()
        local2.zero_grad()
    return full["params"][-1], flat_params(model2.module), full["state"], local2.state_dict()["qsr"]


@pytest.mark.parametrize(
    "cut", [pytest.param(cut, marks=pytest.mark.scenarios(f"resume_{cut}")) for cut in RESUME_CUTS]
)
def test_state_dict_resume_is_exact(runs, cut):
    for full_params, resumed_params, full_state, resumed_state in runs[f"resume_{cut}"]:
        assert torch.equal(full_params, resumed_params), f"resume at step {cut} diverged"
        assert full_state == resumed_state


def _single(rank, world_size):
    model = BNMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    local = LocalOptimizer(opt, model, QSRConfig(qsr_rule="constant", qsr_h_base=2), num_training_steps=3)
    for x, y in rank_batches(0, 3):
        torch.nn.functional.cross_entropy(model(x), y).backward()
        local.step()
        local.zero_grad()
    return local.stats.state_dict()


def test_single_process_trains_normally_with_warning(caplog):
    stats = _single(0, 1)
    assert stats["steps"] == 3 and stats["bytes_averaged"] == 0
    assert any("single-process run" in r.getMessage() for r in caplog.records)


def _unwrapped(rank, world_size):
    model = BNMLP()
    try:
        LocalOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, QSRConfig(qsr_alpha=0.1))
    except ValueError as e:
        return str(e)
    return None


@pytest.mark.scenarios("unwrapped")
def test_unwrapped_model_in_multiprocess_run_is_an_error(runs):
    messages = runs["unwrapped"]
    assert all(m is not None and "not wrapped for data parallelism" in m for m in messages)


@pytest.mark.scenarios("post_local", "post_local_ddp")
def test_post_local_phase_one_is_data_parallel(runs):
    # post-local SGD (Lin et al.): true gradient all-reduce until the switch, then local rounds of H_base; with AdamW,
    # where local training with H = 1 would differ (per-worker moments), phase 1 equals DDP bitwise
    switch = POST_LOCAL_SWITCH
    r0, r1 = runs["post_local"]
    ref = runs["post_local_ddp"]
    for i in range(switch):
        for rank, run in enumerate((r0, r1)):
            assert torch.equal(run["params"][i], ref[rank][i]), f"rank {rank}, step {i + 1}: phase 1 is not DDP"
    assert r0["grad_allreduces"] == switch, "one gradient all-reduce per step in phase 1, none after"
    assert r0["synced"] == [False] * switch + [False, True, False, True]
    for i in (6, 8):  # inside the local rounds [6, 8) and [8, 10)
        assert not torch.equal(r0["params"][i], r1["params"][i]), f"step {i + 1}: ranks equal inside a round"
    assert torch.equal(r0["params"][-1], r1["params"][-1])
    # the counting comm hook's all_reduce (one per phase-1 step) plus one per bucket for each of the two syncs
    assert r0["param_allreduces"] == switch + 2 * r0["buckets"], "phase 1 averages no parameters"
    assert r0["stats"]["syncs"] == switch + 2


def _scheduler_run(rank, world_size, warmup, total, explicit):
    import logging

    from transformers import get_cosine_schedule_with_warmup

    records = []

    class Grab(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logging.getLogger("qsr_hf").addHandler(Grab())
    torch.manual_seed(0)
    accelerator = Accelerator()
    model = BNMLP()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    n = accelerator.num_processes
    # accelerate's convention (its by_feature/local_sgd.py): single-process counts, stepped n times per step
    sched = get_cosine_schedule_with_warmup(opt, warmup * n, total * n)
    model, opt, sched = accelerator.prepare(model, opt, sched)
    errors = []
    for wrong in ({"num_training_steps": total * n}, {"num_warmup_steps": warmup * n}):
        try:
            LocalOptimizer(opt, model, QSRConfig(qsr_rule="constant", qsr_h_base=2), lr_scheduler=sched, **wrong)
        except ValueError as e:
            errors.append(str(e))
    config = QSRConfig(qsr_alpha=0.02, qsr_h_base=2)
    if explicit:  # v0.1's example: the declared warm-up counts optimizer steps, the scheduler runs n times faster
        local = LocalOptimizer(opt, model, config, num_training_steps=total * n, num_warmup_steps=warmup * n)
    else:
        local = LocalOptimizer(opt, model, config, lr_scheduler=sched)
    lrs = []
    for x, y in rank_batches(rank, total):
        accelerator.backward(torch.nn.functional.cross_entropy(model(x), y))
        lrs.append(local.param_groups[0]["lr"])
        local.step()
        sched.step()
        local.zero_grad()
    clock = local.synchronizer.clock
    return {"errors": errors, "lrs": lrs, "total": clock.total_steps, "warmup": clock.schedule.warmup_steps,
            "warnings": records}  # fmt: skip


@pytest.mark.scenarios("scheduler_prepared", "scheduler_explicit")
def test_prepared_scheduler_gives_warmup_and_length_in_optimizer_steps(runs):
    warmup, total = SCHEDULER_WARMUP, SCHEDULER_TOTAL
    for rank, run in enumerate(runs["scheduler_prepared"]):
        assert (run["warmup"], run["total"]) == (warmup, total), f"rank {rank}"
        assert max(range(total), key=run["lrs"].__getitem__) == warmup, "the lr peaks at the end of the warm-up"
        decay = run["lrs"][warmup:]
        assert all(b <= a for a, b in itertools.pairwise(decay)), "the lr must not rise again after its peak"
        assert decay[-1] < 0.02 * max(run["lrs"]), "the lr reaches the end of its cosine at the last step"
        assert len(run["errors"]) == 2, f"rank {rank}: a contradicting explicit count must be refused"
        assert "num_training_steps=32 but the lr scheduler's is 16 optimizer steps" in run["errors"][0]
        assert not run["warnings"]
    for rank, run in enumerate(runs["scheduler_explicit"]):
        assert any("inside the declared warm-up of 8 steps" in m for m in run["warnings"]), f"rank {rank} not warned"


def _stop_mid_round(rank, world_size, stop_after):
    torch.manual_seed(0)
    accelerator = Accelerator()
    model = BNMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))  # 3 warm-up steps
    model, opt, sched = accelerator.prepare(model, opt, sched)
    counter = _count_grad_allreduce(model)
    # after warm-up lr = 0.1 and (alpha / lr)^2 = 3.5, so H = 3; during warm-up H = H_base = 2
    config = QSRConfig(qsr_alpha=0.1 * 3.5**0.5, qsr_h_base=2)
    local = LocalOptimizer(opt, model, config, num_training_steps=11, num_warmup_steps=3)
    synced = []
    batches = rank_batches(rank, stop_after + 1)
    for x, y in batches[:stop_after]:
        accelerator.backward(torch.nn.functional.cross_entropy(model(x), y))
        local.step()
        sched.step()
        local.zero_grad()
        synced.append(local.last_step_synced)
    before_close = flat_params(model.module)
    local.close()
    after_close = flat_params(model.module)
    grads_before = counter["n"]
    x, y = batches[-1]  # one more step after close(): plain DDP again, gradients all-reduced
    accelerator.backward(torch.nn.functional.cross_entropy(model(x), y))
    opt.step()
    return {"synced": synced, "before_close": before_close, "after_close": after_close,
            "grads_after_close": counter["n"] - grads_before, "grads_before": grads_before,
            "after_ddp_step": flat_params(model.module)}  # fmt: skip


@pytest.mark.scenarios("stop_after_11", "stop_after_9")
def test_literal_sync_steps_and_close_mid_round(runs):
    # a literal schedule (not from plan()): warm-up rounds of H_base = 2, including the round [2, 4) that starts on
    # the last warm-up step, then H = 3 from the rule, and the last round clipped to end at step 11
    full = runs["stop_after_11"]
    assert [i + 1 for i, s in enumerate(full[0]["synced"]) if s] == [2, 4, 7, 10, 11]
    # stopped after 9 steps, inside the round [7, 10): close() averages, then DDP reduces gradients again
    r0, r1 = runs["stop_after_9"]
    assert not torch.equal(r0["before_close"], r1["before_close"]), "ranks must differ inside the open round"
    assert torch.equal(r0["after_close"], r1["after_close"]), "close() must average an unfinished round"
    assert r0["grads_before"] == 0, "no gradient all-reduce during local training"
    assert r0["grads_after_close"] == 1, "after close() DDP must all-reduce gradients again"
    n_params = sum(p.numel() for p in BNMLP().parameters())
    assert torch.equal(r0["after_ddp_step"][:n_params], r1["after_ddp_step"][:n_params])


def _scenarios():
    """Every 2-process scenario of the default run, by name: ``(fn, kwargs)`` as `run_distributed` would take them."""
    constant = QSRConfig(qsr_rule="constant", qsr_h_base=2)
    return {
        "constant_h": (_train, {"config": QSRConfig(qsr_rule="constant", qsr_h_base=3), "steps": 7}),
        "optimizer_state": (
            _train,
            {
                "config": QSRConfig(qsr_rule="constant", qsr_h_base=2, qsr_average_optimizer_state=True),
                "steps": 5,
                "optimizer": "adamw",
            },
        ),
        "planner": (_train, {"config": PLANNER_CONFIG, "steps": 40, "lr_fn": _inverse_decay}),
        "accumulation": (_train, {"config": constant, "steps": 6, "accumulation": 3}),
        "bf16_clip": (
            _train,
            {"config": constant, "steps": 4, "optimizer": "adamw", "precision": "bf16", "clip": True},
        ),
        "h1_ours": (_train, {"config": QSRConfig(qsr_rule="ddp", qsr_average_buffers=False), "steps": 5}),
        "h1_ddp": (_ddp_reference, {"steps": 5}),
        "buffers": (_train, {"config": constant, "steps": 2}),
        "bn_reestimate": (_bn_reestimate, {}),
        **{f"resume_{cut}": (_resume, {"steps": 12, "cut": cut}) for cut in RESUME_CUTS},
        "unwrapped": (_unwrapped, {}),
        "post_local": (
            _train,
            {
                "config": QSRConfig(qsr_rule="post_local", qsr_switch_step=POST_LOCAL_SWITCH, qsr_h_base=2),
                "steps": 10,
                "optimizer": "adamw",
            },
        ),
        "post_local_ddp": (_ddp_reference, {"steps": 10, "optimizer": "adamw"}),
        **{
            f"scheduler_{name}": (
                _scheduler_run,
                {"warmup": SCHEDULER_WARMUP, "total": SCHEDULER_TOTAL, "explicit": explicit},
            )
            for name, explicit in (("prepared", False), ("explicit", True))
        },
        "stop_after_11": (_stop_mid_round, {"stop_after": 11}),
        "stop_after_9": (_stop_mid_round, {"stop_after": 9}),
    }


@pytest.fixture(scope="module")
def batch(request):
    """The scenarios of the selected tests, all from one spawn; a scenario that failed raises where a test reads it."""
    return run_distributed_batch(selected_scenarios(request, _scenarios()))


@pytest.fixture
def runs(batch, request):
    """The scenarios this test names in its ``scenarios`` mark."""
    return batch.for_test(request.node)
