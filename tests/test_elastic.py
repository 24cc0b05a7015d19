"""Elastic resume (N -> M processes, ``qsr_elastic_resume``) and preemption, issue 21 parts 2 and 3.

Three launches of real gloo processes share their checkpoint folders (module fixture): 2 processes train and save
(LocalOptimizer and the Trainer, uninterrupted), then run phase 1 of a preempted Trainer run (stopped mid-round after
its first checkpoint, without the end of training); 3 resume the 2-process checkpoints elastically and save again; 2
resume those (3 -> 2) and run phase 2 of the preempted run (``resume_from_checkpoint=True``: the latest checkpoint).
Phase 2 is a launch of its own, as after a torchrun restart or a scheduler's requeue, without depending on torchrun
restarts (which can hang in ``init_process_group`` on 2 loaded cores).
"""

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from test_faults import _error, _Grab, _steps
from testing_utils import BNMLP, flat_params, rank_batches, run_distributed
from torch.nn.parallel import DistributedDataParallel as DDP
from transformers import Trainer, TrainerCallback, TrainingArguments

from qsr_hf import LocalOptimizer, QSRConfig
from qsr_hf.checkpoint.elastic import mean_optimizer_state
from qsr_hf.checkpoint.files import rank_state_path, read_state_file
from qsr_hf.frontends.callback import QSRCallback


TIMEOUT = 180
STEPS = 12
CONSTANT = QSRConfig(qsr_rule="constant", qsr_h_base=4)
# the LocalOptimizer runs also keep a synced state (outer anchor and momentum, compression anchor) in their files
LOCAL = dataclasses.replace(CONSTANT, qsr_outer_optimizer="nesterov", qsr_compress_delta=True)


def _snapshot(synchronizer, optimizer):
    synced = synchronizer.synced.state_dict() if synchronizer.synced is not None else {}
    tensors = [t.detach().clone() for t in synchronizer.local_tensors()]
    return {"tensors": tensors, "optimizer": copy.deepcopy(optimizer.state_dict()), "synced": synced}


def _local(elastic=False):
    torch.manual_seed(0)
    model = BNMLP()
    ddp = DDP(model)
    inner = torch.optim.AdamW(model.parameters(), lr=0.01)
    config = dataclasses.replace(LOCAL, qsr_elastic_resume=elastic)
    return ddp, LocalOptimizer(inner, ddp, config, num_training_steps=STEPS)


def _local_elastic(rank, checkpoint, out, steps, save_after=None, save_to=None):
    """Resume ``checkpoint`` on this world size: the default refuses; the opt-in on rank 0 only, too; with it on
    every rank training goes on from the mean (saved again after ``save_after`` steps) to the end."""
    out["refused"] = _error(_local()[1].load_local_state, checkpoint)
    out["mixed"] = _error(_local(elastic=rank == 0)[1].load_local_state, checkpoint)
    ddp, local = _local(elastic=True)
    grab = _Grab()
    out["restored"] = local.load_local_state(checkpoint)
    out["logs"] = grab.messages
    out["start"] = _snapshot(local.synchronizer, local.optimizer)
    for i, batch in enumerate(rank_batches(rank, steps, seed=2)):
        _steps(ddp, local, [batch])
        if i + 1 == save_after:
            local.save_local_state(save_to)
    local.close()
    out["final"], out["syncs"] = flat_params(ddp.module), local.stats.syncs


class _Classifier(BNMLP):
    def forward(self, x, labels):
        logits = super().forward(x)
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


class _Preempted(RuntimeError):
    pass


class _Probe(TrainerCallback):
    """Runs after QSRCallback: the state training starts from, each step's parameters, a preemption at a step."""

    def __init__(self, qsr, preempt_at):
        self.qsr, self.preempt_at, self.params, self.start = qsr, preempt_at, [], None

    def on_train_begin(self, args, state, control, optimizer=None, **kw):
        self.start = _snapshot(self.qsr.synchronizer, optimizer)

    def on_optimizer_step(self, args, state, control, model=None, **kw):
        self.params.append(flat_params(model))

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.preempt_at:  # the process dies here: no end of training, no further save
            raise _Preempted(f"preempted at optimizer step {state.global_step}")


