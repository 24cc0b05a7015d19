"""ParameterAverager on real 2-process gloo groups.

The selected tests' 2-process runs share one spawn (`run_distributed_batch`, the module fixture ``batch``).
"""

import pytest
import torch
import torch.distributed as dist
from testing_utils import BNMLP, run_distributed, run_distributed_batch, selected_scenarios

from qsr_hf import ParameterAverager
from qsr_hf.sync.tensor_selection import averaged_tensors


def _average(rank, world_size, dtype, fp32):
    torch.manual_seed(rank)
    model = BNMLP().to(dtype)
    model.net[0].weight.requires_grad_(False)  # frozen: not averaged
    frozen_before = model.net[0].weight.detach().clone()
    calls = {"n": 0}
    original = dist.all_reduce

    def spy(*a, **k):
        calls["n"] += 1
        return original(*a, **k)

    averager = ParameterAverager(averaged_tensors(model, average_buffers=True), fp32_average=fp32)
    before = [t.detach().clone() for t in averager.tensors]
    dist.all_reduce = spy
    try:
        sent = averager.average()
    finally:
        dist.all_reduce = original
    return {
        "before": before,
        "after": [t.detach().clone() for t in averager.tensors],
        "calls": calls["n"],
        "buckets": averager.num_buckets,
        "sent": sent,
        "frozen_unchanged": torch.equal(frozen_before, model.net[0].weight),
        "num_batches_tracked_averaged": any(t is model.net[1].num_batches_tracked for t in averager.tensors),
    }


@pytest.mark.scenarios("fp32")
def test_average_is_exact_mean_in_one_collective(runs):
    r0, r1 = runs["fp32"]
    assert r0["calls"] == r0["buckets"] == 1, "one all-reduce for the single fp32 bucket"
    for a0, a1, b0, b1 in zip(r0["after"], r1["after"], r0["before"], r1["before"], strict=True):
        assert torch.equal(a0, a1)
        assert torch.equal(a0, (b0 + b1) / 2)
    assert r0["frozen_unchanged"] and not r0["num_batches_tracked_averaged"]
    n = sum(t.numel() for t in r0["before"])
    assert r0["sent"] == 4 * n


@pytest.mark.scenarios("bf16")
def test_bf16_is_averaged_in_fp32(runs):
    r0, r1 = runs["bf16"]
    for a0, a1, b0, b1 in zip(r0["after"], r1["after"], r0["before"], r1["before"], strict=True):
        assert a0.dtype == torch.bfloat16 and torch.equal(a0, a1)
        assert torch.equal(a0, ((b0.float() + b1.float()) / 2).to(torch.bfloat16))
    assert r0["sent"] == 4 * sum(t.numel() for t in r0["before"]), "fp32 bytes on the wire"


def _views_survive_recast(rank, world_size):
    out = {}
    for mode in ("inplace", "copy"):
        torch.manual_seed(rank)
        model = BNMLP()
        averager = ParameterAverager(lambda model=model: averaged_tensors(model, average_buffers=True), mode=mode)
        model.to(torch.float64)  # re-binds parameters and replaces buffers: the flat views are gone
        averager.average()
        out[mode] = [t.detach().clone() for t in averaged_tensors(model, average_buffers=True)], averager.num_buckets
    return out


@pytest.mark.scenarios("recast")
def test_broken_views_are_rebuilt(runs):
    r0, r1 = runs["recast"]
    for mode in ("inplace", "copy"):
        (t0, b0), (t1, _) = r0[mode], r1[mode]
        assert b0 == 1
        assert all(a.dtype == torch.float64 and torch.equal(a, b) for a, b in zip(t0, t1, strict=True)), mode


def test_views_share_storage_with_parameters():
    model = BNMLP()
    averager = ParameterAverager(averaged_tensors(model, average_buffers=True))
    flat = averager.buckets[0].flat
    flat.add_(1.0)
    assert torch.equal(model.net[0].bias.detach(), flat[model.net[0].weight.numel() :][: model.net[0].bias.numel()])
    assert averager.buckets[0].intact()
    model.net[0].bias.data = model.net[0].bias.data.clone()
    assert not averager.buckets[0].intact()


