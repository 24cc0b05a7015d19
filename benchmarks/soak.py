"""Fault-injection soak of qsr_hf.ft (issue 29): one torchft run of 3-4 replica groups (Nesterov outer optimizer,
examples/torchft_local_sgd.py through tests/ft_probe.py) with failures drawn from a seed, each killed group
restarted, and every check computed here from what the replica processes recorded (benchmarks/soak_check.py).

Failure classes (``--classes``):
- ``kill_mid_round``: SIGKILL a group between two syncs (after at least one local step since its last sync);
- ``kill_in_sync``: the group SIGKILLs itself inside its next round-end sync, after the quorum, before its
  collectives (the others' commit fails and they retry the sync without it);
- ``kill_during_rejoin``: SIGKILL a group mid-round, restart it, and SIGKILL another group while the restarted one
  waits in its joining quorum;
- ``two_kills_one_round``: SIGKILL two groups in the same round (3 groups: one survivor, which waits for a
  restarted group to form a majority with it);
- ``slow_replica``: a group blocks before its next round-end sync until the others committed it without it (past
  the lighthouse's join timeout), then heals from them;
- ``lighthouse_restart``: not injected by default: with torchft 0.2.0 a quorum requested while the lighthouse is
  down is never answered (every replica waits out its quorum_timeout and stops); see docs/fault-tolerance.md.

Every group keeps at least one live peer (the controller never kills the last live group), so the path where every
group died (resume from the newest checkpoint) is avoided by design; tests/test_torchft.py covers it.

Checks (the benchmark exits 1 if one fails): every committed sync is torch's SGD(nesterov) on the mean of its
contributors' recorded pre-sync parameters; every replica leaving a sync holds bitwise the same parameters, anchor
and momentum; one quorum (a majority) per sync step; every group's last process reaches the last step and exits 0,
all with the same final model; no process exits other than by an injected SIGKILL; at least ``--failures``
failures, every class injected, each kill inside a sync died there, each slow replica was dropped and healed.

    python benchmarks/soak.py --seed 0 --groups 3 --failures 50 --steps 6000 --name soak
"""

import argparse
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import soak_check
from _common import RESULTS_DIR, peak_rss_gib, write_result


ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["kill_mid_round", "kill_in_sync", "kill_during_rejoin", "two_kills_one_round", "slow_replica"]
KILLS = {"kill_mid_round": 1, "kill_in_sync": 1, "kill_during_rejoin": 2, "two_kills_one_round": 2, "slow_replica": 1}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


