"""ParameterAverager on real 2-process gloo groups."""

import torch
import torch.distributed as dist
from testing_utils import BNMLP, run_distributed

from qsr_hf import ParameterAverager
from qsr_hf.averaging import averaged_tensors


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


def test_average_is_exact_mean_in_one_collective():
    r0, r1 = run_distributed(_average, dtype=torch.float32, fp32=True)
    assert r0["calls"] == r0["buckets"] == 1, "one all-reduce for the single fp32 bucket"
    for a0, a1, b0, b1 in zip(r0["after"], r1["after"], r0["before"], r1["before"], strict=True):
        assert torch.equal(a0, a1)
        assert torch.equal(a0, (b0 + b1) / 2)
    assert r0["frozen_unchanged"] and not r0["num_batches_tracked_averaged"]
    n = sum(t.numel() for t in r0["before"])
    assert r0["sent"] == 4 * n


def test_bf16_is_averaged_in_fp32():
    r0, r1 = run_distributed(_average, dtype=torch.bfloat16, fp32=True)
    for a0, a1, b0, b1 in zip(r0["after"], r1["after"], r0["before"], r1["before"], strict=True):
        assert a0.dtype == torch.bfloat16 and torch.equal(a0, a1)
        assert torch.equal(a0, ((b0.float() + b1.float()) / 2).to(torch.bfloat16))
    assert r0["sent"] == 4 * sum(t.numel() for t in r0["before"]), "fp32 bytes on the wire"


def _views_survive_recast(rank, world_size):
    torch.manual_seed(rank)
    model = BNMLP()
    averager = ParameterAverager(lambda: averaged_tensors(model, average_buffers=True))
    model.to(torch.float64)  # re-binds parameters and replaces buffers: the flat views are gone
    averager.average()
    return [t.detach().clone() for t in averaged_tensors(model, average_buffers=True)], averager.num_buckets


def test_broken_views_are_rebuilt():
    (t0, b0), (t1, _) = run_distributed(_views_survive_recast)
    assert b0 == 1
    assert all(a.dtype == torch.float64 and torch.equal(a, b) for a, b in zip(t0, t1, strict=True))


def test_views_share_storage_with_parameters():
    model = BNMLP()
    averager = ParameterAverager(averaged_tensors(model, average_buffers=True))
    flat = averager.buckets[0].flat
    flat.add_(1.0)
    assert torch.equal(model.net[0].bias.detach(), flat[model.net[0].weight.numel() :][: model.net[0].bias.numel()])
    assert averager.buckets[0].intact()
    model.net[0].bias.data = model.net[0].bias.data.clone()
    assert not averager.buckets[0].intact()


def _snapshot_divisor(rank, world_size, mode):
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


def test_snapshot_restore_and_divisor():
    for mode in ("inplace", "copy"):
        r0, r1 = run_distributed(_snapshot_divisor, mode=mode)
        for r in (r0, r1):
            assert all(torch.equal(a, b) for a, b in zip(r["restored"], r["before"], strict=True)), mode
            assert r["snap_is_copy"]
            assert len(r["errors"]) == 6
            assert all("snapshot" in e for e in r["errors"][:3]) and all("divisor" in e for e in r["errors"][3:])
        for s, b0, b1 in zip(r0["summed"], r0["before"], r1["before"], strict=True):
            assert torch.equal(s, (b0.float() + b1.float()).to(torch.bfloat16)), f"{mode}: divisor=1 is the sum"
