"""What one rank's state file holds (the one place to read it): its optimizer state, its averaged tensors, the
schedule position, the backend's per-rank state and the compression residual (``qsr_compress_error_feedback``: this
rank's own), with the run's world size, step and config fingerprint."""

from typing import Any

import torch
import torch.distributed as dist

from qsr_hf.runtime.synchronizer import Synchronizer
from qsr_hf.sync.compressed import CompressedAverager


def run_meta(synchronizer: Synchronizer) -> dict[str, int]:
    """What a per-rank state file records about the run: world size, optimizer step, config fingerprint."""
    world = dist.get_world_size() if synchronizer.distributed else 1
    step, fingerprint = synchronizer.clock.step, synchronizer.config.fingerprint()
    return {"world_size": world, "step": step, "config_fingerprint": fingerprint}


def local_state(synchronizer: Synchronizer, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Everything this rank needs to resume exactly: its optimizer state, the averaged tensors, the position.

    The tensors are saved too because checkpoints hold rank 0's model in a format that not every model class reloads
    faithfully; with them, resume does not depend on it.
    """
    state = {
        "optimizer": optimizer.state_dict(),
        "qsr": synchronizer.state_dict(),
        "tensors": [t.detach().to("cpu", copy=True) for t in synchronizer.local_tensors()],
    }
    averager = synchronizer.averager
    if isinstance(averager, CompressedAverager) and averager.residual is not None:
        state["compression"] = averager.state_dict()
    engine_state = synchronizer.engine.local_state_dict()
    if engine_state:
        state["engine"] = engine_state
    return state


def load_local_state(synchronizer: Synchronizer, state: dict[str, Any], optimizer: torch.optim.Optimizer) -> None:
    """Restore what [`local_state`] returned on this rank."""
    tensors = synchronizer.local_tensors()
    if len(state["tensors"]) != len(tensors):
        raise ValueError(
            f"the saved QSR state holds {len(state['tensors'])} tensors but this model averages {len(tensors)}: "
            "was it saved from another model or with another qsr_average_buffers?"
        )
    with torch.no_grad():
        for target, saved in zip(tensors, state["tensors"], strict=True):
            target.copy_(saved)
    optimizer.load_state_dict(state["optimizer"])
    if "engine" in state:
        synchronizer.engine.load_local_state_dict(state["engine"])
    synchronizer.after_average()
    synchronizer.load_state_dict(state["qsr"])
    if isinstance(synchronizer.averager, CompressedAverager):
        synchronizer.averager.load_state_dict(state.get("compression"))  # none (elastic): a zero residual
