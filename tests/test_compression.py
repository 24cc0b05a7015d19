"""``qsr_compress_delta``: the round's change averaged in bf16 from an fp32 anchor, on real gloo groups of 2 and 3."""

import dataclasses

import pytest
import torch
from accelerate import Accelerator
from testing_utils import BNMLP, count_collectives, flat_params, rank_batches, run_distributed
from torch import nn

from qsr_hf import LocalOptimizer, QSRConfig
from qsr_hf.core.wire import padded_numel
from qsr_hf.engines.base import Engine
from qsr_hf.runtime.synchronizer import Synchronizer
from qsr_hf.sync.compressed import ROUNDING_BOUND, CompressedAverager
from qsr_hf.sync.wire_codec import compressed_average, mean_delta


SHAPES = [((3, 4), torch.float32), ((8,), torch.float32), ((5,), torch.bfloat16)]  # 25 values: padded to 26 / 27


def _tensors():
    g = torch.Generator().manual_seed(0)  # the same start on every rank
    return [torch.randn(shape, generator=g).to(dtype) for shape, dtype in SHAPES]


def _one_sync(rank, world_size):
    tensors = _tensors()
    averager = CompressedAverager(tensors)
    anchor = averager.anchor.clone()
    g = torch.Generator().manual_seed(100 + rank)
    scale = 0.01 if rank == 0 else 0.01 * 2**-8  # dynamic range: summed in bf16, the small changes would be lost
    with torch.no_grad():
        for t in tensors:  # a round of local change, different on every rank
            t.add_(scale * torch.randn(t.shape, generator=g).to(t.dtype))
    before = [t.clone() for t in tensors]
    log = []
    with count_collectives(log):
        recorded = averager.average()
    return {
        "anchor": anchor,
        "before": before,
        "after": [t.clone() for t in tensors],
        "new_anchor": averager.anchor.clone(),
        "recorded": recorded,
        "collective_bytes": averager.collective_bytes,
        "collectives": [name for name, _ in log],
    }


def _spec_average(anchor, xs, divisor, sum_dtype=torch.float32):
    """The documented arithmetic, written out independently of `mean_delta`: each change rounded to bf16, summed in
    ``sum_dtype`` in rank order, divided by ``divisor``, rounded to bf16, added to the fp32 anchor."""
    total = torch.zeros_like(anchor, dtype=sum_dtype)
    for x in xs:
        total += (x - anchor).to(torch.bfloat16).to(sum_dtype)
    return anchor + (total / divisor).to(torch.bfloat16).float()


def test_mean_delta_sums_in_fp32_and_divides_by_the_ranks_that_count():
    one, small = torch.tensor([1.0], dtype=torch.bfloat16), torch.tensor([2.0**-8], dtype=torch.bfloat16)
    # in bf16, 1 + 2^-8 rounds back to 1 (a tie, to even): a bf16 sum would give bf16(1/3) = 0.333984375
    assert mean_delta([one, small, small], 3).item() == (1 + 2**-7) / 3 == 0.3359375
    # a rank that does not count sends zeros and is left out of the divisor
    assert mean_delta([one, torch.zeros(1, dtype=torch.bfloat16), one / 2], 2).item() == 0.75


def _flat32(tensors, size):
    out = torch.zeros(size, dtype=torch.float32)
    out[:25] = torch.cat([t.float().reshape(-1) for t in tensors])
    return out


