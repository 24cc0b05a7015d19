"""Fault-tolerant QSR across torchft replica groups (qsr_hf.ft), with real processes: a lighthouse and 3 replica
groups of one gloo process each, running examples/torchft_local_sgd.py. One is SIGKILLed mid-round and restarted,
one sleeps past the lighthouse's join timeout; the run finishes without a restart of the others and every replica
ends bitwise equal."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from qsr_hf.ft import is_torchft_available
from tests.testing_utils import free_port


ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not is_torchft_available(), reason="torchft not installed (pip install qsr_hf[ft])")
STEPS = 120


def _replica(replica: int, lighthouse: str, out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port())}
    cmd = [
        sys.executable, str(ROOT / "examples/torchft_local_sgd.py"), "--replica-id", str(replica),
        "--lighthouse", lighthouse, "--steps", str(STEPS), "--step-time", "0.1", "--quorum-timeout", "40",
        "--out", str(out), *extra,
    ]  # fmt: skip
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, timeout: float) -> str:
    try:
        return proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate()[0] + f"\n[test] killed after {timeout} s"


@pytest.mark.timeout(240)
def test_kill_sleep_and_rejoin(tmp_path):
    port = free_port()
    lighthouse = subprocess.Popen(
        ["torchft_lighthouse", "--bind", f"[::]:{port}", "--min_replicas", "2", "--join_timeout_ms", "1000",
         "--heartbeat_timeout_ms", "1000"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    address, procs = f"http://localhost:{port}", []
    try:
        procs = [
            _replica(0, address, tmp_path / "r0.json"),
            _replica(1, address, tmp_path / "r1.json", "--sleep-after", "75", "--sleep", "2.5"),
            _replica(2, address, tmp_path / "killed.json", "--kill-after", "6"),
        ]
        log = _finish(procs[2], 90)
        assert procs[2].returncode == -signal.SIGKILL, log[-3000:]
        procs[2] = _replica(2, address, tmp_path / "r2.json")  # restarted: rejoins at the others' next sync
        logs = [_finish(p, 150) for p in procs]
        for p, text in zip(procs, logs, strict=True):
            assert p.returncode == 0, text[-4000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        lighthouse.kill()
        lighthouse.wait()
    r0, r1, r2 = (json.loads((tmp_path / f"r{i}.json").read_text()) for i in range(3))
    # survivors went on without a restart: some sync after the kill averaged 2 replicas, later ones 3
    replicas0 = {step: n for step, n, _ in r0["syncs"]}
    assert 2 in replicas0.values() and 3 in replicas0.values(), r0["syncs"]
    # the restarted replica joined mid-run at a sync, from a live peer's state
    assert r2["joined_at"] > 6 and r2["joined_at"] in replicas0, (r2["joined_at"], r0["syncs"])
    # ... and took that peer's optimizer state (AdamW's step count is the peer's, not a fresh optimizer's)
    assert r2["adam_steps_at_join"] == [r2["joined_at"]] * 4 and r0["adam_steps_at_join"] == []
    # the slow one (slept 2.5 s > the lighthouse's 1 s join timeout) was dropped: the others averaged 2 replicas at
    # syncs it missed after the restarted one was back; it then healed at a sync and ends equal (below)
    dropped = {step for step, n in replicas0.items() if step > r2["joined_at"] and n == 2}
    assert dropped - {step for step, _, _ in r1["syncs"]}, (r0["syncs"], r1["syncs"])
    # equal parameters after each sync, and bitwise equal at the end
    by_step: dict[int, set] = {}
    for record in (r0, r1, r2):
        for step, _, checksum in record["syncs"]:
            by_step.setdefault(step, set()).add(checksum)
    assert all(len(sums) == 1 for sums in by_step.values()), by_step
    assert r0["final"] == r1["final"] == r2["final"]
    assert r0["stats"]["qsr/syncs"] == r1["stats"]["qsr/syncs"] == r2["stats"]["qsr/syncs"]
