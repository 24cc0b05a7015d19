"""Run examples/torchft_local_sgd.py with the probes tests/test_torchft.py needs, so that the example stays free of
them. Arguments other than these two go to the example.

``--trace PATH``: write (torch.save) one entry per sync this replica group runs: its kind, the optimizer step it was
called at and the step after it (a replica that heals jumps to its peer's), the replica groups averaged, and this
group's parameters and outer-optimizer state (anchor, momentum) before and after it.

``--progress PATH``: write the optimizer step into PATH after each sync (the test waits on it).

``--resumed-out PATH``: after the run, run the example again in this process, from scratch (new model, optimizers,
Manager) but resumed from the run's ``--save-dir``, writing its record to PATH and its trace next to it. Every replica
group does the same, so all resume together; this saves the start-up of a second set of processes.

``--die-in-sync STEP``: SIGKILL this process inside the round-end sync at optimizer step STEP, after its quorum and
before its first collective: the other replica groups' collectives of that sync fail, and their commit with them.

``--nan-at STEP``: write NaN into this replica's first parameter right before its round-end sync at STEP.

``--joined-file PATH``: write PATH once this replica group has joined (after its start sync).

``--started-file PATH``: write PATH when this replica group reaches its start sync (before its quorum).

``--hold-start PATH [PATH ...]``: before the start sync (after writing ``--started-file``), block until every PATH
exists: replica groups started together wait for each other's start (a loaded machine can start one process seconds
after the others, who would otherwise form the first quorum and finish a short run without it).

``--hold-from STEP --hold-until PATH``: before the first round-end sync at optimizer step STEP or later (before its
quorum), block until PATH exists (e.g. a restarted replica's ``--started-file``): the run cannot end before it.

``--stall-at STEP --stall-until PROGRESS``: before its round-end (or last) sync at optimizer step STEP (before its
quorum), block until the step in PROGRESS is at least STEP: the others committed that sync without this replica; with
``--stall-at-max S`` at most S seconds (a replica that is slow, not one that waits for the others).

``--stall-when PATH --stall-until PROGRESS``: after the first sync that ends once PATH exists, block until the
optimizer step in PROGRESS (another replica's ``--progress``) is past this replica's step: the others then committed
a sync without this replica (it was slower than the lighthouse's join timeout), by events rather than a sleep.

Each trace entry also holds ``optim``, a checksum of the inner optimizer's state after the sync (a replica that heals
takes its peer's), and ``members``, the replica groups of the sync's quorum.

Options for benchmarks/soak.py (the controller injects faults by files, at any time):

``--stream PATH``: append each sync to PATH as it happens (pickled frames, numpy arrays), so that a replica killed
later, or inside the sync, leaves its record: a ``pre`` frame (kind, called_at, before, wall time) when the sync
starts and a ``post`` frame (step, contributors, members, whether this replica healed, after, wall time) once it
committed.

``--step-file PATH``: write the optimizer step into PATH after every optimizer step.

``--die-in-sync-file PATH``: SIGKILL this process inside the next round-end sync that starts once PATH exists, after
its quorum and before its first collective (``--die-in-sync`` triggered by a file).

``--stall-file PATH --stall-until PROGRESS``: before the next round-end sync that starts once PATH exists (before its
quorum), remove PATH and block until the step in PROGRESS is at least the sync's step (the others committed it
without this replica), at most ``--stall-max`` seconds.
"""

import argparse
import os
import pickle
import signal
import sys
import time
from pathlib import Path

import torch
import torchft.manager

from qsr_hf.ft.averaging import ReplicaAverager
from qsr_hf.ft.optimizer import FTLocalOptimizer, ReplicaSynchronizer
from qsr_hf.sync.agreement import END, ROUND_END, START, tensors_checksum


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import torchft_local_sgd


def _snapshot(sync: ReplicaSynchronizer) -> list[torch.Tensor]:
    params = torch.cat([p.detach().reshape(-1) for p in sync.engine.module.parameters()]).clone()
    return [params, *(t.clone() for t in (sync.synced.tensors() if sync.synced is not None else []))]


def _optimizer_checksum(sync: ReplicaSynchronizer) -> int:
    states = sync.optimizer.state_dict()["state"] if sync.optimizer is not None else {}
    tensors = [torch.as_tensor(v) for i in sorted(states) for _, v in sorted(states[i].items())]
    return tensors_checksum(tensors)


def _wait_for_files(paths: list[str]) -> None:
    # an event, not a duration: other replica groups' files (--started-file) exist
    while not all(Path(path).exists() for path in paths):
        time.sleep(0.05)


def _wait_past(progress: Path, step: int, limit: float = float("inf")) -> None:
    # an event, not a duration: another replica's progress file says it committed a sync after `step`
    deadline = time.monotonic() + limit
    while not (progress.exists() and progress.read_text() and int(progress.read_text()) > step):
        if time.monotonic() > deadline:
            return
        time.sleep(0.05)


