"""Faults injected on one rank (issue 10): every rank stops with the same message, or recovers as documented.

Each multi-process run goes through several cases on one process group (a case that raises does so on every rank
at the same collective, so the group stays usable) and is bounded by run_distributed's timeout: a hang fails fast.
"""

import contextlib
import logging
import os
import pickle
import re
import shutil
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from testing_utils import BNMLP, flat_params, rank_batches, run_distributed
from torch.nn.parallel import DistributedDataParallel as DDP
from transformers import Trainer, TrainerCallback, TrainingArguments

from qsr_hf import LocalOptimizer, QSRConfig
from qsr_hf.checkpoint.files import MANIFEST, rank_state_path, read_state_file
from qsr_hf.frontends.callback import QSRCallback


TIMEOUT = 120
CONSTANT = QSRConfig(qsr_rule="constant", qsr_h_base=4)


def _setup(config, steps, lr=0.1, perturb=False):
    torch.manual_seed(0)
    model = BNMLP()
    ddp = DDP(model)  # broadcasts rank 0's parameters
    if perturb:
        with torch.no_grad():
            model.net[0].weight[0, 0] += 1.0
    inner = torch.optim.SGD(model.parameters(), lr=lr)
    return ddp, inner, LocalOptimizer(inner, ddp, config, num_training_steps=steps)


def _steps(ddp, local, batches, nan_after=None):
    for i, (x, y) in enumerate(batches):
        F.cross_entropy(ddp(x), y).backward()
        local.step()
        local.zero_grad()
        if nan_after == i:
            with torch.no_grad():
                ddp.module.net[0].weight[0, 0] = float("nan")


class _Grab(logging.Handler):
    """Collects this process's qsr_hf log messages."""

    def __init__(self):
        super().__init__()
        self.messages = []
        logging.getLogger("qsr_hf").addHandler(self)

    def emit(self, record):
        self.messages.append(record.getMessage())


