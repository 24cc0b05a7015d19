"""qsr_fragments (Streaming DiLoCo's pattern): the model averaged in F parts at staggered steps of each round.

One 2-process gloo run (LocalOptimizer + DDP) serves the distributed tests: a QSR schedule whose H changes (2 < F,
then 6, then 8) checks which fragment is averaged at which step, the collectives of each step, which parameters the
ranks share, the bytes counted and the evaluation view at a round end; a Nesterov run checks each fragment's outer
step against ``torch.optim.SGD(nesterov=True)``; a run stopped mid-round and resumed from the per-rank files must
continue bitwise.
"""

import dataclasses

import pytest
import torch
from testing_utils import default_group_sequence_number, lr_step, nesterov_reference, rank_batches, run_distributed
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from qsr_hf import LocalOptimizer, ParameterAverager, QSRConfig
from qsr_hf.sync.agreement import FRAGMENT_SYNC, ROUND_END
from qsr_hf.sync.fragments import due, partition


F = 3
# H = max(2, ⌊(0.1 / lr)²⌋) at each round's first step: rounds of 2 (< F), 6 and 8 (clipped to the end)
QSR = QSRConfig(qsr_alpha=0.1, qsr_h_base=2, qsr_fragments=F)
LRS = [0.1] * 2 + [0.04] * 6 + [0.035] * 8
# the fragments averaged after each step (1-based): ⌈(f + 1) H / F⌉ into the round; the last step averages all
EXPECTED = {1: [0], 2: [1, 2], 4: [0], 6: [1], 8: [2], 11: [0], 14: [1], 16: [0, 1, 2]}
ROUND_ENDS = [2, 8, 16]
NESTEROV = QSRConfig(qsr_rule="constant", qsr_h_base=3, qsr_fragments=F, qsr_outer_optimizer="nesterov")
STEPS, CUT = 9, 5  # Nesterov run: a fragment every step; stopped after step 5 (mid-round) and resumed
ROUND_LR = dataclasses.replace(NESTEROV, qsr_outer_scaling="round_lr")  # S_r of each fragment since its last sync
ROUND_LRS = [0.02 * f for f in (0.3, 1.0, 0.6, 0.9, 0.2, 0.8, 0.5, 1.0, 0.4)]


def _mlp():
    # 6 tensors of 128, 16, 256, 16, 64, 4 values: fragments [w1, b1], [w2], [b2, w3, b3]
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


def _build(config, steps, seed=0, optimizer=torch.optim.SGD):
    torch.manual_seed(seed)
    ddp = DDP(_mlp())
    return ddp, LocalOptimizer(optimizer(ddp.parameters(), lr=0.1), ddp, config, num_training_steps=steps)


def _tensors(ddp):
    return [p.detach().clone() for p in ddp.module.parameters()]


def _record(ddp, local, log):
    # (kind, buckets, tensors before, tensors after, qsr/pseudo_grad_norm) of every average
    sync = local.synchronizer
    original = sync.average

    def recorded(kind, commit=True, buckets=None):
        before = _tensors(ddp)
        original(kind, commit, buckets)
        log.append((kind, buckets, before, _tensors(ddp), local.stats.pseudo_grad_norm))

    sync.average = recorded


def _qsr_run(rank):
    ddp, local = _build(QSR, len(LRS))
    out = {"per_step": [], "collectives": [], "synced": []}
    for step, batch in enumerate(rank_batches(rank, len(LRS)), 1):
        start = default_group_sequence_number()
        lr_step(ddp, local, LRS[step - 1], batch)
        out["collectives"].append(default_group_sequence_number() - start)
        out["synced"].append(local.last_step_synced)
        out["per_step"].append(_tensors(ddp))
        if step == 8:  # a round end: fragments 0 and 1 moved since their average, so the view must average
            local.synchronizer.enter_averaged_view()
            out["view"] = _tensors(ddp)
            local.synchronizer.leave_averaged_view()
            out["view_restored"] = all(map(torch.equal, _tensors(ddp), out["per_step"][-1]))
    averager = local.synchronizer.averager
    out["fragments"] = [averager.bucket_fragments[i] for i, b in enumerate(averager.buckets) for _ in b.tensors]
    out["fragment_bytes"] = [averager.selection_bytes(averager.buckets_of([f])) for f in range(F)]
    out["stats"] = local.stats.state_dict()
    return out