@pytest.mark.parametrize("world_size", [2, 3])
def test_one_sync_is_anchor_plus_rounded_mean_change(world_size):
    results = run_distributed(_one_sync, world_size=world_size)
    size = padded_numel(25, world_size)
    anchor = results[0]["anchor"]
    for k, r in enumerate(results):
        assert torch.equal(r["anchor"], anchor), f"rank {k}: the anchor differs at the start"
        assert r["collectives"] == ["all_to_all_single", "all_gather_single"], r["collectives"]
        assert r["recorded"] == 2 * size, "recorded bytes: 2 per padded value (all-reduce equivalent)"
        assert r["collective_bytes"] == 4 * size, "2 bytes per padded value into the all-to-all + 2 out of the gather"
        for t, t0 in zip(r["after"], results[0]["after"], strict=True):
            assert torch.equal(t, t0), f"rank {k} differs from rank 0 after the sync"
    xs = [_flat32(r["before"], size) for r in results]
    result = results[0]["new_anchor"]
    # bitwise: each rank's fp32 change rounded to bf16, summed in fp32 in rank order, the mean rounded to bf16
    assert torch.equal(result, compressed_average(anchor, xs, world_size))
    assert torch.equal(result, _spec_average(anchor, xs, world_size)), "not summed in fp32 in rank order"
    if world_size > 2:  # with 2 ranks a bf16 sum gives the same: round(a + b) / 2 = round((a + b) / 2)
        assert not torch.equal(result, _spec_average(anchor, xs, world_size, torch.bfloat16)), "bf16 sum: same"
    for t, view in zip(results[0]["after"], torch.split(result[:25], [12, 8, 5]), strict=True):
        assert torch.equal(t.reshape(-1), view.to(t.dtype)), "the tensors are the anchor cast to their dtype"
    # within the documented bound of the exact mean change, and of the plain fp32 average
    exact = anchor.double() + torch.stack([x.double() - anchor.double() for x in xs]).mean(0)
    max_delta = torch.stack([(x - anchor).abs() for x in xs]).amax(0).double()
    bound = ROUNDING_BOUND * max_delta + 2**-23 * exact.abs()
    assert ((result.double() - exact).abs() <= bound).all()
    plain = xs[0].clone()
    for x in xs[1:]:
        plain.add_(x)
    plain.div_(world_size)
    assert ((result.double() - plain.double()).abs() <= bound + 2**-23 * exact.abs()).all()
    assert not torch.equal(result, plain), "bf16 rounding should show: the compressed average is not the fp32 one"
    assert (result - plain).abs().max() > 0 and (result[25:] == 0).all(), "the padding stays zero"


STEPS, H, CUT, VIEW = 10, 3, 5, 4  # syncs after steps 3, 6, 9, 10; save at 5 and an eval copy at 4 (mid-round)


def _model_and_optimizer(seed, config, accelerator, steps=STEPS):
    torch.manual_seed(seed)
    model = BNMLP()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    model, opt = accelerator.prepare(model, opt)
    return model, LocalOptimizer(opt, model, config, num_training_steps=steps)


def _step(model, local, batch):
    x, y = batch
    nn.functional.cross_entropy(model(x), y).backward()
    local.step()
    local.zero_grad()


def _training(rank, world_size, tmp):
    accelerator = Accelerator()
    config = QSRConfig(qsr_rule="constant", qsr_h_base=H, qsr_compress_delta=True)
    batches = rank_batches(rank, STEPS)
    out = {"full": [], "resumed": []}
    # uninterrupted, with an averaged view (qsr_eval_copy) mid-round
    model, local = _model_and_optimizer(0, config, accelerator)
    for i, batch in enumerate(batches, 1):
        _step(model, local, batch)
        out["full"].append(flat_params(model.module))
        if i == VIEW:
            anchor = local.synchronizer.averager.anchor.clone()
            local.synchronizer.enter_averaged_view()
            out["view"] = flat_params(model.module)
            out["view_anchor_moved"] = not torch.equal(anchor, local.synchronizer.averager.anchor)
            local.synchronizer.leave_averaged_view()
            out["view_restored"] = torch.equal(anchor, local.synchronizer.averager.anchor) and torch.equal(
                flat_params(model.module), out["full"][-1]
            )
    out["stats"] = local.stats.state_dict()
    # stop mid-round, save the per-rank files, resume in a fresh model (other init) and optimizer
    model, local = _model_and_optimizer(0, config, accelerator)
    for batch in batches[:CUT]:
        _step(model, local, batch)
    local.save_local_state(tmp)
    model, local = _model_and_optimizer(123, config, accelerator)
    local.load_local_state(tmp)
    for batch in batches[CUT:]:
        _step(model, local, batch)
        out["resumed"].append(flat_params(model.module))
    state = {k: v for k, v in local.synchronizer.state_dict().items() if k != "synced"}
    try:
        local.synchronizer.load_state_dict(state)
    except ValueError as error:
        out["no_anchor_error"] = str(error)
    # skip_rank: rank 1 holds NaN at the sync after step 3; it contributes a zero change and gets the average
    config = dataclasses.replace(config, qsr_on_nonfinite="skip_rank")
    model, local = _model_and_optimizer(0, config, accelerator, steps=H)
    averager = local.synchronizer.averager
    stage = averager.stage

    def spy(buckets=None):  # what this rank's deltas hold when the average reads them (after any exclusion)
        flats = stage(buckets)
        out["nan_deltas"] = torch.cat([f.clone() for f in flats])
        return flats

    averager.stage = spy
    for i, batch in enumerate(batches[:H], 1):
        if i == H and rank == 1:
            with torch.no_grad():
                model.module.net[0].weight[0, 0] = float("nan")
        _step(model, local, batch)
    out["nan_anchor"] = averager.anchor.clone()  # after the sync; the one before it is the start
    out["nan_start"] = flat_params(_model_and_optimizer(0, config, accelerator, steps=H)[0].module)
    out["nan_after"] = flat_params(model.module)
    out["nan_stats"] = local.stats.state_dict()
    return out


