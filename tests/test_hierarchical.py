"""Hierarchical QSR (``qsr_worker="node"``): 4 gloo processes as 2 nodes x 2, DDP over all ranks with the node hook."""

import pytest
import torch
from testing_utils import BNMLP, count_collectives, rank_batches, run_distributed
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from qsr_hf import LocalOptimizer, QSRConfig
from qsr_hf.analysis.planner import plan
from qsr_hf.engines.hierarchical import HierarchicalEngine, resolve_node_size
from qsr_hf.node_slices import NodeSlices


LRS = [0.2, 0.2] + [0.1] * 7  # H = max(2, (0.2 / lr)^2): rounds of 2, 4, then 3 (clipped): syncs after 2, 6, 9
CONFIG = {"qsr_alpha": 0.2, "qsr_h_base": 2, "qsr_worker": "node", "qsr_node_size": 2}


def _build(split=True):
    HierarchicalEngine.split_sync = split  # this spawned process only
    torch.manual_seed(0)
    ddp = DistributedDataParallel(BNMLP())
    sgd = torch.optim.SGD(ddp.parameters(), lr=LRS[0], momentum=0.9)
    return ddp, sgd, LocalOptimizer(sgd, ddp, QSRConfig(**CONFIG), num_training_steps=len(LRS))


def _step(ddp, optimizer, step, batch):
    for group in optimizer.param_groups:
        group["lr"] = LRS[step]
    x, y = batch
    nn.functional.cross_entropy(ddp(x), y).backward()
    optimizer.step()
    optimizer.zero_grad()


def _vectors(module):
    params = torch.cat([p.detach().reshape(-1) for p in module.parameters()])
    buffers = torch.cat([b.detach().reshape(-1) for b in module.buffers() if b.is_floating_point()])
    return params, buffers


def _bad_layout():
    ddp = DistributedDataParallel(BNMLP())
    try:
        LocalOptimizer(torch.optim.SGD(ddp.parameters(), lr=0.1), ddp, QSRConfig(**{**CONFIG, "qsr_node_size": 3}))
    except ValueError as e:
        return str(e)
    return None


def _odd(engine):
    """Slices of an odd-sized fp32 tensor (padded to 2 x 4) and a 2-element fp64 one, changed and gathered back."""
    tensors = [torch.arange(7.0), torch.ones(2, dtype=torch.float64)]
    slices = NodeSlices(engine.node_group)
    pieces = slices.pieces(tensors)
    for piece in pieces:
        piece.mul_(2)
    slices.gather()
    return [p.numel() for p in pieces], tensors


def _hierarchical(rank, world_size, tmp):
    bad_layout = _bad_layout()
    batches = rank_batches(rank, len(LRS))
    ddp, _, optimizer = _build()
    engine = optimizer.synchronizer.engine
    per_step = []
    for step, batch in enumerate(batches):
        log: list = []
        with count_collectives(log):
            _step(ddp, optimizer, step, batch)
        per_step.append((optimizer.last_step_synced, *_vectors(ddp.module), log))
        if step == 3:  # mid-round (the round of steps 2-5)
            optimizer.save_local_state(tmp)
    logs = optimizer.stats.to_logs()
    # resume from the mid-round checkpoint in fresh objects, as a restarted job would
    ddp2, _, resumed = _build()
    resumed.load_local_state(tmp)
    for step in range(4, len(LRS)):
        _step(ddp2, resumed, step, batches[step])
    exact = torch.equal(_vectors(ddp2.module)[0], per_step[-1][1]) and torch.equal(
        _vectors(ddp2.module)[1], per_step[-1][2]
    )
    optimizer.close()
    resumed.close()
    # the same run with every process averaging the whole model across nodes (no split): the reference
    ddp3, _, whole = _build(split=False)
    reference = []
    for step, batch in enumerate(batches):
        _step(ddp3, whole, step, batch)
        reference.append(_vectors(ddp3.module))
    same = [torch.equal(a[0], r[1]) and torch.equal(a[1], r[2]) for a, r in zip(reference, per_step, strict=True)]
    split = (engine.intra_node_bytes_per_sync, whole.synchronizer.engine.intra_node_bytes_per_sync, _odd(engine))
    whole.close()
    whole_logs = whole.stats.to_logs()
    return type(engine).__name__, engine.world_size, per_step, logs, exact, bad_layout, same, whole_logs, split


