"""The checks of the fault-injection soak (benchmarks/soak_check.py) on made-up records: a correct sync passes, a
wrong average, replicas leaving a sync with different values, a minority quorum and two quorums at one step are
caught, and a contributor killed inside a sync after its collectives is counted from its pre-sync record."""

import pickle
import sys
from pathlib import Path

import numpy as np
import torch

from tests.testing_utils import nesterov_reference


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import soak_check


ROUND_END = 1


def _sync(values: list[np.ndarray], anchor: np.ndarray, momentum: np.ndarray) -> list[np.ndarray]:
    mean = torch.from_numpy(np.mean(values, axis=0))
    params, mom = nesterov_reference(torch.from_numpy(anchor), mean, torch.from_numpy(momentum))
    return [params.numpy(), params.numpy(), mom.numpy()]


def _records(values, members=(0, 1, 2), contributors=None, after=None, dead=()):
    anchor, momentum = np.zeros(4, np.float32), np.full(4, 0.1, np.float32)
    after = after or _sync(values, anchor, momentum)
    incs = []
    for g, v in enumerate(values):
        pre = {"frame": "pre", "kind": ROUND_END, "called_at": 8, "time": 1.0, "before": [v, anchor, momentum]}
        post = {"frame": "post", "kind": ROUND_END, "called_at": 8, "step": 8, "members": list(members),
                "contributors": contributors or len(values), "healed": False, "time": 2.0, "after": after}  # fmt: skip
        incs.append({"group": g, "index": 0, "frames": [pre] if g in dead else [pre, post]})
    return incs


def test_a_correct_sync_passes():
    values = [np.random.default_rng(g).standard_normal(4).astype(np.float32) for g in range(3)]
    result = soak_check.check_syncs(_records(values), groups=3)
    assert result["errors"] == [] and result["outer_steps_checked"] == 1


def test_a_dead_contributor_counts_from_its_pre_sync_record():
    values = [np.random.default_rng(g).standard_normal(4).astype(np.float32) for g in range(3)]
    result = soak_check.check_syncs(_records(values, dead=(2,)), groups=3)
    assert result["errors"] == [] and result["outer_steps_checked"] == 1


def test_wrong_average_unequal_replicas_minority_and_split_are_caught():
    values = [np.random.default_rng(g).standard_normal(4).astype(np.float32) for g in range(3)]
    wrong = _records(values, after=_sync(values[:2], np.zeros(4, np.float32), np.full(4, 0.1, np.float32)))
    assert any("outer step" in e for e in soak_check.check_syncs(wrong, groups=3)["errors"])
    unequal = _records(values)
    unequal[1]["frames"][1] = {**unequal[1]["frames"][1], "after": [a + 1 for a in unequal[1]["frames"][1]["after"]]}
    assert any("different values" in e for e in soak_check.check_syncs(unequal, groups=3)["errors"])
    minority = _records(values[:2], members=(0, 1))
    assert any("not a majority" in e for e in soak_check.check_syncs(minority, groups=4)["errors"])
    split = _records(values[:2], members=(0, 1)) + [
        {**inc, "group": inc["group"] + 2} for inc in _records(values[:2], members=(2, 3))
    ]
    assert soak_check.check_syncs(split, groups=3)["split_steps"] == [8]


def test_a_stream_cut_by_a_kill_keeps_its_whole_frames(tmp_path):
    path = tmp_path / "g0_0.stream"
    with open(path, "wb") as f:
        pickle.dump({"frame": "pre", "called_at": 4}, f)
        f.write(pickle.dumps({"frame": "post", "called_at": 4})[:7])  # SIGKILLed while writing
    assert soak_check.read_stream(path) == [{"frame": "pre", "called_at": 4}]
