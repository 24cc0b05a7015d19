"""Save and restore every rank's local state: the resume agreement (one collective), then each rank's file."""

import os
from typing import Any

from qsr_hf.checkpoint.elastic import resume_resized
from qsr_hf.checkpoint.files import (
    FileStatus,
    ResumeRow,
    agree_to_resume,
    load_rank_state,
    save_rank_state,
    write_manifest,
)
from qsr_hf.checkpoint.payload import load_local_state, local_state, run_meta
from qsr_hf.core.logging_utils import get_logger, process_rank
from qsr_hf.runtime.checks import agreement_values
from qsr_hf.runtime.synchronizer import Synchronizer
from qsr_hf.sync.agreement import RESUME, SAVE, exchange


logger = get_logger(__name__)


def save_local_state(synchronizer: Synchronizer, directory: str | os.PathLike, optimizer: Any) -> str:
    """Write this rank's state file into ``directory``; once every rank has (one collective that also checks that the
    ranks agree), write the manifest that marks the checkpoint complete. Call on every rank.

    Args:
        synchronizer ([`Synchronizer`]): the run's synchronizer.
        directory (`str` or `os.PathLike`): the checkpoint folder.
        optimizer (`torch.optim.Optimizer`): the optimizer whose (local) state is saved.

    Returns:
        `str`: the path of this rank's file.
    """
    synchronizer.finish_overlap()  # an average in flight is folded in first: the file holds its result
    meta = run_meta(synchronizer)
    path, file_digest = save_rank_state(directory, local_state(synchronizer, optimizer), meta)
    digests = [file_digest]
    if synchronizer.distributed:
        digests = [row[0] for row in exchange(agreement_values(synchronizer, SAVE), [file_digest])]
    write_manifest(directory, meta, digests)
    return path


def restore_local_state(
    synchronizer: Synchronizer, directory: str | os.PathLike, optimizer: Any, step: int | None = None
) -> bool:
    """Load every rank's state file from ``directory``, or none: the ranks first agree (one collective) that each has
    a valid one. Each rank logs why its own file is not valid.

    Args:
        synchronizer ([`Synchronizer`]): the run's synchronizer.
        directory (`str` or `os.PathLike`): the checkpoint folder.
        optimizer (`torch.optim.Optimizer`): the optimizer whose state is restored.
        step (`int`, *optional*): the checkpoint's optimizer step (the Trainer's), checked against the files.

    Returns:
        `bool`: True if restored; False when no rank has a file (a checkpoint of a run without qsr_hf): then every
        rank restarts the schedule at ``step`` with the optimizer state already loaded, with a warning.

    Raises:
        `RuntimeError`: on every rank, when some rank's file is missing, invalid or from an interrupted save, or the
            checkpoint was written by another number of processes (unless ``qsr_elastic_resume``: `qsr_hf.checkpoint.elastic`).
    """
    meta = run_meta(synchronizer)
    loaded = load_rank_state(directory, {"config_fingerprint": meta["config_fingerprint"], "step": step})
    if loaded.reason:
        logger.warning(f"qsr_hf: rank {process_rank()}: {loaded.reason}", main_process_only=False)
    mine = ResumeRow(loaded.status, loaded.world_size, int(synchronizer.config.qsr_elastic_resume))
    rows = [mine]
    if synchronizer.distributed:
        rows = [ResumeRow(FileStatus(s), w, e) for s, w, e in exchange(agreement_values(synchronizer, RESUME), mine)]
    if resume_resized(synchronizer, directory, optimizer, step, rows):
        return True
    if not agree_to_resume(directory, rows, meta["world_size"]):
        synchronizer.restart_at(step or 0)  # the checkpoint's (averaged) model, the same on every rank
        return False
    load_local_state(synchronizer, loaded.state, optimizer)
    return True
