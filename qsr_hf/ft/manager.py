"""Build a torchft `Manager` for one replica group, with every wait bounded and a majority quorum (torchft imported
here only).

**One model, not two.** A sync commits only with at least ``min_replicas`` replica groups in its quorum, and qsr_hf
requires a majority of the job's replica groups (more than half): two quorums that both commit always share a replica
group, so no two disjoint sets of replicas can each commit a sync and go on as two models (with ``min_replicas=2`` of
4, two quorums of one trained replica plus one freshly restarted joiner did, and the run ended with two models).
"""

import importlib.util
import os
import re
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from qsr_hf.core.logging_utils import get_logger


logger = get_logger(__name__)


def quorum_size(num_replica_groups: int, min_replicas: int | None = None, allow_minority_quorum: bool = False) -> int:
    """The fewest replica groups a sync commits with: a majority of ``num_replica_groups`` unless told otherwise.

    Args:
        num_replica_groups (`int`): replica groups of the job (every group that may ever take part, dead ones too).
        min_replicas (`int`, *optional*): defaults to the majority, ``num_replica_groups // 2 + 1``.
        allow_minority_quorum (`bool`, defaults to `False`): accept ``min_replicas`` at or below half (UNSAFE: two
            disjoint quorums can then commit the same sync and the run can end with different models).

    Raises:
        `ValueError`: ``min_replicas`` is not a majority (without the opt-out), or out of range.
    """
    if num_replica_groups < 1:
        raise ValueError(f"qsr_hf: num_replica_groups must be at least 1, got {num_replica_groups}")
    majority = num_replica_groups // 2 + 1
    if min_replicas is None:
        return majority
    if not 1 <= min_replicas <= num_replica_groups:
        raise ValueError(f"qsr_hf: min_replicas={min_replicas} is not in 1..num_replica_groups={num_replica_groups}")
    if min_replicas < majority:
        why = (
            f"min_replicas={min_replicas} of {num_replica_groups} replica groups is not a majority: two disjoint "
            "quorums (e.g. one trained replica plus one freshly restarted joiner each) can then commit the same sync "
            "and the run ends with two different models"
        )
        if not allow_minority_quorum:
            raise ValueError(
                f"qsr_hf: {why}. Use min_replicas >= {majority} (the default) and start the lighthouse with "
                f"--min_replicas {majority}, or pass allow_minority_quorum=True to accept that risk (unsafe)"
            )
        logger.warning(f"qsr_hf: {why} (allow_minority_quorum=True: UNSAFE)", main_process_only=False)
    return min_replicas


def replica_number(replica_id: int | str) -> int:
    """The number a replica group is logged as: its id's trailing digits, as torchft reads them (-1: none)."""
    digits = re.search(r"(\d+)$", str(replica_id))
    return int(digits.group(1)) if digits else -1


def is_torchft_available() -> bool:
    """Whether torchft can be imported."""
    return importlib.util.find_spec("torchft") is not None


