"""``qsr_compress_delta`` with ``qsr_overlap_sync``: the compressed average in flight (its all-to-all and all-gather on
a worker thread and a process group of its own, `qsr_hf.sync.compressed_flight`), on 2 and 3 gloo ranks.

Each run trains BNMLP with AdamW in rounds of H = 3 over 10 steps, each average folded K = 2 steps after its send:
sent after steps 3, 6, 9, folded after 5, 8 and 10 (the last step: then the blocking average of the whole model). The
run is compared bitwise with the one-process simulation (`LocalTrainingSimulation`, which computes each average in
its own code, `compressed_average` over the tensors flat in the averager's layout, and folds it with the delayed rule):
the compressed mean is summed in rank order by our own code on every rank, so this holds on 3 ranks too. A second
run saves after step CUT with an average in flight (the save folds it) and a fresh model resumed from the file must
continue it bitwise.
"""

import collections
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from test_compression import _model_and_optimizer, _step
from test_compression_formats import reference_round_trip
from testing_utils import (
    BNMLP,
    count_collectives,
    default_group_sequence_number,
    flat_params,
    rank_batches,
    run_distributed,
)

from qsr_hf import QSRConfig
from qsr_hf.analysis.simulation import LocalTrainingSimulation


STEPS, H, K, CUT = 10, 3, 2, 4


class Expected(NamedTuple):
    in_flight: list[bool]  # after each step
    default_group: list[int]  # collectives on the main thread's (default) group at each step
    worker_group: int  # collectives on the worker's group in the run: 2 per fragment exchanged in flight
    exchanges: int  # all-to-alls in the run (as many all-gathers): in flight and blocking
    folded: tuple[int, ...]  # the steps after which the anchor (and the residual) moves
    first: tuple[int, int]  # the first fragment's (the model's) first average: sent after, folded after step


# sent after steps 3, 6, 9, folded after 5, 8 and 10; each started sync costs its agreement exchange on the default
# group, none at a fold; the last step folds (no collective), then averages blocking: its exchange, all-to-all and
# all-gather
WHOLE = Expected([False, False, True, True, False, True, True, False, True, False], [0, 0, 1, 0, 0, 1, 0, 0, 1, 3],
                 2 * 3, 4, (5, 8, 10), (3, 5))  # fmt: skip
# F = 3 fragments, fragment f sent after step f + 1 of each round (9 sends), folded K steps later, at the round end or
# before it is sent again: (sent, folded) (1, 3) (2, 3) (3, 5) (4, 6) (5, 6) (6, 8) (7, 9) (8, 9) (9, 10); two in
# flight at the cut after step 4; the last step averages the whole model blocking: 3 fragments, each over its buffer
FRAGMENTS = Expected([True] * 9 + [False], [1] * 9 + [1 + 2 * 3], 2 * 9, 9 + 3, (3, 5, 6, 8, 9, 10), (1, 3))


def _config(fmt, feedback, outer, auto=False, fragments=1):
    return QSRConfig(
        qsr_rule="constant", qsr_h_base=H, qsr_overlap_sync=True, qsr_overlap_steps=K, qsr_overlap_auto=auto,
        qsr_compress_delta=True, qsr_compress_format=fmt, qsr_compress_error_feedback=feedback,
        qsr_outer_optimizer=outer, qsr_fragments=fragments,
    )  # fmt: skip


def _run(rank, world_size, tmp, config):
    accelerator = Accelerator()
    batches = rank_batches(rank, STEPS)
    model, local = _model_and_optimizer(0, config, accelerator)
    sync = local.synchronizer
    averager = sync.averager
    out = collections.defaultdict(list)
    log = []
    with count_collectives(log):
        for batch in batches:
            start = default_group_sequence_number()
            _step(model, local, batch)
            out["default_group"].append(default_group_sequence_number() - start)
            out["in_flight"].append(sync.overlap.pending)
            out["params"].append(flat_params(model.module))
            out["anchor"].append(averager.anchor.clone())
            with torch.no_grad():
                out["values"].append(torch.cat([b.gather(torch.empty_like(b.flat)) for b in averager.buckets]))
            out["residual"].append(None if averager.residual is None else averager.residual.clone())
    out["collectives"] = collections.Counter(name for name, _ in log)
    out["worker_group"] = averager._worker.group._get_sequence_number_for_group()
    out["depth"] = sync.overlap.state_dict()
    out["segment0"] = (averager.segments[0].numel, averager.segments[0].size)  # the first fragment's values, padded
    out["bytes"] = sync.stats.bytes_averaged
    model, local = _model_and_optimizer(0, config, accelerator)
    for batch in batches[:CUT]:
        _step(model, local, batch)
    out["pending_at_cut"] = local.synchronizer.overlap.pending
    local.save_local_state(tmp)  # folds the average in flight first: the file holds no average in flight
    for batch in batches[CUT:]:
        _step(model, local, batch)
        out["continued"].append(flat_params(model.module))
    model, local = _model_and_optimizer(123, config, accelerator)
    local.load_local_state(tmp)
    for batch in batches[CUT:]:
        _step(model, local, batch)
        out["resumed"].append(flat_params(model.module))
    return dict(out)


def _loss(model, batch):
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y)


def _simulate(config, world_size):
    torch.manual_seed(0)
    sim = LocalTrainingSimulation(
        BNMLP(), lambda m: torch.optim.AdamW(m.parameters(), lr=0.01), config, world_size, STEPS
    )
    shards = [rank_batches(k, STEPS) for k in range(world_size)]
    params = []
    for step in range(STEPS):
        sim.step([s[step] for s in shards], _loss)
        params.append([flat_params(m) for m in sim.replicas])
    return params, sim.stats.bytes_averaged


