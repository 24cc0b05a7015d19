"""QSRCallback with the real Trainer on 2 gloo processes (tiny ViT, in-memory dataset).

The selected tests' 2-process trainings run in one spawn (`run_distributed_batch`, the module fixture ``batch``), each
in its own output folder under the module's ``tmp``; a test names the trainings it reads in its ``scenarios`` mark.
"""

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from datasets import Dataset
from testing_utils import (
    default_group_sequence_number,
    flat_params,
    run_distributed,
    run_distributed_batch,
    selected_scenarios,
    tiny_vit_config,
)
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from transformers import Trainer, TrainerCallback, TrainingArguments, ViTForImageClassification

from qsr_hf import QSRConfig
from qsr_hf.analysis.planner import plan
from qsr_hf.checkpoint.files import read_state_file
from qsr_hf.frontends.callback import QSRCallback


def make_dataset(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(n, 3, 32, 32, generator=g)
    labels = torch.randint(0, 4, (n,), generator=g)
    return Dataset.from_dict({"pixel_values": pixels.numpy(), "labels": labels.numpy()}).with_format("torch")


class Recorder(TrainerCallback):
    """Runs after QSRCallback: records parameters, lr and sync flag after every optimizer step.

    In a multi-process run it also counts every collective of the default group, by phase: ``step_collectives[s]``
    from the end of step s-1's log/eval/save phase to the start of step s's (data loading, forward, backward,
    optimizer step, QSR's sync), ``log_collectives[s]`` in the Trainer's log/eval/save phase after step s, and
    ``log_gathers[s]`` the sizes of the tensors all-gathered there.
    """

    def __init__(self, qsr):
        self.qsr = qsr
        self.params, self.lrs, self.synced, self.at_eval = [], [], [], []
        self.grad_allreduces = 0
        self.param_allreduces = 0
        self.step_collectives, self.log_collectives, self.log_gathers = {}, {}, {}
        self._log_phase = None

    def _count_collectives_by_phase(self, trainer):
        original_phase, original_gather, self._mark = trainer._maybe_log_save_evaluate, dist.all_gather, None

        def phase(*a, **k):
            step, start = trainer.state.global_step, default_group_sequence_number()
            self.step_collectives[step] = self.step_collectives.get(step, 0) + start - (self._mark or start)
            self._log_phase = step
            original_phase(*a, **k)
            self._log_phase, self._mark = None, default_group_sequence_number()
            self.log_collectives[step] = self.log_collectives.get(step, 0) + self._mark - start

        def gather(tensor_list, tensor, *a, **k):
            if self._log_phase is not None:
                self.log_gathers.setdefault(self._log_phase, []).append(tensor.numel())
            return original_gather(tensor_list, tensor, *a, **k)

        trainer._maybe_log_save_evaluate, dist.all_gather = phase, gather
        self._restore_gather = lambda: setattr(dist, "all_gather", original_gather)
        self._mark = default_group_sequence_number()

    def on_train_begin(self, args, state, control, **kw):
        ddp = self.qsr.trainer.model_wrapped

        def hook(s, bucket):
            self.grad_allreduces += 1
            return default_hooks.allreduce_hook(s, bucket)

        if isinstance(ddp, torch.nn.parallel.DistributedDataParallel):
            ddp.register_comm_hook(None, hook)
        self._orig = dist.all_reduce

        def spy(*a, **k):
            self.param_allreduces += 1
            return self._orig(*a, **k)

        dist.all_reduce = spy
        if dist.is_initialized():
            self._count_collectives_by_phase(self.qsr.trainer)

    def on_step_begin(self, args, state, control, optimizer=None, **kw):
        self.lrs.append(optimizer.param_groups[0]["lr"])
        self._syncs_before = self.qsr.synchronizer.stats.syncs

    def on_optimizer_step(self, args, state, control, model=None, **kw):
        self.params.append(flat_params(model))
        self.synced.append(self.qsr.synchronizer.stats.syncs > self._syncs_before)

    def on_evaluate(self, args, state, control, model=None, **kw):
        self.at_eval.append(flat_params(model))

    def on_train_end(self, args, state, control, **kw):
        dist.all_reduce = self._orig
        if dist.is_initialized():
            self._restore_gather()


class _StopAt(TrainerCallback):
    """Stops training after optimizer step ``step``, as an early-stopping callback does."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        control.should_training_stop |= state.global_step == self.step


def _trainer_run(
    rank, world_size, out_dir, config, max_steps=12, accumulation=1, resume=None, sgd=False, stop_at=None, **extra
):
    torch.manual_seed(0)
    model = ViTForImageClassification(tiny_vit_config())
    settings = {
        "output_dir": out_dir,
        "use_cpu": True,
        "max_steps": max_steps,
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": accumulation,
        "learning_rate": 0.05 if sgd else 1e-3,
        "lr_scheduler_type": "constant" if sgd else "cosine",
        "warmup_steps": 0 if sgd else 2,
        "max_grad_norm": 0.0 if sgd else 1.0,
        "train_sampling_strategy": "sequential" if sgd else "random",
        "logging_steps": 4,
        "report_to": [],
        "save_strategy": "steps" if extra.get("save_steps") else "no",
        "disable_tqdm": True,
        "seed": 0,
    }
    args = TrainingArguments(**{**settings, **extra})
    qsr = QSRCallback(config)
    recorder = Recorder(qsr)
    optimizers = (torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), None) if sgd else (None, None)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=make_dataset(),
        eval_dataset=make_dataset(16, seed=1),
        callbacks=[qsr, recorder] + ([_StopAt(stop_at)] if stop_at else []),
        optimizers=optimizers,
    )
    trainer.train(resume_from_checkpoint=resume)
    if stop_at:
        trainer.save_model()  # what qsr_hf.training.train saves and pushes
    return {
        "params": recorder.params,
        "lrs": recorder.lrs,
        "synced": recorder.synced,
        "at_eval": recorder.at_eval,
        "grad_allreduces": recorder.grad_allreduces,
        "param_allreduces": recorder.param_allreduces,
        "buckets": qsr.synchronizer.averager.num_buckets if qsr.synchronizer.averager else 0,
        "stats": qsr.synchronizer.stats.state_dict(),
        "warmup": args.get_warmup_steps(max_steps),
        "log_history": trainer.state.log_history,
        "final": flat_params(trainer.model),
        "step_collectives": recorder.step_collectives,
        "log_collectives": recorder.log_collectives,
        "log_gathers": recorder.log_gathers,
    }


QSR = QSRConfig(qsr_rule="qsr", qsr_alpha=2e-3, qsr_h_base=2)


def _assert_collectives_only_at_syncs_and_logs(run, logging_steps, where):
    # every collective of the default group, counted by its sequence number. Between syncs a step communicates
    # nothing (no gradient all-reduce, no token-count all-gather from average_tokens_across_devices); a sync step
    # is one all-reduce per bucket and nothing else (the agreement check rides on the first, `qsr_hf.sync.header`);
    # the Trainer's log phase all-gathers one-value tensors
    # (the loss and the flos count) at its logging steps and communicates nothing at the other steps
    assert sorted(run["step_collectives"]) == list(range(1, len(run["synced"]) + 1)), where
    for step, synced in enumerate(run["synced"], 1):
        count, expected = run["step_collectives"][step], run["buckets"] if synced else 0
        assert count == expected, f"{where}, step {step}: {count} collectives, expected {expected} (synced={synced})"
        gathers = run["log_gathers"].get(step, [])
        assert run["log_collectives"][step] == len(gathers), f"{where}, step {step}: a log-phase collective"
        assert set(gathers) <= {1} and (not gathers or step % logging_steps == 0), f"{where}, step {step}: {gathers}"


@pytest.mark.scenarios("schedule")
def test_trainer_local_steps_follow_the_schedule(runs):
    r0, r1 = runs["schedule"]
    expected = plan(QSR, r0["lrs"], r0["warmup"])
    sync_after = [i + 1 for i, s in enumerate(r0["synced"]) if s]
    assert sync_after == expected.sync_steps, "sync steps differ from the planner's"
    assert len(expected.round_lengths) > 2 and max(expected.round_lengths) > 2, "the test schedule must grow H"
    assert r0["grad_allreduces"] == 0 and r1["grad_allreduces"] == 0, "DDP reduced gradients"
    assert r0["param_allreduces"] == expected.syncs * r0["buckets"]
    for rank, run in enumerate((r0, r1)):
        _assert_collectives_only_at_syncs_and_logs(run, 4, f"rank {rank}")
    for i, synced in enumerate(r0["synced"]):
        same = torch.equal(r0["params"][i], r1["params"][i])
        if synced:
            assert same, f"step {i}: ranks differ right after a sync"
        elif r0["lrs"][i] > 0:  # the first warm-up step has lr 0 and changes nothing
            assert not same, f"step {i}: ranks equal between syncs"
    logged = [h for h in r0["log_history"] if "qsr/H" in h]
    assert len(logged) == 3, "one training log every 4 steps"
    for entry in logged:  # the Trainer's own metrics survive, the qsr/* metrics ride along in the same entry
        assert {"loss", "learning_rate", "grad_norm", "qsr/syncs", "qsr/comm_volume_vs_ddp"} <= set(entry), entry
    final = r0["log_history"][-1]
    assert final["qsr/syncs_final"] == expected.syncs
    assert final["qsr/comm_volume_vs_ddp_final"] == pytest.approx(expected.syncs / 12)


@pytest.mark.scenarios("accumulation")
def test_trainer_gradient_accumulation(runs):
    r0, r1 = runs["accumulation"]
    assert r0["synced"] == [False, False, True] * 2
    assert r0["stats"]["steps"] == 6 and r0["grad_allreduces"] == 0
    assert torch.equal(r0["final"], r1["final"])


def _saved_model(checkpoint):
    return flat_params(ViTForImageClassification.from_pretrained(checkpoint))


@pytest.mark.scenarios("eval", "eval_plain")
def test_eval_and_checkpoints_see_an_averaged_copy_and_leave_training_alone(runs, tmp):
    # evaluations at steps 3 and 6 and a checkpoint at step 5 all fall inside the rounds [0, 4) and [4, 8)
    r0, r1 = runs["eval"]
    plain = runs["eval_plain"]
    for rank, run in enumerate((r0, r1)):
        for i, (a, b) in enumerate(zip(run["params"], plain[rank]["params"], strict=True)):
            assert torch.equal(a, b), f"rank {rank}, step {i + 1}: evaluations changed the training trajectory"
        assert torch.equal(run["final"], plain[rank]["final"])
    assert r0["synced"] == [False, False, False, True] * 2
    assert len(r0["at_eval"]) == 3  # steps 3, 6 and the end of training (after the step-8 sync)
    for k, step in enumerate((3, 6, 8)):
        assert torch.equal(r0["at_eval"][k], r1["at_eval"][k]), f"evaluation at step {step} saw per-rank parameters"
        mean = (r0["params"][step - 1] + r1["params"][step - 1]) / 2
        torch.testing.assert_close(r0["at_eval"][k], mean, rtol=0, atol=1e-7, msg=f"eval at {step} is not the mean")
    assert r0["stats"]["syncs"] == 2 and r0["stats"]["extra_syncs"] == 3  # evals at 3 and 6, the save at 5
    ckpt = tmp / "eval" / "checkpoint-5"
    mean5 = (r0["params"][4] + r1["params"][4]) / 2
    n_params = sum(p.numel() for p in ViTForImageClassification(tiny_vit_config()).parameters())
    torch.testing.assert_close(_saved_model(ckpt)[:n_params], mean5[:n_params], rtol=0, atol=1e-7)
    for rank, run in enumerate((r0, r1)):
        saved = read_state_file(ckpt / f"qsr_state_rank{rank}.pt")
        assert saved["qsr"]["clock"]["step"] == 5
        assert saved["optimizer"]["state"], f"rank {rank}'s local optimizer state is saved"
        local = torch.cat([t.reshape(-1) for t in saved["tensors"]])
        assert torch.equal(local, run["params"][4][: local.numel()]), f"rank {rank}'s file holds the averaged copy"


@pytest.mark.scenarios("stopped")
def test_training_stopped_inside_a_round_ends_on_the_average(runs, tmp):
    # an early stop after step 6, inside the round [4, 8): the ranks end on their average, which is what is saved
    r0, r1 = runs["stopped"]
    assert r0["synced"] == [False, False, False, True, False, False]
    assert not torch.equal(r0["params"][5], r1["params"][5]), "the ranks should differ at the stop"
    assert torch.equal(r0["final"], r1["final"]), "the ranks end on different models"
    mean = (r0["params"][5] + r1["params"][5]) / 2
    torch.testing.assert_close(r0["final"], mean, rtol=0, atol=1e-7, msg="the final model is not the average")
    assert torch.equal(_saved_model(tmp / "stopped"), r0["final"]), "the saved model is not the final average"
    assert r0["stats"]["extra_syncs"] == 1 and r0["stats"]["syncs"] == 1
    for rank, run in enumerate((r0, r1)):
        _assert_collectives_only_at_syncs_and_logs(run, 3, f"rank {rank}")


@pytest.mark.slow  # kept out of the default run's 10-minute budget; `pytest -m slow`
def test_eval_with_extra_sync_option(tmp_path):
    # qsr_eval_copy=False: v0.1 behaviour, the evaluation's average is kept (training changes)
    config = QSRConfig(qsr_rule="constant", qsr_h_base=4, qsr_eval_copy=False)
    r0, r1 = run_distributed(
        _trainer_run, out_dir=str(tmp_path), config=config, max_steps=4, eval_strategy="steps", eval_steps=2
    )
    assert torch.equal(r0["at_eval"][0], r1["at_eval"][0])
    assert not torch.equal(r0["params"][1], r1["params"][1])  # recorded before the eval's sync
    assert r0["stats"]["extra_syncs"] == 1


def _resume_from_a_copy(rank, world_size, checkpoint, copy_to, **kwargs):
    # the checkpoint copied outside output_dir (rank 0 copies, the others wait): the callback must still find it
    if rank == 0:
        shutil.copytree(checkpoint, copy_to)
    dist.barrier()
    return _trainer_run(rank, world_size, resume=copy_to, **kwargs)


@pytest.mark.scenarios("resume_full", "resumed")
def test_resume_reproduces_uninterrupted_run(runs):
    # "resumed" starts from a copy of "full"'s checkpoint-5 made outside its output_dir (`_resume_from_a_copy`)
    full, resumed = runs["resume_full"], runs["resumed"]
    for rank in (0, 1):
        assert torch.equal(full[rank]["final"], resumed[rank]["final"]), f"rank {rank} diverged after resume"
        assert full[rank]["stats"] == resumed[rank]["stats"]
    assert resumed[0]["synced"] == full[0]["synced"][5:]


@pytest.mark.slow  # kept out of the default run's 10-minute budget; `pytest -m slow`
def test_resume_without_qsr_files_warns(tmp_path):
    full_dir = tmp_path / "full"
    run_distributed(_trainer_run, out_dir=str(full_dir), config=QSR, save_steps=5, max_steps=6)
    for f in Path(full_dir / "checkpoint-5").glob("qsr_state_rank*.pt"):
        f.unlink()
    out = run_distributed(_resume_capturing_warnings, out_dir=str(full_dir), resume=str(full_dir / "checkpoint-5"))
    assert any("qsr_state_rank0.pt" in m for m in out[0])


def _resume_capturing_warnings(rank, world_size, out_dir, resume):
    import logging

    records = []

    class Grab(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logging.getLogger("qsr_hf").addHandler(Grab())
    _trainer_run(rank, world_size, out_dir, QSR, max_steps=6, save_steps=5, resume=resume)
    return records


def _local_optimizer_run(rank, world_size, steps, h):
    from accelerate import Accelerator

    from qsr_hf import LocalOptimizer

    torch.manual_seed(0)
    accelerator = Accelerator()
    model = ViTForImageClassification(tiny_vit_config())
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loader = torch.utils.data.DataLoader(make_dataset(), batch_size=4, shuffle=False)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    local = LocalOptimizer(opt, model, QSRConfig(qsr_rule="constant", qsr_h_base=h), num_training_steps=steps)
    for i, batch in enumerate(loader):
        if i == steps:
            break
        accelerator.backward(model(**batch).loss)
        local.step()
        local.zero_grad()
    return flat_params(model.module)


@pytest.mark.slow  # kept out of the default run's 10-minute budget; `pytest -m slow`
def test_callback_matches_local_optimizer(tmp_path):
    config = QSRConfig(qsr_rule="constant", qsr_h_base=3)
    trainer_runs = run_distributed(_trainer_run, out_dir=str(tmp_path), config=config, max_steps=7, sgd=True)
    loop_runs = run_distributed(_local_optimizer_run, steps=7, h=3)
    for rank in (0, 1):
        torch.testing.assert_close(trainer_runs[rank]["final"], loop_runs[rank], rtol=1e-5, atol=1e-6)


def test_single_process_trainer_warns_and_trains(tmp_path, caplog):
    result = _trainer_run(0, 1, str(tmp_path), QSRConfig(qsr_rule="constant", qsr_h_base=2), max_steps=3)
    assert result["stats"]["steps"] == 3 and result["stats"]["bytes_averaged"] == 0
    assert any("single-process run" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    "scheduler", ["linear", "cosine", "constant_with_warmup", "cosine_with_min_lr", "polynomial", "inverse_sqrt"]
)
def test_every_scheduler_type_drives_the_schedule(tmp_path, scheduler):
    kwargs = {"lr_scheduler_kwargs": {"min_lr": 1e-5}} if scheduler == "cosine_with_min_lr" else {}
    config = QSRConfig(qsr_alpha=2e-3, qsr_h_base=2)
    result = _trainer_run(0, 1, str(tmp_path), config, max_steps=16, lr_scheduler_type=scheduler, **kwargs)
    expected = plan(config, result["lrs"], result["warmup"])
    assert [i + 1 for i, s in enumerate(result["synced"]) if s] == expected.sync_steps


@pytest.mark.slow  # kept out of the default run's 10-minute budget; `pytest -m slow`
def test_trainer_bf16_autocast(tmp_path):
    config = QSRConfig(qsr_rule="constant", qsr_h_base=3)
    r0, r1 = run_distributed(_trainer_run, out_dir=str(tmp_path), config=config, max_steps=6, bf16=True)
    assert r0["grad_allreduces"] == 0 and r0["synced"] == [False, False, True] * 2
    assert torch.equal(r0["final"], r1["final"]) and not torch.equal(r0["params"][3], r1["params"][3])


@pytest.mark.slow  # kept out of the default run's 10-minute budget; `pytest -m slow`
def test_trainer_torch_compile(tmp_path):
    # TrainingArguments(torch_compile=True): Trainer compiles the model (inductor on CPU, ~20 s); the DDP wrapper is
    # still found and kept in no_sync, so ranks drift apart between syncs and agree after each
    config = QSRConfig(qsr_rule="constant", qsr_h_base=2)
    r0, r1 = run_distributed(_trainer_run, out_dir=str(tmp_path), config=config, max_steps=6, torch_compile=True)
    assert r0["synced"] == [False, True] * 3
    assert r0["param_allreduces"] == 3 * r0["buckets"]
    for i in (1, 3, 5):
        assert torch.equal(r0["params"][i], r1["params"][i]), f"ranks differ after the sync at step {i}"
    for i in (2, 4):  # step 0 has lr 0 (warm-up) and changes nothing
        assert not torch.equal(r0["params"][i], r1["params"][i]), f"ranks equal between syncs at step {i}"


@pytest.mark.slow  # 10 s; the same synchronizer path is tested through LocalOptimizer (test_local_optimizer.py)
def test_trainer_optimizer_state_averaging_option(tmp_path):
    config = QSRConfig(qsr_rule="constant", qsr_h_base=3, qsr_average_optimizer_state=True)
    r0, r1 = run_distributed(_trainer_run, out_dir=str(tmp_path), config=config, max_steps=6)
    assert r0["synced"] == [False, False, True] * 2 and torch.equal(r0["final"], r1["final"])
    param_bytes = sum(p.numel() * 4 for p in ViTForImageClassification(tiny_vit_config()).parameters())
    assert r0["stats"]["bytes_averaged"] == 2 * 3 * param_bytes, "a sync sends parameters and both AdamW moments"


def _bn_trainer_run(out_dir, reestimate, evaluate):
    from qsr_hf.training.models import build_model

    torch.manual_seed(0)
    model = build_model("demo_resnet", [str(i) for i in range(4)], image_size=16, num_channels=3)
    g = torch.Generator().manual_seed(0)
    data = Dataset.from_dict(
        {"pixel_values": torch.randn(64, 3, 16, 16, generator=g).numpy(), "labels": torch.randint(0, 4, (64,)).numpy()}
    ).with_format("torch")
    config = QSRConfig(
        qsr_rule="constant", qsr_h_base=4, qsr_average_buffers=False, qsr_bn_reestimate_batches=reestimate
    )
    args = TrainingArguments(
        output_dir=out_dir, use_cpu=True, max_steps=4, per_device_train_batch_size=4, learning_rate=1e-3,
        lr_scheduler_type="constant", eval_strategy="steps" if evaluate else "no", eval_steps=2, report_to=[],
        save_strategy="no", disable_tqdm=True, seed=0,
    )  # fmt: skip
    qsr = QSRCallback(config)
    recorder = Recorder(qsr)
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data, callbacks=[qsr, recorder])
    trainer.train()
    return {
        "at_eval": recorder.at_eval,
        "extra_syncs": qsr.synchronizer.stats.extra_syncs,
        "params": recorder.params,
        "final": flat_params(trainer.model),
    }


def _bn_trainer_runs(rank, world_size, out_dir, variants):
    # several trainings on one process group: one spawn
    return {(n, evaluate): _bn_trainer_run(f"{out_dir}/{n}_{evaluate}", n, evaluate) for n, evaluate in variants}


@pytest.mark.scenarios("batchnorm")
def test_trainer_batchnorm_reestimated_before_eval(runs):
    # buffers stay local between syncs; before the mid-round eval at step 2 the statistics are recomputed and averaged
    r0, r1 = runs["batchnorm"]
    assert len(r0[2, True]["at_eval"]) == 2
    for a, b in zip(r0[2, True]["at_eval"], r1[2, True]["at_eval"], strict=True):
        assert torch.equal(a, b), "parameters or BatchNorm statistics differ across ranks at evaluation"
    # extra syncs: parameters before the step-2 eval, statistics before both evals and at the end of training
    assert r0[2, True]["extra_syncs"] == 4
    # the re-estimated statistics belong to the evaluation's copy: training (buffers included) is that of no eval
    for rank, run in enumerate((r0, r1)):
        evaluated, plain = run[2, True], run[2, False]
        for step, (a, b) in enumerate(zip(evaluated["params"], plain["params"], strict=True), 1):
            assert torch.equal(a, b), f"rank {rank}, step {step}: the evaluation's BatchNorm re-estimation leaked"
        assert torch.equal(evaluated["final"], plain["final"]), f"rank {rank}: the runs end differently"
    assert not torch.equal(r0[0, True]["at_eval"][0], r1[0, True]["at_eval"][0]), "without it, statistics stay local"


def test_missing_lr_scheduler_is_an_error(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    from transformers import TrainerControl, TrainerState

    with pytest.raises(ValueError, match="needs an lr scheduler"):
        QSRCallback(alpha=0.01).on_train_begin(args, TrainerState(), TrainerControl(), lr_scheduler=None)


def test_one_line_form_equals_config_form():
    assert QSRCallback(alpha=0.0175, h_base=4).config == QSRCallback(QSRConfig(qsr_alpha=0.0175, qsr_h_base=4)).config


@pytest.mark.slow  # 22 s; outer resume bitwise: tests/test_outer.py; Trainer resume: test_resume_reproduces_uninterrupted_run
def test_trainer_outer_optimizer_resumes_bitwise_and_logs(tmp_path):
    # QSR rounds + DiLoCo's Nesterov outer step; an evaluation (step 3) and a checkpoint (step 5) inside rounds
    config = dataclasses.replace(QSR, qsr_outer_optimizer="nesterov")
    full_dir = tmp_path / "full"
    full = run_distributed(
        _trainer_run, out_dir=str(full_dir), config=config, save_steps=5, eval_strategy="steps", eval_steps=3
    )
    resumed = run_distributed(
        _trainer_run, out_dir=str(tmp_path / "resumed"), config=config, save_steps=5, eval_strategy="steps",
        eval_steps=3, resume=str(full_dir / "checkpoint-5"),
    )  # fmt: skip
    r0, r1 = full
    for i, synced in enumerate(r0["synced"]):
        if r0["lrs"][i] > 0:  # the first warm-up step has lr 0 and changes nothing
            assert torch.equal(r0["params"][i], r1["params"][i]) == synced, f"step {i + 1}: equal only after a sync"
    for rank in (0, 1):
        assert torch.equal(full[rank]["final"], resumed[rank]["final"]), f"rank {rank}: resume with outer state"
        saved = read_state_file(full_dir / "checkpoint-5" / f"qsr_state_rank{rank}.pt")
        assert set(saved["qsr"]["synced"]) == {"anchor", "momentum"}, "the outer state is in every rank's file"
    logged = [h for h in r0["log_history"] if "qsr/H" in h]
    for entry in logged:  # the Trainer's own metrics survive; the outer optimizer's ride along
        assert {"loss", "learning_rate", "qsr/outer_lr"} <= set(entry), entry
    assert logged[-1]["qsr/pseudo_grad_norm"] > 0


def _scenarios(tmp):
    """Every 2-process training of the default run, by name: ``(fn, kwargs)`` as `run_distributed` would take them.

    Each writes under its own folder of ``tmp``; "resumed" reads "full"'s checkpoint, so it comes after it.
    """
    constant4 = QSRConfig(qsr_rule="constant", qsr_h_base=4)
    return {
        "schedule": (_trainer_run, {"out_dir": str(tmp / "schedule"), "config": QSR}),
        "accumulation": (
            _trainer_run,
            {
                "out_dir": str(tmp / "accumulation"),
                "config": QSRConfig(qsr_rule="constant", qsr_h_base=3),
                "max_steps": 6,
                "accumulation": 2,
            },
        ),
        "eval": (
            _trainer_run,
            {
                "out_dir": str(tmp / "eval"),
                "config": constant4,
                "max_steps": 8,
                "eval_strategy": "steps",
                "eval_steps": 3,
                "save_steps": 5,
            },
        ),
        "eval_plain": (_trainer_run, {"out_dir": str(tmp / "plain"), "config": constant4, "max_steps": 8}),
        "stopped": (
            _trainer_run,
            {"out_dir": str(tmp / "stopped"), "config": constant4, "max_steps": 8, "stop_at": 6, "logging_steps": 3},
        ),
        "resume_full": (_trainer_run, {"out_dir": str(tmp / "full"), "config": QSR, "save_steps": 5}),
        "resumed": (
            _resume_from_a_copy,
            {
                "checkpoint": str(tmp / "full" / "checkpoint-5"),
                "copy_to": str(tmp / "elsewhere" / "checkpoint-5"),
                "out_dir": str(tmp / "resumed"),
                "config": QSR,
                "save_steps": 5,
            },
        ),
        "batchnorm": (
            _bn_trainer_runs,
            {"out_dir": str(tmp / "batchnorm"), "variants": [(2, True), (2, False), (0, True)]},
        ),
    }


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("callback")


@pytest.fixture(scope="module")
def batch(request, tmp):
    """The trainings of the selected tests, all from one spawn; one that failed raises where a test reads it."""
    return run_distributed_batch(selected_scenarios(request, _scenarios(tmp)))


@pytest.fixture
def runs(batch, request):
    """The trainings this test names in its ``scenarios`` mark."""
    return batch.for_test(request.node)