def test_hierarchical_two_nodes_of_two(tmp_path):
    results = run_distributed(_hierarchical, world_size=4, tmp=str(tmp_path))
    name, workers, steps0, logs, *_ = results[0]
    assert name == HierarchicalEngine.__name__ and workers == 2  # one QSR worker per node
    expected = plan(QSRConfig(**CONFIG), LRS).sync_steps
    assert [i + 1 for i, s in enumerate(steps0) if s[0]] == expected == [2, 6, 9]
    nodes, inter = ((0, 1), (2, 3)), ((0, 2), (1, 3))
    for step in range(len(LRS)):
        synced = steps0[step][0]
        params = [r[2][step][1] for r in results]
        buffers = [r[2][step][2] for r in results]
        # a node is one worker: its processes hold bitwise equal parameters after every step
        assert torch.equal(params[0], params[1]) and torch.equal(params[2], params[3]), step
        if synced:  # parameters and BatchNorm statistics equal everywhere
            assert all(torch.equal(params[0], p) for p in params) and all(torch.equal(buffers[0], b) for b in buffers)
        else:  # nodes diverge inside a round
            assert not torch.equal(params[0], params[2]), step
        for rank, result in enumerate(results):
            groups = {ranks for _, ranks in result[2][step][3]}
            node = nodes[rank // 2]
            # between syncs every collective stays inside the node; a sync adds the inter-node group and the agreement
            # check (one small all-gather over all ranks)
            allowed = {node, inter[rank % 2], (0, 1, 2, 3)} if synced else {node}
            assert node in groups and groups <= allowed, (step, rank, groups)
            assert (inter[rank % 2] in groups) == synced, (step, rank)
    # accounting: gradients inside the node every step; between nodes at each sync, half the parameters per
    # process (the split: the node sends one model's worth, the floor) and its buffers
    grad_bytes = sum(p.numel() * 4 for p in BNMLP().parameters())
    buffer_bytes = 2 * 16 * 4
    assert logs["qsr/bytes_intra_node"] == len(LRS) * grad_bytes
    assert logs["qsr/bytes_inter_node"] == 3 * (grad_bytes // 2 + buffer_bytes)
    whole_logs = results[0][7]
    assert whole_logs["qsr/bytes_inter_node"] == 3 * (grad_bytes + buffer_bytes)  # without the split: k times more
    assert results[0][8][:2] == (grad_bytes // 2, 0)  # the split's all-gather inside the node: the other half
    for result in results:  # an odd size is zero-padded to k slices; every dtype is its own flat buffer
        sizes, (fp32, fp64) = result[8][2]
        assert sizes == [4, 1] and torch.equal(fp32, 2 * torch.arange(7.0)) and torch.equal(fp64, 2 * torch.ones(2))
    # the split is bitwise the whole-model average (2 nodes: a sum of two values does not depend on the order)
    assert all(all(r[6]) for r in results), [r[6] for r in results]
    assert all(r[4] for r in results)  # resume from a mid-round checkpoint is bitwise exact on every rank
    for result in results:  # a node size that does not divide the world: a clear error on every rank
        assert result[5] is not None and "qsr_node_size" in result[5] and "divide the world size 4" in result[5]


def test_node_size_from_the_launcher(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert resolve_node_size(8) == 4 and resolve_node_size(8, 2) == 2
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    with pytest.raises(ValueError, match="LOCAL_WORLD_SIZE"):
        resolve_node_size(8)


def test_node_layout_cost_model():
    from qsr_hf.analysis.planner import Plan
    from qsr_hf.analysis.scaling import NodeLayout, predict_node_modes

    # 2 nodes x 4, 1 GB: inside a node 2*3/4 GB at 80 Gbit/s = 0.15 s; between nodes 2*1/2 GB at 8 Gbit/s = 1 s
    layout = NodeLayout(nodes=2, per_node=4, intra_bits_per_s=80e9, inter_bits_per_s=8e9)
    assert layout.intra_allreduce_s(1e9) == pytest.approx(0.15) and layout.inter_allreduce_s(1e9) == pytest.approx(1.0)
    modes = predict_node_modes(Plan(100, list(range(0, 100, 4)), [4] * 25), 0.5, 1e9, layout)
    assert modes["ddp_s"] == pytest.approx(50 + 100 * 1.15)
    assert modes["qsr_process_s"] == pytest.approx(50 + 25 * 1.15)
    assert modes["qsr_node_s"] == pytest.approx(50 + 100 * 0.15 + 25 * 4 * 1.0)  # 4 full-model rings share the link
    assert modes["qsr_fsdp2_s"] == pytest.approx(50 + 100 * 1.5 * 0.15 + 25 * 1.0)  # shards: the inter-node floor
    assert modes["sync_floor_s"] == pytest.approx(1.0)


def test_plan_cli_over_nodes(capsys):
    from qsr_hf.cli import plan_main

    flags = ["--peak-lr", "0.01", "--total-steps", "200", "--alpha", "0.02", "--h-base", "2"]
    nodes = ["--nodes", "2", "--procs-per-node", "4", "--intra-node-gbps", "80", "--bandwidth-gbps", "8"]
    summary = plan_main([*flags, *nodes, "--compute-s-per-step", "0.5", "--model-params", "1e6"])
    assert "wall_clock" not in summary and summary["node_modes"]["ddp_h"] == summary["node_modes"]["ddp_s"] / 3600
    assert "on 2 nodes x 4: data-parallel" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--intra-node-gbps"):
        plan_main([*flags, "--nodes", "2", "--procs-per-node", "4"])
