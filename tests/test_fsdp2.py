"""FSDP2 local steps: 4 gloo processes as 2 nodes x 2, parameters and Adam state sharded inside each node."""

import os

import torch
from testing_utils import (
    BNMLP,
    assert_node_groups,
    nesterov_reference,
    rank_batches,
    record_averages,
    recorded_steps,
    run_distributed,
    view_round_trip,
)
from torch import nn

from qsr_hf import LocalOptimizer, QSRConfig
from qsr_hf.analysis.planner import plan
from qsr_hf.engines import detect_engine
from qsr_hf.engines.fsdp2 import FSDP2Engine


LRS = [0.02, 0.02] + [0.01] * 7  # H = max(2, (0.02 / lr)^2): rounds of 2, 4, 3 (clipped): syncs after 2, 6, 9
CONFIG = {"qsr_alpha": 0.02, "qsr_h_base": 2}


def _mesh():
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))


def _sharded(mesh):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = BNMLP()
    for layer in (model.net[0], model.net[3]):
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _build(mesh, **overrides):
    model = _sharded(mesh["shard"])
    adam = torch.optim.AdamW(model.parameters(), lr=LRS[0])
    return model, LocalOptimizer(adam, model, QSRConfig(**CONFIG, **overrides), num_training_steps=len(LRS))


def _shards(model):
    params = torch.cat([p.to_local().detach().reshape(-1) for p in model.parameters()])
    buffers = torch.cat([b.detach().reshape(-1) for b in model.buffers() if b.is_floating_point()])
    return params, buffers


def _refusals(mesh, batch):
    """FSDP2's own HSDP (2-D mesh), sharding across all ranks, qsr_overlap_sync and qsr_fragments are refused; why
    HSDP cannot take local steps."""
    hsdp = _sharded(mesh)
    hsdp.set_requires_all_reduce(False)
    nn.functional.cross_entropy(hsdp(batch[0]), batch[1]).backward()
    grads_unset = all(p.grad is None for p in hsdp.parameters())
    messages = []
    for model in (hsdp, _sharded(None)):
        try:
            detect_engine(model)
        except NotImplementedError as e:
            messages.append(str(e))
    for overrides in ({"qsr_overlap_sync": True}, {"qsr_fragments": 2}):
        try:
            _build(mesh, **overrides)
        except NotImplementedError as e:
            messages.append(str(e))
    return grads_unset, messages


def _fsdp2(rank, world_size, tmp):
    mesh = _mesh()
    batches = rank_batches(rank, len(LRS))
    refusals = _refusals(mesh, batches[0])
    model, optimizer = _build(mesh)
    per_step = recorded_steps(model, optimizer, LRS, batches, _shards, save_at=3, tmp=tmp)  # 3: mid-round (2-5)
    model2, resumed = _build(mesh)
    resumed.load_local_state(tmp)
    resumed_steps = recorded_steps(model2, resumed, LRS[4:], batches[4:], _shards)
    exact = all(torch.equal(a, b) for a, b in zip(resumed_steps[-1][1:3], per_step[-1][1:3], strict=True))
    engine = optimizer.synchronizer.engine
    # an evaluation view mid-round (qsr_eval_copy) puts the shards and BatchNorm statistics back bitwise
    model3, viewed = _build(mesh)
    recorded_steps(model3, viewed, LRS[:3], batches[:3], _shards)
    view = view_round_trip(model3, viewed, _shards)
    stats = optimizer.stats.to_logs()
    return type(engine).__name__, engine.world_size, per_step, stats, exact, refusals, view, _outer(mesh, batches, tmp)


def _outer(mesh, batches, tmp):
    """Nesterov outer steps per shard: the values around every average, and a bitwise mid-round resume."""
    saved, log = os.path.join(tmp, "outer"), []
    model, outer = _build(mesh, qsr_outer_optimizer="nesterov")
    init = _shards(model)[0]
    record_averages(outer, lambda: _shards(model), log)
    steps = recorded_steps(model, outer, LRS, batches, _shards, save_at=3, tmp=saved)
    model2, resumed = _build(mesh, qsr_outer_optimizer="nesterov")
    resumed.load_local_state(saved)
    last = recorded_steps(model2, resumed, LRS[4:], batches[4:], _shards)[-1]
    return init, log, torch.equal(last[1], steps[-1][1]) and torch.equal(last[2], steps[-1][2])