def _error(fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except RuntimeError as error:
        return str(error)
    return None


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _break(case, directory, rank):
    """Damage a copy of a complete checkpoint the way a fault would (run on rank 0, between barriers)."""
    own = rank_state_path(directory, 1)
    if case == "missing":
        own.unlink()
    elif case == "copied":
        shutil.copy(rank_state_path(directory, 0), own)
    elif case == "bit_flip":
        data = bytearray(own.read_bytes())
        data[len(data) // 2] ^= 0x01
        own.write_bytes(data)
    elif case == "interrupted":  # killed after rank 1 wrote a .tmp and before the manifest was renamed into place
        (directory / MANIFEST).unlink()
        own.rename(own.with_name(own.name + ".tmp1"))
    elif case == "pickle":
        own.write_bytes(pickle.dumps(_Evil(directory / "executed")))


def _two_ranks(rank, world_size, tmp):
    out = {}
    # settings that differ between ranks: caught when the wrapper is built
    out["config"] = _error(_setup, QSRConfig(qsr_rule="constant", qsr_h_base=4 + rank), 8)
    # a rank that starts from other parameters (raised at the first step: state may be loaded before it)
    ddp, _, local = _setup(CONSTANT, 8, perturb=rank == 1)
    out["start_params"] = _error(_steps, ddp, local, rank_batches(rank, 1))
    # a rank that runs fewer steps: its end-of-training check meets the other's last sync
    ddp, _, local = _setup(CONSTANT, 8)
    out["fewer_steps"] = _error(lambda: (_steps(ddp, local, rank_batches(rank, 8 - rank)), local.close()))
    # a rank whose data runs out right after the sync at step 4: it has nothing left to average, so only its
    # end-of-training check meets the other rank's next sync
    ddp, _, local = _setup(CONSTANT, 8)
    out["ends_early"] = _error(lambda: (_steps(ddp, local, rank_batches(rank, 8 - 4 * rank)), local.close()))
    # NaN on rank 1 after step 1: the sync at step 4 stops every rank
    ddp, _, local = _setup(CONSTANT, 8)
    out["nan"] = _error(_steps, ddp, local, rank_batches(rank, 4), nan_after=1 if rank == 1 else None)
    # per-rank state files: save a complete checkpoint, then damage copies of it
    ddp, _, local = _setup(QSRConfig(qsr_rule="constant", qsr_h_base=2), 8)
    _steps(ddp, local, rank_batches(rank, 3))
    base = Path(tmp) / "complete"
    local.save_local_state(base)
    out["saved_params"] = flat_params(ddp.module)
    out["saved_step"] = read_state_file(rank_state_path(base))["qsr"]["clock"]["step"]
    for case in ("missing", "copied", "bit_flip", "interrupted", "pickle"):
        directory = Path(tmp) / case
        if rank == 0:
            shutil.copytree(base, directory)
            _break(case, directory, rank)
        dist.barrier()
        grab = _Grab()
        out[case] = _error(local.load_local_state, directory)
        out[f"{case}_logs"] = grab.messages
        out[f"{case}_executed"] = (directory / "executed").exists()
    _steps(ddp, local, rank_batches(rank, 1, seed=1))  # move away, then restore exactly
    out["restored"] = local.load_local_state(base)
    out["restored_params"] = flat_params(ddp.module)
    return out


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults")
    return run_distributed(_two_ranks, world_size=2, timeout=TIMEOUT, tmp=str(tmp)), tmp


def _same_on_every_rank(results, key, *needles):
    messages = [r[key] for r in results]
    assert messages[0] is not None, f"{key}: no error raised"
    assert all(m == messages[0] for m in messages), f"{key}: ranks raised different messages {messages}"
    for needle in needles:
        assert needle in messages[0], f"{key}: {needle!r} not in {messages[0]!r}"


def test_different_settings_stop_every_rank_at_the_start(two):
    results, _ = two
    _same_on_every_rank(results, "config", "at the start of training", "QSR config fingerprint")
    _same_on_every_rank(results, "start_params", "start from different parameters", "refuses")


def test_a_rank_with_fewer_steps_stops_every_rank(two):
    results, _ = two
    _same_on_every_rank(results, "fewer_steps", "optimizer step: rank 0 = 8, rank 1 = 7", "rank 1 = extra sync")


def test_a_rank_that_ends_early_on_a_sync_stops_every_rank(two):
    results, _ = two
    _same_on_every_rank(
        results, "ends_early", "rank 0 = round end, rank 1 = end of training", "optimizer step: rank 0 = 8, rank 1 = 4"
    )


def test_nan_on_one_rank_stops_every_rank(two):
    results, _ = two
    _same_on_every_rank(results, "nan", "rank(s) [1] hold NaN/inf", "at optimizer step 4", "skip_rank")


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("missing", "rank 0's is valid, rank 1's is missing"),
        ("copied", "rank 1's is invalid"),
        ("bit_flip", "rank 1's is invalid"),
        ("interrupted", "interrupted save"),
        ("pickle", "rank 1's is invalid"),
    ],
)
def test_bad_state_files_stop_every_rank(two, case, needle):
    results, _ = two
    _same_on_every_rank(results, case, "cannot resume", needle)
    assert not any(r[f"{case}_executed"] for r in results), "a pickled state file ran code"
    own = [m for m in results[1][f"{case}_logs"] if m.startswith("qsr_hf: rank 1: ")]
    assert own, "rank 1 did not say why its file is bad"
    assert "qsr_state_rank1.pt" in own[0]


def test_a_complete_checkpoint_restores_exactly(two):
    results, _ = two
    for r in results:
        assert r["restored"] and torch.equal(r["restored_params"], r["saved_params"])
        assert r["saved_step"] == 3


def _three_ranks(rank, world_size, checkpoint):
    out = {}
    # another lr on rank 2 gives it another H: its first sync meets the others' first sync
    ddp, _, local = _setup(QSRConfig(qsr_alpha=0.375, qsr_h_base=2), 12, lr=0.0625 if rank == 2 else 0.125)
    out["lr"] = _error(_steps, ddp, local, rank_batches(rank, 12))
    # skip_rank: NaN on rank 1; the sync averages ranks 0 and 2 and gives the result to all
    ddp, inner, local = _setup(QSRConfig(qsr_rule="constant", qsr_h_base=3, qsr_on_nonfinite="skip_rank"), 3)
    before = []
    inner.register_step_post_hook(lambda *_: before.append(flat_params(ddp.module)))
    grab = _Grab()
    _steps(ddp, local, rank_batches(rank, 3), nan_after=0 if rank == 1 else None)
    out["skip_logs"] = grab.messages
    out["before"], out["after"] = before[-1], flat_params(ddp.module)
    out["logs"] = local.stats.to_logs()
    # a 2-process checkpoint resumed on 3 processes
    out["world"] = _error(local.load_local_state, checkpoint)
    return out


