"""FSDP2 local steps: 4 gloo processes as 2 nodes x 2, parameters and Adam state sharded inside each node."""

import torch
from testing_utils import BNMLP, count_collectives, rank_batches, run_distributed
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


def _build(mesh):
    model = _sharded(mesh["shard"])
    adam = torch.optim.AdamW(model.parameters(), lr=LRS[0])
    return model, LocalOptimizer(adam, model, QSRConfig(**CONFIG), num_training_steps=len(LRS))


def _step(model, optimizer, step, batch):
    for group in optimizer.param_groups:
        group["lr"] = LRS[step]
    x, y = batch
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    optimizer.zero_grad()


def _shards(model):
    params = torch.cat([p.to_local().detach().reshape(-1) for p in model.parameters()])
    buffers = torch.cat([b.detach().reshape(-1) for b in model.buffers() if b.is_floating_point()])
    return params, buffers


def _refusals(mesh, batch):
    """FSDP2's own HSDP (2-D mesh) and sharding across all ranks are refused; why HSDP cannot take local steps."""
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
    return grads_unset, messages


def _fsdp2(rank, world_size, tmp):
    mesh = _mesh()
    batches = rank_batches(rank, len(LRS))
    refusals = _refusals(mesh, batches[0])
    model, optimizer = _build(mesh)
    per_step = []
    for step, batch in enumerate(batches):
        log: list = []
        with count_collectives(log):
            _step(model, optimizer, step, batch)
        per_step.append((optimizer.last_step_synced, *_shards(model), log))
        if step == 3:  # mid-round (the round of steps 2-5)
            optimizer.save_local_state(tmp)
    model2, resumed = _build(mesh)
    resumed.load_local_state(tmp)
    for step in range(4, len(LRS)):
        _step(model2, resumed, step, batches[step])
    exact = all(torch.equal(a, b) for a, b in zip(_shards(model2), per_step[-1][1:3], strict=True))
    engine = optimizer.synchronizer.engine
    return type(engine).__name__, engine.world_size, per_step, optimizer.stats.to_logs(), exact, refusals


def test_fsdp2_sharded_inside_nodes():
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        results = run_distributed(_fsdp2, world_size=4, tmp=tmp)
    name, workers, steps0, logs, _, _ = results[0]
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
            groups = {ranks for _, ranks in result[2][step][3]}
            node, replica = nodes[rank // 2], replicas[rank % 2]
            # FSDP's all-gathers and reduce-scatters stay inside the node; only a sync crosses nodes (the replica group,
            # and the agreement check: one small all-gather over all ranks)
            allowed = {node, replica, (0, 1, 2, 3)} if synced else {node}
            assert node in groups and groups <= allowed, (step, rank, groups)
            assert (replica in groups) == synced, (step, rank)
    # each rank averages its own shard: half the model between nodes per sync (plus the unsharded buffers)
    shard_bytes, buffer_bytes = steps0[0][1].numel() * 4, 2 * 16 * 4
    assert logs["qsr/bytes_inter_node"] == 3 * (shard_bytes + buffer_bytes)
    assert all(r[4] for r in results)  # resume from a mid-round checkpoint is bitwise exact on every rank
    for grads_unset, messages in (r[5] for r in results):
        assert grads_unset  # HSDP with set_requires_all_reduce(False): .grad stays unset, nothing would train
        assert len(messages) == 2 and "hybrid sharding" in messages[0] and 'mesh["shard"]' in messages[0]
        assert "sharded across all 4 ranks" in messages[1] and "DDP" in messages[1]
