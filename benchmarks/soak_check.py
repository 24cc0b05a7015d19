"""The checks of benchmarks/soak.py, computed from what each replica process recorded (tests/ft_probe.py
``--stream``), and the soak's figure. Pure functions of the records: tests/test_soak_check.py runs them on made-up
frames.

A replica process (one *incarnation* of a replica group: a restart is a new one) streams a ``pre`` frame when a sync
starts (its parameters, outer anchor and momentum before it) and a ``post`` frame when the sync committed (the same
after it, the step it left at, the quorum's members, the number of contributors, whether it healed from a peer).
A process killed inside a sync leaves its ``pre`` frame (and a ``die`` frame).
"""

import pickle
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from testing_utils import nesterov_reference


START = 0  # qsr_hf.sync.agreement.START: a start-of-training sync averages nothing


def read_stream(path: Path) -> list[dict]:
    """The frames of one incarnation; a frame cut short by a SIGKILL (the last one) is dropped."""
    frames = []
    if not path.exists():
        return frames
    with open(path, "rb") as f:
        while True:
            try:
                frames.append(pickle.load(f))
            except (EOFError, pickle.UnpicklingError, ValueError, AttributeError, IndexError):
                return frames


def commits(incarnations: list[dict]) -> dict[tuple, list[tuple[dict, dict]]]:
    """The committed syncs: {(step, members): [(incarnation, post frame), ...]} over every incarnation that left it."""
    out: dict[tuple, list] = defaultdict(list)
    for inc in incarnations:
        for frame in inc["frames"]:
            if frame["frame"] == "post":
                out[frame["step"], tuple(frame["members"])].append((inc, frame))
    return dict(out)


def _pre_of(inc: dict, post_index: int | None, called_at: int) -> dict | None:
    """The ``pre`` frame of the sync an incarnation ran at ``called_at`` (before its ``post`` frame, if any)."""
    frames = inc["frames"] if post_index is None else inc["frames"][:post_index]
    pres = [f for f in frames if f["frame"] == "pre" and f["called_at"] == called_at]
    return pres[-1] if pres else None


def check_syncs(incarnations: list[dict], groups: int, rtol: float = 1e-5, atol: float = 1e-6) -> dict[str, Any]:
    """Every committed sync: the replicas that left it hold bitwise the same parameters, anchor and momentum; its
    quorum is a majority of ``groups`` with one member set per step; and its new parameters are torch's
    SGD(nesterov) on the last anchor with gradient anchor - mean(contributors' pre-sync parameters), the
    contributors being the members that did not heal at it (a member killed inside the sync after its collectives,
    whose frames end with this sync's ``pre``, counts when the contributor count says so)."""
    majority = groups // 2 + 1
    errors: list[str] = []
    checked = unverified = 0
    steps: dict[int, set] = defaultdict(set)
    for (step, members), leavers in sorted(commits(incarnations).items()):
        steps[step].add(members)
        first = leavers[0][1]
        if len(members) < majority or len(set(members)) != len(members):
            errors.append(f"step {step}: quorum {list(members)} is not a majority of {groups} distinct groups")
        for inc, frame in leavers[1:]:
            if not all(np.array_equal(a, b) for a, b in zip(first["after"], frame["after"], strict=True)):
                errors.append(f"step {step}: group {inc['group']} left the sync with different values")
        if all(frame["kind"] == START for _, frame in leavers):
            continue  # the start of training: nothing averaged (a joiner's start is its peers' sync: checked)
        first = next(frame for _, frame in leavers if frame["kind"] != START)
        pres = []
        for inc, frame in leavers:
            if not frame["healed"] and frame["called_at"] == step:
                pres.append(_pre_of(inc, inc["frames"].index(frame), step))
        if len(pres) < first["contributors"]:  # a contributor that died after the collectives, before its commit
            left = {inc["group"] for inc, _ in leavers}
            for inc in incarnations:
                ends = [f for f in inc["frames"] if f["frame"] in ("pre", "post")]
                dead = ends and ends[-1]["frame"] == "pre" and ends[-1]["called_at"] == step
                if inc["group"] in set(members) - left and dead:
                    pres.append(ends[-1])
        if len(pres) != first["contributors"] or any(p is None for p in pres):
            unverified += 1
            errors.append(f"step {step}: {first['contributors']} contributors, {len(pres)} pre-sync records found")
            continue
        if any(len({p["before"][i].tobytes() for p in pres}) != 1 for i in (1, 2)):
            errors.append(f"step {step}: the contributors' anchors or momenta differ before the sync")
        anchor, momentum = (torch.from_numpy(pres[0]["before"][i].copy()) for i in (1, 2))
        mean = torch.stack([torch.from_numpy(p["before"][0].copy()) for p in pres]).sum(0) / len(pres)
        ref_params, ref_momentum = nesterov_reference(anchor, mean, momentum)
        params, new_anchor, new_momentum = (torch.from_numpy(a.copy()) for a in first["after"])
        if not torch.allclose(params, ref_params, rtol=rtol, atol=atol):
            errors.append(f"step {step}: parameters != the outer step on the {len(pres)} contributors' mean")
        elif not torch.allclose(new_momentum, ref_momentum, rtol=rtol, atol=atol):
            errors.append(f"step {step}: momentum != SGD(nesterov)'s")
        elif not torch.equal(new_anchor, params):
            errors.append(f"step {step}: anchor != parameters after the sync")
        else:
            checked += 1
    split = {step: sorted(m) for step, m in steps.items() if len(m) > 1}
    if split:
        errors.append(f"steps committed by two different quorums (two models for a while): {split}")
    return {
        "syncs_committed": sum(len(m) for m in steps.values()),
        "outer_steps_checked": checked,
        "unverified": unverified,
        "split_steps": sorted(split),
        "errors": errors,
    }


