"""DeepSpeed ZeRO-0 on real 2-process gloo groups: real engines through Accelerate (LocalOptimizer) and Trainer."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from testing_utils import BNMLP, flat_params, rank_batches, require_deepspeed, run_distributed

from qsr_hf import LocalOptimizer, QSRConfig
from qsr_hf.analysis.planner import plan
from qsr_hf.checkpoint.files import read_state_file
from qsr_hf.runtime.paths import folds_checks


pytestmark = require_deepspeed

COLLECTIVES = [
    "all_reduce",
    "all_reduce_coalesced",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "broadcast",
    "broadcast_object_list",
    "reduce",
    "all_to_all_single",
    "barrier",
]


class CollectiveSpy:
    """Counts every torch.distributed collective (DeepSpeed's comm layer calls these) while still running them.

    Installed before the engine is built, so that references DeepSpeed caches at init are counted too.
    """

    def __init__(self):
        self.calls = []
        self._orig = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}
        for name, fn in self._orig.items():
            setattr(dist, name, self._wrap(name, fn))

    def _wrap(self, name, fn):
        def spy(*args, **kwargs):
            self.calls.append(name)
            return fn(*args, **kwargs)

        return spy

    def take(self):
        calls, self.calls = self.calls, []
        return calls

    def close(self):
        for name, fn in self._orig.items():
            setattr(dist, name, fn)


def _ds_config(precision, clip, stage=0):
    config = {
        "train_micro_batch_size_per_gpu": 8,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "gradient_clipping": clip,
        "steps_per_print": 10**9,
    }
    if precision == "bf16":
        config["bf16"] = {"enabled": True}
    if precision == "fp16":
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 8}  # dynamic loss scaling
    if precision != "fp32":
        # BatchNorm statistics in the model's dtype too: DeepSpeed keeps buffers in fp32, and torch's CPU batch_norm
        # refuses fp16 inputs beside fp32 statistics ("expected scalar type Half but found Float")
        config["data_types"] = {"buffer_dtype": precision}
    return config


def _skip_if_fp16_unsupported(precision):
    from deepspeed.accelerator import get_accelerator

    if precision == "fp16" and not get_accelerator().is_fp16_supported():
        pytest.skip(
            f"DeepSpeed's {get_accelerator().device_name()} accelerator refuses fp16 here "
            "('Type fp16 is not supported on your device': torch has no mkldnn fp16 on this CPU)"
        )


def _masters(engine):
    """This rank's fp32 master weights as one vector (None for an fp32 engine, whose parameters are the weights)."""
    opt = engine.optimizer
    if hasattr(opt, "fp32_groups_flat"):
        return torch.cat([t.detach().reshape(-1) for t in opt.fp32_groups_flat]).clone()
    if hasattr(opt, "fp32_groups"):
        return torch.cat([t.detach().reshape(-1) for group in opt.fp32_groups for t in group]).clone()
    return None


WARMUP = 2
RESUME_QSR = QSRConfig(qsr_rule="qsr", qsr_alpha=0.015, qsr_h_base=2)


def _model_weights(engine):
    """The low-precision model weights in the masters' order (optimizer groups), as fp32."""
    return torch.cat([p.detach().float().reshape(-1) for group in engine.optimizer.fp16_groups for p in group])


def _lr_decay(step):
    return 1.0 / (1 + step)


def _build(precision, clip, optimizer="torch", scheduler="torch", steps=9):
    # ACCELERATE_USE_CPU makes Accelerate fall back to DDP; DeepSpeed picks its CPU accelerator on its own
    os.environ.pop("ACCELERATE_USE_CPU", None)
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DeepSpeedPlugin

    # one Accelerator per DeepSpeed engine (Accelerate ties `backward` to the last engine it prepared); only the
    # first one of a process may be given the plugin
    plugin = None if AcceleratorState._shared_state else DeepSpeedPlugin(hf_ds_config=_ds_config(precision, clip))
    accelerator = Accelerator(deepspeed_plugin=plugin)
    torch.manual_seed(0)
    model = BNMLP()
    # two parameter groups, as Trainer builds them: no weight decay on biases and norms
    decay = [p for p in model.parameters() if p.dim() > 1]
    groups = [{"params": decay}, {"params": [p for p in model.parameters() if p.dim() <= 1], "weight_decay": 0.0}]
    if optimizer == "fused":
        from deepspeed.ops.adam import FusedAdam

        opt = FusedAdam(groups, lr=0.01, weight_decay=0.05, adam_w_mode=True)
    else:
        opt = torch.optim.AdamW(groups, lr=0.01, weight_decay=0.05)
    if scheduler == "deepspeed":
        # a DeepSpeed scheduler is handed to the engine, which steps it inside `accelerator.backward`
        from deepspeed.runtime.lr_schedules import WarmupDecayLR

        sched = WarmupDecayLR(opt, steps, warmup_min_lr=0.001, warmup_max_lr=0.01, warmup_num_steps=WARMUP)
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_decay)
    engine, opt, sched = accelerator.prepare(model, opt, sched)
    lrs = []  # the lr each optimizer step actually used
    engine.basic_optimizer.register_step_pre_hook(lambda o, args, kwargs: lrs.append(o.param_groups[0]["lr"]))
    engine.used_lrs = lrs
    return accelerator, engine, opt, sched