def main() -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trace", default=None)
    parser.add_argument("--die-in-sync", type=int, default=-1)
    parser.add_argument("--progress", default=None)
    parser.add_argument("--resumed-out", default=None)
    parser.add_argument("--joined-file", default=None)
    parser.add_argument("--stall-when", default=None)
    parser.add_argument("--stall-until", default=None)
    parser.add_argument("--stall-at", type=int, default=-1)
    parser.add_argument("--stall-at-max", type=float, default=float("inf"))
    parser.add_argument("--nan-at", type=int, default=-1)
    parser.add_argument("--started-file", default=None)
    parser.add_argument("--hold-from", type=int, default=-1)
    parser.add_argument("--hold-until", default=None)
    parser.add_argument("--hold-start", nargs="+", default=[])
    parser.add_argument("--stream", default=None)
    parser.add_argument("--step-file", default=None)
    parser.add_argument("--die-in-sync-file", default=None)
    parser.add_argument("--stall-file", default=None)
    parser.add_argument("--stall-max", type=float, default=30.0)
    probes, rest = parser.parse_known_args()
    trace, current, stalled, held = [], {}, [], []
    average, allreduce = ReplicaSynchronizer.average, torchft.manager.Manager.allreduce
    adopt_peer, step = ReplicaAverager.adopt_peer, FTLocalOptimizer.step

    def emit(frame: dict) -> None:
        if probes.stream:
            with open(probes.stream, "ab") as f:
                pickle.dump(frame, f)

    def traced(self, kind, commit=True, buckets=None):
        current.update(kind=kind, step=self.clock.step, healed=False)
        if kind in (ROUND_END, END) and self.clock.step == probes.stall_at:
            _wait_past(Path(probes.stall_until), probes.stall_at - 1, probes.stall_at_max)
        if kind == START and probes.started_file:
            Path(probes.started_file).write_text(str(self.clock.step))
        if kind == START:
            _wait_for_files(probes.hold_start)
        if kind == ROUND_END and 0 <= probes.hold_from <= self.clock.step and not held:
            held.append(self.clock.step)
            _wait_for_files([probes.hold_until])
        if kind == ROUND_END and probes.stall_file and Path(probes.stall_file).exists():
            Path(probes.stall_file).unlink()
            emit({"frame": "stall", "called_at": self.clock.step, "time": time.time()})
            _wait_past(Path(probes.stall_until), self.clock.step - 1, probes.stall_max)
        if kind == ROUND_END and self.clock.step == probes.nan_at:
            with torch.no_grad():
                next(self.engine.module.parameters()).view(-1)[0] = float("nan")
        before = _snapshot(self)
        emit({"frame": "pre", "kind": int(kind), "called_at": current["step"], "time": time.time(),
              "before": [t.numpy() for t in before]})  # fmt: skip
        average(self, kind, commit, buckets)
        emit(
            {
                "frame": "post", "kind": int(kind), "called_at": current["step"], "step": self.clock.step,
                "contributors": self.averager.contributors, "members": list(self.averager.members),
                "healed": current["healed"], "time": time.time(), "after": [t.numpy() for t in _snapshot(self)],
            }
        )  # fmt: skip
        trace.append(
            {
                "kind": int(kind),  # a plain int: the test loads the trace with weights_only=True
                "called_at": current["step"],
                "step": self.clock.step,
                "contributors": self.averager.contributors,
                "before": before,
                "after": _snapshot(self),
                "optim": _optimizer_checksum(self),
                "members": list(self.averager.members),
            }
        )
        if probes.progress:
            Path(probes.progress).write_text(str(self.clock.step))
        if probes.joined_file and kind == START:
            Path(probes.joined_file).write_text(str(self.clock.step))
        if probes.stall_when and not stalled and Path(probes.stall_when).exists():
            stalled.append(self.clock.step)
            _wait_past(Path(probes.stall_until), self.clock.step)

    def dying(self, *args, **kwargs):
        if current.get("kind") == ROUND_END and current.get("step") == probes.die_in_sync:
            os.kill(os.getpid(), signal.SIGKILL)
        if current.get("kind") == ROUND_END and probes.die_in_sync_file and Path(probes.die_in_sync_file).exists():
            emit({"frame": "die", "called_at": current["step"], "time": time.time()})
            os.kill(os.getpid(), signal.SIGKILL)
        return allreduce(self, *args, **kwargs)

    def adopting(self, kind):
        current["healed"] = True
        return adopt_peer(self, kind)

    def stepping(self, *args, **kwargs):
        result = step(self, *args, **kwargs)
        if probes.step_file:
            Path(probes.step_file).write_text(str(self.global_step))
        return result

    ReplicaAverager.adopt_peer = adopting
    FTLocalOptimizer.step = stepping
    ReplicaSynchronizer.average = traced
    torchft.manager.Manager.allreduce = dying
    record = torchft_local_sgd.main(rest)
    if probes.trace:
        torch.save(trace, probes.trace)
    if probes.resumed_out:
        trace.clear()
        resumed = Path(probes.resumed_out)
        save_dir = rest[rest.index("--save-dir") + 1]
        torchft_local_sgd.main([*rest, "--save-at", "-1", "--resume", save_dir, "--out", str(resumed)])
        torch.save(trace, resumed.with_suffix(".pt"))
    return record


if __name__ == "__main__":
    main()
