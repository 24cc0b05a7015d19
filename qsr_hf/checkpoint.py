"""Per-rank local state files, shared by the Trainer callback and the Accelerate wrapper.

Trainer and ``accelerator.save_state`` keep rank 0's optimizer state only. With local optimizers every rank's state
differs, so each rank writes ``qsr_state_rank{r}.pt`` (like Trainer's ``rng_state_{r}.pth``) into the checkpoint
folder: its optimizer state and the schedule position.
"""

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from qsr_hf.logging_utils import get_logger


logger = get_logger(__name__)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def rank_state_path(directory: str | os.PathLike, rank: int | None = None) -> Path:
    """Path of a rank's state file in ``directory`` (this process's rank by default)."""
    return Path(directory) / f"qsr_state_rank{_rank() if rank is None else rank}.pt"


def save_rank_state(directory: str | os.PathLike, state: dict[str, Any]) -> str:
    """Write this rank's ``state`` to ``directory/qsr_state_rank{r}.pt`` (atomically) and return the path."""
    path = rank_state_path(directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return str(path)


def load_rank_state(directory: str | os.PathLike) -> dict[str, Any] | None:
    """Read this rank's state from ``directory``; `None`, with a warning saying what is reset, if there is none."""
    path = rank_state_path(directory)
    if not path.is_file():
        logger.warning(
            f"qsr_hf: no {path.name} in {directory} (a checkpoint from another kind of run?): this rank's local "
            "optimizer state and the sync schedule position are not restored; the schedule restarts from the "
            "checkpoint's step with rank 0's optimizer state"
        )
        return None
    return torch.load(path, map_location="cpu", weights_only=False)