def _run(accelerator, engine, local, sched, batches, spy=None):
    dtype = next(engine.module.parameters()).dtype
    out = {"params": [], "masters": [], "synced": [], "collectives": [], "pre_sync_masters": []}
    averager = local.synchronizer.averager
    average = averager.average

    def snapshot_then_average(*args, **kwargs):
        out["pre_sync_masters"].append(_masters(engine))
        return average(*args, **kwargs)

    averager.average = snapshot_then_average
    for x, y in batches:
        loss = torch.nn.functional.cross_entropy(engine(x.to(dtype)).float(), y)
        accelerator.backward(loss)
        local.step()
        sched.step()
        local.zero_grad()
        out["params"].append(flat_params(engine.module))
        out["masters"].append(_masters(engine))
        if out["masters"][-1] is not None:
            out.setdefault("weights", []).append(_model_weights(engine))
        out["synced"].append(local.last_step_synced)
        if spy is not None:
            out["collectives"].append(spy.take())
    averager.average = average
    return out


def _train(rank, world_size, precision, clip, steps, h, optimizer="torch", outer="none", overlap=0):
    spy = CollectiveSpy()
    try:
        accelerator, engine, opt, sched = _build(precision, clip, optimizer)
        config = QSRConfig(
            qsr_rule="constant", qsr_h_base=h, qsr_outer_optimizer=outer, qsr_overlap_sync=overlap > 0,
            qsr_overlap_steps=max(1, overlap),
        )  # fmt: skip
        local = LocalOptimizer(opt, engine, config, num_training_steps=steps)
        init = _masters(engine)
        spy.take()
        out = _run(accelerator, engine, local, sched, rank_batches(rank, steps), spy)
    finally:
        spy.close()
    out["buckets"] = local.synchronizer.averager.num_buckets
    out["folds"] = folds_checks(local.synchronizer.path)  # the agreement check rides on the first all-reduce
    out["optimizer"] = type(engine.optimizer).__name__
    out["init_masters"] = init
    if precision == "fp32":  # one spawn less: check the refusal of ZeRO 1-3 in this process too
        out["zero_errors"] = _zero_stage_errors()
    return out


def _check_local_steps_and_syncs(r0, r1, steps, h):
    expected = [(i + 1) % h == 0 or i + 1 == steps for i in range(steps)]
    assert r0["synced"] == expected and r1["synced"] == expected
    for i in range(steps):
        calls = r0["collectives"][i]
        if expected[i]:
            check = [] if r0["folds"] else ["all_gather"]  # separate when no fp32 bucket can carry the header
            assert calls == check + ["all_reduce"] * r0["buckets"], (
                f"step {i}: a sync is one all-reduce per bucket (after the agreement check if separate): {calls}"
            )
            assert torch.equal(r0["params"][i], r1["params"][i]), f"model differs across ranks after the sync {i}"
        else:
            assert calls == [], f"step {i}: collectives between syncs: {calls}"
            assert not torch.allclose(r0["params"][i], r1["params"][i]), f"ranks equal between syncs at step {i}"


