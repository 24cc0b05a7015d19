"""`ReplicaAverager`: a sync across the live replica groups through torchft's `Manager`.

One sync is one torchft step: ``start_quorum`` (the lighthouse's view of who is alive; a replica behind the others
receives a live peer's state here), three collectives on the Manager's reconfigurable process group, then
``should_commit``. The collectives are a tiny int64 MAX all-reduce of ``[values, -values]`` (the agreement check among
the live replicas: they agree where max == min), a float64 SUM of ``[contributes, non-finite, members...]`` (the
divisor, and each member's replica number at its rank in the quorum: logged at every sync) and one
SUM all-reduce per (device, dtype) bucket of a copy of the values. Nothing is written into the model before the
Manager commits: when a replica dies mid-sync every survivor's commit fails, and the sync is retried from the
untouched local values with the next quorum (the dead replica's round is lost, nobody else's). The collectives run
one after the other, so that the survivors of a failed one skip the rest together instead of waiting for each other
until the Manager's timeout. A survivor still inside the failed collective, waiting for data from another survivor
that has given up on it (a death reaches one survivor directly and the other only through it), waits out the
collective ``timeout`` before the retry.
"""

import time
from collections.abc import Callable
from typing import Any

import torch
from torch.distributed import ReduceOp

from qsr_hf.core.logging_utils import get_logger
from qsr_hf.sync.agreement import COMMON, START, SyncPoint, all_finite
from qsr_hf.sync.averaging import ParameterAverager, Transform


logger = get_logger(__name__)