def test_three_ranks_disagreement_skip_rank_and_world_size(two):
    _, tmp = two
    results = run_distributed(_three_ranks, world_size=3, timeout=TIMEOUT, checkpoint=str(tmp / "complete"))
    _same_on_every_rank(results, "lr", "round end", "optimizer step: rank 0 = 9, rank 1 = 9, rank 2 = 12")
    expected = (results[0]["before"] + results[2]["before"]) / 2
    assert not torch.isfinite(results[1]["before"]).all()
    for r in results:
        torch.testing.assert_close(r["after"], expected, rtol=0, atol=1e-6)
        assert r["logs"]["qsr/nonfinite_syncs"] == 1.0
    assert all(torch.equal(r["after"], results[0]["after"]) for r in results)
    assert any("rank 1 holds NaN/inf at optimizer step 3" in m for m in results[1]["skip_logs"])
    _same_on_every_rank(results, "world", "written by 2 processes and this run has 3", "ranks [2]")


class _TinyClassifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(8, 4)

    def forward(self, x, labels=None):
        logits = self.linear(x)
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


class _OverflowOnRank1(TrainerCallback):
    """Makes rank 1's optimizer step ``at`` behave as a GradScaler overflow does: no step, ``step_was_skipped``."""

    def __init__(self, qsr, at):
        self.qsr, self.at, self.calls, self.skipped = qsr, at, 0, 0
        self.lrs, self.synced = [], []

    def on_train_begin(self, args, state, control, optimizer=None, **kw):
        original = optimizer.step

        def step(*a, **k):
            self.calls += 1
            optimizer._is_overflow = dist.get_rank() == 1 and self.calls == self.at
            if optimizer._is_overflow:
                self.skipped += 1
                return None
            return original(*a, **k)

        optimizer.step = step

    def on_step_begin(self, args, state, control, optimizer=None, **kw):  # after QSRCallback's (catch-up)
        self.lrs.append(optimizer.param_groups[0]["lr"])
        self._syncs = self.qsr.synchronizer.stats.syncs

    def on_optimizer_step(self, args, state, control, **kw):
        self.synced.append(self.qsr.synchronizer.stats.syncs > self._syncs)


def _overflow_run(rank, world_size, out_dir, evaluate):
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)
    data = Dataset.from_dict(
        {"x": torch.randn(96, 8, generator=g).numpy(), "labels": torch.randint(0, 4, (96,), generator=g).numpy()}
    )
    torch.manual_seed(0)
    qsr = QSRCallback(QSRConfig(qsr_alpha=0.25, qsr_h_base=2))
    spy = _OverflowOnRank1(qsr, at=2)
    args = TrainingArguments(
        output_dir=out_dir, use_cpu=True, max_steps=16, per_device_train_batch_size=4, learning_rate=0.1,
        lr_scheduler_type="cosine", optim="sgd", eval_strategy="steps" if evaluate else "no", eval_steps=5, report_to=[],
        save_strategy="no", disable_tqdm=True, seed=0,
    )  # fmt: skip
    trainer = Trainer(
        model=_TinyClassifier(), args=args, train_dataset=data.with_format("torch"),
        eval_dataset=data.select(range(16)).with_format("torch"), callbacks=[qsr, spy],
    )  # fmt: skip
    trainer.train()
    return {"lrs": spy.lrs, "synced": spy.synced, "skipped": spy.skipped, "final": flat_params(trainer.model)}


@pytest.mark.parametrize(
    "evaluate", [pytest.param(False, marks=pytest.mark.slow), True], ids=["no_eval", "eval_in_round"]
)
def test_overflow_on_one_rank_keeps_lr_and_rounds_aligned(tmp_path, evaluate):
    r0, r1 = run_distributed(_overflow_run, world_size=2, timeout=TIMEOUT, out_dir=str(tmp_path), evaluate=evaluate)
    assert (r0["skipped"], r1["skipped"]) == (0, 1), "the overflow was not injected on rank 1 only"
    assert r1["lrs"] == r0["lrs"], "rank 1's lr lags after its skipped step"
    assert r1["synced"] == r0["synced"] and sum(r0["synced"]) >= 2
    assert torch.equal(r0["final"], r1["final"]), "training did not end on a common average"