@pytest.mark.parametrize(
    ("precision", "optimizer", "wrapper"),
    [
        ("fp32", "torch", "AdamW"),
        ("bf16", "torch", "FP16_UnfusedOptimizer"),
        ("fp16", "torch", "FP16_UnfusedOptimizer"),  # dynamic loss scaling; skipped where DeepSpeed refuses fp16
        # DeepSpeed's FusedAdam (what an "AdamW" DeepSpeed config builds) gets the flat-master FP16_Optimizer; its
        # CPU op is JIT-compiled on first use (about a minute): `.ci/run` builds it before the tests
        # (tests/build_deepspeed_ops.py)
        ("bf16", "fused", "FP16_Optimizer"),
    ],
)
def test_zero0_local_steps_no_collectives_with_clipping(precision, optimizer, wrapper):
    # gradient_clipping=1.0: DeepSpeed all-reduces the clipping norm (fp32) or an overflow flag (bf16) every step
    # unless the adapter makes them local
    _skip_if_fp16_unsupported(precision)
    steps, h = 5, 2
    r0, r1 = run_distributed(_train, precision=precision, clip=1.0, steps=steps, h=h, optimizer=optimizer)
    assert r0["optimizer"] == wrapper
    _check_local_steps_and_syncs(r0, r1, steps, h)
    if precision == "fp32":
        for messages in (r0["zero_errors"], r1["zero_errors"]):
            assert sorted(messages) == [1, 2, 3]
            for stage, message in messages.items():
                assert f"got stage {stage}" in message and '"stage": 0' in message
        return
    for i in range(steps):
        m0, m1 = r0["masters"][i], r1["masters"][i]
        # the bf16 model weights are the masters rounded, at every step (after a sync too)
        low = torch.bfloat16 if precision == "bf16" else torch.float16
        assert torch.equal(r0["weights"][i], m0.to(low).float()), f"model != {precision}(masters), step {i}"
        if r0["synced"][i]:
            k = sum(r0["synced"][: i + 1]) - 1
            mean = (r0["pre_sync_masters"][k] + r1["pre_sync_masters"][k]) / 2
            assert torch.equal(m0, mean) and torch.equal(m1, mean), f"masters are not the mean at sync step {i}"
        else:
            assert not torch.equal(m0, m1), f"masters equal between syncs at step {i}"
            if i > 0 and r0["synced"][i - 1]:
                # the step after a sync starts from the averaged masters: one AdamW step away from them
                assert (m0 - r0["masters"][i - 1]).abs().max() < 0.05, "the sync was undone by the next step"


def test_zero0_outer_optimizer_steps_the_fp32_masters():
    # DiLoCo's Nesterov step on DeepSpeed's fp32 masters: the bf16 weights follow them, ranks equal after each sync
    steps, h = 5, 2
    r0, r1 = run_distributed(_train, precision="bf16", clip=0.0, steps=steps, h=h, outer="nesterov")
    anchor, momentum = r0["init_masters"], torch.zeros_like(r0["init_masters"])
    for i in range(steps):
        m0, m1 = r0["masters"][i], r1["masters"][i]
        assert torch.equal(r0["weights"][i], m0.to(torch.bfloat16).float()), f"model != bf16(masters), step {i}"
        assert torch.equal(m0, m1) == r0["synced"][i], f"step {i}: masters equal exactly after the syncs"
        if r0["synced"][i]:
            k = sum(r0["synced"][: i + 1]) - 1
            g = anchor - (r0["pre_sync_masters"][k] + r1["pre_sync_masters"][k]) / 2
            momentum = 0.9 * momentum + g
            anchor = anchor - 0.7 * (g + 0.9 * momentum)  # torch.optim.SGD(nesterov=True)'s update
            torch.testing.assert_close(m0, anchor, rtol=1e-5, atol=1e-6, msg=f"step {i}: not the Nesterov step")
            anchor = m0


