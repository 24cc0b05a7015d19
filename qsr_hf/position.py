"""The position of a [`Synchronizer`] in training, as saved in each rank's state file and restored on resume.

Schedule position and counters, the last synced step, the synced state (outer optimizer, compression anchor: equal
on every rank) and the overlap depth (``qsr_overlap_auto`` resumes with the depth it chose).
"""

from typing import TYPE_CHECKING, Any


if TYPE_CHECKING:
    from qsr_hf.synchronizer import Synchronizer


def state_of(sync: "Synchronizer") -> dict[str, Any]:
    """What ``sync.state_dict()`` returns."""
    state = {"clock": sync.clock.state_dict(), "stats": sync.stats.state_dict(), "synced_at": sync.synced_at}
    if sync.synced is not None:
        state["synced"] = sync.synced.state_dict()
    if sync.overlap is not None:
        state["overlap"] = sync.overlap.state_dict()
    return state


def load_state(sync: "Synchronizer", state: dict[str, Any]) -> None:
    """Restore what :func:`state_of` returned into ``sync``."""
    sync.clock.load_state_dict(state["clock"])
    sync.stats.load_state_dict(state["stats"])
    sync._set_gradient_sync(sync._data_parallel_step(sync.clock.step))  # post-local: phase 1 or 2
    sync.synced_at = int(state.get("synced_at", -1))
    if sync.synced is not None:
        sync.synced.load_state_dict(state.get("synced", {}))
    if sync.overlap is not None and "overlap" in state:
        sync.overlap.load_state_dict(state["overlap"])
    sync._start_error = None  # a resumed position: the start check happens after the state is loaded
