"""Backend detection: DDP found (also through the unwrapped model), FSDP refused, single process is local."""

import pytest
import torch
from testing_utils import BNMLP, run_distributed
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from qsr_hf import QSRConfig
from qsr_hf.engines import detect_engine, find_wrapper
from qsr_hf.engines.ddp import DDPEngine
from qsr_hf.engines.single_process import SingleProcessEngine
from qsr_hf.runtime.synchronizer import Synchronizer


def _detect(rank, world_size):
    # every multi-process case in one launch (each launch costs seconds of process start-up)
    out = {}
    model = BNMLP()
    fully_shard(model)
    try:
        detect_engine(model)
        out["fsdp"] = None
    except NotImplementedError as e:
        out["fsdp"] = str(e)
    model = BNMLP()
    ddp = DistributedDataParallel(model)
    engine = detect_engine(model)  # the unwrapped model: the wrapper is found among live objects
    out["ddp"] = (find_wrapper(model) is ddp, type(engine).__name__, engine.world_size)
    out["compiled"] = type(detect_engine(torch.compile(ddp))).__name__
    ddp = DistributedDataParallel(BNMLP())
    engine = DDPEngine(ddp)
    engine.disable_gradient_sync()
    with ddp.no_sync():  # what accelerator.accumulate does on non-boundary micro-batches
        pass
    off = not ddp.require_backward_grad_sync
    engine.restore_gradient_sync()
    out["no_sync"] = (off, ddp.require_backward_grad_sync)
    return out


@pytest.fixture(scope="module")
def detected():
    return run_distributed(_detect)


def test_ddp_is_found_from_the_unwrapped_model(detected):
    for r in detected:
        assert r["ddp"] == (True, DDPEngine.__name__, 2)


def test_fsdp_is_refused_with_a_clear_error(detected):
    for r in detected:
        assert r["fsdp"] is not None and "does not support FSDP" in r["fsdp"] and "DDP" in r["fsdp"]


def test_single_process_is_local():
    assert isinstance(detect_engine(BNMLP()), SingleProcessEngine)


def test_gradient_sync_stays_off_through_nested_no_sync(detected):
    for r in detected:
        assert r["no_sync"] == (True, True)


def test_compiled_ddp_is_unwrapped(detected):
    for r in detected:
        assert r["compiled"] == DDPEngine.__name__


def test_optimizer_state_averaging_needs_a_torch_optimizer():
    config = QSRConfig(qsr_rule="constant", qsr_average_optimizer_state=True)
    module = BNMLP()
    with pytest.raises(NotImplementedError, match="qsr_average_optimizer_state=False"):
        Synchronizer(SingleProcessEngine(module), config, 0, 10, optimizer=None)

    class NoStateEngine(SingleProcessEngine):  # what the DeepSpeed adapter declares
        can_average_optimizer_state = False

    with pytest.raises(NotImplementedError, match="NoStateEngine"):
        Synchronizer(NoStateEngine(module), config, 0, 10, torch.optim.SGD(module.parameters(), lr=0.1))
