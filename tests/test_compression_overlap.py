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

import pytest
import torch
from accelerate import Accelerator
from test_compression import _model_and_optimizer, _step
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
IN_FLIGHT = [False, False, True, True, False, True, True, False, True, False]  # after each step
FOLDED = (5, 8, 10)


def _config(fmt, feedback, outer, auto=False):
    return QSRConfig(
        qsr_rule="constant", qsr_h_base=H, qsr_overlap_sync=True, qsr_overlap_steps=K, qsr_overlap_auto=auto,
        qsr_compress_delta=True, qsr_compress_format=fmt, qsr_compress_error_feedback=feedback,
        qsr_outer_optimizer=outer,
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
            out["residual"].append(None if averager.residual is None else averager.residual.clone())
    out["collectives"] = collections.Counter(name for name, _ in log)
    out["worker_group"] = averager._worker.group._get_sequence_number_for_group()
    out["depth"] = sync.overlap.state_dict()
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
    return params


CASES = {
    "2-int8-ef-nesterov": (2, _config("int8", True, "nesterov")),
    "3-int8-ef": (3, _config("int8", True, "none")),
    "3-fp8-ef-nesterov": (3, _config("fp8", True, "nesterov")),
    "2-bf16-sgd": (2, _config("bf16", False, "sgd")),
    "3-bf16": (3, _config("bf16", False, "none")),
}
SLOW = ("3-fp8-ef-nesterov", "2-bf16-sgd", "3-bf16")  # the default run keeps one 2-rank and one 3-rank case


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW else c for c in CASES])
def test_compressed_average_in_flight_is_the_simulation_bitwise(case, tmp_path, one_thread):
    world_size, config = CASES[case]
    results = run_distributed(_run, world_size=world_size, tmp=str(tmp_path), config=config)
    simulated = _simulate(config, world_size)
    for k, r in enumerate(results):
        assert r["in_flight"] == IN_FLIGHT
        for step in range(STEPS):
            assert torch.equal(r["params"][step], simulated[step][k]), f"rank {k}, step {step + 1}: not the simulation"
        # the main thread's group: one agreement exchange per sync started, none at a fold; the last step folds
        # (no collective), then averages blocking: its exchange, the all-to-all and the all-gather
        assert r["default_group"] == [0, 0, 1, 0, 0, 1, 0, 0, 1, 3], r["default_group"]
        # the worker's group: the all-to-all and the all-gather of each average in flight, nothing else
        assert r["worker_group"] == 2 * 3
        assert r["collectives"]["all_to_all_single"] == r["collectives"]["all_gather_single"] == 4
        # the anchor and (error feedback) the residual change at the fold, when the average is committed
        for step in range(1, STEPS):
            moved = not torch.equal(r["anchor"][step], r["anchor"][step - 1])
            assert moved == (step + 1 in FOLDED), f"rank {k}: the anchor moved after step {step + 1}: {moved}"
            if r["residual"][step] is not None:
                changed = not torch.equal(r["residual"][step], r["residual"][step - 1])
                assert changed == (step + 1 in FOLDED), f"rank {k}: residual after step {step + 1}"
        assert r["pending_at_cut"]
        for step, (continued, resumed) in enumerate(zip(r["continued"], r["resumed"], strict=True), CUT + 1):
            assert torch.equal(continued, resumed), f"rank {k}, step {step}: the resume differs"
    for r in results[1:]:
        for step in FOLDED:
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