def _trainer(out_dir, resume=None, elastic=False, preempt_at=None):
    x, y = rank_batches(0, 1, batch=96)[0]  # the same 96 samples on every rank; the Trainer shards them
    torch.manual_seed(0)
    qsr = QSRCallback(dataclasses.replace(CONSTANT, qsr_elastic_resume=elastic))
    probe, grab = _Probe(qsr, preempt_at), _Grab()
    args = TrainingArguments(
        output_dir=str(out_dir), use_cpu=True, max_steps=STEPS, per_device_train_batch_size=4, learning_rate=0.01,
        save_steps=5, logging_steps=100, report_to=[], disable_tqdm=True, seed=0,
    )  # fmt: skip
    data = Dataset.from_dict({"x": x.numpy(), "labels": y.numpy()}).with_format("torch")
    trainer = Trainer(model=_Classifier(), args=args, train_dataset=data, callbacks=[qsr, probe])
    trainer.train(resume_from_checkpoint=str(resume) if isinstance(resume, Path) else resume)
    final, syncs = flat_params(trainer.model), qsr.synchronizer.stats.syncs
    return {"start": probe.start, "params": probe.params, "final": final, "logs": grab.messages, "syncs": syncs}


def _two(rank, world_size, tmp):
    ddp, local = _local()
    _steps(ddp, local, rank_batches(rank, 6))  # mid-round: rounds [0, 4), [4, 8)
    local.save_local_state(tmp / "local2")
    out = {"full": _trainer(tmp / "full")}  # uninterrupted; checkpoints at 5 and 10 (mid-round) and 12
    try:  # phase 1 of a preempted run, last in this launch: it stops at step 7, inside the round after checkpoint-5
        _trainer(tmp / "preempted", preempt_at=7)
    except _Preempted as error:
        out["preempted"] = str(error)
    return out


def _three(rank, world_size, tmp):
    out = {}
    _local_elastic(rank, tmp / "local2", out, steps=6, save_after=3, save_to=tmp / "local3")  # saved at step 9
    out["trainer"] = _trainer(tmp / "grown", resume=tmp / "full" / "checkpoint-5", elastic=True)
    return out


def _back_to_two(rank, world_size, tmp):
    out = {}
    _local_elastic(rank, tmp / "local3", out, steps=3)
    out["trainer"] = _trainer(tmp / "shrunk", resume=tmp / "grown" / "checkpoint-10", elastic=True)
    out["resumed"] = _trainer(tmp / "preempted", resume=True)  # the latest checkpoint: checkpoint-5
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("elastic")
    two = run_distributed(_two, world_size=2, timeout=TIMEOUT, tmp=tmp)
    left = sorted(p.name for p in (tmp / "preempted").glob("checkpoint-*"))
    three = run_distributed(_three, world_size=3, timeout=TIMEOUT, tmp=tmp)
    back = run_distributed(_back_to_two, world_size=2, timeout=TIMEOUT, tmp=tmp)
    return tmp, two, three, back, left


def _saved(directory, world):
    return [read_state_file(rank_state_path(directory, r)) for r in range(world)]


def _mean(tensors):
    return (sum(t.double() for t in tensors) / len(tensors)).to(tensors[0].dtype)


def _assert_started_from_the_mean(results, directory, saved_world, where):
    files = _saved(directory, saved_world)
    assert not torch.equal(files[0]["tensors"][0], files[1]["tensors"][0]), f"{where}: not a mid-round checkpoint"
    expected = [_mean(ts) for ts in zip(*(f["tensors"] for f in files), strict=True)]
    for rank, r in enumerate(results):
        start = r["start"]
        assert all(map(torch.equal, start["tensors"], expected)), f"{where}: rank {rank} is not at the saved mean"
        state = start["optimizer"]["state"]
        assert state.keys() == files[0]["optimizer"]["state"].keys()
        for index, per_param in state.items():
            saved = [f["optimizer"]["state"][index] for f in files]
            assert torch.equal(per_param["step"], saved[0]["step"]), f"{where}: step counter of parameter {index}"
            for key in ("exp_avg", "exp_avg_sq"):
                mean = _mean([s[key] for s in saved])
                assert torch.equal(per_param[key], mean), f"{where}: rank {rank}, {key} of parameter {index}"
        numel = sum(t.numel() for t in expected)  # the compression anchor is padded to a multiple of the world size
        for name, value in files[0]["qsr"].get("synced", {}).items():
            assert torch.equal(start["synced"][name][:numel], value[:numel]), f"{where}: synced {name} not kept"
        assert any(f"written by {saved_world} processes, on {len(results)}" in m for m in r["logs"]), r["logs"]
    assert all(torch.equal(r["final"], results[0]["final"]) for r in results), f"{where}: training did not end synced"