def make_manager(
    replica_id: int | str,
    lighthouse: str | None = None,
    min_replicas: int | None = None,
    timeout: float = 30.0,
    quorum_timeout: float = 600.0,
    connect_timeout: float = 30.0,
    *,
    num_replica_groups: int,
    allow_minority_quorum: bool = False,
    fresh_start_wait: float | None = None,
) -> Any:
    """A torchft `Manager` over a gloo reconfigurable process group, as `FTLocalOptimizer` needs it.

    Call it on every process of the replica group after ``torch.distributed.init_process_group`` (torchrun does
    it), whose store the Manager uses inside the group.

    Args:
        replica_id (`int` or `str`): this replica group's name, the same after a restart (torchft adds a uuid).
        lighthouse (`str`, *optional*): the lighthouse's address (``http://host:29510``); defaults to
            ``$TORCHFT_LIGHTHOUSE``.
        min_replicas (`int`, *optional*): fewest replica groups a sync commits with (torchft's
            ``min_replica_size``); defaults to a majority of ``num_replica_groups``, and a lower value is refused
            ([`quorum_size`]). Start the lighthouse with the same ``--min_replicas``.
        timeout (`float`, defaults to 30): seconds for a collective, a commit vote or a state transfer.
        quorum_timeout (`float`, defaults to 600): seconds a sync waits for a quorum. A joining replica waits for the
            others' next sync, so this must exceed a round's duration.
        connect_timeout (`float`, defaults to 30): seconds to reach the lighthouse and the peers.
        num_replica_groups (`int`): the job's replica groups (keyword only, required): a sync needs a majority.
        allow_minority_quorum (`bool`, defaults to `False`): accept a ``min_replicas`` that is not a majority
            (unsafe, see [`quorum_size`]).
        fresh_start_wait (`float`, *optional*): seconds a start quorum in which nobody is ahead, formed after the
            lighthouse's first quorum and without every replica group, waits for the missing groups before it
            starts from the newest checkpoint or from scratch: a trained group may be away from the quorums for
            that long (a failed sync: up to ``connect_timeout`` to reach a dead peer, then ``timeout``), and freshly
            restarted groups that are a majority would otherwise restart the job beside it (the soak,
            benchmarks/soak.py). Defaults to ``quorum_timeout``, the longest a sync waits for the others anyway:
            ``timeout + connect_timeout`` (60 s by default) was too tight on a loaded machine: after two kills in
            one round a soak that passed went up to 58.5 s without a sync, and in one that failed the survivor was
            away about 90 s.

    Returns:
        `torchft.Manager`: with ``use_async_quorum=False`` and ``init_sync=False`` (qsr_hf checks instead that the
        replicas start from the same weights); its ``qsr_replica`` and ``qsr_replica_groups`` name the replica
        group and the job's size for `FTLocalOptimizer` (which logs each sync's members).

    Raises:
        `ImportError`: torchft is not installed.
        `ValueError`: ``min_replicas`` is not a majority of ``num_replica_groups`` (see [`quorum_size`]).
    """
    min_replicas = quorum_size(num_replica_groups, min_replicas, allow_minority_quorum)
    if not is_torchft_available():
        raise ImportError("qsr_hf.ft needs torchft: pip install 'qsr_hf[ft]'")
    from torchft.manager import Manager
    from torchft.process_group import ProcessGroupGloo

    class QSRManager(Manager):  # torchft's Manager, knowing this replica group's number and the job's size
        def __init__(self, replica: int, replica_groups: int, fresh_start_wait: float, **kwargs: Any) -> None:
            self.qsr_replica, self.qsr_replica_groups = replica, replica_groups
            self.qsr_fresh_start_wait = fresh_start_wait
            super().__init__(**kwargs)

        @property
        def qsr_quorum_id(self) -> int:  # the lighthouse's id of the last quorum (1: its first)
            return self._quorum_id

    initialized = dist.is_available() and dist.is_initialized()
    return QSRManager(
        replica_number(replica_id),
        num_replica_groups,
        quorum_timeout if fresh_start_wait is None else fresh_start_wait,
        pg=ProcessGroupGloo(timeout=timedelta(seconds=timeout)),
        load_state_dict=None,
        state_dict=None,
        min_replica_size=min_replicas,
        use_async_quorum=False,
        init_sync=False,
        timeout=timedelta(seconds=timeout),
        quorum_timeout=timedelta(seconds=quorum_timeout),
        connect_timeout=timedelta(seconds=connect_timeout),
        rank=dist.get_rank() if initialized else int(os.environ.get("RANK", "0")),
        world_size=dist.get_world_size() if initialized else int(os.environ.get("WORLD_SIZE", "1")),
        lighthouse_addr=lighthouse or os.environ.get("TORCHFT_LIGHTHOUSE"),
        replica_id=str(replica_id),
    )