def _nesterov_run(rank, tmp):
    batches = rank_batches(rank, STEPS, seed=1)
    ddp, local = _build(NESTEROV, STEPS, optimizer=torch.optim.AdamW)
    out = {"init": _tensors(ddp), "log": [], "full": []}
    _record(ddp, local, out["log"])
    for batch in batches:
        lr_step(ddp, local, 0.02, batch)
        out["full"].append(_tensors(ddp))
    ddp, local = _build(NESTEROV, STEPS, optimizer=torch.optim.AdamW)
    for batch in batches[:CUT]:
        lr_step(ddp, local, 0.02, batch)
    local.save_local_state(tmp)
    ddp, local = _build(NESTEROV, STEPS, seed=123, optimizer=torch.optim.AdamW)
    local.load_local_state(tmp)
    out["resumed"] = []
    for batch in batches[CUT:]:
        lr_step(ddp, local, 0.02, batch)
        out["resumed"].append(_tensors(ddp))
    return out


def _round_lr_run(rank):
    ddp, local = _build(ROUND_LR, STEPS, optimizer=torch.optim.AdamW)
    out = {"init": _tensors(ddp), "log": []}
    _record(ddp, local, out["log"])
    for lr, batch in zip(ROUND_LRS, rank_batches(rank, STEPS, seed=1), strict=True):
        lr_step(ddp, local, lr, batch)
    return out


def _ranks(rank, world_size, tmp):
    return {"qsr": _qsr_run(rank), "nesterov": _nesterov_run(rank, tmp), "round_lr": _round_lr_run(rank)}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_distributed(_ranks, world_size=2, tmp=str(tmp_path_factory.mktemp("fragments")))


def test_each_fragment_is_averaged_at_its_step(ranks):
    r0, r1 = ranks[0]["qsr"], ranks[1]["qsr"]
    fragments = r0["fragments"]
    assert fragments == [0, 0, 1, 2, 2, 2], fragments
    for step in range(1, len(LRS) + 1):
        due_now = EXPECTED.get(step, [])
        # one all-reduce per bucket of the fragments due (each one bucket here), the checks riding along; else none
        assert r0["collectives"][step - 1] == r1["collectives"][step - 1] == len(due_now), f"step {step}"
        for i, f in enumerate(fragments):
            equal = torch.equal(r0["per_step"][step - 1][i], r1["per_step"][step - 1][i])
            assert equal == (f in due_now), f"step {step}: tensor {i} (fragment {f}) equal across ranks: {equal}"
    assert [s for s in range(1, len(LRS) + 1) if r0["synced"][s - 1]] == ROUND_ENDS
    # syncs count rounds; every fragment's bytes count (the whole model once a round, plus the last sync's rest)
    sent = sum(r0["fragment_bytes"][f] for fs in EXPECTED.values() for f in fs)
    view = sum(r0["fragment_bytes"])  # the evaluation view averages the whole model
    assert r0["stats"]["syncs"] == len(ROUND_ENDS) and r0["stats"]["extra_syncs"] == 1
    assert r0["stats"]["bytes_averaged"] == sent + view
    assert all(map(torch.equal, r0["view"], r1["view"])) and r0["view_restored"] and r1["view_restored"]


def test_each_fragment_takes_its_own_nesterov_step_and_resumes_bitwise(ranks):
    r0 = ranks[0]["nesterov"]
    fragment_of = partition([t.numel() for t in r0["init"]], F)
    anchor = [t.clone() for t in r0["init"]]
    momentum = [None] * len(anchor)
    assert len(r0["log"]) == STEPS
    for n, (kind, buckets, *_) in enumerate(r0["log"]):
        chosen = list(range(F)) if buckets is None else buckets  # one bucket per fragment here: bucket f is f's
        assert chosen == (list(range(F)) if n == STEPS - 1 else [n % F]), f"average {n}: buckets {buckets}"
        assert kind == (ROUND_END if (n + 1) % 3 == 0 else FRAGMENT_SYNC), f"average {n}: kind {kind}"
        squares = 0.0
        for i in [i for i, f in enumerate(fragment_of) if f in chosen]:
            mean = torch.stack([r["nesterov"]["log"][n][2][i] for r in ranks]).mean(0)
            expected, momentum[i] = nesterov_reference(anchor[i], mean, momentum[i])
            for r in ranks:
                after = r["nesterov"]["log"][n][3][i]
                torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-6, msg=f"average {n}, tensor {i}")
                assert torch.equal(after, r0["log"][n][3][i]), f"average {n}: ranks differ after it"
            squares += float((anchor[i] - mean).square().sum())
            anchor[i] = r0["log"][n][3][i]
        # qsr/pseudo_grad_norm: the norm over the fragments this sync averaged only
        assert r0["log"][n][4] == pytest.approx(squares**0.5, rel=1e-4), f"average {n}"
    for r in ranks:  # stopped after step 5 (mid-round), resumed from the per-rank files in a fresh model
        for step, (full, resumed) in enumerate(
            zip(r["nesterov"]["full"][CUT:], r["nesterov"]["resumed"], strict=True), CUT + 1
        ):
            assert all(map(torch.equal, full, resumed)), f"step {step} after the resume"


