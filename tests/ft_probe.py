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
"""

import argparse
import os
import signal
import sys
from pathlib import Path

import torch
import torchft.manager

from qsr_hf.ft.optimizer import ReplicaSynchronizer
from qsr_hf.sync.agreement import ROUND_END


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import torchft_local_sgd


def _snapshot(sync: ReplicaSynchronizer) -> list[torch.Tensor]:
    params = torch.cat([p.detach().reshape(-1) for p in sync.engine.module.parameters()]).clone()
    return [params, *(t.clone() for t in (sync.synced.tensors() if sync.synced is not None else []))]


def main() -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trace", default=None)
    parser.add_argument("--die-in-sync", type=int, default=-1)
    parser.add_argument("--progress", default=None)
    parser.add_argument("--resumed-out", default=None)
    probes, rest = parser.parse_known_args()
    trace, current = [], {}
    average, allreduce = ReplicaSynchronizer.average, torchft.manager.Manager.allreduce

    def traced(self, kind, commit=True, buckets=None):
        current.update(kind=kind, step=self.clock.step)
        before = _snapshot(self)
        average(self, kind, commit, buckets)
        trace.append(
            {
                "kind": kind,
                "called_at": current["step"],
                "step": self.clock.step,
                "contributors": self.averager.contributors,
                "before": before,
                "after": _snapshot(self),
            }
        )
        if probes.progress:
            Path(probes.progress).write_text(str(self.clock.step))

    def dying(self, *args, **kwargs):
        if current.get("kind") == ROUND_END and current.get("step") == probes.die_in_sync:
            os.kill(os.getpid(), signal.SIGKILL)
        return allreduce(self, *args, **kwargs)

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