class Soak:
    """One run: the lighthouse, the replica groups' processes, the injections and the timeline."""

    def __init__(self, args: argparse.Namespace, workdir: Path, inject: bool) -> None:
        self.args, self.dir, self.inject = args, workdir, inject
        shutil.rmtree(self.dir, ignore_errors=True)  # the streams are appended to: never mix in an earlier run's
        self.dir.mkdir(parents=True)
        self.rng = random.Random(args.seed)
        self.t0 = time.time()
        self.port = free_port()
        self.lighthouse = self._start_lighthouse()
        self.incs: list[dict] = []  # every replica process started
        self.current: dict[int, dict] = {}  # group -> its live (or last) incarnation
        self.failures: list[dict] = []
        self.alive: list[tuple[float, int, int]] = []
        self.unexpected: list[str] = []
        self.maxprog = self.dir / "maxprog"
        self.maxprog.write_text("0")

    def now(self) -> float:
        return round(time.time() - self.t0, 3)

    def _start_lighthouse(self) -> subprocess.Popen:
        a = self.args
        cmd = ["torchft_lighthouse", "--bind", f"[::]:{self.port}", "--min_replicas", str(a.groups // 2 + 1),
               "--join_timeout_ms", str(a.join_timeout_ms), "--heartbeat_timeout_ms", "1000"]  # fmt: skip
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def start(self, group: int) -> dict:
        a = self.args
        index = sum(1 for i in self.incs if i["group"] == group)
        base = self.dir / f"g{group}_{index}"
        files = {k: base.with_suffix("." + k) for k in ("stream", "progress", "step", "json", "log", "die", "stall")}
        cmd = [
            sys.executable, str(ROOT / "tests/ft_probe.py"), "--replica-id", str(group),
            "--lighthouse", f"http://localhost:{self.port}", "--steps", str(a.steps), "--step-time", str(a.step_time),
            "--outer", "nesterov", "--quorum-timeout", str(a.quorum_timeout), "--replica-groups", str(a.groups),
            "--out", str(files["json"]), "--stream", str(files["stream"]), "--progress", str(files["progress"]),
            "--step-file", str(files["step"]), "--die-in-sync-file", str(files["die"]),
            "--stall-file", str(files["stall"]), "--stall-until", str(self.maxprog), "--stall-max", "30",
        ]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port())}
        log = open(files["log"], "w")  # noqa: SIM115 (closed when the process ends)
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        inc = {"group": group, "index": index, "proc": proc, "files": files, "log": log, "started": self.now(),
               "ended": None, "rc": None, "killed": False, "death_step": None}  # fmt: skip
        self.incs.append(inc)
        self.current[group] = inc
        return inc

    # ---- the state of the run, read from the files the replicas write
    def progress(self, inc: dict) -> int | None:
        step = _read_int(inc["files"]["progress"])  # None while the replica rewrites it: keep the last one read
        inc["progress"] = step if step is not None else inc.get("progress")
        return inc["progress"]

    def settled_progress(self, inc: dict) -> int:
        """The replica's progress file, read until it is not being rewritten (not the last value cached)."""
        for _ in range(100):
            step = _read_int(inc["files"]["progress"])
            if step is not None:
                inc["progress"] = step
                return step
            time.sleep(0.01)
        return self.progress(inc) or 0

    def live(self) -> list[dict]:
        return [i for i in self.current.values() if i["ended"] is None]

    def healthy(self) -> bool:
        live = self.live()
        return (
            len(live) == self.args.groups
            and all(self.progress(i) is not None for i in live)
            and not any(i["files"]["stall"].exists() or i["files"]["die"].exists() for i in live)
        )

    def poll(self) -> None:
        """Reap ended processes, restart killed groups, update the shared progress and the timeline."""
        for inc in self.live():
            rc = inc["proc"].poll()
            if rc is None:
                continue
            inc.update(ended=self.now(), rc=rc, death_step=_read_int(inc["files"]["step"]))
            inc["log"].close()
            if rc == -signal.SIGKILL and inc["killed"]:
                self.start(inc["group"])  # every killed group is restarted at once
            elif rc != 0:
                self.unexpected.append(f"group {inc['group']} process {inc['index']} exited with {rc}")
        steps = [p for p in (self.progress(i) for i in self.incs) if p is not None]
        tmp = self.dir / "maxprog.tmp"
        tmp.write_text(str(max(steps, default=0)))
        tmp.replace(self.maxprog)  # atomic: a stalled replica reads it
        live = self.live()
        state = (len(live), sum(1 for i in live if self.progress(i) is not None))
        if not self.alive or self.alive[-1][1:] != state:
            self.alive.append((self.now(), *state))

    def wait(self, condition: Any, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.poll()
            if condition():
                return True
            time.sleep(0.05)
        return False

    # ---- the failures
    def kill(self, inc: dict, cls: str, event: int) -> None:
        """SIGKILL a group mid-round (it took a local step since its last sync)."""
        self.wait(lambda: (_read_int(inc["files"]["step"]) or 0) > (self.progress(inc) or 0), 10)
        inc["killed"] = True
        inc["proc"].send_signal(signal.SIGKILL)
        self.failures.append({"class": cls, "event": event, "t": self.now(), "group": inc["group"],
                              "incarnation": inc["index"]})  # fmt: skip
        self.wait(lambda: inc["ended"] is not None, 30)
        self.failures[-1]["death_step"] = inc["death_step"]

    def inject_one(self, cls: str, event: int) -> None:
        live = self.live()
        victim = self.rng.choice(live)
        if cls == "kill_mid_round":
            self.kill(victim, cls, event)
        elif cls == "kill_in_sync":
            victim["killed"] = True
            victim["files"]["die"].touch()
            self.failures.append({"class": cls, "event": event, "t": self.now(), "group": victim["group"],
                                  "incarnation": victim["index"]})  # fmt: skip
            self.wait(lambda: victim["ended"] is not None, 60)
            self.failures[-1]["death_step"] = victim["death_step"]
        elif cls == "two_kills_one_round":
            first, second = self.rng.sample(live, 2)
            at = int(self.maxprog.read_text())
            self.kill(first, cls, event)
            time.sleep(self.rng.uniform(0, 2 * self.args.step_time))
            if int(self.maxprog.read_text()) != at:
                self.failures[-1]["note"] = "a sync committed between the two kills"
            self.kill(second, cls, event)
        elif cls == "kill_during_rejoin":
            self.kill(victim, cls, event)
            rejoining = self.current[victim["group"]]  # restarted by poll()
            # its start sync has begun (its `pre` frame): it waits in its joining quorum, it has not joined
            began = self.wait(lambda: rejoining["files"]["stream"].exists() or rejoining["ended"] is not None, 120)
            other = self.rng.choice([i for i in self.live() if i is not rejoining])
            self.kill(other, cls, event)
            self.failures[-1]["rejoiner_joined"] = not began or self.progress(rejoining) is not None
        elif cls == "slow_replica":
            # t before the file: the victim may take it at once, and its stall frame must not precede the failure
            self.failures.append({"class": cls, "event": event, "t": self.now(), "group": victim["group"],
                                  "incarnation": victim["index"]})  # fmt: skip
            victim["files"]["stall"].touch()
            self.wait(lambda: not victim["files"]["stall"].exists() or victim["ended"] is not None, 90)
            # the victim took the file after writing its last sync's progress: the next event waits for the sync it
            # stalled at (a progress read before the file could be a sync older than the one just before the stall)
            stalled_after = self.settled_progress(victim)
            self.wait(lambda: (self.progress(victim) or 0) > stalled_after or victim["ended"] is not None, 90)

    def run(self) -> dict[str, Any]:
        a = self.args
        for g in range(a.groups):
            self.start(g)
        schedule, event = [], 0
        while sum(KILLS[c] for c in schedule) < a.failures:
            schedule.append(self.rng.choice(a.classes))
        stop_at = a.steps - a.margin
        try:
            while self.inject and event < len(schedule):
                if not self.wait(self.healthy, 300):
                    self.unexpected.append(f"not every group alive and joined within 300 s (event {event})")
                    break
                self.wait(lambda: False, self.rng.uniform(0.5, 2.0))
                if int(self.maxprog.read_text()) >= stop_at:
                    break
                if self.healthy():
                    self.inject_one(schedule[event], event)
                    event += 1
            if not self.wait(lambda: not self.live(), a.timeout):
                self.unexpected.append(f"the run did not end within {a.timeout} s")
        finally:
            for inc in self.live():
                inc["proc"].kill()
                inc["proc"].wait()
            self.poll()
            self.lighthouse.kill()
            self.lighthouse.wait()
        return {"wall_s": max(i["ended"] for i in self.incs), "schedule": schedule, "events": event}


def timeline_syncs(soak: Soak, incs: list[dict]) -> list[tuple[float, int, int]]:
    """(seconds, step, contributors) of every committed sync but the start, once per sync."""
    posts = {(f["step"], tuple(f["members"])): f for i in incs for f in i["frames"] if f["frame"] == "post"}
    return sorted((round(f["time"] - soak.t0, 3), s, f["contributors"]) for (s, _), f in posts.items() if f["kind"])


def analyse(soak: Soak, result: dict, args: argparse.Namespace) -> dict[str, Any]:
    incs = [{"group": i["group"], "index": i["index"], "frames": soak_check.read_stream(i["files"]["stream"])}
            for i in soak.incs]  # fmt: skip
    syncs = soak_check.check_syncs(incs, args.groups)
    errors = list(syncs.pop("errors")) + soak.unexpected
    finals = {}
    for g, inc in soak.current.items():
        out = inc["files"]["json"]
        if inc["rc"] != 0 or not out.exists():
            errors.append(f"group {g}: its last process exited with {inc['rc']} without its record")
            continue
        record = json.loads(out.read_text())
        finals[g] = record["final"]
        last = [f["step"] for f in incs[soak.incs.index(inc)]["frames"] if f["frame"] == "post"]
        if not last or last[-1] != args.steps:
            errors.append(f"group {g}: its last sync is at step {last[-1:]} not {args.steps}")
    if len(set(finals.values())) != 1 or len(finals) != args.groups:
        errors.append(f"final models differ or are missing: {finals}")
    for f in soak.failures:
        f.update(soak_check.steps_lost({**f, "t": f["t"] + soak.t0}, incs))  # the frames hold time.time()
        frames = next(i["frames"] for i in incs if (i["group"], i["index"]) == (f["group"], f["incarnation"]))
        if f["class"] == "kill_in_sync" and not any(x["frame"] == "die" for x in frames):
            errors.append(f"event {f['event']}: the kill inside a sync did not happen inside a sync")
        if f["class"] == "slow_replica" and not f.get("local"):
            errors.append(f"event {f['event']}: the slow replica was not dropped from a sync (or did not heal)")
    if soak.inject:
        if len(soak.failures) < args.failures:
            errors.append(f"{len(soak.failures)} failures injected, fewer than {args.failures}")
        missing = set(args.classes) - {f["class"] for f in soak.failures}
        if missing:
            errors.append(f"failure classes never injected: {sorted(missing)}")
    times = sorted(t for t, _, _ in timeline_syncs(soak, incs))
    for f in soak.failures:  # seconds until the next committed sync of the run (the others' wait included)
        f["s_to_next_sync"] = next((round(t - f["t"], 3) for t in times if t > f["t"]), None)
    by_class: dict[str, dict] = {}
    for f in soak.failures:
        c = by_class.setdefault(
            f["class"], {"failures": 0, "local_steps_lost": [], "steps_absent": [], "s_to_next_sync": []}
        )
        c["failures"] += 1
        c["s_to_next_sync"].append(f["s_to_next_sync"])
        c["local_steps_lost"].append(f.get("local"))
        c["steps_absent"].append(f.get("absent"))
    timeline = {"alive": [list(x) for x in soak.alive], "syncs": timeline_syncs(soak, incs)}
    return {
        "wall_s": result["wall_s"],
        "failures_injected": len(soak.failures),
        "failures_by_class": by_class,
        "processes_started": len(soak.incs),
        **syncs,
        "final_checksums": finals,
        "errors": errors,
        "failures": soak.failures,
        "timeline": timeline,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--groups", type=int, default=3, choices=[3, 4])
    p.add_argument("--failures", type=int, default=50, help="at least this many injected failures")
    p.add_argument("--steps", type=int, default=6000, help="optimizer steps of the run")
    p.add_argument("--step-time", type=float, default=0.05, help="seconds slept per step")
    p.add_argument("--margin", type=int, default=600, help="no failure injected in the last MARGIN steps")
    p.add_argument("--join-timeout-ms", type=int, default=1000, help="the lighthouse's --join_timeout_ms")
    p.add_argument("--quorum-timeout", type=float, default=120.0)
    p.add_argument("--classes", nargs="+", default=CLASSES, choices=CLASSES)
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds for the run to end after the last failure")
    p.add_argument("--no-failures", action="store_true", help="only the run without failures")
    p.add_argument("--no-baseline", action="store_true", help="skip the run without failures")
    p.add_argument("--workdir", default="/tmp/qsr_soak")
    p.add_argument("--name", default="soak")
    args = p.parse_args()
    out: dict[str, Any] = {"config": {k: v for k, v in vars(args).items() if k != "workdir"}}
    if not args.no_baseline or args.no_failures:
        base = Soak(args, Path(args.workdir) / f"{args.name}_baseline", inject=False)
        res = base.run()
        out["baseline"] = analyse(base, res, args)
        out["baseline_timeline"] = [[t, s] for t, s, _ in out["baseline"]["timeline"]["syncs"]]
        print(f"run without failures: {res['wall_s']:.1f} s, errors: {out['baseline']['errors']}", flush=True)
    if not args.no_failures:
        soak = Soak(args, Path(args.workdir) / args.name, inject=True)
        res = soak.run()
        out.update(analyse(soak, res, args))
    else:
        out.update(out.pop("baseline"))
    out["peak_rss_mib_per_replica"] = round(peak_rss_gib(resource.RUSAGE_CHILDREN) * 1024, 1)
    if "baseline" in out:
        out["wall_ratio_vs_no_failures"] = round(out["wall_s"] / out["baseline"]["wall_s"], 3)
    errors = out["errors"] + out.get("baseline", {}).get("errors", [])
    out["checks_passed"] = not errors
    path = write_result(args.name, out)
    import plots

    plt = plots.import_pyplot()
    fig = plt.figure(figsize=(12, 6.5))
    soak_check.figure(out, fig)
    fig.suptitle(out_title(path), fontsize=8, family="monospace")
    fig.tight_layout()
    fig.savefig(RESULTS_DIR / f"{args.name}.png", dpi=100)
    summary = {k: out.get(k) for k in ("wall_s", "failures_injected", "syncs_committed", "outer_steps_checked",
                                       "unverified", "split_steps", "wall_ratio_vs_no_failures",
                                       "peak_rss_mib_per_replica", "checks_passed")}  # fmt: skip
    print(json.dumps(summary, indent=1))
    for c, v in out.get("failures_by_class", {}).items():
        print(c, v["failures"], "local steps lost", v["local_steps_lost"], "absent", v["steps_absent"])
    for e in errors:
        print("CHECK FAILED:", e)
    return 0 if not errors else 1


def out_title(path: Path) -> str:
    return json.loads(path.read_text())["command"]


if __name__ == "__main__":
    sys.exit(main())