@pytest.mark.slow  # 15 s; the delayed arithmetic itself is checked bitwise with DDP in tests/test_overlap.py
def test_zero0_overlap_over_two_steps_reaches_the_bf16_weights():
    # qsr_overlap_steps=2 on DeepSpeed's fp32 masters: rounds of 3 over 8 steps, averages started after steps 3 and
    # 6 and folded in 2 steps later with the local change kept (ranks still differ), the last one blocking
    steps, h = 8, 3
    r0, r1 = run_distributed(_train, precision="bf16", clip=0.0, steps=steps, h=h, overlap=2)
    assert len(r0["pre_sync_masters"]) == 3, "averages started after steps 3 and 6, and the last one"
    for i in range(steps):
        m0, m1 = r0["masters"][i], r1["masters"][i]
        assert torch.equal(r0["weights"][i], m0.to(torch.bfloat16).float()), f"model != bf16(masters), step {i}"
        assert torch.equal(m0, m1) == (i == steps - 1), f"step {i}: masters equal only after the blocking last sync"
    gap = [(r0["masters"][i] - r1["masters"][i]).norm() for i in range(steps)]
    assert gap[4] < gap[3] / 2, f"the average of step 3 was not folded in after step 5: {gap}"  # 2 steps' drift left
    assert torch.equal(r0["masters"][-1], (r0["pre_sync_masters"][-1] + r1["pre_sync_masters"][-1]) / 2)


def _resume(rank, world_size, precision, steps, cut, tmp):
    batches = rank_batches(rank, steps)

    def build():
        accelerator, engine, opt, sched = _build(precision, 0.0, scheduler="deepspeed", steps=steps)
        local = LocalOptimizer(opt, engine, RESUME_QSR, num_training_steps=steps, num_warmup_steps=WARMUP)
        return accelerator, engine, local, sched

    accelerator, engine, local, sched = build()
    full = _run(accelerator, engine, local, sched, batches)
    full["used_lrs"] = engine.used_lrs
    local.close()
    # a second engine runs to `cut` and saves this rank's state; a third one loads it and finishes
    accelerator, engine, local, sched = build()
    _run(accelerator, engine, local, sched, batches[:cut])
    local.save_local_state(tmp)
    model_state = {k: v.clone() for k, v in engine.module.state_dict().items()}
    sched_state = sched.state_dict()
    local.close()
    accelerator, engine, local, sched = build()
    engine.module.load_state_dict(model_state)
    assert local.load_local_state(tmp)
    sched.load_state_dict(sched_state)
    rest = _run(accelerator, engine, local, sched, batches[cut:])
    return full, rest


def test_bf16_resume_mid_round_is_exact(tmp_path):
    steps, cut = 9, 7
    results = run_distributed(_resume, precision="bf16", steps=steps, cut=cut, tmp=str(tmp_path))
    full = results[0][0]
    # the engine steps its lr scheduler inside accelerator.backward, before LocalOptimizer.step: H must still come
    # from the lr that the round's first step used
    expected = plan(RESUME_QSR, full["used_lrs"], warmup_steps=WARMUP)
    assert [i + 1 for i, synced in enumerate(full["synced"]) if synced] == expected.sync_steps
    # ... and taking the lr current at LocalOptimizer.step (the next step's) would have given other rounds
    assert plan(RESUME_QSR, full["used_lrs"][1:] + full["used_lrs"][-1:], warmup_steps=WARMUP) != expected
    assert cut not in expected.sync_steps, "the cut must fall inside a round"
    for rank, (full, rest) in enumerate(results):
        assert full["synced"][cut:] == rest["synced"], f"rank {rank}: the sync schedule changed on resume"
        assert torch.equal(full["params"][-1], rest["params"][-1]), f"rank {rank}: resumed model diverged"
        assert torch.equal(full["masters"][-1], rest["masters"][-1]), f"rank {rank}: resumed masters diverged"


