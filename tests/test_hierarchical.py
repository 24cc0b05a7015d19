"""Hierarchical QSR (``qsr_worker="node"``): gloo processes as 2 nodes x 2 and 3 nodes x 2, DDP over all ranks with
the node hook."""

import os
from collections import Counter

import pytest
import torch
import torch.distributed as dist
from testing_utils import BNMLP, assert_node_groups, rank_batches, recorded_steps, run_distributed, view_round_trip
from torch.nn.parallel import DistributedDataParallel

from qsr_hf import LocalOptimizer, QSRConfig
from qsr_hf.analysis.planner import plan
from qsr_hf.engines.hierarchical import HierarchicalEngine, resolve_node_size
from qsr_hf.sync.node_slices import NodeSlices


LRS = [0.2, 0.2] + [0.1] * 7  # H = max(2, (0.2 / lr)^2): rounds of 2, 4, then 3 (clipped): syncs after 2, 6, 9
CONFIG = {"qsr_alpha": 0.2, "qsr_h_base": 2, "qsr_worker": "node", "qsr_node_size": 2}
# BNMLP: Linear(8, 16) 128 + 16, BatchNorm1d(16) 16 + 16, Linear(16, 4) 64 + 4 = 244 fp32 parameters
GRAD_BYTES, BUFFER_BYTES = 244 * 4, 2 * 16 * 4  # 976 bytes of gradients; running mean and var: 128 bytes


def _build(split=True, lrs=LRS, **overrides):
    HierarchicalEngine.split_sync = split  # this spawned process only
    torch.manual_seed(0)
    ddp = DistributedDataParallel(BNMLP())
    sgd = torch.optim.SGD(ddp.parameters(), lr=lrs[0], momentum=0.9)
    return ddp, LocalOptimizer(sgd, ddp, QSRConfig(**{**CONFIG, **overrides}), num_training_steps=len(lrs))


def _vectors(ddp):
    params = torch.cat([p.detach().reshape(-1) for p in ddp.module.parameters()])
    buffers = torch.cat([b.detach().reshape(-1) for b in ddp.module.buffers() if b.is_floating_point()])
    return params, buffers


def _refusals():
    """A node size that does not divide the world, and qsr_overlap_sync on the floor path: errors before training."""
    messages = []
    for overrides in ({"qsr_node_size": 3}, {"qsr_overlap_sync": True}):
        try:
            _build(**overrides)
        except (ValueError, NotImplementedError) as e:
            messages.append((type(e).__name__, str(e)))
    return messages


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
    refusals = _refusals()
    batches = rank_batches(rank, len(LRS))
    ddp, optimizer = _build()
    engine = optimizer.synchronizer.engine
    per_step = recorded_steps(ddp, optimizer, LRS, batches, _vectors, save_at=3, tmp=tmp)  # 3: mid-round (2-5)
    optimizer.close()
    logs = optimizer.stats.to_logs()
    # resume from the mid-round checkpoint in fresh objects, as a restarted job would
    ddp2, resumed = _build()
    resumed.load_local_state(tmp)
    resumed_steps = recorded_steps(ddp2, resumed, LRS[4:], batches[4:], _vectors)
    exact = all(torch.equal(a, b) for a, b in zip(resumed_steps[-1][1:3], per_step[-1][1:3], strict=True))
    resumed.close()
    resumed_logs = resumed.stats.to_logs()
    # the same run with every process averaging the whole model across nodes (no split): the reference
    ddp3, whole = _build(split=False)
    reference = recorded_steps(ddp3, whole, LRS, batches, _vectors)
    same = [torch.equal(a[1], r[1]) and torch.equal(a[2], r[2]) for a, r in zip(reference, per_step, strict=True)]
    split = (engine.intra_node_bytes_per_sync, whole.synchronizer.engine.intra_node_bytes_per_sync, _odd(engine))
    whole.close()
    logs = (logs, resumed_logs, whole.stats.to_logs())
    # an evaluation view mid-round (Trainer eval with qsr_eval_copy) puts parameters and BatchNorm statistics back
    ddp4, viewed = _build()
    recorded_steps(ddp4, viewed, LRS[:3], batches[:3], _vectors)
    view = view_round_trip(ddp4, viewed, _vectors)
    return type(engine).__name__, engine.world_size, per_step, logs, exact, refusals, same, split, view, _outer(tmp)


def _outer(tmp):
    """Nesterov outer steps on node slices: each local rank keeps its slice's outer state; bitwise the whole-model
    outer step (2 nodes); a mid-round resume is bitwise."""
    batches, saved = rank_batches(dist.get_rank(), len(LRS)), os.path.join(tmp, "outer")
    ddp, sliced = _build(qsr_outer_optimizer="nesterov")
    steps = recorded_steps(ddp, sliced, LRS, batches, _vectors, save_at=3, tmp=saved)
    ddp2, whole = _build(split=False, qsr_outer_optimizer="nesterov")
    reference = recorded_steps(ddp2, whole, LRS, batches, _vectors)
    ddp3, resumed = _build(qsr_outer_optimizer="nesterov")
    resumed.load_local_state(saved)
    last = recorded_steps(ddp3, resumed, LRS[4:], batches[4:], _vectors)[-1]
    same = [torch.equal(a[1], r[1]) and torch.equal(a[2], r[2]) for a, r in zip(steps, reference, strict=True)]
    exact = torch.equal(last[1], steps[-1][1]) and torch.equal(last[2], steps[-1][2])
    sizes = (sliced.synchronizer.synced.numel, whole.synchronizer.synced.numel)
    return [s[:3] for s in steps], same, exact, sizes


