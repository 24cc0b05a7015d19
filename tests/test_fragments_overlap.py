"""Fragments in flight (``qsr_fragments`` with ``qsr_overlap_sync``, Streaming DiLoCo's combination), on 2 and 3 gloo
ranks, with and without the Nesterov outer step.

Each rank trains a reference model beside the library's and applies the schedule written out below (FLIGHTS): each
fragment's average is started after its step of the round and folded in ``K`` steps later as ``average(sent) +
(params now - sent)`` (with the outer step: the outer step's result on the average), cut at the round end, before its
fragment is sent again, and by the checkpoint saved after step CUT; the last step folds everything and averages the
whole model, blocking. The reference averages each fragment in one flat buffer laid out as the library's bucket, so
without the outer step the comparison is bitwise on 3 ranks too. The run saved after step CUT (mid-round, averages in
flight) is resumed in a fresh model and must continue bitwise.
"""

import copy

import pytest
import torch
import torch.distributed as dist
from testing_utils import default_group_sequence_number, lr_step, nesterov_reference, rank_batches, run_distributed
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from qsr_hf import LocalOptimizer, QSRConfig


F, K, CUT = 3, 5, 12
# H = max(2, ⌊(0.1 / lr)²⌋) at each round's first step: rounds of 2 (< F: fragments 1 and 2 at its end), 6, 8, 8
LRS = [0.1] * 2 + [0.04] * 6 + [0.035] * 16
STEPS = len(LRS)
# (step sent, fragments, step folded): fragment f is sent after step ⌈(f + 1) H / F⌉ of its round and folded K steps
# later, or at the first round end after the send (steps 2, 8, 16), or before one of its fragments is sent again
# (step 6: fragment 1 again), or by the checkpoint after step CUT (would be 13 and 16), or at the last step (24)
FLIGHTS = [
    (1, (0,), 2),  # cut at the round end
    (2, (1, 2), 6),  # one average of both (a round of 2 < F steps ends with them); fragment 1 is due again at 6
    (4, (0,), 8),  # 4 + K = 9: cut at the round end
    (6, (1,), 8),
    (8, (2,), CUT),  # K steps: 13, but the checkpoint after step 12 folds it
    (11, (0,), CUT),  # 16
    (14, (1,), 16),
    (16, (2,), 21),  # K steps after a round end
    (19, (0,), 24),
    (22, (1,), 24),  # the last step folds everything, then averages the whole model, blocking
]


def _mlp():
    # 6 tensors of 128, 16, 256, 16, 64, 4 values: fragments [w1, b1], [w2], [b2, w3, b3], one bucket each
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


FRAGMENT_OF = [0, 0, 1, 2, 2, 2]


def _config(outer):
    return QSRConfig(
        qsr_alpha=0.1, qsr_h_base=2, qsr_fragments=F, qsr_overlap_sync=True, qsr_overlap_steps=K,
        qsr_outer_optimizer=outer,
    )  # fmt: skip


def _build(outer, seed=0):
    torch.manual_seed(seed)
    module = _mlp()
    ref = copy.deepcopy(module)
    ddp = DDP(module)
    local = LocalOptimizer(torch.optim.SGD(ddp.parameters(), lr=0.1), ddp, _config(outer), num_training_steps=STEPS)
    return ddp, local, ref


def _tensors(module):
    return [p.detach().clone() for p in module.parameters()]


def _in_flight(local):
    averager = local.synchronizer.averager
    flights = local.synchronizer.overlap.in_flight
    return [tuple(sorted({averager.bucket_fragments[i] for i in b})) for b in flights]


class _Reference:
    """The schedule of FLIGHTS on a plain SGD model: the fragment averaged at its send as its bucket is (one flat
    buffer, the same all-reduce), the outer step (torch's SGD with Nesterov) on it, the local change added at the fold."""

    def __init__(self, model, world_size, outer):
        self.params, self.world, self.outer = list(model.parameters()), world_size, outer != "none"
        self.anchor = [p.detach().clone() for p in self.params]
        self.momentum = [None] * len(self.params)
        self.flights = {}  # step sent -> (tensor indices, values sent, averages)

    @torch.no_grad()
    def _average(self, indices):
        flat = torch.cat([self.params[i].detach().reshape(-1) for i in indices])
        dist.all_reduce(flat)
        flat.div_(self.world)
        sizes = [self.params[i].numel() for i in indices]
        out = [a.view_as(self.params[i]) for a, i in zip(flat.split(sizes), indices, strict=True)]
        if self.outer:
            for n, i in enumerate(indices):
                self.anchor[i], self.momentum[i] = nesterov_reference(self.anchor[i], out[n], self.momentum[i])
                out[n] = self.anchor[i].clone()
        return out

    @torch.no_grad()
    def after_step(self, step):
        for sent_at, _, folded_at in FLIGHTS:
            if folded_at == step:
                indices, sent, averages = self.flights.pop(sent_at)
                for i, s, a in zip(indices, sent, averages, strict=True):
                    self.params[i].copy_(a + (self.params[i] - s))
        for sent_at, fragments, _ in FLIGHTS:
            if sent_at == step:
                indices = [i for i, f in enumerate(FRAGMENT_OF) if f in fragments]
                sent = [self.params[i].detach().clone() for i in indices]
                averages = [a for f in fragments for a in self._average([i for i in indices if FRAGMENT_OF[i] == f])]
                self.flights[step] = (indices, sent, averages)  # each fragment's average in its own buffer
        if step == STEPS:
            assert not self.flights
            for fragment in range(F):  # the last sync: every fragment's bucket, blocking
                indices = [i for i, f in enumerate(FRAGMENT_OF) if f == fragment]
                for i, a in zip(indices, self._average(indices), strict=True):
                    self.params[i].copy_(a)


