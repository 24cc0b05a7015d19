"""Helpers for the recipe, data, hub and end-to-end training tests (tests/testing_utils.py is the core's)."""

import os
import subprocess
from pathlib import Path

import datasets
import numpy as np
from PIL import Image


REPO = Path(__file__).resolve().parents[1]
MULTI_CPU = REPO / "accelerate_configs" / "multi_cpu.yaml"


def random_image(rng: np.random.Generator, mode: str = "RGB") -> Image.Image:
    """A random PIL image of random size (as ImageNet's JPEGs: varied sizes, a few grey or CMYK ones)."""
    height, width = rng.integers(20, 48, size=2)
    channels = {"RGB": 3, "L": 1, "CMYK": 4, "RGBA": 4}[mode]
    array = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    return Image.fromarray(array.squeeze(-1) if channels == 1 else array, mode=mode)


def make_imagenet_like(root: Path, n_train: int = 24, n_eval: int = 12, num_classes: int = 3) -> Path:
    """A tiny dataset in the layout of ILSVRC/imagenet-1k on the hub: parquet shards, ``image`` + ``label`` columns.

    ``datasets.load_dataset(str(root))`` finds the ``train`` and ``validation`` splits from the file names.
    """
    rng = np.random.default_rng(0)
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[f"class_{i}" for i in range(num_classes)])}
    )
    modes = ["RGB", "RGB", "L", "CMYK", "RGBA"]
    for split, n in (("train", n_train), ("validation", n_eval)):
        images = [random_image(rng, modes[i % len(modes)]) for i in range(n)]
        labels = [i % num_classes for i in range(n)]
        ds = datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
        (root / "data").mkdir(parents=True, exist_ok=True)
        ds.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    return root


def launch_train(
    args: list[str], timeout: float = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``accelerate launch --config_file accelerate_configs/multi_cpu.yaml -m qsr_hf.training.train ARGS`` (2 CPU processes)."""
    cmd = [
        "accelerate",
        "launch",
        "--config_file",
        str(MULTI_CPU),
        "--main_process_port",
        "0",
        "-m",
        "qsr_hf.training.train",
    ]
    cmd += args
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(cmd, check=False, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
