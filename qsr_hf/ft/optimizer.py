"""`FTLocalOptimizer`: QSR across torchft replica groups, for Accelerate and plain torch loops.

The [`ReplicaSynchronizer`] is the [`Synchronizer`] with three differences: its syncs are torchft steps
(`qsr_hf.ft.averaging`); it hands its state to a joining replica through the Manager (the state a peer sends: schedule
position, counters, synced state of an outer optimizer, the inner optimizer's state, the data position); and the
start of training is a sync (a quorum), where a replica that is behind the others receives a live peer's state.
"""

import copy
import functools
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from qsr_hf.checkpoint.files import newest_checkpoint
from qsr_hf.checkpoint.payload import run_meta
from qsr_hf.checkpoint.resume import restore_local_state
from qsr_hf.core.config import QSRConfig
from qsr_hf.core.logging_utils import get_logger
from qsr_hf.frontends.local_optimizer import LocalOptimizer
from qsr_hf.ft.averaging import ReplicaAverager
from qsr_hf.ft.engine import ReplicaEngine
from qsr_hf.runtime.checks import agreement_values, parameters_must_agree
from qsr_hf.runtime.paths import SyncPath
from qsr_hf.runtime.synchronizer import Synchronizer
from qsr_hf.sync.agreement import ROUND_END, START, SyncPoint, exchange, tensors_checksum
from qsr_hf.sync.averaging import AveragerMode, Transform


logger = get_logger(__name__)


class ReplicaPath(SyncPath):
    """The separate checks inside the replica group, without its non-finite policy: NaN/inf is judged across the
    replica groups by the `ReplicaAverager` (``qsr_on_nonfinite``), so that every replica stops together ("error") or
    the non-finite one receives the others' average ("skip_rank"), instead of the non-finite replica stopping alone
    while the others wait out their quorum timeout (the processes of a DDP replica group hold the same values)."""

    def average(
        self, kind: SyncPoint, storage: list[torch.Tensor], transform: Transform, buckets: list[int] | None = None
    ) -> int | None:
        """Check inside the replica group, then the fault-tolerant sync."""
        exchange(agreement_values(self.rt, kind))
        return self._average(None, transform, buckets)