def _round_lr_replay(ranks, since_round_start=False):
    # the round_lr Nesterov step of each fragment, S_r = the lrs of the steps since that fragment's last sync (or,
    # planted wrong, since the round's start); returns the largest difference from what the ranks hold
    r0 = ranks[0]["round_lr"]
    fragment_of = partition([t.numel() for t in r0["init"]], F)
    anchor, momentum = list(r0["init"]), [torch.zeros_like(t) for t in r0["init"]]
    last, worst = [0] * F, 0.0
    for n, (_, buckets, *_) in enumerate(r0["log"]):
        step = n + 1  # a fragment every step (rounds of 3), every fragment at the last step
        chosen = list(range(F)) if buckets is None else buckets
        for i in [i for i, f in enumerate(fragment_of) if f in chosen]:
            start = (step - 1) // 3 * 3 if since_round_start else last[fragment_of[i]]
            work = sum(ROUND_LRS[start:step])
            mean = torch.stack([r["round_lr"]["log"][n][2][i] for r in ranks]).mean(0)
            g = anchor[i] - mean
            momentum[i] = 0.9 * momentum[i] + g / work
            expected = mean + (g - 0.7 * work * (g / work + 0.9 * momentum[i]))
            worst = max(worst, float((r0["log"][n][3][i] - expected).abs().max()))
            assert all(torch.equal(r["round_lr"]["log"][n][3][i], r0["log"][n][3][i]) for r in ranks)
            anchor[i] = r0["log"][n][3][i]
        for f in chosen:
            last[f] = step
    return worst


def test_each_fragment_scales_its_outer_step_by_its_own_lr_work(ranks):
    assert _round_lr_replay(ranks) < 1e-5
    assert _round_lr_replay(ranks, since_round_start=True) > 1e-4  # the check tells the fragments' S_r apart


@pytest.mark.parametrize(
    ("numels", "fragments", "expected"),
    [
        ([128, 16, 256, 16, 64, 4], 3, [0, 0, 1, 2, 2, 2]),
        ([10, 10, 10, 10], 2, [0, 0, 1, 1]),
        ([1000, 1, 1, 1], 4, [0, 1, 2, 3]),  # no fragment left empty
        ([1, 1, 1, 1000], 2, [0, 0, 0, 1]),
        ([0, 5, 5], 3, [0, 1, 2]),
    ],
)
def test_partition(numels, fragments, expected):
    assert partition(numels, fragments) == expected


def test_due():
    assert [due(k, 6, 3) for k in range(1, 7)] == [[], [0], [], [1], [], [2]]
    assert [due(k, 2, 3) for k in (1, 2)] == [[0], [1, 2]]  # H < F: the rest at the round end
    assert [due(k, 4, 4) for k in range(1, 5)] == [[0], [1], [2], [3]]
    assert [due(k, 1, 3) for k in (1,)] == [[0, 1, 2]]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"qsr_fragments": 0}, "qsr_fragments must be an integer >= 1"),
        ({"qsr_average_optimizer_state": True}, "set qsr_average_optimizer_state=False or qsr_fragments=1"),
        ({"qsr_worker": "node"}, "qsr_fragments=2 does not work with qsr_worker='node'"),
    ],
)
def test_refusals(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QSRConfig(qsr_rule="constant", **{"qsr_fragments": 2, **kwargs})


def test_fewer_tensors_than_fragments_is_refused():
    with pytest.raises(ValueError, match="qsr_fragments=3 needs at least 3 averaged tensors, the model has 2"):
        ParameterAverager([torch.zeros(4), torch.zeros(4)], fragments=3)
