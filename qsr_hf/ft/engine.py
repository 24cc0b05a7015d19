"""`ReplicaEngine`: one torchft replica group is one QSR worker; syncs average across the live replica groups.

A replica group is one process (an unwrapped model) or a DDP group of processes (a DDP-wrapped model, whose gradient
all-reduce stays on inside the group, as for ``qsr_worker="node"``). Averaging goes through torchft's `Manager`
(`qsr_hf.ft.averaging.ReplicaAverager`), never through the default process group, which is the replica group.
"""

import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from qsr_hf.core.config import QSRConfig
from qsr_hf.engines.base import Engine
from qsr_hf.sync.averaging import AveragerMode


class ReplicaEngine(Engine):
    """Adapter for a torchft replica group.

    Args:
        model (`nn.Module`): the model, or its `DistributedDataParallel` wrapper inside the replica group.
        manager (`torchft.Manager`): this replica group's Manager (see `qsr_hf.ft.make_manager`).
        max_attempts (`int`, defaults to 5): failed commits of one sync before the run stops.
        checkpoint_dir (`str` or `os.PathLike`, *optional*): the job's checkpoints (see [`FTLocalOptimizer`]).

    ``world_size`` is 2 whatever the live count, which only switches the [`Synchronizer`]'s averaging on: a
    fault-tolerant run always averages through the Manager, even while one replica group is alive; the live count of
    each sync is ``qsr/replicas``.
    """

    world_size = 2
    can_average_optimizer_state = False  # a joining replica takes a peer's optimizer state instead (qsr_hf.ft)

    def __init__(
        self, model: nn.Module, manager: Any, max_attempts: int = 5, checkpoint_dir: str | os.PathLike | None = None
    ) -> None:
        super().__init__(model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model)
        self.manager = manager
        self.max_attempts = max_attempts
        self.checkpoint_dir = checkpoint_dir
        if getattr(manager, "_use_async_quorum", False):
            raise ValueError(
                "qsr_hf needs a torchft Manager built with use_async_quorum=False: a joining replica must load its "
                "peer's state before the sync's collectives (qsr_hf.ft.make_manager builds one)"
            )
        if getattr(manager, "qsr_replica_groups", None) is None:
            raise ValueError(
                "qsr_hf needs the torchft Manager built by qsr_hf.ft.make_manager(replica_id, "
                "num_replica_groups=N): it requires a majority of the job's N replica groups in every quorum, so that "
                "two disjoint quorums cannot both commit a sync and end as two models"
            )
        self.replica: int = manager.qsr_replica  # this replica group's number, in each sync's log of members

    def check_config(self, config: QSRConfig) -> None:
        """Refuse what fault-tolerant syncs do not run: overlap, compression, post-local's data-parallel phase."""
        refused = {
            "qsr_overlap_sync": config.qsr_overlap_sync,
            "qsr_compress_delta": config.qsr_compress_delta,
            "qsr_rule='post_local'": config.qsr_rule == "post_local",
            "qsr_worker='node'": config.qsr_worker != "process",
        }
        for name, on in refused.items():
            if on:
                raise NotImplementedError(
                    f"{name} is not supported with torchft replica groups (qsr_hf.ft): a sync is one blocking "
                    "torchft step across replica groups, and a replica group that is a DDP group of processes is "
                    "already one worker; turn it off"
                )

    def make_averager(
        self, tensors: Callable[[], list[torch.Tensor]], fp32_average: bool, mode: AveragerMode, fragments: int = 1
    ) -> Any:
        """Not here: the `qsr_hf.ft.averaging.ReplicaAverager` needs the synchronizer's agreement values and start
        checksum, so [`ReplicaSynchronizer`] builds it."""
        raise NotImplementedError("a ReplicaEngine's averager is built by qsr_hf.ft.optimizer.ReplicaSynchronizer")
