"""Build a torchft `Manager` for one replica group, with every wait bounded (torchft imported here only)."""

import importlib.util
import os
from datetime import timedelta
from typing import Any

import torch.distributed as dist


def is_torchft_available() -> bool:
    """Whether torchft can be imported."""
    return importlib.util.find_spec("torchft") is not None


def make_manager(
    replica_id: int | str,
    lighthouse: str | None = None,
    min_replicas: int = 2,
    timeout: float = 30.0,
    quorum_timeout: float = 600.0,
    connect_timeout: float = 30.0,
) -> Any:
    """A torchft `Manager` over a gloo reconfigurable process group, as `FTLocalOptimizer` needs it.

    Call it on every process of the replica group after ``torch.distributed.init_process_group`` (torchrun does
    it), whose store the Manager uses inside the group.

    Args:
        replica_id (`int` or `str`): this replica group's name, the same after a restart (torchft adds a uuid).
        lighthouse (`str`, *optional*): the lighthouse's address (``http://host:29510``); defaults to
            ``$TORCHFT_LIGHTHOUSE``.
        min_replicas (`int`, defaults to 2): fewest replica groups a sync commits with (torchft's
            ``min_replica_size``); keep it equal to the lighthouse's ``--min_replicas``.
        timeout (`float`, defaults to 30): seconds for a collective, a commit vote or a state transfer.
        quorum_timeout (`float`, defaults to 600): seconds a sync waits for a quorum. A joining replica waits for the
            others' next sync, so this must exceed a round's duration.
        connect_timeout (`float`, defaults to 30): seconds to reach the lighthouse and the peers.

    Returns:
        `torchft.Manager`: with ``use_async_quorum=False`` and ``init_sync=False`` (qsr_hf checks instead that the
        replicas start from the same weights).

    Raises:
        `ImportError`: torchft is not installed.
    """
    if not is_torchft_available():
        raise ImportError("qsr_hf.ft needs torchft: pip install 'qsr_hf[ft]'")
    from torchft.manager import Manager
    from torchft.process_group import ProcessGroupGloo

    initialized = dist.is_available() and dist.is_initialized()
    return Manager(
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
