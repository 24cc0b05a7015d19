"""The agreement and non-finite checks riding on the averaging collective (`qsr_hf.sync.header`, issue 20 part 2).

A healthy sync is one all-reduce per bucket and nothing else; the sum of the headers reveals any difference, after
which the detailed exchange names it on every rank (the fault classes themselves are in test_faults.py, which runs
this path); an early stop checks in a sync-shaped collective that leaves the model bitwise unchanged.
"""

import pytest
import torch
import torch.nn.functional as F
from testing_utils import default_group_sequence_number, flat_params, rank_batches, run_distributed
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from qsr_hf import LocalOptimizer, ParameterAverager, QSRConfig
from qsr_hf.runtime.paths import folds_checks
from qsr_hf.sync.agreement import COMMON
from qsr_hf.sync.header import decode, digit_bits, encode, header_slots


def _summed(headers, dtype):
    # the collective's sum in the header's dtype, in one order and in the reverse one
    stacked = torch.tensor(headers, dtype=dtype)
    forward, backward = torch.zeros_like(stacked[0]), torch.zeros_like(stacked[0])
    for row in stacked:
        forward += row
    for row in reversed(stacked):
        backward += row
    assert torch.equal(forward, backward), "the header's sums are not exact"
    return forward.tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("world", [2, 3, 8, 256, 4096])
def test_the_summed_header_reveals_any_difference(world, dtype):
    values = [1, 8, 3, 4, 12, 2**61 + 5, 2**40 + 7, world]
    same = encode(values, True, world, dtype)
    assert len(same) == header_slots(world, dtype)
    total = decode(_summed([same] * world, dtype), world)
    assert total.agree and total.counted == world
    for index in range(len(values)):  # one rank differs in one value, by one
        other = list(values)
        other[index] += 1
        headers = [same] * (world - 1) + [encode(other, True, world, dtype)]
        assert not decode(_summed(headers, dtype), world).agree, f"a difference in value {index} was not seen"
    nonfinite = decode(_summed([same] * (world - 1) + [encode(values, False, world, dtype)], dtype), world)
    assert nonfinite.agree and nonfinite.counted == world - 1


def test_digits_keep_the_sums_exact_and_small_types_fall_back():
    for world in [2, 3, 255, 256, 257, 4096, 65536]:
        for dtype, mantissa in [(torch.float32, 24), (torch.float64, 53)]:
            bits = digit_bits(world, dtype)
            assert world * (2**bits - 1) ** 2 < 2**mantissa  # every partial sum of squares is an exact integer
    assert header_slots(2, torch.bfloat16) == 0 and header_slots(2, torch.float16) == 0
    assert header_slots(2**21, torch.float32) == 0  # digits of 1 bit: the separate exchange instead
    with pytest.raises(ValueError, match="no sync header fits"):
        encode([0] * len(COMMON), True, 2, torch.bfloat16)


class _Mixed(nn.Module):
    """fp32 and bf16 parameters: two buckets, the header rides in the fp32 one."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 4).to(torch.bfloat16)

    def forward(self, x):
        return self.b(F.relu(self.a(x.to(self.a.weight.dtype))).to(torch.bfloat16)).float()


def _run(model_fn, steps, total, lr=0.1, h=2, rank=0):
    torch.manual_seed(0)
    ddp = DDP(model_fn())
    inner = torch.optim.SGD(ddp.parameters(), lr=lr)
    local = LocalOptimizer(inner, ddp, QSRConfig(qsr_rule="constant", qsr_h_base=h), num_training_steps=total)
    collectives, params = [], []
    for x, y in rank_batches(rank, steps):
        F.cross_entropy(ddp(x), y).backward()
        start = default_group_sequence_number()
        local.step()
        collectives.append(default_group_sequence_number() - start)
        local.zero_grad()
        params.append(flat_params(ddp.module))
    return ddp, local, collectives, params


def _error(fn):
    try:
        fn()
    except RuntimeError as error:
        return str(error)
    return None


def _ranks(rank, world_size):
    out = {}
    # a run to its last step: syncs are one all-reduce per bucket, nothing between them, nothing at the end
    ddp, local, out["collectives"], out["params"] = _run(_Mixed, 6, 6, rank=rank)
    out["buckets"], out["folds"] = local.synchronizer.averager.num_buckets, folds_checks(local.synchronizer.path)
    start = default_group_sequence_number()
    local.close()
    out["end_collectives"] = default_group_sequence_number() - start
    # an early stop after the sync at step 4 of 12: one sync-shaped collective, the model bitwise unchanged
    ddp, local, _, _ = _run(_Mixed, 4, 12, rank=rank)
    with torch.no_grad():  # the same values on every rank, for which an average of 3 equal copies is not bitwise x
        ddp.module.a.weight.copy_(torch.randn(16, 8, generator=torch.Generator().manual_seed(1)))
    before, start = flat_params(ddp.module), default_group_sequence_number()
    local.close()
    out["early_end_collectives"] = default_group_sequence_number() - start
    out["early_end_unchanged"] = torch.equal(flat_params(ddp.module), before)
    # all-bf16 parameters (averaged in fp32: the header rides in the up-cast buffer): rank 2 runs one step less, so
    # its end-of-training sync at step 5 meets the others' last sync at step 6
    out["bf16_steps"] = _error(
        lambda: _run(lambda: _Mixed().to(torch.bfloat16), 6 - (rank == 2), 6, rank=rank)[1].close()
    )
    # the averager's own API in copy mode: the header and its verdict on every rank
    averager = ParameterAverager([torch.full((5,), float(rank))], mode="copy")
    calls = []
    header = averager.make_header([0, rank == 1], True, lambda: calls.append("unhealthy") or 2)
    averager.average(header=header)
    out["copy_calls"], out["copy_result"] = calls, averager.tensors[0].tolist()
    return out


def test_syncs_carry_the_checks_and_an_early_stop_keeps_the_model():
    results = run_distributed(_ranks, world_size=3, timeout=120)
    for rank, r in enumerate(results):
        assert r["folds"] and r["buckets"] == 2
        assert r["collectives"] == [0, 2, 0, 2, 0, 2], f"rank {rank}: collectives per step {r['collectives']}"
        assert r["end_collectives"] == 0, f"rank {rank}: the end of a complete run communicated"
        assert r["early_end_collectives"] == 2 and r["early_end_unchanged"], f"rank {rank}"
        for step in (1, 3, 5):  # after each sync every rank holds the same model
            assert torch.equal(r["params"][step], results[0]["params"][step])
        assert r["copy_calls"] == ["unhealthy"] and r["copy_result"] == [1.5] * 5  # sum 3 / the divisor it returned
    assert not torch.equal(results[0]["params"][0], results[1]["params"][0]), "ranks equal inside a round"
    messages = {r["bf16_steps"] for r in results}
    assert len(messages) == 1, f"ranks raised different messages: {messages}"
    message = messages.pop()
    assert "optimizer step: rank 0 = 6, rank 1 = 6, rank 2 = 5" in message, message
    assert "rank 0 = round end, rank 1 = round end, rank 2 = extra sync" in message, message