def test_fsdp2_sharded_inside_nodes():
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        results = run_distributed(_fsdp2, world_size=4, tmp=tmp)
    name, workers, steps0, logs, *_ = results[0]
    assert name == FSDP2Engine.__name__ and workers == 2  # one QSR worker per node (shard group)
    assert [i + 1 for i, s in enumerate(steps0) if s[0]] == plan(QSRConfig(**CONFIG), LRS).sync_steps == [2, 6, 9]
    nodes, replicas = ((0, 1), (2, 3)), ((0, 2), (1, 3))
    for step in range(len(LRS)):
        synced = steps0[step][0]
        shards = [r[2][step][1] for r in results]
        buffers = [r[2][step][2] for r in results]
        assert not torch.equal(shards[0], shards[1])  # a rank holds its own shard
        for a, b in replicas:  # the replicas of a shard (same shard, other node)
            if synced:
                assert torch.equal(shards[a], shards[b]), step
            else:
                assert not torch.equal(shards[a], shards[b]), step
        if synced:
            assert all(torch.equal(buffers[0], b) for b in buffers), step
        for rank, result in enumerate(results):
            # FSDP's all-gathers and reduce-scatters stay inside the node; only a sync crosses nodes
            assert_node_groups(result[2][step][3], nodes[rank // 2], replicas[rank % 2], 4, synced, (step, rank))
    # each rank averages its own shard: half the model between nodes per sync (plus the unsharded buffers)
    assert steps0[0][1].numel() * 4 == 488 and logs["qsr/bytes_inter_node"] == 3 * (488 + 128) == 1848
    # inside the node, per rank and step (k = 2, fp32; a collective moves the other rank's shard, 4 bytes each):
    # forward all-gathers of the root (BatchNorm: 8 + 8 = 16 elements), net[0] (8 x 8 + 8 = 72) and net[3] (2 x 16 + 2
    # = 34); backward re-gathers net[0] and net[3] (the root keeps its parameters after forward); reduce-scatters of
    # all three: (16 + 72 + 34 + 72 + 34 + 16 + 72 + 34) x 4 = 1400 bytes. At each sync the buffers are averaged
    # inside the node (128 bytes). 9 steps, 3 syncs:
    assert logs["qsr/bytes_intra_node"] == 9 * 1400 + 3 * 128 == 12984
    assert all(r[4] for r in results)  # resume from a mid-round checkpoint is bitwise exact on every rank
    # leaving the evaluation view restores every rank bitwise; entering averaged the buffers inside the node (128)
    assert all(r[6] == (True, 128) for r in results), [r[6] for r in results]
    for grads_unset, messages in (r[5] for r in results):
        assert grads_unset  # HSDP with set_requires_all_reduce(False): .grad stays unset, nothing would train
        assert len(messages) == 4 and "hybrid sharding" in messages[0] and 'mesh["shard"]' in messages[0]
        assert "sharded across all 4 ranks" in messages[1] and "DDP" in messages[1]
        assert "qsr_overlap_sync=True is not supported with FSDP2" in messages[2]
        assert "qsr_fragments=2 is supported with DDP only, not with FSDP2Engine" in messages[3], messages[3]
        assert "Set qsr_overlap_sync=False" in messages[2]
    for a, b in replicas:  # the outer optimizer per shard: Nesterov on the replicas' mean, the same on both
        (init, log_a, exact_a), (_, log_b, exact_b) = results[a][7], results[b][7]
        assert exact_a and exact_b and len(log_a) == 3, "3 syncs; a mid-round resume is bitwise"
        anchor, momentum = init, None
        for k, (entry_a, entry_b) in enumerate(zip(log_a, log_b, strict=True)):
            expected, momentum = nesterov_reference(anchor, (entry_a[2] + entry_b[2]) / 2, momentum, mu=0.9)
            torch.testing.assert_close(entry_a[4], expected, rtol=1e-5, atol=1e-6, msg=f"sync {k}, ranks {a}, {b}")
            assert torch.equal(entry_a[4], entry_b[4]), f"sync {k}: the replicas of a shard differ"
            anchor = entry_a[4]
