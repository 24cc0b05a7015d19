"""RandAugment as the official code (composer's, depth 2, severity 10) and augmentation seeded by (index, epoch)."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from qsr_hf.training import data, randaugment, transforms


# composer.algorithms.utils.augmentation_sets["all"], the set the official code's RandomAugment uses
OFFICIAL_OPS = [
    "autocontrast", "equalize", "posterize", "rotate", "solarize", "shear_x", "shear_y", "translate_x",
    "translate_y", "color", "contrast", "brightness", "sharpness",
]  # fmt: skip


def photo(size: int = 64) -> Image.Image:
    """A photo-like RGB image: smooth color gradients, an edge, noise, a saturated highlight."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size] / size
    array = np.stack([60 + 120 * x, 50 + 100 * y, 90 + 60 * (x > 0.5)], -1) + rng.normal(0, 8, (size, size, 3))
    array[: size // 8, : size // 8] = 255  # solarize's weakest draw (threshold 254) only inverts such pixels
    return Image.fromarray(array.clip(0, 255).astype(np.uint8))


def test_op_list_is_the_official_one():
    assert list(randaugment.OP_NAMES) == OFFICIAL_OPS


@pytest.mark.parametrize("name", OFFICIAL_OPS)
def test_every_op_changes_the_image_at_severity_10(name):
    image, rng = photo(), np.random.default_rng(1)
    changed = 0
    for _ in range(20):
        out = randaugment.apply_op(image, name, randaugment.draw_strength(name, rng, 10, image.size))
        assert out.size == image.size and out.mode == "RGB"
        changed += not np.array_equal(np.asarray(out), np.asarray(image))
    assert changed >= 19, f"{name} left the image unchanged in {20 - changed} of 20 draws"


@pytest.mark.parametrize(
    ("name", "low", "high"),
    [("rotate", 0, 29), ("shear_x", 0.003, 0.3), ("translate_x", 0, 63 // 3), ("solarize", 1, 254)],
)
def test_strength_is_drawn_at_random_up_to_the_maximum(name, low, high):
    rng = np.random.default_rng(0)
    draws = np.array([randaugment.draw_strength(name, rng, 10, (64, 64)) for _ in range(2000)], dtype=float)
    magnitude = np.abs(draws)
    assert magnitude.min() >= low and magnitude.max() <= high  # never past the op's maximum
    assert np.quantile(magnitude, 0.05) < low + 0.1 * (high - low) and np.quantile(magnitude, 0.95) > 0.85 * high
    if name in ("rotate", "shear_x", "translate_x"):
        assert 0.45 < (draws < 0).mean() < 0.55  # random sign
    half = np.array([randaugment.draw_strength(name, rng, 5, (64, 64)) for _ in range(500)], dtype=float)
    if name != "solarize":  # severity 5 caps the strength at half the maximum
        assert np.abs(half).max() <= 0.5 * high + 1e-9


def test_enhancement_factors_follow_composers_symmetric_draw():
    rng = np.random.default_rng(0)
    factors = np.array([randaugment.draw_strength("contrast", rng, 10, (8, 8)) for _ in range(4000)])
    assert factors.min() >= 0.1 and factors.max() <= 10 and 0.45 < (factors > 1).mean() < 0.55
    assert {randaugment.draw_strength("posterize", rng, 10, (8, 8)) for _ in range(500)} == {1, 2, 3, 4}


def test_depth_and_grey_images():
    grey = photo().convert("L")
    out = randaugment.rand_augment(grey, np.random.default_rng(0), depth=2, severity=10)
    assert out.mode == "L" and out.size == grey.size
    assert randaugment.rand_augment(grey, np.random.default_rng(0), depth=0) is grey


TRANSFORM = transforms.TrainTransform(8, 1, crop_scale_min=0.3, randaugment_depth=2)


def test_augmentation_is_a_function_of_index_and_epoch():
    ds = data.load_sklearn_digits("train")
    one, two = data.ImageDataset(ds, TRANSFORM, seed=7), data.ImageDataset(ds, TRANSFORM, seed=7)
    one.set_epoch(3), two.set_epoch(3)
    first = one[5]["pixel_values"]
    assert torch.equal(first, two[5]["pixel_values"]) and torch.equal(
        first, one.__getitems__([4, 5])[1]["pixel_values"]
    )
    others = []
    for epoch in (2, 4):
        one.set_epoch(epoch)
        others.append(one[5]["pixel_values"])
    assert not all(torch.equal(first, other) for other in others)  # the epoch changes the draw
    # a fresh process, given the image and the generator ImageDataset seeds for (seed 7, epoch 3, index 5)
    image = np.asarray(ds.with_format("numpy")[5]["image"], np.uint8)
    code = (
        "import sys, numpy as np; from qsr_hf.training.transforms import TrainTransform; "
        "image = np.frombuffer(sys.stdin.buffer.read(), np.uint8).reshape(8, 8); "
        "out = TrainTransform(8, 1, crop_scale_min=0.3, randaugment_depth=2)(image, np.random.default_rng([7, 3, 5])); "
        "sys.stdout.buffer.write(out.numpy().tobytes())"
    )
    out = subprocess.run([sys.executable, "-c", code], input=image.tobytes(), capture_output=True, check=True).stdout
    assert out == first.contiguous().numpy().tobytes()
