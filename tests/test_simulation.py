"""The one-process simulation (qsr_hf.analysis.simulation) against real 2-process gloo runs (LocalOptimizer, Accelerate DDP).

Same init, same data (rank k gets shard k of every global batch), same AdamW and lr schedule. The comparison is
bitwise (torch.equal), after every optimizer step, of all parameters and floating-point buffers (BatchNorm running
statistics included): with K = 2 the sums the simulation does are the ones gloo does (a + b is commutative). The
selected tests' real runs share one spawn (`run_distributed_batch`, the module fixture ``batch``).
"""

import pytest
import torch
from accelerate import Accelerator
from testing_utils import BNMLP, flat_params, run_distributed_batch, selected_scenarios
from transformers import get_scheduler

from qsr_hf import LocalOptimizer, QSRConfig
from qsr_hf.analysis.planner import plan
from qsr_hf.analysis.simulation import DataParallelSimulation, LocalTrainingSimulation, shard_batch


STEPS, WARMUP, GLOBAL_BATCH, WORKERS = 24, 3, 16, 2
PEAK_LR = 0.05
CONFIGS = {
    "constant": QSRConfig(qsr_rule="constant", qsr_h_base=3),
    # alpha just above PEAK_LR * sqrt(H_base): rounds 2, 2, 2, 2, 3, 5, 8 (the last one clipped to the end)
    "qsr": QSRConfig(qsr_rule="qsr", qsr_alpha=0.077, qsr_h_base=2),
    # data-parallel (gradients averaged, as DDP) for 10 steps, then local rounds of 3
    "post_local": QSRConfig(qsr_rule="post_local", qsr_switch_step=10, qsr_h_base=3),
    # the QSR schedule with each sync folded in one step late (the last one blocking)
    "qsr_overlap": QSRConfig(qsr_rule="qsr", qsr_alpha=0.077, qsr_h_base=2, qsr_overlap_sync=True),
    # constant rounds of 4 with each average folded in 2 steps late (qsr_overlap_steps)
    "constant_overlap2": QSRConfig(qsr_rule="constant", qsr_h_base=4, qsr_overlap_sync=True, qsr_overlap_steps=2),
    # the QSR schedule averaging bf16 changes from an fp32 anchor
    "qsr_compress": QSRConfig(qsr_rule="qsr", qsr_alpha=0.077, qsr_h_base=2, qsr_compress_delta=True),
    # the QSR schedule with DiLoCo's Nesterov outer step; and post-local, whose outer state starts at the switch
    "qsr_nesterov": QSRConfig(qsr_rule="qsr", qsr_alpha=0.077, qsr_h_base=2, qsr_outer_optimizer="nesterov"),
    # the overlap's fold-in with the outer step taken on the average when it arrives
    "qsr_overlap_nesterov": QSRConfig(
        qsr_rule="qsr", qsr_alpha=0.077, qsr_h_base=2, qsr_overlap_sync=True, qsr_outer_optimizer="nesterov"
    ),
    "post_local_nesterov": QSRConfig(
        qsr_rule="post_local", qsr_switch_step=10, qsr_h_base=3, qsr_outer_optimizer="nesterov"
    ),
    # Streaming DiLoCo's pattern: the QSR schedule, the model averaged in 3 fragments at staggered steps (rounds of
    # 2 < 3 included), each taking its own Nesterov step
    "qsr_fragments3_nesterov": QSRConfig(
        qsr_rule="qsr", qsr_alpha=0.077, qsr_h_base=2, qsr_fragments=3, qsr_outer_optimizer="nesterov"
    ),
    # Streaming DiLoCo's full combination: each fragment's average in flight while training goes on, folded 3 steps
    # after its step or at the next round end (several fragments in flight at once); and with the Nesterov step
    "qsr_fragments3_overlap3": QSRConfig(
        qsr_rule="qsr", qsr_alpha=0.077, qsr_h_base=2, qsr_fragments=3, qsr_overlap_sync=True, qsr_overlap_steps=3
    ),
    "qsr_fragments3_overlap2_nesterov": QSRConfig(
        qsr_rule="qsr",
        qsr_alpha=0.077,
        qsr_h_base=2,
        qsr_fragments=3,
        qsr_overlap_sync=True,
        qsr_overlap_steps=2,
        qsr_outer_optimizer="nesterov",
    ),
    # the outer step per unit of the round's inner-lr work (S_r from the lr warm-up's 0 on), its momentum ramped
    # over 12 steps; with fragments (each fragment's S_r since its own last sync) and with the overlap (S_r of the
    # round the average started from)
    "qsr_nesterov_round_lr": QSRConfig(
        qsr_rule="qsr",
        qsr_alpha=0.077,
        qsr_h_base=2,
        qsr_outer_optimizer="nesterov",
        qsr_outer_scaling="round_lr",
        qsr_outer_momentum_warmup=12,
    ),
    "qsr_fragments3_nesterov_round_lr": QSRConfig(
        qsr_rule="qsr",
        qsr_alpha=0.077,
        qsr_h_base=2,
        qsr_fragments=3,
        qsr_outer_optimizer="nesterov",
        qsr_outer_scaling="round_lr",
        qsr_outer_momentum_warmup=12,
    ),
    # int8 changes with error feedback (blocks across tensors: the simulation flattens as the averager does); fp8
    "qsr_int8ef": QSRConfig(
        qsr_rule="qsr",
        qsr_alpha=0.077,
        qsr_h_base=2,
        qsr_compress_delta=True,
        qsr_compress_format="int8",
        qsr_compress_error_feedback=True,
    ),
    "qsr_fp8": QSRConfig(
        qsr_rule="qsr", qsr_alpha=0.077, qsr_h_base=2, qsr_compress_delta=True, qsr_compress_format="fp8"
    ),
    # the compressed average in flight (its two collectives on the worker thread), folded 2 steps late: int8 with
    # error feedback and the Nesterov step on arrival; bf16 one step late; fp8 with error feedback, no outer step
    "qsr_overlap2_int8ef_nesterov": QSRConfig(
        qsr_rule="qsr",
        qsr_alpha=0.077,
        qsr_h_base=2,
        qsr_overlap_sync=True,
        qsr_overlap_steps=2,
        qsr_compress_delta=True,
        qsr_compress_format="int8",
        qsr_compress_error_feedback=True,
        qsr_outer_optimizer="nesterov",
    ),
    "qsr_overlap_compress": QSRConfig(
        qsr_rule="qsr", qsr_alpha=0.077, qsr_h_base=2, qsr_overlap_sync=True, qsr_compress_delta=True
    ),
    "constant_overlap3_fp8ef": QSRConfig(
        qsr_rule="constant",
        qsr_h_base=4,
        qsr_overlap_sync=True,
        qsr_overlap_steps=3,
        qsr_compress_delta=True,
        qsr_compress_format="fp8",
        qsr_compress_error_feedback=True,
    ),
    # each fragment's change compressed over its own buffer (int8 blocks per fragment), at its own step; and the
    # fragments' compressed averages in flight, the Nesterov step on arrival
    "qsr_fragments3_int8ef": QSRConfig(
        qsr_rule="qsr",
        qsr_alpha=0.077,
        qsr_h_base=2,
        qsr_fragments=3,
        qsr_compress_delta=True,
        qsr_compress_format="int8",
        qsr_compress_error_feedback=True,
    ),
    "qsr_fragments3_overlap2_int8ef_nesterov": QSRConfig(
        qsr_rule="qsr",
        qsr_alpha=0.077,
        qsr_h_base=2,
        qsr_fragments=3,
        qsr_overlap_sync=True,
        qsr_overlap_steps=2,
        qsr_compress_delta=True,
        qsr_compress_format="int8",
        qsr_compress_error_feedback=True,
        qsr_outer_optimizer="nesterov",
    ),
    "qsr_overlap_sgd_round_lr": QSRConfig(
        qsr_rule="qsr",
        qsr_alpha=0.077,
        qsr_h_base=2,
        qsr_overlap_sync=True,
        qsr_outer_optimizer="sgd",
        qsr_outer_scaling="round_lr",
        qsr_outer_momentum_warmup=12,
    ),
}


