"""Fault-tolerant QSR across torchft replica groups (``pip install qsr_hf[ft]``; torchft is imported lazily).

A replica group (one process, or a DDP group of processes) is one QSR worker. Syncs average across the replica
groups that are alive, through torchft's `Manager` and its reconfigurable process group; a replica group that fails
is dropped at the next sync, and one that (re)starts joins at a sync with a live peer's state. See
docs/fault-tolerance.md.
"""

from qsr_hf.ft.manager import is_torchft_available, make_manager
from qsr_hf.ft.optimizer import FTLocalOptimizer, ReplicaSynchronizer


__all__ = ["FTLocalOptimizer", "ReplicaSynchronizer", "is_torchft_available", "make_manager"]
