"""Agreement checks: before anything is averaged, the ranks compare a few integers in one tiny collective.

Local steps remove data-parallel training's per-step lockstep, and with it the loud failure DDP gives when ranks
drift apart: two ranks at different steps would pair their collectives and average different things, or hang. So
every synchronization point (start of training, each sync, the end) first all-gathers one small int64 vector per
rank over the default (WORLD) group: what kind of point it is, the optimizer step, the rounds done, this round's H,
the total steps, fingerprints of the QSR config and of the averaged tensors' layout, the world size, and a few
point-specific values (a non-finite flag, a parameter checksum, the resume status). Every rank gets the same rows,
so on a difference every rank raises the same `RuntimeError`, naming the ranks and the values that differ.
"""

import hashlib
from collections.abc import Iterable, Sequence
from enum import IntEnum

import torch
import torch.distributed as dist


class SyncPoint(IntEnum):
    """The kind of a synchronization point (the first agreement value; its ``label`` names it in messages)."""

    START = 0
    ROUND_END = 1
    EXTRA_SYNC = 2
    END = 3
    RESUME = 4
    SAVE = 5
    FRAGMENT_SYNC = 6

    @property
    def label(self) -> str:
        """The point's name in messages ("round end")."""
        return _LABELS[self]


_LABELS = {
    SyncPoint.START: "start of training",
    SyncPoint.ROUND_END: "round end",
    SyncPoint.EXTRA_SYNC: "extra sync",
    SyncPoint.END: "end of training",
    SyncPoint.RESUME: "resume",
    SyncPoint.SAVE: "checkpoint save",
    SyncPoint.FRAGMENT_SYNC: "fragment sync",
}
START, ROUND_END, EXTRA_SYNC, END, RESUME, SAVE, FRAGMENT_SYNC = SyncPoint  # the members, by their short names
COMMON = [
    "synchronization point",
    "optimizer step",
    "rounds done",
    "round length H",
    "total steps",
    "QSR config fingerprint",
    "averaged tensors' layout fingerprint",
    "world size",
]
_SLOTS = len(COMMON) + 6
_MASK = (1 << 62) - 1


def digest(data: bytes | Iterable[bytes]) -> int:
    """A 62-bit sha256 digest of ``data`` (fits an int64 slot; equal across processes, unlike ``hash()``)."""
    h = hashlib.sha256()
    for chunk in [data] if isinstance(data, bytes) else data:
        h.update(chunk)
    return int.from_bytes(h.digest()[:8], "big") & _MASK


def layout_fingerprint(tensors: Sequence[torch.Tensor]) -> int:
    """Digest of the shapes and dtypes of ``tensors``, in order: ranks must average the same layout."""
    return digest(repr([(tuple(t.shape), str(t.dtype)) for t in tensors]).encode())


def tensors_checksum(tensors: Sequence[torch.Tensor]) -> int:
    """Digest of the bytes of ``tensors`` (exact: any differing bit changes it). Reads every byte once (CPU copy)."""
    local = (t.to_local() if hasattr(t, "to_local") else t for t in tensors)  # a DTensor: this rank's shard
    return digest(t.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy().tobytes() for t in local)


@torch.no_grad()
def all_finite(flats: Sequence[torch.Tensor]) -> bool:
    """Whether every value of the flat buffers is finite.

    One fp32 sum per buffer (NaN/inf propagate into it; one vectorised read pass, far cheaper than ``isfinite`` or a
    float64 sum); only when a sum is not finite, which finite values can also give by overflowing, is the buffer
    checked element by element. So the answer is exact and the common case costs one read of the buffer.
    """
    for flat in flats:
        total = flat.sum(dtype=torch.float32) if flat.is_floating_point() else None
        if total is not None and not bool(torch.isfinite(total)) and not bool(torch.isfinite(flat).all()):
            return False
    return True