class ReplicaAverager(ParameterAverager):
    """Average the flat buckets of a [`ParameterAverager`] (in-place mode) across torchft replica groups.

    Args:
        tensors (`Callable[[], list[torch.Tensor]]`): what to average (re-collected, see [`ParameterAverager`]).
        manager (`torchft.Manager`): built with ``use_async_quorum=False`` (a joiner's state is loaded before the
            sync's collectives) and ``min_replica_size`` >= 1.
        fp32_average (`bool`): sum bf16/fp16 buckets in fp32.
        values (`Callable[[SyncPoint], list[int]]`): the agreement values of a sync point (`qsr_hf.sync.agreement`
            ``COMMON``; read after the quorum).
        checksum (`Callable[[], int]`): the checksum of what the replicas must hold identically at the start (compared
            at ``START`` only).
        on_nonfinite (`str`): ``qsr_on_nonfinite``: ``"error"`` stops every replica on NaN/inf, ``"skip_rank"``
            averages the finite replicas.
        max_attempts (`int`, defaults to 5): failed commits (a replica died during the sync) before giving up.
        replica (`int`, defaults to -1): this replica group's number (`qsr_hf.ft.manager.replica_number`), for the
            log of each sync's members.
        fresh_start (`Callable[[], None]`, *optional*): called after the quorum of the start of training when no live
            replica group is ahead (torchft's step is 0 on every member: a new job, or every replica group died), before
            the start checksum is read: the synchronizer resumes the job's newest checkpoint there, or warns that it
            starts from scratch.

    Attributes:
        kind ([`SyncPoint`]): the point of the sync in progress (:meth:`begin`; a replica that heals takes its
            peer's, :meth:`adopt_peer`).
        healed (`bool`): a peer's state was loaded at the quorum: this replica contributes nothing until a sync
            commits, and receives the average of the others.
        contributors, replicas, replica_rank (`int`): of the last committed sync: replica groups averaged, replica
            groups in the quorum, this group's rank among them.
        members (`list[int]`): of the last committed sync: the replica numbers of the quorum, by rank.
    """

    def __init__(
        self,
        tensors: Callable[[], list[torch.Tensor]],
        manager: Any,
        fp32_average: bool,
        values: Callable[[SyncPoint], list[int]],
        checksum: Callable[[], int],
        on_nonfinite: str,
        max_attempts: int = 5,
        replica: int = -1,
        fresh_start: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(tensors, None, fp32_average, mode="inplace")
        self._fresh_start = fresh_start
        self.replica = replica
        self.members: list[int] = []
        self.manager = manager
        self.max_attempts = max_attempts
        self.kind = START
        self._values_of = values
        self._checksum = checksum
        self._on_nonfinite = on_nonfinite
        self.healed = False
        self.contributors = self.replicas = self.replica_rank = 0

    def begin(self, kind: SyncPoint) -> None:
        """The next :meth:`average` is a sync point of ``kind``."""
        self.kind = kind

    def adopt_peer(self, kind: SyncPoint) -> None:
        """A peer's state was loaded at the quorum of a sync of ``kind`` (the peer's): contribute nothing to it."""
        self.kind, self.healed = SyncPoint(kind), True

    def values(self) -> list[int]:
        """The agreement values of the sync in progress."""
        return self._values_of(self.kind)

    def _quorum(self) -> None:
        try:
            self.manager.start_quorum()
        except Exception as error:  # torchft raises the lighthouse's TimeoutError or a connection error
            raise RuntimeError(
                f"qsr_hf: no quorum of replica groups formed at the {SyncPoint(self.kind).label} (optimizer step "
                f"{self.values()[1]}) within the Manager's quorum_timeout ({error}). Is the lighthouse up and are at "
                "least min_replicas replica groups alive? A joining replica waits for the others' next sync, so "
                "quorum_timeout must exceed a round's duration"
            ) from error

    def _nobody_ahead_without_everyone(self) -> bool:
        # a start quorum of replica groups that are all at torchft step 0, without every group of the job, formed
        # after the lighthouse's first quorum: the job ran before, and a trained group may be alive but away
        manager = self.manager
        groups = getattr(manager, "qsr_replica_groups", 0)
        return (
            self.kind == START
            and not self.healed
            and manager.current_step() == 0
            and manager.num_participants() < groups
            and getattr(manager, "qsr_quorum_id", 1) > 1
        )

    def _start_quorum(self) -> None:
        """The quorum; at the start of training, when nobody in it is ahead and groups are missing, the quorum again
        (every second, up to the Manager's ``qsr_fresh_start_wait``) until a group that is ahead or every group is
        in it: freshly restarted groups that are a majority must not restart the job from its checkpoint (or from
        scratch) beside a trained group that is alive but away (reconfiguring after a failed sync)."""
        self._quorum()
        deadline = time.monotonic() + getattr(self.manager, "qsr_fresh_start_wait", 0.0)
        while self._nobody_ahead_without_everyone():
            if time.monotonic() > deadline:
                logger.warning(
                    f"qsr_hf: replica group {self.replica}: the start quorum has nobody ahead and "
                    f"{self.manager.num_participants()} of {self.manager.qsr_replica_groups} replica groups, after "
                    "waiting for the others: starting without them",
                    main_process_only=False,
                )
                return
            time.sleep(1.0)
            self._quorum()

    def _check(self, header: torch.Tensor) -> None:
        n = len(COMMON) + 1
        high, low = header[:n].tolist(), (-header[n:]).tolist()
        names = [*COMMON, "checksum of the parameters and synced state (start)"]
        differences = [f"{names[i]}: {low[i]}..{high[i]}" for i in range(n) if high[i] != low[i]]
        if differences:
            raise RuntimeError(
                "qsr_hf: the live replica groups disagree at a sync, so every replica stops here instead of averaging "
                "different things (" + "; ".join(differences) + "). Every replica group must run the same QSR "
                "settings, model and number of optimizer steps, and start from the same weights"
            )

    @torch.no_grad()
    def average(
        self,
        divisor: int | None = None,
        async_op: bool = False,
        keep_local_change: bool = False,
        transform: Transform = None,
    ) -> int:
        """Run one fault-tolerant sync (see the module docstring); retried with a new quorum when it fails.

        ``divisor`` (the synchronizer's non-finite policy inside the replica group) is ignored: the divisor is the
        number of replica groups that contribute. Returns the bytes this replica put into the collectives.

        Raises:
            `RuntimeError`: no quorum in time, the replicas disagree, NaN/inf with ``qsr_on_nonfinite="error"``, or
                ``max_attempts`` failed commits.
        """
        if async_op or keep_local_change:
            raise NotImplementedError("fault-tolerant syncs are blocking: qsr_overlap_sync is not supported")
        for attempt in range(1, self.max_attempts + 1):
            self.ensure_views()
            self._start_quorum()  # a replica behind the others loads a peer's state here (healed, kind = the peer's)
            if self.kind == START and not self.healed and self.manager.current_step() == 0 and self._fresh_start:
                self._fresh_start()  # nobody is ahead: the job's newest checkpoint, or a warned start from scratch
            values = [*self.values(), self._checksum() if self.kind == START else 0]
            header = torch.tensor([*values, *(-v for v in values)], dtype=torch.int64)
            finite = all_finite([b.flat for b in self.buckets])
            contributes = not self.healed and finite
            counts = torch.zeros(2 + self.manager.num_participants(), dtype=torch.float64)
            counts[0], counts[1] = float(contributes), float(not finite)
            rank = self.manager.participating_rank()
            if rank is not None:
                counts[2 + rank] = self.replica + 1.0  # the quorum's members, by rank (0: unknown)
            sent = [
                b.flat.to(self._reduce_dtype(b.flat.dtype), copy=True) if contributes else torch.zeros_like(b.flat)
                for b in self.buckets
            ]
            # one collective at a time: after a failed one the Manager turns the next ones into no-ops, whereas one
            # already started would wait the whole timeout for a survivor that has given up on it. (Aborting this
            # replica's process group after a failed collective, so that a peer still waiting on it fails at once,
            # was tried on 2026-12-06 and broke the soak's heals: benchmarks/soak.py failed 3 of 3 runs with it.)
            for tensor, op in [(header, ReduceOp.MAX), *((t, ReduceOp.SUM) for t in [counts, *sent])]:
                self.manager.allreduce(tensor, reduce_op=op).wait()
            if self.manager.should_commit():
                return self._commit(header, counts, sent, transform)
            logger.warning(
                f"qsr_hf: the sync at optimizer step {values[1]} did not commit (attempt {attempt} of "
                f"{self.max_attempts}: {self.manager.errored()}); a replica group failed during it. Retrying from this "
                "replica's own values with a new quorum",
                main_process_only=False,
            )
        raise RuntimeError(
            f"qsr_hf: {self.max_attempts} attempts at the sync at optimizer step {self.values()[1]} failed to commit "
            "(replica groups keep failing during the sync)"
        )

    def _commit(
        self, header: torch.Tensor, counts: torch.Tensor, sent: list[torch.Tensor], transform: Transform
    ) -> int:
        self._check(header)
        contributors, nonfinite = int(counts[0]), int(counts[1])
        if nonfinite and (self._on_nonfinite == "error" or not contributors):
            raise RuntimeError(
                f"qsr_hf: {nonfinite} replica group(s) hold NaN/inf at optimizer step {self.values()[1]}; every "
                "replica stops here so that they do not spread through the average (qsr_on_nonfinite='skip_rank' "
                "averages the finite replicas only)"
            )
        if not contributors:
            raise RuntimeError("qsr_hf: no replica group in the quorum holds values to average (all were joining)")
        if nonfinite:
            logger.warning(
                f"qsr_hf: {nonfinite} replica group(s) hold NaN/inf at optimizer step {self.values()[1]}: averaging the "
                f"{contributors} finite one(s), which every replica receives (qsr_on_nonfinite='skip_rank')",
                main_process_only=False,
            )
        self.replicas, self.replica_rank = self.manager.num_participants(), self.manager.participating_rank()
        self.contributors, self.healed = contributors, False
        self.members = [int(v) - 1 for v in counts[2:].tolist()]
        logger.info(
            f"qsr_hf: {SyncPoint(self.kind).label} at optimizer step {self.values()[1]}: quorum of replica groups "
            f"{self.members} ({contributors} contributed)",
            main_process_only=False,
        )
        if self.kind == START:
            return 0  # every replica starts from the same values (checked above): nothing to write
        for index, (bucket, wide) in enumerate(zip(self.buckets, sent, strict=True)):
            wide.div_(contributors)
            if transform is not None:
                transform(index, wide)  # the outer optimizer's step (`SyncedState.advance`)
            bucket.flat.copy_(wide)
        return self.bytes_per_sync