def _overflow(rank, world_size, steps):
    # rank 1's loss is inf at step 2: its (now local) overflow check skips the step, and the engine skips its lr
    # scheduler's step with it; the adapter makes it up before the next forward pass
    accelerator, engine, opt, sched = _build("bf16", 0.0, scheduler="deepspeed", steps=steps)
    local = LocalOptimizer(opt, engine, RESUME_QSR, num_training_steps=steps, num_warmup_steps=WARMUP)
    out = {"lr": [], "h": [], "synced": []}
    for i, (x, y) in enumerate(rank_batches(rank, steps)):
        loss = torch.nn.functional.cross_entropy(engine(x.to(torch.bfloat16)).float(), y)
        out["lr"].append(opt.param_groups[0]["lr"])  # the lr recorded for this step, after any catch-up
        accelerator.backward(loss * (float("inf") if rank == 1 and i == 2 else 1.0))
        local.step()
        sched.step()
        local.zero_grad()
        out["h"].append(local.synchronizer.stats.round_length)
        out["synced"].append(local.last_step_synced)
    local.close()
    out["skipped"] = engine.skipped_steps
    out["masters"] = _masters(engine)
    return out


def test_overflow_on_one_rank_keeps_the_engines_lr_aligned():
    steps = 9
    r0, r1 = run_distributed(_overflow, steps=steps)
    assert (r0["skipped"], r1["skipped"]) == (0, 1), "the overflow was not injected on rank 1 only"
    assert r1["lr"] == r0["lr"] and len(set(r0["lr"])) > 2, "rank 1's lr lags after its skipped step"
    assert r1["h"] == r0["h"] and r1["synced"] == r0["synced"] and sum(r0["synced"]) >= 2
    assert torch.equal(r0["masters"], r1["masters"]), "training did not end on a common average"


def _zero_stage_errors():
    import deepspeed

    messages = {}
    for stage in (1, 2, 3):
        torch.manual_seed(0)
        model = BNMLP()
        opt = torch.optim.AdamW(model.parameters(), lr=0.01)
        engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=_ds_config("fp32", 0.0, stage))
        try:
            LocalOptimizer(opt, engine, QSRConfig(qsr_rule="constant", qsr_h_base=2))
        except NotImplementedError as e:
            messages[stage] = str(e)
    return messages


# -- Trainer + QSRCallback ---------------------------------------------------------------------------------------
# the shipped example config ("auto" values are filled from TrainingArguments)
TRAINER_DS_CONFIG = json.loads((Path(__file__).parents[1] / "recipes" / "deepspeed" / "zero0_bf16.json").read_text())


def _vit_dataset(n=64, seed=0):
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(n, 3, 32, 32, generator=g)
    labels = torch.randint(0, 4, (n,), generator=g)
    return Dataset.from_dict({"pixel_values": pixels.numpy(), "labels": labels.numpy()}).with_format("torch")