def _snapshot_divisor(rank, world_size):
    return {mode: _snapshot_divisor_mode(rank, mode) for mode in ("inplace", "copy")}


def _snapshot_divisor_mode(rank, mode):
    torch.manual_seed(rank)
    model = BNMLP().to(torch.bfloat16)
    averager = ParameterAverager(averaged_tensors(model, average_buffers=True), mode=mode)
    before = [t.detach().clone() for t in averager.tensors]
    snap = averager.snapshot()
    averager.average(divisor=1)  # a plain sum
    summed = [t.detach().clone() for t in averager.tensors]
    averager.restore(snap)
    restored = [t.detach().clone() for t in averager.tensors]
    errors = []
    for bad in ([], [s.double() for s in snap], [torch.zeros(3)]):
        try:
            averager.restore(bad)
        except ValueError as e:
            errors.append(str(e))
    for bad in (0, 1.5, True):
        try:
            averager.average(divisor=bad)
        except ValueError as e:
            errors.append(str(e))
    return {
        "before": before,
        "summed": summed,
        "restored": restored,
        "snap_is_copy": snap[0] is not averager.buckets[0].flat,
        "errors": errors,
    }


def _check_snapshot_divisor(results):
    for mode in ("inplace", "copy"):
        r0, r1 = (r[mode] for r in results)
        for r in (r0, r1):
            assert all(torch.equal(a, b) for a, b in zip(r["restored"], r["before"], strict=True)), mode
            assert r["snap_is_copy"]
            assert len(r["errors"]) == 6
            assert all("snapshot" in e for e in r["errors"][:3]) and all("divisor" in e for e in r["errors"][3:])
        for s, b0, b1 in zip(r0["summed"], r0["before"], r1["before"], strict=True):
            assert torch.equal(s, (b0.float() + b1.float()).to(torch.bfloat16)), f"{mode}: divisor=1 is the sum"


def _clone(ts):
    return [t.detach().clone() for t in ts]


def _modes(rank, world_size, dtype):
    """The same values averaged by every mode (blocking and async), plus bookkeeping checks, in one process group."""
    out = {}
    for name, mode, fp32, asynchronous in [
        ("inplace", "inplace", True, False),
        ("copy", "copy", True, False),
        ("inplace_async", "inplace", True, True),
        ("copy_async", "copy", True, True),
        ("low_precision", "inplace", False, False),
    ]:
        torch.manual_seed(rank)
        model = BNMLP().to(dtype)
        averager = ParameterAverager(averaged_tensors(model, average_buffers=True), fp32_average=fp32, mode=mode)
        out["before"] = _clone(averager.tensors)
        if asynchronous:
            handle = averager.average(async_op=True)
            if mode == "copy":
                dist.barrier()  # the collective has had time to finish: the tensors must still be untouched
                out["untouched_before_wait"] = all(
                    torch.equal(a, b) for a, b in zip(averager.tensors, out["before"], strict=True)
                )
            out[name + "_bytes"] = handle.wait()
            out[name + "_wait_twice"] = handle.wait() == out[name + "_bytes"] and handle.done
        else:
            out[name + "_bytes"] = averager.average()
        out[name] = _clone(averager.tensors)
    # overlap bookkeeping: the change made while the average is in flight is kept on top of it
    torch.manual_seed(rank)
    model = BNMLP().to(dtype)
    averager = ParameterAverager(averaged_tensors(model, average_buffers=True), mode="copy")
    sent = _clone(averager.tensors)
    handle = averager.average(async_op=True, keep_local_change=True)
    with torch.no_grad():
        for i, t in enumerate(averager.tensors):
            t.add_(0.01 * (rank + 1) * (i + 1))
    now = _clone(averager.tensors)
    try:
        averager.average()
    except RuntimeError as e:
        out["in_flight_error"] = str(e)
    handle.wait()
    out["delayed"], out["delayed_sent"], out["delayed_now"] = _clone(averager.tensors), sent, now
    return out