def _accelerate_overflow_run(rank, world_size, eval_at):
    """An Accelerate loop with a real GradScaler: rank 1's loss is inf at step 2, so its scaler skips the optimizer
    step and accelerate's scheduler skips its step too (``step_was_skipped``)."""
    from accelerate import Accelerator

    torch.manual_seed(0)
    accelerator = Accelerator()
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)  # what fp16 on a GPU installs
    model = BNMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** (s / 12))
    model, opt, sched = accelerator.prepare(model, opt, sched)
    local = LocalOptimizer(opt, model, QSRConfig(qsr_alpha=0.12, qsr_h_base=2), lr_scheduler=sched)
    out = {"lrs": [], "synced": [], "skipped": 0}
    for i, (x, y) in enumerate(rank_batches(rank, 12)):
        loss = F.cross_entropy(model(x), y) * (float("inf") if rank == 1 and i == 2 else 1.0)
        accelerator.backward(loss)
        local.step()
        out["lrs"].append(local.synchronizer.stats.round_length)
        out.setdefault("lr", []).append(opt.param_groups[0]["lr"])  # the lr this step used
        out["skipped"] += opt.step_was_skipped
        sched.step()
        local.zero_grad()
        out["synced"].append(local.last_step_synced)
        if i == eval_at:
            local.synchronizer.enter_averaged_view()
            local.synchronizer.leave_averaged_view()
    local.close()
    out["final"] = flat_params(model.module)
    return out


def _accelerate_overflow_runs(rank, world_size):
    # both cases on one process group: without an evaluation, and with one (an averaged view) inside a round
    return {eval_at: _accelerate_overflow_run(rank, world_size, eval_at) for eval_at in (None, 3)}


@pytest.fixture(scope="module")
def accelerate_overflow():
    return run_distributed(_accelerate_overflow_runs, world_size=2, timeout=TIMEOUT)


@pytest.mark.parametrize("eval_at", [None, 3], ids=["no_eval", "eval_in_round"])
def test_accelerate_overflow_on_one_rank_keeps_lr_and_rounds_aligned(accelerate_overflow, eval_at):
    r0, r1 = (results[eval_at] for results in accelerate_overflow)
    assert (r0["skipped"], r1["skipped"]) == (0, 1), "the overflow was not injected on rank 1 only"
    assert r1["lrs"] == r0["lrs"] and len(set(r0["lrs"])) > 1, (
        "the ranks' round lengths differ after rank 1's skipped step"
    )
    assert r1["synced"] == r0["synced"] and sum(r0["synced"]) >= 3
    assert r1["lr"] == r0["lr"] and r0["lr"][-1] < r0["lr"][0], "rank 1's lr lags after its skipped step"
    assert torch.equal(r0["final"], r1["final"]), "training did not end on a common average"


CRASH_SCRIPT = """
import torch, torch.nn.functional as F
from accelerate import Accelerator
from qsr_hf import LocalOptimizer, QSRConfig

accelerator = Accelerator(cpu=True)
torch.manual_seed(0)
model = torch.nn.Linear(8, 4)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
model, opt = accelerator.prepare(model, opt)
local = LocalOptimizer(opt, model, QSRConfig(qsr_rule="constant", qsr_h_base=4), num_training_steps=8)
for step in range(8):
    if accelerator.process_index == 1 and step == 1:
        raise ValueError("injected failure on rank 1 inside a round")
    x = torch.randn(4, 8)
    accelerator.backward(F.cross_entropy(model(x), torch.zeros(4, dtype=torch.long)))
    local.step()
    local.zero_grad()
local.close()
"""