def _trainer_run(rank, world_size, out_dir, steps, h, save_steps, resume=None):
    os.environ.pop("ACCELERATE_USE_CPU", None)
    from testing_utils import tiny_vit_config
    from transformers import Trainer, TrainerCallback, TrainingArguments, ViTForImageClassification

    from qsr_hf.frontends.callback import QSRCallback

    spy = CollectiveSpy()

    class Recorder(TrainerCallback):
        """Runs after QSRCallback: model, masters and the collectives of each step's window."""

        def __init__(self):
            self.params, self.masters, self.collectives, self.synced = [], [], [], []

        def on_step_begin(self, args, state, control, **kw):
            spy.take()
            self._syncs = qsr.synchronizer.stats.syncs

        def on_optimizer_step(self, args, state, control, model=None, **kw):
            self.collectives.append(spy.take())
            self.params.append(flat_params(model))
            self.masters.append(_masters(qsr.synchronizer.engine.engine))
            self.synced.append(qsr.synchronizer.stats.syncs > self._syncs)

    torch.manual_seed(0)
    args = TrainingArguments(
        output_dir=out_dir,
        use_cpu=True,  # without it Trainer + DeepSpeed on CPU silently runs with world size 1
        deepspeed=TRAINER_DS_CONFIG,
        bf16=True,
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        lr_scheduler_type="cosine",
        max_grad_norm=1.0,
        save_strategy="steps",
        save_steps=save_steps,
        logging_steps=steps,
        report_to=[],
        disable_tqdm=True,
        seed=0,
    )
    qsr, recorder = QSRCallback(rule="constant", h_base=h), Recorder()
    trainer = Trainer(
        model=ViTForImageClassification(tiny_vit_config()),
        args=args,
        train_dataset=_vit_dataset(),
        callbacks=[qsr, recorder],
    )
    try:
        trainer.train(resume_from_checkpoint=resume)
    finally:
        spy.close()
    engine = trainer.model_wrapped
    return {
        "world_size": dist.get_world_size(),
        "engine": type(engine).__name__,
        "optimizer": type(engine.optimizer).__name__,
        "params": recorder.params,
        "masters": recorder.masters,
        "collectives": recorder.collectives,
        "synced": recorder.synced,
        "buckets": qsr.synchronizer.averager.num_buckets,
        "folds": folds_checks(qsr.synchronizer.path),
        "final": flat_params(trainer.model),
        "final_masters": _masters(engine),
    }


def test_trainer_deepspeed_bf16_local_steps_and_resume(tmp_path):
    steps, h, save = 8, 3, 4
    full_dir, resumed_dir = tmp_path / "full", tmp_path / "resumed"
    r0, r1 = run_distributed(_trainer_run, out_dir=str(full_dir), steps=steps, h=h, save_steps=save)
    assert r0["world_size"] == 2 and r0["engine"] == "DeepSpeedEngine" and r0["optimizer"] == "FP16_UnfusedOptimizer"
    expected = [(i + 1) % h == 0 or i + 1 == steps for i in range(steps)]
    assert r0["synced"] == expected
    for i in range(steps):
        if expected[i]:
            assert r0["folds"], "the fp32 masters carry the agreement check"
            assert r0["collectives"][i] == ["all_reduce"] * r0["buckets"], f"step {i}: {r0['collectives'][i]}"
            assert torch.equal(r0["params"][i], r1["params"][i]), f"step {i}: model differs right after a sync"
            assert torch.equal(r0["masters"][i], r1["masters"][i]), f"step {i}: masters differ right after a sync"
        else:
            assert r0["collectives"][i] == [], f"step {i}: collectives between syncs: {r0['collectives'][i]}"
            assert not torch.equal(r0["masters"][i], r1["masters"][i]), f"step {i}: masters equal between syncs"
    # every rank wrote its own optimizer state (Adam moments and fp32 masters) next to DeepSpeed's checkpoint
    states = [read_state_file(full_dir / f"checkpoint-{save}" / f"qsr_state_rank{r}.pt") for r in (0, 1)]
    moments = [
        next(iter(s["engine"]["optimizer"]["optimizer_state_dict"]["state"].values()))["exp_avg"] for s in states
    ]
    assert not torch.equal(moments[0], moments[1]), "rank 1's Adam moments were not saved"
    assert "fp32_groups" in states[1]["engine"]["optimizer"]

    shutil.copytree(full_dir / f"checkpoint-{save}", resumed_dir / f"checkpoint-{save}")
    resumed = run_distributed(
        _trainer_run, out_dir=str(resumed_dir), steps=steps, h=h, save_steps=save,
        resume=str(resumed_dir / f"checkpoint-{save}"),
    )  # fmt: skip
    for rank, full in enumerate((r0, r1)):
        assert resumed[rank]["synced"] == full["synced"][save:]
        assert torch.equal(resumed[rank]["final_masters"], full["final_masters"]), f"rank {rank} diverged on resume"
        assert torch.equal(resumed[rank]["final"], full["final"]), f"rank {rank} diverged on resume"
