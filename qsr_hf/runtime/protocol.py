"""`SyncRuntime`: the narrow view of the [`Synchronizer`] that the modules beside it read (checks, sync paths, the
averaged view), so that none of them imports it. They read its parts and call its methods; only the
[`Synchronizer`] writes its own fields."""

from typing import Protocol

import torch

from qsr_hf.core.accounting import SyncStats
from qsr_hf.core.clock import SyncClock
from qsr_hf.core.config import QSRConfig
from qsr_hf.engines.base import Engine
from qsr_hf.sync.agreement import SyncPoint
from qsr_hf.sync.averaging import ParameterAverager
from qsr_hf.sync.compressed import CompressedAverager
from qsr_hf.sync.overlap import OverlappedSync
from qsr_hf.sync.synced_state import SyncedState


class SyncRuntime(Protocol):
    """What the checks, the sync paths and the averaged view need of the runtime (read-only attributes)."""

    @property
    def clock(self) -> SyncClock:
        """The round position."""

    @property
    def config(self) -> QSRConfig:
        """The QSR settings."""

    @property
    def stats(self) -> SyncStats:
        """The run's counters (updated through their ``record_*`` methods)."""

    @property
    def engine(self) -> Engine:
        """The backend adapter."""

    @property
    def averager(self) -> ParameterAverager | CompressedAverager | None:
        """The averager of a sync (`None` in a single-process run)."""

    @property
    def overlap(self) -> OverlappedSync | None:
        """The overlapped sync (``qsr_overlap_sync``), if on."""

    @property
    def synced(self) -> SyncedState | None:
        """The last synced values (outer optimizer, compression), if kept."""

    @property
    def synced_at(self) -> int:
        """Optimizer step of the last whole-model average (-1: none yet)."""

    @property
    def distributed(self) -> bool:
        """Whether there is more than one QSR worker."""

    def local_tensors(self) -> list[torch.Tensor]:
        """This rank's tensors a sync averages."""

    def finish_overlap(self) -> None:
        """Fold in an average still in flight."""

    def sync_now(self) -> bool:
        """Average outside the schedule."""

    def average(self, kind: SyncPoint, commit: bool = True, buckets: list[int] | None = None) -> None:
        """Average now (after the checks)."""

    def after_average(self) -> None:
        """Propagate averaged tensors to where the backend reads them (and count the engine's bytes)."""

    def after_restore(self) -> None:
        """Propagate tensors put back to their local values."""