def test_fingerprint_leaves_out_the_elastic_opt_in():
    # state files record the fingerprint: toggling the opt-in must keep an otherwise valid checkpoint readable
    assert dataclasses.replace(CONSTANT, qsr_elastic_resume=True).fingerprint() == CONSTANT.fingerprint()


def _adam_state(seed, steps=2):
    torch.manual_seed(seed)
    model = BNMLP()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    for x, y in rank_batches(seed, steps):
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return opt.state_dict()


def test_optimizer_state_rule():
    states = [_adam_state(seed) for seed in range(3)]
    merged = mean_optimizer_state(states)
    assert merged["param_groups"] == states[0]["param_groups"]
    for index, per_param in merged["state"].items():
        assert torch.equal(per_param["step"], torch.tensor(2.0))
        for key in ("exp_avg", "exp_avg_sq"):
            expected = sum(s["state"][index][key].double() for s in states) / 3
            torch.testing.assert_close(per_param[key], expected.float(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="optimizer state 'step' of parameter 0 differs"):
        mean_optimizer_state([states[0], _adam_state(1, steps=3)])
    del states[1]["state"][0]["exp_avg"]
    with pytest.raises(ValueError, match="parameter 0 have different keys"):
        mean_optimizer_state(states)


@pytest.mark.parametrize("direction", ["2->3", "3->2"])
def test_local_optimizer_elastic_resume(runs, direction):
    tmp, _, three, back, _ = runs
    results, checkpoint, saved = (three, "local2", 2) if direction == "2->3" else (back, "local3", 3)
    assert all(r["restored"] for r in results)
    assert all(r["start"]["synced"] for r in results), "the test must carry a synced state"
    _assert_started_from_the_mean(results, tmp / checkpoint, saved, f"LocalOptimizer {direction}")
    # 2 -> 3: one sync before the save at step 6, then [6, 10) and [10, 12); 3 -> 2: one more before step 9, [9, 12)
    assert [r["syncs"] for r in results] == [3 if direction == "2->3" else 2] * len(results)


@pytest.mark.parametrize("direction", ["2->3", "3->2"])
def test_trainer_elastic_resume(runs, direction):
    tmp, _, three, back, _ = runs
    results = [r["trainer"] for r in (three if direction == "2->3" else back)]
    checkpoint, saved = (
        (tmp / "full" / "checkpoint-5", 2) if direction == "2->3" else (tmp / "grown" / "checkpoint-10", 3)
    )
    _assert_started_from_the_mean(results, checkpoint, saved, f"Trainer {direction}")
    assert [len(r["params"]) for r in results] == [STEPS - int(checkpoint.name.split("-")[1])] * len(results)


def test_refusal_stays_the_default(runs):
    tmp, _, three, back, _ = runs
    refusals = {
        "local2": (three, "would leave ranks [2] without local optimizer state. Resume with 2 processes"),
        "local3": (
            back,
            "would drop the local optimizer state (momentum, Adam moments) of ranks [2]. Resume with 3 processes",
        ),
    }
    for name, (results, tail) in refusals.items():
        saved, world = (2, 3) if name == "local2" else (3, 2)
        expected = (
            f"qsr_hf: cannot resume from {tmp / name}: it was written by {saved} processes and this run has {world}; "
            f"each rank's optimizer state is its own, so resuming {tail}"
        )
        assert [r["refused"] for r in results] == [expected] * world
        mixed = [r["mixed"] for r in results]
        assert mixed[0] is not None and "qsr_elastic_resume is set on ranks [0] only" in mixed[0]
        assert mixed == [mixed[0]] * world, "ranks that disagree on the opt-in must all stop"


def test_preempted_run_resumes_bitwise(runs):
    _, two, _, back, left = runs
    assert [r.get("preempted") for r in two] == ["preempted at optimizer step 7"] * 2
    assert left == ["checkpoint-5"], "phase 1 must stop after its first checkpoint"
    for rank, (full, resumed) in enumerate(zip((r["full"] for r in two), (r["resumed"] for r in back), strict=True)):
        assert len(resumed["params"]) == STEPS - 5, "phase 2 did not resume from the latest checkpoint (step 5)"
        for step, (a, b) in enumerate(zip(full["params"][5:], resumed["params"], strict=True), 6):
            assert torch.equal(a, b), f"rank {rank}, step {step}: the resumed run differs from the uninterrupted one"
        assert torch.equal(full["final"], resumed["final"]) and full["syncs"] == resumed["syncs"]
