"""The overlapped (delayed) sync, ``qsr_overlap_sync`` / ``qsr_overlap_steps``: exact bookkeeping on a real 2-process
gloo group. The selected tests' runs share one spawn (`run_distributed_batch`, the module fixture ``batch``)."""

import copy

import pytest
import torch
from testing_utils import rank_batches, run_distributed_batch, selected_scenarios
from torch import nn

from qsr_hf import LocalOptimizer, ParameterAverager, QSRConfig


STEPS, H = 7, 2  # rounds end after steps 2, 4, 6 (started async, folded one step later) and 7 (the last: blocking)


def _overlap_run(rank, world_size, h=H, delay=1, steps=STEPS, auto=None):
    """``delay``: the depth, or a list of the depths of the 1st, 2nd, ... average (the last one repeats).
    ``auto``: run with qsr_overlap_auto, each rank reporting these (transfer, step) microseconds (None: measured)."""
    from accelerate import Accelerator

    torch.manual_seed(0)
    accelerator = Accelerator()
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    ref = copy.deepcopy(model)  # the reference: plain local SGD and the delayed rule written out below
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    model, opt = accelerator.prepare(model, opt)
    delays = delay if isinstance(delay, list) else [delay]
    config = QSRConfig(
        qsr_rule="constant", qsr_h_base=h, qsr_overlap_sync=True, qsr_overlap_steps=delays[0],
        qsr_overlap_auto=auto is not None,
    )  # fmt: skip
    local = LocalOptimizer(opt, model, config, num_training_steps=steps)
    overlap = local.synchronizer.overlap
    if auto and auto[rank] is not None:
        overlap.measurement_us = lambda: list(auto[rank]) if overlap.measured else [0, 0]
    ref_params = list(ref.parameters())
    pending, started, syncs, out = None, 0, 0, {"ours": [], "ref": [], "pending": [], "depth": []}
    for i, (x, y) in enumerate(rank_batches(rank, steps)):
        nn.functional.cross_entropy(model(x), y).backward()
        local.step()
        local.zero_grad()
        nn.functional.cross_entropy(ref(x), y).backward()
        ref_opt.step()
        ref_opt.zero_grad()
        due = (i + 1) % h == 0 or i + 1 == steps
        with torch.no_grad():
            depth = delays[min(syncs - 1, len(delays) - 1)]
            if pending is not None and (i + 1 - started >= depth or due):  # average(sent) + (params now - sent)
                sent, avg = pending
                for p, s, a in zip(ref_params, sent, avg, strict=True):
                    p.copy_(a + (p - s))
                pending = None
            if due:
                avg = [p.detach().clone() for p in ref_params]
                ParameterAverager(avg).average()
                syncs += 1
                if i + 1 == steps:
                    for p, a in zip(ref_params, avg, strict=True):
                        p.copy_(a)
                else:
                    pending, started = ([p.detach().clone() for p in ref_params], avg), i + 1
        out["ours"].append(torch.cat([p.detach().reshape(-1) for p in model.module.parameters()]))
        out["ref"].append(torch.cat([p.detach().reshape(-1) for p in ref_params]))
        out["pending"].append(overlap.pending)
        out["depth"].append(local.synchronizer.stats.overlap_steps)
    out["mode"] = local.synchronizer.averager.mode
    out["syncs"] = local.synchronizer.stats.syncs
    out["measured"], out["state"] = overlap.measured, local.synchronizer.state_dict()["overlap"]
    return out


SCENARIOS = {
    "delay_1": {},
    "delay_2": {"h": 3, "delay": 2},
    "auto_given": {"h": 4, "delay": [1, 5], "steps": 13, "auto": [(30000, 10000), (25000, 6000)]},
    "auto_measured": {"h": 3, "steps": 7, "auto": [None, None]},
}  # `_overlap_run`'s arguments


@pytest.fixture(scope="module")
def batch(request):
    """The runs of the selected tests, all from one spawn; a run that failed raises where a test reads it."""
    scenarios = {name: (_overlap_run, kwargs) for name, kwargs in SCENARIOS.items()}
    return run_distributed_batch(selected_scenarios(request, scenarios))