def _device() -> torch.device:
    backend = str(dist.get_backend())
    if "gloo" in backend or backend == "mpi":
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def exchange(common: Sequence[int], local: Sequence[int] = ()) -> list[list[int]]:
    """All-gather ``common`` + ``local`` from every rank (one collective over WORLD); raise if ``common`` differs.

    Args:
        common (`Sequence[int]`): the `COMMON` values, in order; they must be equal on every rank.
        local (`Sequence[int]`, *optional*): up to 6 point-specific values the caller interprets.

    Returns:
        `list[list[int]]`: each rank's ``local`` values, indexed by rank (the same list on every rank).

    Raises:
        `RuntimeError`: on every rank, with the same text, when any ``common`` value differs between ranks.
    """
    if len(common) != len(COMMON) or len(local) > _SLOTS - len(COMMON):
        raise ValueError(f"exchange() takes {len(COMMON)} common and at most {_SLOTS - len(COMMON)} local values")
    row = [*common, *local] + [0] * (_SLOTS - len(common) - len(local))
    mine = torch.tensor(row, dtype=torch.int64, device=_device())
    rows = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    try:
        dist.all_gather(rows, mine)
    except RuntimeError as error:  # another rank is in another collective (gloo: "collective mismatch")
        raise RuntimeError(
            f"qsr_hf: the agreement check at the {_show(0, common[0])} (optimizer step {common[1]}) met another "
            "collective on some rank: the ranks are not at the same point of training (a rank stopped early, e.g. "
            "should_training_stop set on one rank only, or skipped or added optimizer steps). Every rank must run "
            f"the same number of optimizer steps. Backend error: {error}"
        ) from error
    table = [r.tolist() for r in rows]
    differences = [
        f"{name}: " + ", ".join(f"rank {r} = {_show(i, t[i])}" for r, t in enumerate(table))
        for i, name in enumerate(COMMON)
        if len({t[i] for t in table}) > 1
    ]
    if differences:
        kinds = {t[0] for t in table}
        where = f"the {_show(0, kinds.pop())}" if len(kinds) == 1 else "different synchronization points"
        raise RuntimeError(
            f"qsr_hf: the ranks disagree at {where}, so every rank stops here instead of averaging different "
            "things ("
            + "; ".join(differences)
            + "). Every rank must run the same QSR settings, the same number of optimizer steps and the same model; "
            "a rank that skips or adds optimizer steps (uneven data, a per-rank condition around optimizer.step) "
            "breaks the round schedule"
        )
    return [t[len(common) : len(common) + len(local)] for t in table]


def _show(index: int, value: int) -> str:
    return SyncPoint(value).label if index == 0 and value in {int(p) for p in SyncPoint} else str(value)


def require_identical_start(
    checksums: Sequence[int], groups: Sequence[int] | None = None, what: str = "parameters"
) -> None:
    """Refuse to train when the ranks' starting ``what`` differ (``checksums`` from [`tensors_checksum`], by rank).

    ``groups`` (by rank: the first rank of that rank's averaging group) limits the comparison to ranks that average
    the same tensors (FSDP2: the replicas of one shard); `None` compares all ranks. ``what`` names the values
    (the parameters, or the synced state of an outer optimizer) in the message.

    qsr_hf refuses rather than broadcasting rank 0's parameters: a difference means a rank loaded other weights or
    another checkpoint, which a broadcast would hide.

    Raises:
        `RuntimeError`: the same on every rank.
    """
    groups = list(groups) if groups is not None else [0] * len(checksums)
    if any(len({c for c, g in zip(checksums, groups, strict=True) if g == leader}) > 1 for leader in set(groups)):
        raise RuntimeError(
            f"qsr_hf: the ranks start from different {what} (checksums "
            + ", ".join(f"rank {r} = {c}" for r, c in enumerate(checksums))
            + "): a rank loaded other weights or another checkpoint. qsr_hf refuses to train rather than broadcast "
            "rank 0's; start every rank from the same weights (resume every rank from the same checkpoint)"
        )