def _run(rank, world_size, tmp, outer):
    batches = rank_batches(rank, STEPS)
    ddp, local, ref = _build(outer)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    reference = _Reference(ref, world_size, outer)
    out = {"ours": [], "ref": [], "collectives": [], "in_flight": [], "resumed": [], "resumed_in_flight": []}
    for step, (lr, batch) in enumerate(zip(LRS, batches, strict=True), 1):
        start = default_group_sequence_number()
        lr_step(ddp, local, lr, batch)
        out["collectives"].append(default_group_sequence_number() - start)
        lr_step(ref, ref_opt, lr, batch)
        reference.after_step(step)
        if step == CUT:
            out["pending_at_cut"] = _in_flight(local)
            local.save_local_state(tmp)  # folds every average in flight first
        out["in_flight"].append(_in_flight(local))
        out["ours"].append(_tensors(ddp.module))
        out["ref"].append(_tensors(ref))
    out["stats"] = local.stats.state_dict()
    ddp, local, _ = _build(outer, seed=123)
    local.load_local_state(tmp)
    for lr, batch in zip(LRS[CUT:], batches[CUT:], strict=True):
        lr_step(ddp, local, lr, batch)
        out["resumed"].append(_tensors(ddp.module))
        out["resumed_in_flight"].append(_in_flight(local))
    return out


# 2 ranks without and 3 ranks with the outer step in the default run; the other two with -m slow (time budget)
SLOW_RUNS = [pytest.param(case, marks=pytest.mark.slow) for case in [(3, "none"), (2, "nesterov")]]


@pytest.fixture(scope="module", params=[(2, "none"), (3, "nesterov"), *SLOW_RUNS], ids=str)
def run(request, tmp_path_factory):
    world_size, outer = request.param
    tmp = str(tmp_path_factory.mktemp(f"fragments_overlap_{world_size}_{outer}"))
    return world_size, outer, run_distributed(_run, world_size=world_size, tmp=tmp, outer=outer)


def test_each_fragment_is_sent_and_folded_at_its_step(run):
    _, _, ranks = run
    sends = {s: fragments for s, fragments, _ in FLIGHTS}
    for step in range(1, STEPS + 1):
        # one exchange of the checks and one all-reduce per bucket sent; the last step: all of them, blocking; a
        # fold costs no collective
        expected = 1 + F if step == STEPS else 1 + len(sends[step]) if step in sends else 0
        in_flight = [fragments for s, fragments, folded in FLIGHTS if s <= step < folded]
        for r in ranks:
            assert r["collectives"][step - 1] == expected, f"step {step}: collectives"
            assert r["in_flight"][step - 1] == in_flight, f"step {step}: in flight"
    assert ranks[0]["pending_at_cut"] == [(2,), (0,)], "the checkpoint must be taken with averages in flight"
    stats = ranks[0]["stats"]
    assert stats["syncs"] == 4 and stats["extra_syncs"] == 0  # rounds (fragments inside them are no syncs)


def test_each_fragment_is_its_average_at_send_plus_the_local_change(run):
    _, outer, ranks = run
    for r in ranks:
        for step, (ours, ref) in enumerate(zip(r["ours"], r["ref"], strict=True), 1):
            for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
                if outer == "none":  # the same all-reduces on the same buffers: bitwise
                    assert torch.equal(a, b), f"step {step}, tensor {i} (fragment {FRAGMENT_OF[i]})"
                else:
                    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"step {step}, tensor {i}")
    # ranks differ while training (folds keep each rank's local change) and end equal (the last sync blocks)
    assert not all(map(torch.equal, ranks[0]["ours"][-2], ranks[1]["ours"][-2]))
    assert all(all(map(torch.equal, r["ours"][-1], ranks[0]["ours"][-1])) for r in ranks)


def test_a_mid_round_resume_continues_bitwise(run):
    _, _, ranks = run
    for r in ranks:
        assert r["resumed_in_flight"] == r["in_flight"][CUT:]
        for step, (full, resumed) in enumerate(zip(r["ours"][CUT:], r["resumed"], strict=True), CUT + 1):
            assert all(map(torch.equal, full, resumed)), f"step {step} after the resume"


def test_fragments_with_the_overlap_are_accepted():
    config = QSRConfig(qsr_rule="constant", qsr_fragments=2, qsr_overlap_sync=True, qsr_overlap_auto=True)
    assert config.qsr_fragments == 2 and config.qsr_overlap_sync