def _fsdp2_replicas(rank, world_size):
    """FSDP2 (HSDP mesh: 2 replicas x 1 shard): copy mode averages the DTensor local shards across replicas."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world_size, 1), mesh_dim_names=("replicate", "shard"))
    torch.manual_seed(rank)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    fully_shard(model, mesh=mesh)
    tensors = averaged_tensors(model, average_buffers=False)
    before = [t.to_local().clone() for t in tensors]
    try:
        ParameterAverager(tensors, mesh.get_group("replicate"))
        error = None
    except ValueError as e:
        error = str(e)
    ParameterAverager(tensors, mesh.get_group("replicate"), mode="copy").average()
    return {
        "kind": type(tensors[0]).__name__,
        "before": before,
        "after": [t.to_local().clone() for t in tensors],
        "error": error,
    }


def _check_modes(results, dtype):
    r0 = results[0]
    for name in ("copy", "inplace_async", "copy_async"):
        assert all(torch.equal(a, b) for a, b in zip(r0[name], r0["inplace"], strict=True)), f"{name} != inplace"
        assert r0[name + "_bytes"] == r0["inplace_bytes"] and r0.get(name + "_wait_twice", True)
    assert r0["untouched_before_wait"], "copy mode must not touch the tensors before wait()"
    assert "wait()" in r0["in_flight_error"]
    for r in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(r["inplace"], r0["inplace"], strict=True))
    k = len(results)
    for i, avg in enumerate(r0["inplace"]):
        wide = sum(r["before"][i].double() for r in results) / k
        assert torch.allclose(avg.double(), wide, rtol=1e-2 if dtype == torch.bfloat16 else 1e-6)
        avg32 = sum(r["before"][i].float() for r in results) / k  # exact sums: bf16 values, or 2 fp32 ones
        for r in results:  # the fp32 average + (current - sent), rounded once
            delayed = (avg32 + (r["delayed_now"][i].float() - r["delayed_sent"][i].float())).to(dtype)
            assert torch.equal(r["delayed"][i], delayed)


def test_modes_agree_on_three_ranks_bf16():
    results = run_distributed(_modes, world_size=3, dtype=torch.bfloat16)
    _check_modes(results, torch.bfloat16)
    r0 = results[0]
    # with 3 ranks, bf16 summed in fp32 and divided by 3 differs from bf16 arithmetic: the fp32 path is really taken
    assert any(not torch.equal(a, b) for a, b in zip(r0["inplace"], r0["low_precision"], strict=True))
    for i, avg in enumerate(r0["inplace"]):
        exact = (sum(r["before"][i].float() for r in results) / 3).to(torch.bfloat16)
        assert torch.equal(avg, exact)
    assert r0["inplace_bytes"] == 2 * r0["low_precision_bytes"]


def _two_ranks(rank, world_size):
    return {
        "modes": _modes(rank, world_size, torch.float32),
        "fsdp2": _fsdp2_replicas(rank, world_size),
        "snapshot": _snapshot_divisor(rank, world_size),
    }


@pytest.mark.scenarios("two_ranks")
def test_two_ranks_fp32_modes_fsdp2_snapshot_divisor(runs):
    results = runs["two_ranks"]
    _check_modes([r["modes"] for r in results], torch.float32)
    _check_snapshot_divisor([r["snapshot"] for r in results])
    f0, f1 = (r["fsdp2"] for r in results)
    assert f0["kind"] == "DTensor" and "mode='copy'" in f0["error"]
    for a0, a1, b0, b1 in zip(f0["after"], f1["after"], f0["before"], f1["before"], strict=True):
        assert torch.equal(a0, a1) and torch.equal(a0, (b0 + b1) / 2)


@pytest.fixture(scope="module")
def batch(request):
    """The 2-process runs of the selected tests, all from one spawn; a run that failed raises where a test reads it."""
    scenarios = {
        "fp32": (_average, {"dtype": torch.float32, "fp32": True}),
        "bf16": (_average, {"dtype": torch.bfloat16, "fp32": True}),
        "recast": (_views_survive_recast, {}),
        "two_ranks": (_two_ranks, {}),
    }
    return run_distributed_batch(selected_scenarios(request, scenarios))


@pytest.fixture
def runs(batch, request):
    """The runs this test names in its ``scenarios`` mark."""
    return batch.for_test(request.node)
