"""Backend detection: DDP found (also through the unwrapped model), FSDP refused, single process is local."""

import pytest
import torch
from testing_utils import BNMLP, run_distributed
from torch.nn.parallel import DistributedDataParallel

from qsr_hf import QSRConfig
from qsr_hf.engines import detect_engine, find_wrapper
from qsr_hf.engines.ddp import DDPEngine
from qsr_hf.engines.single_process import SingleProcessEngine
from qsr_hf.synchronizer import Synchronizer


def _detect(rank, world_size, kind):
    model = BNMLP()
    if kind == "fsdp":
        from torch.distributed.fsdp import fully_shard

        fully_shard(model)
        try:
            detect_engine(model)
        except NotImplementedError as e:
            return str(e)
        return None
    ddp = DistributedDataParallel(model)
    found = find_wrapper(model) is ddp
    engine = detect_engine(model)  # the unwrapped model: the wrapper is found among live objects
    compiled = detect_engine(torch.compile(ddp)) if kind == "compiled" else None
    return found, type(engine).__name__, engine.world_size, type(compiled).__name__


def test_ddp_is_found_from_the_unwrapped_model():
    for found, name, world_size, _ in run_distributed(_detect, kind="ddp"):
        assert found and name == DDPEngine.__name__ and world_size == 2


def test_fsdp_is_refused_with_a_clear_error():
    for message in run_distributed(_detect, kind="fsdp"):
        assert message is not None and "does not support FSDP" in message and "DDP" in message


def test_single_process_is_local():
    assert isinstance(detect_engine(BNMLP()), SingleProcessEngine)


def _no_sync_kept(rank, world_size):
    ddp = DistributedDataParallel(BNMLP())
    engine = DDPEngine(ddp)
    engine.disable_gradient_sync()
    with ddp.no_sync():  # what accelerator.accumulate does on non-boundary micro-batches
        pass
    off = not ddp.require_backward_grad_sync
    engine.restore_gradient_sync()
    return off, ddp.require_backward_grad_sync


def test_gradient_sync_stays_off_through_nested_no_sync():
    for off, restored in run_distributed(_no_sync_kept):
        assert off and restored


@pytest.mark.parametrize("kind", ["compiled"])
def test_compiled_ddp_is_unwrapped(kind):
    for _, _, _, compiled in run_distributed(_detect, kind=kind):
        assert compiled == DDPEngine.__name__


def test_optimizer_state_averaging_needs_a_torch_optimizer():
    config = QSRConfig(qsr_rule="constant", qsr_average_optimizer_state=True)
    module = BNMLP()
    with pytest.raises(NotImplementedError, match="qsr_average_optimizer_state=False"):
        Synchronizer(SingleProcessEngine(module), config, 0, 10, optimizer=None)

    class NoStateEngine(SingleProcessEngine):  # what the DeepSpeed adapter declares
        can_average_optimizer_state = False

    with pytest.raises(NotImplementedError, match="NoStateEngine"):
        Synchronizer(NoStateEngine(module), config, 0, 10, torch.optim.SGD(module.parameters(), lr=0.1))