def _global_batches():
    g = torch.Generator().manual_seed(7)
    return [
        (torch.randn(GLOBAL_BATCH, 8, generator=g), torch.randint(0, 4, (GLOBAL_BATCH,), generator=g))
        for _ in range(STEPS)
    ]


def _model():
    torch.manual_seed(0)
    return BNMLP()


def _optimizer(model):
    return torch.optim.AdamW(model.parameters(), lr=PEAK_LR, weight_decay=0.05)


def _scheduler(optimizer):
    return get_scheduler(
        "cosine_with_min_lr",
        optimizer,
        num_warmup_steps=WARMUP,
        num_training_steps=STEPS,
        scheduler_specific_kwargs={"min_lr_rate": 0.01},
    )


def _loss(model, batch):
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y)


def _real_run(rank, world_size, config):
    """LocalOptimizer (config) or plain DDP (config None) on the real Accelerator; rank's params after each step."""
    accelerator = Accelerator()
    model = _model()
    optimizer = _optimizer(model)
    scheduler = _scheduler(optimizer)  # not prepared: accelerate would step it world_size times per step
    model, optimizer = accelerator.prepare(model, optimizer)
    if config is not None:
        optimizer = LocalOptimizer(optimizer, model, config, num_training_steps=STEPS, num_warmup_steps=WARMUP)
    params, synced = [], []
    for batch in _global_batches():
        accelerator.backward(_loss(model, shard_batch(batch, world_size)[rank]))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        params.append(flat_params(model.module))
        synced.append(getattr(optimizer, "last_step_synced", True))
    return {"params": params, "synced": synced}


