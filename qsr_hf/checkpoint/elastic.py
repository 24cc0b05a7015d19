"""Elastic resume (``qsr_elastic_resume``): continue from a checkpoint written by N processes on M != N.

Each rank's state file holds that rank's *local* tensors and optimizer state; with another number of processes there
is no one-to-one mapping, so by default a resume is refused (`qsr_hf.checkpoint.files.agree_to_resume`). With the opt-in,
every rank reads all N files from the shared checkpoint folder (each verified as at a plain resume: checksum, rank,
step, config fingerprint, manifest) and builds the same state from them:

- the averaged tensors (parameters, float buffers): the mean of the N saved local tensors, accumulated in float64 in
  rank order and cast back, so every rank starts bitwise from the same model, the average a sync would have made;
- the inner optimizer's state (the rule): floating-point tensors (momentum, Adam moments) are the mean of the N saved
  ones, the same way; step counters and every other value must be equal in the N files (ranks take the same steps);
  ``param_groups`` (lr, ...) are rank 0's, as in the Trainer's ``optimizer.pt``;
- the synced state (outer optimizer anchor and momentum, compression anchor): equal in every file (checked), taken
  as it is, so the next sync's outer step also covers the interrupted round's progress;
- the compression residuals (``qsr_compress_error_feedback``): per rank, no mapping N -> M: reset to zero;
- the schedule: a new round starts at the checkpoint's step (rounds done and counters are rank 0's).

Every rank logs what was reset. Engines that save their own per-rank state (DeepSpeed, node workers, FSDP2 shards)
are refused: their state does not average this way.
"""

import os
from typing import Any

import torch

from qsr_hf.checkpoint.files import OK, FileStatus, ResumeRow, load_rank_state
from qsr_hf.checkpoint.payload import load_local_state
from qsr_hf.core.logging_utils import get_logger, process_rank
from qsr_hf.engines.ddp import DDPEngine
from qsr_hf.engines.single_process import SingleProcessEngine
from qsr_hf.runtime.synchronizer import Synchronizer


logger = get_logger(__name__)