def test_a_rank_that_crashes_inside_a_round_stops_the_run(tmp_path):
    # the other rank goes on with local steps and then meets the dead rank at the next sync: its all-reduce fails
    # ("connection closed") with qsr_hf's message, or accelerate launch (torchrun's agent) sees rank 1 fail and
    # stops it (SIGTERM) first; either way it does not wait for the process group's timeout (30 min; the
    # subprocess's own timeout, 5 min, fails the test if it does)
    import subprocess
    import sys

    script = tmp_path / "crash.py"
    script.write_text(CRASH_SCRIPT)
    config = Path(__file__).parents[1] / "accelerate_configs" / "multi_cpu.yaml"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--main_process_port", "0",
        str(script),
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, check=False)
    assert out.returncode != 0
    assert "injected failure on rank 1 inside a round" in out.stderr
    stopped = "[rank0]: RuntimeError: qsr_hf: an average's all-reduce failed on this rank" in out.stderr
    assert stopped or "closing signal SIGTERM" in out.stderr, out.stderr[-3000:]


def _agreement_meets_another_collective(rank, world_size, tmp):
    from qsr_hf.sync.agreement import COMMON, ROUND_END, exchange

    if rank == 0:  # at a sync
        try:
            exchange([ROUND_END, 8] + [0] * (len(COMMON) - 2))
        except RuntimeError as error:
            Path(tmp, "rank0.txt").write_text(str(error))
    else:  # stopped early: the Trainer's own end-of-training gather (store_flos), which gloo aborts on, or blocks
        # until the process group's timeout: 5 s here (started or ended before rank 0's exchange, it fails that too)
        from torch.distributed.distributed_c10d import _set_pg_timeout

        _set_pg_timeout(timedelta(seconds=5))
        with contextlib.suppress(RuntimeError):
            dist.all_gather(
                [torch.zeros(1, dtype=torch.float64) for _ in range(2)], torch.zeros(1, dtype=torch.float64)
            )


def test_agreement_check_names_a_collective_mismatch(tmp_path):
    # a Trainer rank that stops early (should_training_stop on one rank only) meets the other rank's agreement check
    # inside another collective: gloo aborts rank 1 in C++ with its own message, or blocks it until the process
    # group's timeout (5 s); the rank at the sync says why, whichever way gloo pairs the two collectives (an error, or rows
    # that disagree). Nothing here waits on the clock but gloo's own timeout of a blocked collective.
    try:
        run_distributed(_agreement_meets_another_collective, tmp=str(tmp_path), timeout=TIMEOUT)
    except RuntimeError as error:  # gloo aborted rank 1's process
        assert re.search(r"ranks \[1\] did not report \(exit codes \{1: -?[1-9]", str(error)), error
    message = (tmp_path / "rank0.txt").read_text()
    assert (
        "the agreement check at the round end (optimizer step 8) met another collective" in message
        and "should_training_stop set on one rank only" in message
    ) or "the ranks disagree at different synchronization points" in message, message


def _run_and_close(ddp, local, batches):
    _steps(ddp, local, batches)
    local.close()


def _ends_early_on_separate_paths(rank, world_size):
    """A rank that ends early, on the paths whose end-of-training check is its own exchange (not on the average)."""
    out = {}
    for name, extra in [("compress", {"qsr_compress_delta": True}), ("overlap", {"qsr_overlap_sync": True})]:
        config = QSRConfig(qsr_rule="constant", qsr_h_base=4, **extra)
        for case, steps in [("fewer_steps", 8 - rank), ("ends_early", 8 - 4 * rank)]:
            ddp, _, local = _setup(config, 8)
            out[f"{name}_{case}"] = _error(_run_and_close, ddp, local, rank_batches(rank, steps))
    return out


@pytest.fixture(scope="module")
def separate_paths():
    return run_distributed(_ends_early_on_separate_paths, world_size=2, timeout=TIMEOUT)


@pytest.mark.parametrize("path", ["compress", "overlap"])
def test_a_rank_that_ends_early_stops_every_rank_on_separate_checks(separate_paths, path):
    """Compression and overlap check the end in their own exchange (`SeparateChecks.check_end`): a rank that ends
    early (one step short, or right after a sync) meets the other's sync there, and every rank raises (no hang)."""
    _same_on_every_rank(separate_paths, f"{path}_fewer_steps", "optimizer step: rank 0 = 8, rank 1 = 7")
    _same_on_every_rank(
        separate_paths, f"{path}_ends_early", "optimizer step: rank 0 = 8, rank 1 = 4", "end of training"
    )