@pytest.fixture(scope="module")
def batch(request):
    """The real runs of the selected tests (a LocalOptimizer run per rule, plain DDP), all from one spawn."""
    scenarios = {rule: (_real_run, {"config": config}) for rule, config in CONFIGS.items()}
    scenarios["data_parallel"] = (_real_run, {"config": None})
    return run_distributed_batch(selected_scenarios(request, scenarios), world_size=WORKERS)


@pytest.fixture
def runs(batch, request):
    """The real runs this test names in its ``scenarios`` mark."""
    return batch.for_test(request.node)


# constant, post_local, qsr_overlap and qsr_nesterov are also covered by constant_overlap2, post_local_nesterov,
# qsr_overlap_nesterov (and test_overlap.py) and qsr_fragments3_nesterov (whose last sync steps the whole model):
# slow, for the time budget
SLOW = (
    "constant",
    "post_local",
    "qsr_overlap",
    "qsr_nesterov",
    # covered in the default run by qsr_nesterov_round_lr and qsr_fragments3_overlap2_nesterov
    "qsr_fragments3_nesterov_round_lr",
    "qsr_overlap_sgd_round_lr",
    "qsr_fragments3_overlap3",
    # covered in the default run by qsr_int8ef and qsr_overlap2_int8ef_nesterov (and test_compression_overlap.py)
    "qsr_fp8",
    "qsr_overlap2_int8ef_nesterov",
    "qsr_fragments3_overlap2_int8ef_nesterov",  # and on 3 ranks in test_compression_overlap.py
    "qsr_overlap_compress",
    "constant_overlap3_fp8ef",
)


@pytest.mark.parametrize(
    "rule",
    [
        pytest.param(r, marks=[pytest.mark.scenarios(r), *([pytest.mark.slow] if r in SLOW else [])])
        for r in sorted(CONFIGS)
    ],
)
def test_local_simulation_matches_local_optimizer_bitwise(rule, one_thread, runs):
    config = CONFIGS[rule]
    real = runs[rule]
    sim = LocalTrainingSimulation(_model(), _optimizer, config, WORKERS, STEPS, WARMUP, _scheduler)
    synced, lrs = [], []
    for step, batch in enumerate(_global_batches()):
        lrs.append(sim.lr)
        synced.append(sim.step(shard_batch(batch, WORKERS), _loss))
        for k in range(WORKERS):
            assert torch.equal(flat_params(sim.replicas[k]), real[k]["params"][step]), (
                f"{rule}: worker {k}, step {step}"
            )
    assert synced == real[0]["synced"] == real[1]["synced"]
    expected = plan(config, lrs, WARMUP)
    switch = config.qsr_switch_step or 0  # post-local: data-parallel steps before it average nothing
    assert [i + 1 for i, s in enumerate(synced) if s] == [s for s in expected.sync_steps if s > switch]
    assert sim.stats.syncs == expected.syncs and sim.stats.steps == STEPS
    if rule == "qsr":
        assert len(set(expected.round_lengths)) > 2, "the QSR schedule should have rounds of several lengths"
    # workers differ between syncs and are equal at the end (training ends on a sync)
    assert torch.equal(flat_params(sim.replicas[0]), flat_params(sim.replicas[1]))
    first_local = CONFIGS[rule].qsr_switch_step or 0
    assert not torch.equal(real[0]["params"][first_local], real[1]["params"][first_local])
    if rule.startswith("qsr_"):  # the variant must change the trajectory
        plain = LocalTrainingSimulation(_model(), _optimizer, CONFIGS["qsr"], WORKERS, STEPS, WARMUP, _scheduler)
        for batch in _global_batches()[:3]:  # rounds of 2: the first sync after step 2
            plain.step(shard_batch(batch, WORKERS), _loss)
        assert not torch.equal(flat_params(plain.replicas[0]), real[0]["params"][2]), f"{rule} = plain QSR"


