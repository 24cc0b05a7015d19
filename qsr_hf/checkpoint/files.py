"""The per-rank state file format and the manifest, shared by the Trainer callback and the Accelerate wrapper.

Trainer and ``accelerator.save_state`` keep rank 0's optimizer state only. With local optimizers every rank's state
differs, so each rank writes ``qsr_state_rank{r}.pt`` (like Trainer's ``rng_state_{r}.pth``) into the checkpoint
folder: its optimizer state, its averaged tensors and the schedule position.

Each file is an envelope that records the rank, the world size, the optimizer step, the QSR config fingerprint and a
sha256 of the payload; it is read with ``torch.load(weights_only=True)`` (no pickle code runs). Once every rank has
written its file, every rank writes the same ``qsr_manifest.json`` (world size, step, each rank's digest) by
write-then-rename: a folder without a manifest is an interrupted save and is refused at resume.
"""

import io
import json
import os
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any, NamedTuple

import torch

from qsr_hf.core.logging_utils import get_logger, process_rank
from qsr_hf.sync.agreement import digest


logger = get_logger(__name__)


FORMAT = 2
MANIFEST = "qsr_manifest.json"


class FileStatus(IntEnum):
    """What one rank found of its state file in a checkpoint folder (its ``label`` says it in messages)."""

    OK = 0
    MISSING = 1
    INVALID = 2
    INCOMPLETE = 3

    @property
    def label(self) -> str:
        """How a message names the status."""
        return ("valid", "missing", "invalid", "from an interrupted save (no qsr_manifest.json)")[self]


OK, MISSING, INVALID, INCOMPLETE = FileStatus


class ResumeRow(NamedTuple):
    """One rank's answer in the resume agreement (gathered from every rank)."""

    status: FileStatus
    world_size: int  # the world size its checkpoint was written with (-1: unknown)
    elastic: int  # 1 when this rank set qsr_elastic_resume


def rank_state_path(directory: str | os.PathLike, rank: int | None = None) -> Path:
    """Path of a rank's state file in ``directory`` (this process's rank by default)."""
    return Path(directory) / f"qsr_state_rank{process_rank() if rank is None else rank}.pt"


def _replace_atomically(path: Path, write: Any) -> None:
    tmp = path.with_name(f"{path.name}.tmp{process_rank()}")
    write(tmp)
    os.replace(tmp, path)


