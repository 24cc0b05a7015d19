"""benchmarks/gpu_check.py's tiny path (the same sections as on a GPU, at a tiny size, on CPU here): the json it writes."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch


ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # kept out of the default run's 10-minute budget; `pytest -m slow`
def test_gpu_check_tiny_writes_every_section(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = ["bash", str(ROOT / "benchmarks/gpu_check.sh"), "--tiny", "--results-dir", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check_tiny.json").read_text())
    assert {"machine", "command", "size", "gpus"} <= set(result)
    for section in ("step_world1", "step_world2"):
        steps = result[section]
        assert "skipped" not in steps, steps
        assert steps["world_size"] == int(section[-1])
        for variant in ("without_callback", "with_callback"):
            assert len(steps[variant]["step_s"]) == result["size"]["steps"]
            assert steps[variant]["images_per_s_per_process"] > 0
    local = result["sync_local_work"]["median_s"]
    assert {"average_inplace", "average_copy", "upcast_fp32", "divide", "copy_back", "finite_check", "copy_in"} <= set(
        local
    )
    assert result["sync_local_work"]["params"] == sum(p.numel() for p in _demo_vit().parameters())
    if torch.cuda.device_count() < 2:
        assert "NCCL needs one GPU per rank" in result["nccl_avg"]["skipped"]
    pipeline = result["input_pipeline"]
    assert "tiny mode" in pipeline["skipped"]  # the full-size loader benchmark does not run in the tiny check


def _demo_vit():
    from qsr_hf.training.models import build_model

    return build_model("demo_vit", [str(i) for i in range(1000)], image_size=28, num_channels=3)