@pytest.mark.scenarios("data_parallel")
def test_data_parallel_simulation_matches_ddp_bitwise(one_thread, runs):
    real = runs["data_parallel"]
    sim = DataParallelSimulation(_model(), _optimizer, WORKERS, _scheduler)
    n_params = sum(p.numel() for p in BNMLP().parameters())
    for step, batch in enumerate(_global_batches()):
        sim.step(shard_batch(batch, WORKERS), _loss)
        ours = flat_params(sim.model)
        # rank 0 holds the buffers DDP broadcasts; rank 1's buffers saw its own last shard, its parameters match too
        assert torch.equal(ours, real[0]["params"][step]), f"step {step}"
        assert torch.equal(ours[:n_params], real[1]["params"][step][:n_params]), f"rank 1, step {step}"
    assert sim.stats.comm_volume_vs_ddp == 1.0


def test_data_parallel_differs_from_local_adamw_with_h1(one_thread):
    # the reason for a separate data-parallel baseline: with AdamW, H = 1 keeps per-worker moments
    batches = _global_batches()[:6]
    dp = DataParallelSimulation(_model(), _optimizer, WORKERS)
    h1 = LocalTrainingSimulation(_model(), _optimizer, QSRConfig(qsr_rule="ddp"), WORKERS, len(batches))
    for batch in batches:
        dp.step(shard_batch(batch, WORKERS), _loss)
        h1.step(shard_batch(batch, WORKERS), _loss)
    n_params = sum(p.numel() for p in BNMLP().parameters())
    assert not torch.allclose(flat_params(dp.model)[:n_params], flat_params(h1.replicas[0])[:n_params], atol=1e-4)


def test_averaged_model_does_not_disturb_training():
    sim = LocalTrainingSimulation(_model(), _optimizer, CONFIGS["constant"], WORKERS, STEPS, WARMUP, _scheduler)
    batch = _global_batches()[0]
    sim.step(shard_batch(batch, WORKERS), _loss)
    before = [flat_params(m) for m in sim.replicas]
    averaged = flat_params(sim.averaged_model())
    torch.testing.assert_close(averaged, (before[0] + before[1]) / 2)
    assert all(torch.equal(b, flat_params(m)) for b, m in zip(before, sim.replicas, strict=True))


def test_averaged_model_right_after_a_sync_is_the_synced_model():
    # with an outer step, averaging again would take a momentum lookahead that training never takes
    sim = LocalTrainingSimulation(_model(), _optimizer, CONFIGS["qsr_nesterov"], WORKERS, STEPS, WARMUP, _scheduler)
    for batch in _global_batches():
        synced = sim.step(shard_batch(batch, WORKERS), _loss)
        if synced and sim.clock.round_index > 1:  # the outer momentum is non-zero from the second sync on
            assert torch.equal(flat_params(sim.averaged_model()), flat_params(sim.replicas[0])), sim.clock.step
    assert synced, "training ends on a sync"


def test_shard_batch():
    x, y = torch.arange(12).reshape(6, 2), torch.arange(6)
    shards = shard_batch((x, y), 3)
    assert [s[1].tolist() for s in shards] == [[0, 1], [2, 3], [4, 5]]
    assert shard_batch({"a": y}, 2)[1]["a"].tolist() == [3, 4, 5]
    with pytest.raises(ValueError, match="not divisible"):
        shard_batch(y, 4)
