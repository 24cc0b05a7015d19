"""The README's Accelerate example runs under `accelerate launch` on 2 CPU processes and communicates less."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # kept out of the default run's 10-minute budget; `pytest -m slow`
def test_accelerate_loop_example(tmp_path):
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file",
        str(ROOT / "accelerate_configs/multi_cpu.yaml"), "--main_process_port", "0",
        str(ROOT / "examples/accelerate_loop.py"), "--steps", "60",
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(line for line in out.stdout.splitlines() if line.startswith("test accuracy"))
    stats = ast.literal_eval(line.split("; ", 1)[1])
    assert float(line.split()[2].rstrip(";")) > 0.5
    assert stats["qsr/syncs"] >= 1 and 0 < stats["qsr/comm_volume_vs_ddp"] <= 0.5  # H >= H_base = 2
    assert stats["qsr/bytes_averaged"] > 0, "a 2-process run must average"