def mean_tensors(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The element-wise mean of ``tensors`` (accumulated in float64 in the given order, cast to their dtype).

    Non-floating tensors must be equal and are returned as they are.

    Raises:
        `ValueError`: non-floating tensors that differ, or shapes that differ.
    """
    first = tensors[0]
    if any(t.shape != first.shape for t in tensors):
        raise ValueError(f"the saved tensors have different shapes {[tuple(t.shape) for t in tensors]}")
    if not first.is_floating_point():
        if any(not torch.equal(t, first) for t in tensors):
            raise ValueError("the saved non-floating tensors differ between ranks")
        return first.clone()
    return torch.stack([t.double() for t in tensors]).mean(dim=0).to(first.dtype)


def _same(values: list[Any], what: str) -> Any:
    first = values[0]
    equal = (lambda a: torch.equal(a, first)) if isinstance(first, torch.Tensor) else (lambda a: a == first)
    if any(type(v) is not type(first) or not equal(v) for v in values):
        raise ValueError(f"{what} differs between the saved ranks ({values}); it must be equal to average the states")
    return first


def mean_optimizer_state(states: list[dict[str, Any]]) -> dict[str, Any]:
    """Merge N saved ``torch.optim.Optimizer.state_dict()`` s into one: floating tensors averaged ([`mean_tensors`]),
    ``step`` and every other value equal in all N (checked), ``param_groups`` from the first.

    Raises:
        `ValueError`: naming the parameter and key that cannot be merged.
    """
    merged: dict[str, Any] = {}
    for index in states[0]["state"]:
        per_param = [s["state"].get(index) for s in states]
        if any(p is None or p.keys() != per_param[0].keys() for p in per_param):
            raise ValueError(f"the saved optimizer states of parameter {index} have different keys (or none)")
        merged[index] = {}
        for key in per_param[0]:
            values = [p[key] for p in per_param]
            averaged = key != "step" and isinstance(values[0], torch.Tensor) and values[0].is_floating_point()
            where = f"optimizer state {key!r} of parameter {index}"
            merged[index][key] = mean_tensors(values) if averaged else _same(values, where)
    if any(s["state"].keys() != states[0]["state"].keys() for s in states):
        raise ValueError("the saved optimizer states hold state for different parameters")
    return {"state": merged, "param_groups": states[0]["param_groups"]}


def _synced(states: list[dict[str, Any]], synchronizer: Synchronizer) -> dict[str, torch.Tensor]:
    saved = [s["qsr"].get("synced", {}) for s in states]
    for name in saved[0]:
        _same([s[name] for s in saved], f"the synced {name} (outer optimizer / compression)")
    synced = dict(saved[0])
    if synchronizer.synced is not None and "anchor" in synced:
        # the compressed averager pads the anchor to a multiple of the world size: keep the values, re-pad
        mine, values = synchronizer.synced.anchor, synced["anchor"][: synchronizer.synced.numel]
        synced["anchor"] = torch.cat([values, values.new_zeros(mine.numel() - values.numel())])
    return synced


def _read_all(directory: str | os.PathLike, saved: int, expected: dict[str, int | None]) -> list[dict[str, Any]]:
    states = []
    for rank in range(saved):
        loaded = load_rank_state(directory, expected, rank)
        if loaded.status != OK or loaded.world_size != saved:
            reason = loaded.reason or f"it was written by {loaded.world_size} processes, not {saved}"
            raise RuntimeError(
                f"qsr_hf: cannot resume elastically from {directory}: every one of its {saved} state files must be "
                f"valid, and rank {rank}'s is {FileStatus(loaded.status).label} ({reason})"
            )
        states.append(loaded.state)
    steps = {s["qsr"]["clock"]["step"] for s in states}
    if len(steps) != 1:
        raise RuntimeError(f"qsr_hf: cannot resume elastically from {directory}: its files hold steps {steps}")
    if any("engine" in s for s in states):
        raise NotImplementedError(
            f"qsr_hf: {directory} holds backend state (DeepSpeed, node workers or FSDP2): elastic resume "
            "(qsr_elastic_resume) supports DDP runs only; resume with the same number of processes"
        )
    return states


def resume_resized(
    synchronizer: Synchronizer, directory: str | os.PathLike, optimizer: Any, step: int | None, rows: list[ResumeRow]
) -> bool:
    """Resume from a checkpoint of another number of processes, if every rank opted in (``qsr_elastic_resume``).

    Args:
        synchronizer ([`Synchronizer`]): the run's synchronizer.
        directory (`str` or `os.PathLike`): the checkpoint folder (shared: every rank reads every file).
        optimizer (`torch.optim.Optimizer`): the optimizer whose state is set.
        step (`int`, *optional*): the checkpoint's optimizer step (the Trainer's), checked against the files.
        rows (`list[ResumeRow]`): per rank, its file status, saved world size and ``qsr_elastic_resume`` (gathered).

    Returns:
        `bool`: True when resumed here; False when the world size is unchanged or no rank opted in (then the
        default path, which refuses another world size).

    Raises:
        `RuntimeError`: on every rank, when only some ranks opted in, or a file is missing or invalid.
        `NotImplementedError`: for engines other than DDP, or a checkpoint with backend state.
    """
    world, saved = len(rows), max(row.world_size for row in rows)
    opted = [r for r, row in enumerate(rows) if row.elastic]
    if saved in (-1, world) or not opted:
        return False
    if len(opted) != world:
        raise RuntimeError(
            f"qsr_hf: cannot resume from {directory} ({saved} processes) on {world}: qsr_elastic_resume is set on "
            f"ranks {opted} only; set it on every rank or on none"
        )
    if type(synchronizer.engine) not in (DDPEngine, SingleProcessEngine):
        raise NotImplementedError(
            f"qsr_elastic_resume supports DDP runs only, not {type(synchronizer.engine).__name__}: resume with "
            f"{saved} processes"
        )
    states = _read_all(directory, saved, {"config_fingerprint": synchronizer.config.fingerprint(), "step": step})
    clock = states[0]["qsr"]["clock"]
    step = clock["step"]
    merged = {
        "tensors": [mean_tensors(list(ts)) for ts in zip(*(s["tensors"] for s in states), strict=True)],
        "optimizer": mean_optimizer_state([s["optimizer"] for s in states]),
        "qsr": {
            "clock": {**clock, "round_start": step, "round_length": 0},  # a new round starts here
            "stats": states[0]["qsr"]["stats"],
            "synced_at": step,  # every rank now holds the same tensors
            "synced": _synced(states, synchronizer),
        },
    }
    load_local_state(synchronizer, merged, optimizer)
    rank = process_rank()
    own = f"its own saved state (rank {rank}) was one of the {saved}" if rank < saved else "it had no saved state"
    ended = f"started at step {clock['round_start']}, H = {clock['round_length']}" if clock["round_length"] else "none"
    logger.warning(
        f"qsr_hf: rank {rank}: elastic resume from {directory}, written by {saved} processes, on {world} "
        f"(qsr_elastic_resume): parameters and float buffers reset to the mean of the {saved} saved local models; "
        f"optimizer state reset to the mean of the {saved} saved states (floating tensors averaged, step counters "
        f"equal); the round in progress ({ended}) ends and a new round starts at step {step}"
        + ("; synced state (outer optimizer / compression anchor) kept" if merged["qsr"]["synced"] else "")
        + ("; compression residuals (error feedback) reset to zero" if "compression" in states[0] else "")
        + f"; {own}",
        main_process_only=False,
    )
    return True