@pytest.fixture
def runs(batch, request):
    """The runs this test names in its ``scenarios`` mark."""
    return batch.for_test(request.node)


@pytest.mark.scenarios("delay_1")
def test_overlapped_sync_is_the_delayed_average_bitwise(runs):
    r0, r1 = runs["delay_1"]
    for r in (r0, r1):
        assert r["mode"] == "copy" and r["syncs"] == 4
        assert r["pending"] == [False, True, False, True, False, True, False]
        for step, (ours, ref) in enumerate(zip(r["ours"], r["ref"], strict=True), 1):
            assert torch.equal(ours, ref), f"step {step}: overlapped sync differs from the delayed rule"
    equal = [torch.equal(a, b) for a, b in zip(r0["ours"], r1["ours"], strict=True)]
    # in flight after steps 2, 4, 6: ranks differ; folded after 3, 5 with the local change: still differ; the last
    # sync (step 7) is blocking: the final model is the exact average
    assert equal == [False] * 6 + [True]


@pytest.mark.slow  # 7 s; depths > 1 stay in the default run: the automatic-depth test (5 steps) and the simulation
@pytest.mark.scenarios("delay_2")
def test_overlap_over_two_steps_is_the_delayed_average_bitwise(runs):
    # rounds of 3 (ends after steps 3 and 6, then 7): each average folded in 2 steps later, with both steps' change
    r0, r1 = runs["delay_2"]
    for r in (r0, r1):
        assert r["syncs"] == 3
        assert r["pending"] == [False, False, True, True, False, True, False]
        for step, (ours, ref) in enumerate(zip(r["ours"], r["ref"], strict=True), 1):
            assert torch.equal(ours, ref), f"step {step}: the 2-step overlap differs from the delayed rule"
    assert torch.equal(r0["ours"][-1], r1["ours"][-1]), "training ends on a blocking average"


@pytest.mark.scenarios("auto_given")
def test_auto_depth_is_chosen_once_from_every_rank_and_followed_bitwise(runs):
    # rounds of 4 over 13 steps: the average of step 4 arrives 1 step late (the initial depth) and is measured; at
    # step 8 the ranks exchange (transfer, step) = (30 ms, 10 ms) and (25 ms, 6 ms): ceil(25/6) = 5 on rank 1 decides;
    # the average of step 8 arrives 5 steps late (cut at the round end at 12), that of 12 at the last step, 13
    r0, r1 = runs["auto_given"]  # h=4, delay=[1, 5], steps=13, auto=[(30000, 10000), (25000, 6000)]
    for r in (r0, r1):
        assert r["state"] == {"steps": 5, "auto": False}  # saved in checkpoints: a resume keeps the chosen depth
        assert r["depth"] == [None] * 3 + [1] * 4 + [5] * 6
        assert r["pending"] == [False] * 3 + [True, False, False, False, True, True, True, True, True, False]
        for step, (ours, ref) in enumerate(zip(r["ours"], r["ref"], strict=True), 1):
            assert torch.equal(ours, ref), f"step {step}: the chosen depth is not the one followed"


@pytest.mark.scenarios("auto_measured")
def test_auto_depth_measures_transfer_and_step_times(runs):
    # real measurements (2 ranks, loopback): the same depth on both ranks, chosen from positive times
    r0, r1 = runs["auto_measured"]
    assert r0["state"] == r1["state"] and not r0["state"]["auto"] and r0["state"]["steps"] >= 1
    for r in (r0, r1):
        transfer, step = r["measured"]
        assert 0 < transfer < 60 and 0 < step < 60, r["measured"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"qsr_overlap_sync": True, "qsr_overlap_steps": 0}, "qsr_overlap_steps must be an integer >= 1"),
        ({"qsr_overlap_steps": 3}, r"qsr_overlap_steps=3 needs qsr_overlap_sync=True"),
        ({"qsr_overlap_auto": True}, r"qsr_overlap_auto=True needs qsr_overlap_sync=True"),
    ],
)
def test_overlap_steps_refusals(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QSRConfig(qsr_rule="constant", **kwargs)
