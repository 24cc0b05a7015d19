"""A start quorum in which nobody is ahead must not restart a running job beside a trained replica group that is alive
but away (issue 29's soak, benchmarks/soak.py: two groups SIGKILLed in one round, the survivor reconfiguring for 30 s
towards a dead peer, and the two restarted groups, a majority of 3, started the job again from step 0 without it).

`ReplicaAverager._start_quorum` asks the quorum again while nobody in it is ahead, groups are missing and the
lighthouse formed a quorum before (the job ran), up to the Manager's ``qsr_fresh_start_wait``.
"""

import json
import signal
import time

import pytest
import torch

from qsr_hf.ft import is_torchft_available
from qsr_hf.ft.averaging import ReplicaAverager
from qsr_hf.sync.agreement import ROUND_END, START


class FakeManager:
    """The members of torchft's Manager `_start_quorum` reads; each quorum is (participants, quorum id, step)."""

    def __init__(self, quorums: list[tuple[int, int, int]], groups: int = 3, wait: float = 60.0) -> None:
        self.quorums, self.calls = quorums, 0
        self.qsr_replica_groups, self.qsr_fresh_start_wait = groups, wait

    def start_quorum(self) -> None:
        self.n, self.qsr_quorum_id, self.step = self.quorums[min(self.calls, len(self.quorums) - 1)]
        self.calls += 1

    def current_step(self) -> int:
        return self.step

    def num_participants(self) -> int:
        return self.n


CASES = [
    # (kind, quorums, calls): the job's first quorum, 2 of 3 at step 0: a job start, no wait
    (START, [(2, 1, 0)], 1),
    # the job ran (quorum id 7): 2 fresh groups of 3 wait until the trained one is back (they heal: step 40)
    (START, [(2, 7, 0), (2, 7, 0), (3, 8, 40)], 3),
    # every group died and all restarted: no one is missing, no wait
    (START, [(3, 7, 0)], 1),
    # a trained member is in the quorum (step 40): no wait
    (START, [(2, 7, 40)], 1),
    # only the start of training waits
    (ROUND_END, [(2, 7, 0)], 1),
]


@pytest.mark.parametrize(("kind", "quorums", "calls"), CASES)
def test_start_quorum_waits_for_a_group_ahead(monkeypatch, kind, quorums, calls):
    monkeypatch.setattr("qsr_hf.ft.averaging.time.sleep", lambda s: None)
    manager = FakeManager(quorums)
    averager = ReplicaAverager(
        lambda: [torch.zeros(3)], manager, False, values=lambda k: [0, 0], checksum=lambda: 0, on_nonfinite="error"
    )
    averager.begin(kind)
    averager._start_quorum()
    assert manager.calls == calls


def test_start_quorum_gives_up_after_the_wait(monkeypatch):
    monkeypatch.setattr("qsr_hf.ft.averaging.time.sleep", lambda s: None)
    manager = FakeManager([(2, 7, 0)], wait=-1.0)  # nobody comes: it starts without them (warned)
    averager = ReplicaAverager(
        lambda: [torch.zeros(3)], manager, False, values=lambda k: [0, 0], checksum=lambda: 0, on_nonfinite="error"
    )
    averager._start_quorum()
    assert manager.calls == 1


@pytest.mark.slow  # ~40 s of real replica processes
@pytest.mark.timeout(240)
@pytest.mark.skipif(not is_torchft_available(), reason="torchft not installed (pip install qsr_hf[ft])")
def test_restarted_majority_waits_for_the_trained_group(tmp_path):
    """3 replica groups: 0 and 1 train, 1 is SIGKILLed at step 10 and 0 stays away before its sync at 12 (as a group
    reconfiguring towards a dead peer does); 1 and 2 start fresh, a majority with nobody ahead. They must not start
    the job again: they wait, and heal from group 0 once it is back; all three end with the same model."""
    from tests.test_torchft import _finish, _lighthouse, _replica, _run, _stop

    lighthouse, address = _lighthouse(min_replicas=2)
    release = tmp_path / "release"
    common = ["--outer", "nesterov", "--step-time", "0.05"]
    procs = []
    try:
        procs = [
            _replica(0, address, tmp_path / "r0.json", *common, "--stall-at", "12", "--stall-until", str(release),
                     steps=40),
            _replica(1, address, tmp_path / "killed.json", *common, "--kill-after", "10", steps=40),
        ]  # fmt: skip
        log = _finish(procs[1], 90)
        assert procs[1].returncode == -signal.SIGKILL, log[-3000:]
        streams = [tmp_path / f"s{i}" for i in (1, 2)]
        procs[1:] = [
            _replica(i, address, tmp_path / f"r{i}.json", *common, "--stream", str(s), steps=40)
            for i, s in zip((1, 2), streams, strict=True)
        ]
        deadline = time.monotonic() + 120
        while not all(s.exists() for s in streams) and time.monotonic() < deadline:
            time.sleep(0.2)  # both restarted groups are inside their start sync (their first stream frame)
        time.sleep(5)  # past the lighthouse's 1 s join timeout: without the wait they would have started from step 0
        release.write_text("12")
        logs = _run(procs, 150)
    finally:
        _stop(procs, lighthouse)
    records = [json.loads((tmp_path / f"r{i}.json").read_text()) for i in range(3)]
    assert records[1]["joined_at"] >= 12 and records[2]["joined_at"] >= 12, [r["joined_at"] for r in records]
    assert not any("STARTS FROM SCRATCH" in text for text in logs[1:]), logs[1][-3000:]
    assert len({r["final"] for r in records}) == 1