def test_local_optimizer_resume_view_and_skip_rank(tmp_path):
    r0, r1 = run_distributed(_training, tmp=str(tmp_path))
    for r in (r0, r1):
        # a mid-round checkpoint (anchor in the per-rank files, read with weights_only=True) resumes bitwise
        for step, (full, resumed) in enumerate(zip(r["full"][CUT:], r["resumed"], strict=True), CUT + 1):
            assert torch.equal(full, resumed), f"step {step}: the resumed run differs from the uninterrupted one"
        # the view's average does not commit: the anchor never moves, and the local tensors come back
        assert not r["view_anchor_moved"] and r["view_restored"], "the eval copy must leave the anchor alone"
        assert r["stats"]["syncs"] == 4 and r["stats"]["extra_syncs"] == 1
        n = sum(p.numel() for p in BNMLP().parameters()) + 2 * 16  # + BatchNorm running mean and var
        assert r["stats"]["bytes_averaged"] == 5 * 2 * padded_numel(n, 2)
        assert "no synced anchor" in r["no_anchor_error"]
    assert torch.equal(r0["view"], r1["view"]), "the averaged view is the same on both ranks"
    for step in (H, 2 * H, 3 * H, STEPS):
        assert torch.equal(r0["full"][step - 1], r1["full"][step - 1]), f"step {step}: ranks differ after a sync"
    assert not torch.equal(r0["full"][CUT - 1], r1["full"][CUT - 1]), "ranks should differ inside a round"
    # NaN on rank 1: it sends a zero change (not zero parameters); both ranks get the anchor + rank 0's change
    assert r0["nan_stats"]["nonfinite_syncs"] == r1["nan_stats"]["nonfinite_syncs"] == 1
    assert (r1["nan_deltas"] == 0).all() and (r0["nan_deltas"] != 0).any()
    wire = [r["nan_deltas"].to(torch.bfloat16) for r in (r0, r1)]
    expected = r0["nan_start"] + mean_delta(wire, 1)
    assert torch.equal(expected, r0["nan_start"] + wire[0]), "the mean is over rank 0 alone, not over both ranks"
    assert torch.equal(r0["nan_after"], expected) and torch.equal(r1["nan_after"], expected)
    assert torch.equal(r0["nan_anchor"], expected)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"qsr_average_optimizer_state": True}, "qsr_average_optimizer_state=True .*set qsr_average_optimizer_state"),
        ({"qsr_worker": "node"}, "qsr_worker='node' .*set qsr_worker='process'"),
    ],
)
def test_config_refusals(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QSRConfig(qsr_rule="constant", qsr_compress_delta=True, **kwargs)


class _ShardedEngine(Engine):
    world_size = 2  # a multi-process engine that is not DDP (FSDP2, hierarchical and DeepSpeed are refused alike)


def test_engine_refusal():
    config = QSRConfig(qsr_rule="constant", qsr_compress_delta=True)
    with pytest.raises(ValueError, match="DDP only, not with _ShardedEngine: set qsr_compress_delta=False"):
        Synchronizer(_ShardedEngine(nn.Linear(2, 2)), config, 0, 10)