def test_hierarchical_two_nodes_of_two(tmp_path):
    results = run_distributed(_hierarchical, world_size=4, tmp=str(tmp_path))
    name, workers, steps0, (logs, resumed_logs, whole_logs), *_ = results[0]
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
            assert_node_groups(result[2][step][3], nodes[rank // 2], inter[rank % 2], 4, synced, (step, rank))
    # accounting, per rank, 9 steps and 3 syncs: between nodes half the parameters (the split: the node sends one
    # model's worth, the floor) and the buffers: 3 x (488 + 128); inside the node the gradients every step
    # (9 x 976) and at each sync the all-gather of the other half (488) and the buffers averaged in the node (128)
    assert logs["qsr/bytes_inter_node"] == 3 * (GRAD_BYTES // 2 + BUFFER_BYTES) == 1848
    assert logs["qsr/bytes_intra_node"] == 9 * GRAD_BYTES + 3 * (GRAD_BYTES // 2 + BUFFER_BYTES) == 10632
    assert resumed_logs == logs  # the counters resume with the run
    # without the split: k times more between nodes, no all-gather inside
    assert whole_logs["qsr/bytes_inter_node"] == 3 * (GRAD_BYTES + BUFFER_BYTES) == 3312
    assert whole_logs["qsr/bytes_intra_node"] == 9 * GRAD_BYTES + 3 * BUFFER_BYTES == 9168
    assert results[0][7][:2] == (488, 0)  # the split's all-gather inside the node: the other half
    for result in results:  # an odd size is zero-padded to k slices; every dtype is its own flat buffer
        sizes, (fp32, fp64) = result[7][2]
        assert sizes == [4, 1] and torch.equal(fp32, 2 * torch.arange(7.0)) and torch.equal(fp64, 2 * torch.ones(2))
    # the split is bitwise the whole-model average (2 nodes: a sum of two values does not depend on the order)
    assert all(all(r[6]) for r in results), [r[6] for r in results]
    assert all(r[4] for r in results)  # resume from a mid-round checkpoint is bitwise exact on every rank
    # leaving the evaluation view restores every rank bitwise (its own BatchNorm statistics, not the node's mean);
    # entering is an extra sync: the all-gather (488) and the buffers (128) inside the node; leaving re-gathers (488)
    assert all(r[8] == (True, 488 + 128 + 488) for r in results), [r[8] for r in results]
    for step, synced in enumerate(s[0] for s in results[0][9][0]):  # the outer optimizer (Nesterov) on node slices
        params = [r[9][0][step][1] for r in results]
        assert all(torch.equal(params[0], p) for p in params) == synced, step
        assert torch.equal(params[0], params[1]) and torch.equal(params[2], params[3]), step
    for _, same, exact, sizes in (r[9] for r in results):
        assert all(same) and exact, "the sliced outer step must be bitwise the whole-model one, and resume exactly"
        assert sizes == (244 // 2 + 32, 244 + 32), "a local rank keeps only its slice's outer state (+ buffers)"
    for result in results:  # clear errors before training, on every rank
        (layout_error, layout), (overlap_error, overlap) = result[5]
        assert layout_error == "ValueError" and "qsr_node_size" in layout and "divide the world size 4" in layout
        assert overlap_error == "NotImplementedError" and "qsr_overlap_sync=True is not supported" in overlap
        assert "Set qsr_overlap_sync=False" in overlap and "split_sync = False" in overlap


LRS3 = [0.2, 0.2] + [0.1] * 4  # rounds of 2 and 4: syncs after 2 and 6


def _three_nodes(rank, world_size):
    ddp, optimizer = _build(lrs=LRS3)
    per_step = recorded_steps(ddp, optimizer, LRS3, rank_batches(rank, len(LRS3)), _vectors)
    optimizer.close()
    return per_step, optimizer.stats.to_logs()


@pytest.mark.slow  # kept out of the default run's 10-minute budget; `pytest -m slow`
def test_floor_path_three_nodes_of_two():
    results = run_distributed(_three_nodes, world_size=6)
    steps0, logs = results[0]
    assert [i + 1 for i, s in enumerate(steps0) if s[0]] == plan(QSRConfig(**CONFIG), LRS3).sync_steps == [2, 6]
    nodes, inter = ((0, 1), (2, 3), (4, 5)), ((0, 2, 4), (1, 3, 5))
    for step, (synced, *_) in enumerate(steps0):
        params = [r[0][step][1] for r in results]
        buffers = [r[0][step][2] for r in results]
        assert all(torch.equal(params[a], params[b]) for a, b in nodes), step  # equal inside a node, every step
        if synced:  # 3 nodes: each slice is averaged by one inter-node group, then gathered: equal everywhere
            assert all(torch.equal(params[0], p) for p in params) and all(torch.equal(buffers[0], b) for b in buffers)
        else:  # every pair of nodes differs inside a round
            assert not any(torch.equal(params[a], params[b]) for a, b in ((0, 2), (0, 4), (2, 4))), step
        for rank, (per_step, _) in enumerate(results):
            log = per_step[step][3]
            node, peers = nodes[rank // 2], inter[rank % 2]
            assert_node_groups(log, node, peers, 6, synced, (step, rank))
            counts = Counter((name, ranks) for name, ranks in log)
            # every step: one gradient bucket all-reduced inside the node (DDP's hook); at a sync also: one all-reduce
            # of the slice and the buffers with the 2 other nodes, one all-gather of the slices and one all-reduce of
            # the buffers inside the node, one agreement all-gather over all 6 ranks
            expected = {("all_reduce", node): 1}
            if synced:
                expected = {("all_reduce", node): 2, ("all_gather_single", node): 1, ("all_reduce", peers): 1}
                expected[("all_gather", tuple(range(6)))] = 1
            assert counts == expected, (step, rank, counts)
    # per rank: 6 steps of gradients inside the node; 2 syncs of the half slice + buffers between nodes, and of the
    # all-gather (the other half) + buffers inside the node
    assert logs["qsr/bytes_inter_node"] == 2 * (GRAD_BYTES // 2 + BUFFER_BYTES) == 1232
    assert logs["qsr/bytes_intra_node"] == 6 * GRAD_BYTES + 2 * (GRAD_BYTES // 2 + BUFFER_BYTES) == 7088


def test_node_size_from_the_launcher(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert resolve_node_size(8) == 4 and resolve_node_size(8, 2) == 2
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    with pytest.raises(ValueError, match="LOCAL_WORLD_SIZE"):
        resolve_node_size(8)


def test_node_layout_cost_model():
    from qsr_hf.analysis.planner import Plan
    from qsr_hf.analysis.scaling import NodeLayout, predict_node_modes

    # 2 nodes x 4, 1 GB: inside a node a ring all-reduce sends 2 x 3/4 GB at 80 Gbit/s = 0.15 s and an all-gather
    # 3/4 GB = 0.075 s; between nodes a node's link carries 2 x 1/2 GB at 8 Gbit/s = 1 s (the floor)
    layout = NodeLayout(nodes=2, per_node=4, intra_bits_per_s=80e9, inter_bits_per_s=8e9)
    assert layout.intra_allreduce_s(1e9) == pytest.approx(0.15) and layout.inter_allreduce_s(1e9) == pytest.approx(1.0)
    assert layout.intra_allgather_s(1e9) == pytest.approx(0.075)
    # 100 steps of 0.5 s compute (50 s), 25 syncs
    modes = predict_node_modes(Plan(100, list(range(0, 100, 4)), [4] * 25), 0.5, 1e9, layout)
    assert modes["ddp_s"] == pytest.approx(165.0)  # 50 + 100 x (0.15 + 1)
    assert modes["qsr_process_s"] == pytest.approx(78.75)  # 50 + 25 x (0.15 + 1)
    # floor path: 50 + 100 x 0.15 (gradients in the node) + 25 x (1 (slices between nodes) + 0.075 (all-gather))
    assert modes["qsr_node_s"] == pytest.approx(91.875)
    assert modes["qsr_node_whole_s"] == pytest.approx(
        165.0
    )  # 50 + 15 + 25 x 4 x 1: 4 whole-model rings share the link
    assert modes["qsr_fsdp2_s"] == pytest.approx(97.5)  # 50 + 100 x 1.5 x 0.15 + 25 x 1: shards, the floor
    assert modes["sync_floor_s"] == pytest.approx(1.0)
    with_latency = NodeLayout(nodes=3, per_node=2, intra_bits_per_s=8e9, inter_bits_per_s=8e9, latency_s=1e-3)
    assert with_latency.intra_allgather_s(1e9) == pytest.approx(0.5 + 1e-3)  # 1/2 GB at 1 GB/s, one hop


def test_plan_cli_over_nodes(capsys):
    from qsr_hf.cli import plan_main

    flags = ["--peak-lr", "0.01", "--total-steps", "200", "--alpha", "0.02", "--h-base", "2"]
    nodes = ["--nodes", "2", "--procs-per-node", "4", "--intra-node-gbps", "80", "--bandwidth-gbps", "8"]
    summary = plan_main([*flags, *nodes, "--compute-s-per-step", "0.5", "--model-params", "1e6"])
    assert "wall_clock" not in summary and summary["node_modes"]["ddp_h"] == summary["node_modes"]["ddp_s"] / 3600
    assert "on 2 nodes x 4: data-parallel" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--intra-node-gbps"):
        plan_main([*flags, "--nodes", "2", "--procs-per-node", "4"])