def save_rank_state(directory: str | os.PathLike, state: dict[str, Any], meta: dict[str, int]) -> tuple[str, int]:
    """Write this rank's ``state`` to ``directory/qsr_state_rank{r}.pt`` (write-then-rename).

    Args:
        directory (`str` or `os.PathLike`): the checkpoint folder.
        state (`dict`): plain tensors and containers (what ``torch.load(weights_only=True)`` reads back).
        meta (`dict[str, int]`): ``world_size``, ``step`` and ``config_fingerprint``, recorded in the file.

    Returns:
        `tuple[str, int]`: the path and the payload's 62-bit digest (the manifest lists every rank's).
    """
    path = rank_state_path(directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    envelope = {"format": FORMAT, "rank": process_rank(), **meta, "digest": digest(payload), "payload": payload}
    _replace_atomically(path, lambda tmp: torch.save(envelope, tmp))
    return str(path), envelope["digest"]


def write_manifest(directory: str | os.PathLike, meta: dict[str, int], digests: list[int]) -> None:
    """Mark the checkpoint complete: every rank's file is written (call after all ranks saved; same on every rank)."""
    text = json.dumps({"format": FORMAT, **meta, "digests": digests}, sort_keys=True)
    _replace_atomically(Path(directory) / MANIFEST, lambda tmp: tmp.write_text(text))


def read_state_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read the payload of a state file written by [`save_rank_state`] (``torch.load(weights_only=True)``), checking
    its checksum; no rank or manifest check (see [`load_rank_state`] for those).

    Raises:
        `ValueError`: the file is not a qsr_hf state file or its checksum does not match (naming the file).
    """
    envelope = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(envelope, dict) or envelope.get("format") != FORMAT:
        raise ValueError(f"{path} is not a qsr_hf v{FORMAT} state file")
    if digest(envelope["payload"]) != envelope["digest"]:
        raise ValueError(f"{path}: its checksum does not match its content (the file is corrupted)")
    return torch.load(io.BytesIO(envelope["payload"]), map_location="cpu", weights_only=True)


@dataclass
class LoadedState:
    """What one rank found in a checkpoint folder.

    Args:
        status ([`FileStatus`]): ``OK``, ``MISSING``, ``INVALID`` or ``INCOMPLETE``.
        state (`dict`, *optional*): the payload when ``status == OK``.
        world_size (`int`): the world size the checkpoint was written with (-1 if unknown).
        reason (`str`): why it is not valid, naming the file.
    """

    status: FileStatus
    state: dict[str, Any] | None = None
    world_size: int = -1
    reason: str = field(default="")


def _read_manifest(directory: Path) -> dict[str, Any] | None:
    try:
        return json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def load_rank_state(
    directory: str | os.PathLike, expected: dict[str, int | None], rank: int | None = None
) -> LoadedState:
    """Read and verify rank ``rank``'s state file in ``directory`` (this process's by default).

    Args:
        directory (`str` or `os.PathLike`): the checkpoint folder.
        expected (`dict`): ``config_fingerprint`` and ``step`` (`None`: not checked) the file must record.
        rank (`int`, *optional*): whose file; defaults to this process's rank.

    Returns:
        [`LoadedState`]: the payload, or the status and a reason naming the file.
    """
    directory, rank = Path(directory), process_rank() if rank is None else rank
    path = rank_state_path(directory, rank)
    manifest = _read_manifest(directory)
    saved_world = int(manifest["world_size"]) if manifest else -1
    if not path.is_file():
        return LoadedState(MISSING, world_size=saved_world, reason=f"{path} does not exist")
    try:
        envelope = torch.load(path, map_location="cpu", weights_only=True)
        ok = isinstance(envelope, dict) and envelope.get("format") == FORMAT
    except Exception as error:  # noqa: BLE001 — a truncated or foreign file: report it, every rank then stops
        return LoadedState(INVALID, world_size=saved_world, reason=f"{path} cannot be read ({error})")
    if not ok:
        return LoadedState(INVALID, world_size=saved_world, reason=f"{path} is not a qsr_hf v{FORMAT} state file")
    saved_world = int(envelope["world_size"])
    problems = []
    if digest(envelope["payload"]) != envelope["digest"]:
        problems.append("its checksum does not match its content (the file is corrupted)")
    if envelope["rank"] != rank:
        problems.append(f"it holds rank {envelope['rank']}'s state, not rank {rank}'s (copied or renamed?)")
    if expected.get("step") is not None and envelope["step"] != expected["step"]:
        problems.append(f"it was saved at optimizer step {envelope['step']}, the checkpoint is at {expected['step']}")
    if envelope["config_fingerprint"] != expected["config_fingerprint"]:
        problems.append("it was saved with other QSR settings (config fingerprint differs): resume with the same ones")
    if not problems and manifest is None:
        return LoadedState(INCOMPLETE, world_size=saved_world, reason=f"{directory / MANIFEST} does not exist")
    digests = manifest["digests"] if manifest else []
    if not problems and envelope["rank"] < len(digests) and digests[envelope["rank"]] != envelope["digest"]:
        problems.append(f"it is not the file {directory / MANIFEST} lists (left from another save?)")
    if problems:
        return LoadedState(INVALID, world_size=saved_world, reason=f"{path}: " + "; ".join(problems))
    state = torch.load(io.BytesIO(envelope["payload"]), map_location="cpu", weights_only=True)
    return LoadedState(OK, state=state, world_size=saved_world)


def agree_to_resume(directory: str | os.PathLike, rows: list[ResumeRow], world_size: int) -> bool:
    """Decide, identically on every rank, from each rank's [`ResumeRow`], whether to resume.

    Args:
        directory (`str` or `os.PathLike`): the checkpoint folder (for the message).
        rows (`list[ResumeRow]`): per rank, what [`load_rank_state`] found (gathered by one collective).
        world_size (`int`): this run's number of processes.

    Returns:
        `bool`: True when every rank has a valid file; False when none has one (a checkpoint of a run without
        qsr_hf: every rank falls back together, with a warning).

    Raises:
        `RuntimeError`: the same on every rank: another world size, or some ranks' files missing or invalid.
    """
    saved_worlds = sorted({row.world_size for row in rows if row.world_size > 0})
    if saved_worlds and saved_worlds != [world_size]:
        saved = saved_worlds[0]
        lost = (
            f"would drop the local optimizer state (momentum, Adam moments) of ranks {list(range(world_size, saved))}"
            if saved > world_size
            else f"would leave ranks {list(range(saved, world_size))} without local optimizer state"
        )
        raise RuntimeError(
            f"qsr_hf: cannot resume from {directory}: it was written by {saved} processes and this run has "
            f"{world_size}; each rank's optimizer state is its own, so resuming {lost}. Resume with {saved} processes"
        )
    if all(row.status == MISSING for row in rows):
        logger.warning(
            f"qsr_hf: no rank has a qsr_state_rank*.pt in {directory} (a checkpoint of a run without qsr_hf?): the "
            "local optimizer states and the schedule position are not restored; every rank restarts the schedule at "
            "the checkpoint's step with the optimizer state already loaded"
        )
        return False
    if any(row.status != OK for row in rows):
        raise RuntimeError(
            f"qsr_hf: cannot resume from {directory}: every rank needs its own valid state file, and "
            + ", ".join(f"rank {r}'s is {FileStatus(row.status).label}" for r, row in enumerate(rows))
            + " (each rank logged why). Resume from another, complete checkpoint"
        )
    return True


def newest_checkpoint(root: str | os.PathLike, expected: dict[str, int]) -> tuple[Path, int] | None:
    """The newest complete qsr_hf checkpoint in ``root`` or a folder below it (one with a ``qsr_manifest.json``),
    written with ``expected``'s ``world_size`` and ``config_fingerprint``; ties on the step go to the first path in
    sorted order, so that every process scanning the same folders picks the same one.

    Returns:
        `tuple[Path, int]` or `None`: the folder and its manifest's digest (the checkpoint's identity), or `None`.
    """
    found = []
    for manifest_path in sorted(Path(root).rglob(MANIFEST)):
        manifest = _read_manifest(manifest_path.parent)
        keys = ("world_size", "config_fingerprint")
        if manifest is None or any(manifest.get(k) != expected[k] for k in keys):
            logger.warning(f"qsr_hf: {manifest_path} is unreadable or from another run's settings: skipped")
            continue
        found.append((-int(manifest["step"]), str(manifest_path.parent), digest(manifest_path.read_bytes())))
    if not found:
        return None
    _, folder, identity = min(found)
    return Path(folder), identity