class ReplicaSynchronizer(Synchronizer):
    """The [`Synchronizer`] of a torchft replica group (built by [`FTLocalOptimizer`]; same arguments)."""

    path_class = ReplicaPath  # NaN/inf is decided across the replica groups (`ReplicaAverager`)

    def __init__(
        self,
        engine: ReplicaEngine,
        config: QSRConfig,
        warmup_steps: int,
        total_steps: int | None,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        super().__init__(engine, config, warmup_steps, total_steps, optimizer)
        self.optimizer = optimizer
        # data position: global batches read before the quorum at `quorum_step`, read `k` per step since then
        self.data = {"batches": 0, "quorum_step": 0, "replicas": 1, "rank": 0}
        self._synced_at_before = self.synced_at
        self._resumed_from: int | None = None  # at a fresh start: the resumed checkpoint's identity (0: none)
        engine.manager.register_state_dict_fn("qsr_hf", self._load_peer_state, self._peer_state)

    def _make_averager(self, tensors: Callable[[], list[torch.Tensor]], mode: AveragerMode) -> ReplicaAverager:
        # over the Manager, with this synchronizer's agreement values, start checksum and non-finite policy
        engine, config = self.engine, self.config
        return ReplicaAverager(
            tensors,
            engine.manager,
            config.qsr_fp32_average,
            values=functools.partial(agreement_values, self),
            checksum=self._start_checksum,
            on_nonfinite=config.qsr_on_nonfinite,
            max_attempts=engine.max_attempts,
            replica=engine.replica,
            fresh_start=self._fresh_start,
        )

    def _fresh_start(self) -> None:
        # at the start quorum, nobody ahead (torchft step 0 on every member): never silently back to step 0
        if self._resumed_from is not None:
            return  # a retried start quorum: already resumed (or warned)
        root, replica = self.engine.checkpoint_dir, self.engine.replica
        found = None if root is None else newest_checkpoint(root, run_meta(self))
        if found is None:
            self._resumed_from = 0
            where = "no checkpoint_dir was given" if root is None else f"no complete qsr_hf checkpoint in {root}"
            logger.warning(
                f"qsr_hf: replica group {replica}: no live replica group is ahead and {where}: this run STARTS FROM "
                "SCRATCH at optimizer step 0 (if the job ran before, its progress is lost; pass checkpoint_dir to "
                "FTLocalOptimizer to resume from the job's newest checkpoint)",
                main_process_only=False,
            )
            return
        folder, self._resumed_from = found
        restore_local_state(self, folder, self.optimizer)
        self._synced_at_before = self.synced_at
        logger.warning(
            f"qsr_hf: replica group {replica}: no live replica group is ahead: resuming the job from its newest "
            f"complete checkpoint {folder} at optimizer step {self.clock.step}",
            main_process_only=False,
        )

    def _start_checksum(self) -> int:
        # what the replicas must hold identically at the start: the synced state (outer optimizer) always, the
        # parameters when training starts or resumes at a sync (a resume inside a round holds each replica's own)
        # (resumed from the job's checkpoint: every member loaded the same one, parameters included, which its
        # identity in the checksum checks)
        tensors = [] if self.synced is None else self.synced.tensors()
        if parameters_must_agree(self) or self._resumed_from:
            tensors += [p for p in self.engine.module.parameters() if p.requires_grad]
        return tensors_checksum(tensors) ^ (self._resumed_from or 0)

    def _peer_state(self) -> dict[str, Any]:
        # what a live peer sends a joining replica, at the quorum of a sync (before that sync's average)
        optimizer = {} if self.optimizer is None else self.optimizer.state_dict()
        return copy.deepcopy({"qsr": self.state_dict(), "optimizer": optimizer, "kind": int(self.averager.kind)})

    def _load_peer_state(self, state: dict[str, Any]) -> None:
        self.load_state_dict(state["qsr"])
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])  # policy: the peer's optimizer state (documented)
        self.averager.adopt_peer(state["kind"])

    def average(self, kind: SyncPoint, commit: bool = True, buckets: list[int] | None = None) -> None:
        """A fault-tolerant sync (see [`Synchronizer.average`]); ``kind=START`` is the join at the start.
        ``buckets`` is always `None` here (``qsr_fragments`` is refused with torchft)."""
        self._synced_at_before = self.synced_at  # (a resume from the job's checkpoint at the quorum replaces it)
        self.averager.begin(kind)
        super().average(kind, commit, buckets)
        averager, data = self.averager, self.data
        if kind == START:  # the start is not counted by the base class; a join counts the peers' sync it joined
            self._resumed_from = 0  # a later start (load_local_state) compares what it always does
            if averager.kind != START:
                self.stats.record_sync(0, scheduled=averager.kind == ROUND_END)
            else:  # nothing was averaged (a resume inside a round keeps each replica's own values)
                self.synced_at = self._synced_at_before
        data["batches"] += (self.clock.step - data["quorum_step"]) * data["replicas"]
        data.update(quorum_step=self.clock.step, replicas=averager.replicas, rank=averager.replica_rank)
        self.stats.record_replicas(averager.contributors)

    def check_start(self, defer_parameters: bool = False) -> None:
        """Check the replica group's own ranks (as the base class), then join the replica groups: a quorum where
        every fresh replica must hold the same parameters, or where a replica that is behind receives a peer's state
        and the average of the peers' sync in progress."""
        super().check_start(defer_parameters)
        self.average(START)

    def batch_index(self, step: int | None = None) -> int:
        """Index, in one global stream of batches, of the batch this replica group reads at optimizer ``step``
        (default: the next one). Each step reads as many batches as there are replica groups in the last quorum,
        rank ``r`` the ``r``-th: the shards follow the live count, and the batches of a failed replica's lost
        round are skipped, not re-read."""
        step = self.clock.step if step is None else step
        data = self.data
        return data["batches"] + (step - data["quorum_step"]) * data["replicas"] + data["rank"]

    def reestimate_batchnorm(self, batches: Any, forward: Any) -> int:
        """Not supported across replica groups (it would average inside the replica group only)."""
        raise NotImplementedError("reestimate_batchnorm is not supported with qsr_hf.ft; keep qsr_average_buffers")

    def state_dict(self) -> dict[str, Any]:
        """The base class's state plus the data position."""
        return {**super().state_dict(), "data": dict(self.data)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        super().load_state_dict(state)
        self.data.update(state.get("data", {}))


class FTLocalOptimizer(LocalOptimizer):
    """[`LocalOptimizer`] whose syncs average across the live torchft replica groups (``pip install qsr_hf[ft]``).

    Build it on every process of every replica group after the model is built (same seed everywhere): the
    constructor joins the replica groups. On a fresh start it waits until ``min_replicas`` groups are up; a group
    (re)started while the others train waits for their next sync, receives a live peer's schedule position,
    counters, outer-optimizer state and inner optimizer state, and the average of that sync. Every sync's quorum holds a
    majority of the job's replica groups ([`make_manager`]), and its members are logged. Read the step to
    continue from in :attr:`global_step` and the batch to read in :meth:`batch_index`.

    Args:
        optimizer, model, config: as [`LocalOptimizer`] (``model``: unwrapped, or DDP inside the replica group).
        manager (`torchft.Manager`): this replica group's Manager, from [`make_manager`].
        max_attempts (`int`, defaults to 5): failed commits of one sync (replicas dying during it) before stopping.
        checkpoint_dir (`str` or `os.PathLike`, *optional*): where the job's replica groups save their checkpoints
            ([`save_local_state`], one folder per replica group below it). When no live replica group is ahead at the
            start (a new job, or every replica group died), every replica group of the first quorum resumes from the
            newest complete checkpoint found there (the same one for all: the start checks it), and logs it; without
            one it warns, on every rank, that the run starts from scratch.
        **kwargs: ``lr_scheduler``, ``num_training_steps``, ``num_warmup_steps`` and QSR overrides, as
            [`LocalOptimizer`]. Pass ``lr_scheduler``: a joining replica's scheduler is then stepped to the step.

    Example:

    ```python
    manager = make_manager(replica_id=0, num_replica_groups=3)  # a sync needs a majority: 2 of 3
    optimizer = FTLocalOptimizer(torch.optim.AdamW(model.parameters()), model, QSRConfig(), manager=manager)
    while optimizer.global_step < total:
        x, y = batches[optimizer.batch_index() % len(batches)]
        ...
    ```
    """

    synchronizer_class = ReplicaSynchronizer

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module,
        config: QSRConfig | None = None,
        *,
        manager: Any,
        max_attempts: int = 5,
        checkpoint_dir: str | os.PathLike | None = None,
        **kwargs: Any,
    ) -> None:
        engine = ReplicaEngine(model, manager, max_attempts, checkpoint_dir)
        super().__init__(optimizer, model, config, engine=engine, **kwargs)

    @property
    def global_step(self) -> int:
        """Optimizer steps done by the replica groups (a joining replica starts here, not at 0)."""
        return self.synchronizer.clock.step

    def batch_index(self, step: int | None = None) -> int:
        """See [`ReplicaSynchronizer.batch_index`]."""
        return self.synchronizer.batch_index(step)