CASES = {
    "2-int8-ef-nesterov": (2, _config("int8", True, "nesterov"), WHOLE),
    "3-fragments3-int8-ef": (3, _config("int8", True, "none", fragments=3), FRAGMENTS),
    "3-int8-ef": (3, _config("int8", True, "none"), WHOLE),
    "3-fp8-ef-nesterov": (3, _config("fp8", True, "nesterov"), WHOLE),
    "2-bf16-sgd": (2, _config("bf16", False, "sgd"), WHOLE),
    "2-fragments3-bf16-nesterov": (2, _config("bf16", False, "nesterov", fragments=3), FRAGMENTS),
}
# the default run keeps one 2-rank case and one 3-rank case (with fragments), the rest with -m slow (time budget)
SLOW = ("3-int8-ef", "3-fp8-ef-nesterov", "2-bf16-sgd", "2-fragments3-bf16-nesterov")


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW else c for c in CASES])
def test_compressed_average_in_flight_is_the_simulation_bitwise(case, tmp_path, one_thread):
    world_size, config, expected = CASES[case]
    results = run_distributed(_run, world_size=world_size, tmp=str(tmp_path), config=config)
    simulated, simulated_bytes = _simulate(config, world_size)
    for k, r in enumerate(results):
        assert r["in_flight"] == expected.in_flight
        for step in range(STEPS):
            assert torch.equal(r["params"][step], simulated[step][k]), f"rank {k}, step {step + 1}: not the simulation"
        assert r["bytes"] == simulated_bytes, "bytes recorded: each fragment's own wire buffer"
        assert r["default_group"] == expected.default_group, r["default_group"]
        assert r["worker_group"] == expected.worker_group, "the worker's group: its exchanges, nothing else"
        assert r["collectives"]["all_to_all_single"] == r["collectives"]["all_gather_single"] == expected.exchanges
        # the anchor and (error feedback) the residual change at a fold, when the average is committed
        for step in range(1, STEPS):
            moved = not torch.equal(r["anchor"][step], r["anchor"][step - 1])
            assert moved == (step + 1 in expected.folded), f"rank {k}: the anchor moved after step {step + 1}"
            if r["residual"][step] is not None:
                changed = not torch.equal(r["residual"][step], r["residual"][step - 1])
                assert changed == (step + 1 in expected.folded), f"rank {k}: residual after step {step + 1}"
        assert r["pending_at_cut"]
        for step, (continued, resumed) in enumerate(zip(r["continued"], r["resumed"], strict=True), CUT + 1):
            assert torch.equal(continued, resumed), f"rank {k}, step {step}: the resume differs"
    if config.qsr_outer_optimizer == "none":  # the first average against the codec written out in the test
        numel, size = results[0]["segment0"]
        sent, folded = expected.first
        anchor = results[0]["anchor"][sent - 1][:numel]  # the start: nothing folded before
        fmt = config.qsr_compress_format
        deltas = [
            reference_round_trip(F.pad(r["values"][sent - 1][:numel] - anchor, (0, size - numel)), fmt)
            for r in results
        ]
        total = deltas[0].clone()
        for d in deltas[1:]:
            total += d  # fp32, rank order
        reference = anchor + reference_round_trip(total / world_size, fmt)[:numel]
        for r in results:
            assert torch.equal(r["anchor"][folded - 1][:numel], reference), "not the reference mean of the codec"
    for r in results[1:]:
        for step in expected.folded:
            assert torch.equal(r["anchor"][step - 1], results[0]["anchor"][step - 1]), f"anchors differ at {step}"
        assert not torch.equal(r["params"][4], results[0]["params"][4]), "a fold keeps each rank's local change"
        assert torch.equal(r["params"][-1], results[0]["params"][-1]), "training ends on a blocking average"
        assert torch.equal(r["resumed"][-1], results[0]["resumed"][-1])


@pytest.mark.slow  # 11 s; the depth's measurement reads the flight's `arrived`, the rest is OverlappedSync's own
def test_automatic_depth_with_compression(tmp_path):
    # measured times (loopback): every rank chooses the same depth; the anchors agree after every sync
    results = run_distributed(_run, world_size=2, tmp=str(tmp_path), config=_config("int8", True, "none", auto=True))
    assert results[0]["depth"] == results[1]["depth"] and not results[0]["depth"]["auto"]
    for step in range(STEPS):
        assert torch.equal(results[0]["anchor"][step], results[1]["anchor"][step]), f"step {step + 1}"
    assert torch.equal(results[0]["params"][-1], results[1]["params"][-1])


def _ends_early(rank, world_size):
    from test_faults import _error, _run_and_close, _setup

    out = {}
    config = _config("int8", False, "none")
    # rank 1 runs one step fewer; ends 4 steps early at a round end; ends with an average in flight (step 6 of 10)
    for case, steps, total in [
        ("fewer_steps", 9 - rank, 9),
        ("ends_early", 9 - 4 * rank, 9),
        ("in_flight", 10 - 4 * rank, 10),
    ]:
        ddp, _, local = _setup(config, total)
        out[case] = _error(_run_and_close, ddp, local, rank_batches(rank, steps))
    return out


@pytest.mark.slow  # three runs; the end checks are the overlap's (test_faults.py), this adds the worker thread
def test_a_rank_that_ends_early_stops_every_rank_with_averages_in_flight():
    # the compressed averages in flight complete on the worker's group (both ranks started them); the rank that ends
    # early then meets the other's next sync in the agreement exchange: every rank stops, naming it, none hangs
    for r in run_distributed(_ends_early, world_size=2, timeout=120):
        for case, error in r.items():
            assert error is not None and "disagree at different synchronization points" in error, (case, error)