def _last_synced(inc: dict, before: float = float("inf")) -> int:
    steps = [f["step"] for f in inc["frames"] if f["frame"] == "post" and f["time"] <= before]
    return steps[-1] if steps else -1


def steps_lost(failure: dict, incarnations: list[dict]) -> dict[str, int | None]:
    """For one injected failure: ``local`` = optimizer steps the victim had taken that never entered an average (its
    steps since its last committed sync, 0 if a sync committed its values after all), ``absent`` = steps of the run
    the group missed (from its death, or its stall, to the sync where it, or its restart, was back)."""
    victim = [i for i in incarnations if i["group"] == failure["group"] and i["index"] == failure["incarnation"]]
    if not victim:
        return {"local": None, "absent": None}
    inc = victim[0]
    if failure["class"] == "slow_replica":
        stall = next(
            (k for k, f in enumerate(inc["frames"]) if f["frame"] == "stall" and f["time"] >= failure["t"]), None
        )
        if stall is None:
            return {"local": None, "absent": None}
        called = inc["frames"][stall]["called_at"]
        post = next((f for f in inc["frames"][stall:] if f["frame"] == "post"), None)
        if post is None:
            return {"local": None, "absent": None}
        healed = post["healed"] or post["called_at"] != post["step"]
        return {"local": called - _last_synced(inc, inc["frames"][stall]["time"]) if healed else 0,
                "absent": post["step"] - called}  # fmt: skip
    death = failure.get("death_step")
    if death is None:
        return {"local": None, "absent": None}
    contributed = commits(incarnations)
    last = _last_synced(inc)
    died_in = [f for f in inc["frames"] if f["frame"] == "die"]
    # the step file is written after each step's sync: a kill inside the sync of step s (or right after it) is at s
    death = max(death, last, died_in[-1]["called_at"] if died_in else -1)
    if died_in and any(
        step == died_in[-1]["called_at"] and inc["group"] in members and inc["group"] not in {i["group"] for i, _ in v}
        for (step, members), v in contributed.items()
    ):
        last = died_in[-1]["called_at"]  # its values entered the sync it died in
    nxt = [i for i in incarnations if i["group"] == failure["group"] and i["index"] == failure["incarnation"] + 1]
    back = next((f["step"] for f in nxt[0]["frames"] if f["frame"] == "post"), None) if nxt else None
    return {"local": death - last, "absent": None if back is None else back - death}


def figure(d: dict, fig: Any) -> None:
    """Replicas alive over time with the failures marked by class (top), the run's step over time with each
    committed sync, beside the run without failures (bottom)."""
    colors = {"kill_mid_round": "C3", "kill_in_sync": "C1", "kill_during_rejoin": "C4", "two_kills_one_round": "C5",
              "slow_replica": "C2", "lighthouse_restart": "C7"}  # fmt: skip
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [1, 1.3]})
    t, alive, joined = zip(*d["timeline"]["alive"], strict=True) if d["timeline"]["alive"] else ((), (), ())
    top.step(t, alive, where="post", color="k", lw=1, label="replica processes alive")
    top.step(t, joined, where="post", color="C0", lw=1, label="of them joined (trained)")
    seen = set()
    for f in d["failures"]:
        label = f["class"] if f["class"] not in seen else None
        seen.add(f["class"])
        top.axvline(f["t"], color=colors.get(f["class"], "k"), lw=0.8, alpha=0.8, label=label)
    top.set_ylabel("replica groups")
    top.set_ylim(-0.2, d["config"]["groups"] + 0.4)
    top.legend(fontsize=7, ncol=4, loc="lower left")
    syncs = d["timeline"]["syncs"]
    if syncs:
        for n in sorted({c for _, _, c in syncs}):
            pts = [(a, b) for a, b, c in syncs if c == n]
            bottom.plot(*zip(*pts, strict=True), ".", ms=2.5, label=f"committed sync, {n} contributed")
    base = d.get("baseline_timeline") or []
    if base:
        bottom.plot(*zip(*base, strict=True), "-", color="gray", lw=1, label="the same run without failures")
    bottom.set_xlabel("seconds since the start")
    bottom.set_ylabel("optimizer step")
    bottom.legend(fontsize=7, loc="upper left")
