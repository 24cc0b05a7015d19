"""RandAugment as the official code (composer's, depth 2, severity 10) and augmentation seeded by (index, epoch)."""

import subprocess
import sys

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from qsr_hf.training import batched_randaugment, data, randaugment, transforms


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


# --- RandAugment on whole batches (the device path) -------------------------------------------------------------


def as_batch(image: Image.Image) -> torch.Tensor:
    return transforms.to_uint8_tensor(image)[None]


def test_every_batched_op_equals_pillow_bit_for_bit():
    # RGB photo, random RGB noise of a non-square size, grey: each op with 8 random strengths (one batch per op)
    rng = np.random.default_rng(3)
    noise = Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))
    for image in (photo(), noise, photo().convert("L")):
        for name in OFFICIAL_OPS:
            strengths = [randaugment.draw_strength(name, rng, 10, image.size) for _ in range(8)]
            expected = torch.cat([as_batch(randaugment.apply_op(image, name, s)) for s in strengths])
            values = torch.tensor([0.0 if s is None else float(s) for s in strengths], dtype=torch.float64)
            out = batched_randaugment.apply_op_batched(as_batch(image).repeat(8, 1, 1, 1), name, values)
            assert out.dtype == torch.uint8
            assert torch.equal(out, expected), f"{name} on {image.mode} {image.size}: {(out != expected).sum()} values"


def test_ops_survive_any_input_cast_and_decode_exactly():
    ops = randaugment.sample_ops(np.random.default_rng(0), 4, 10, (224, 224))
    encoded = randaugment.encode_ops(ops)
    assert encoded.dtype == torch.int64 and encoded.shape == (4, 2)  # not floating: DeepSpeed leaves it alone
    index, strength = randaugment.decode_ops(encoded[None])
    assert [OFFICIAL_OPS[i] for i in index[0].tolist()] == [name for name, _ in ops]
    assert strength[0].tolist() == [0.0 if s is None else float(s) for _, s in ops]


def rgb_table(n: int = 12) -> datasets.Dataset:

    rng = np.random.default_rng(0)
    images = [photo(int(rng.integers(40, 72))).rotate(int(rng.integers(0, 360))) for _ in range(n)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    return datasets.Dataset.from_dict({"image": images, "label": [i % 2 for i in range(n)]}, features=features)


def test_device_path_draws_and_applies_what_the_loader_path_does():
    # same seed, same (index, epoch): the per-image Pillow path and the loader-draws / batch-applies path agree
    table, indices = rgb_table(), list(range(12))
    on_cpu = transforms.TrainTransform(32, randaugment_depth=2)
    on_device = transforms.TrainTransform(32, randaugment_depth=2, randaugment_on_device=True)
    expected = torch.stack([r["pixel_values"] for r in data.ImageDataset(table, on_cpu, 5).__getitems__(indices)])
    rows = data.ImageDataset(table, on_device, 5).__getitems__(indices)
    batch = transforms.ImageCollator(data.IMAGENET_MEAN, data.IMAGENET_STD, normalize=False)(rows)
    assert batch["pixel_values"].dtype == torch.uint8 and batch["randaugment"].shape == (12, 2, 2)
    assert torch.equal(batched_randaugment.batched_rand_augment(batch["pixel_values"], batch["randaugment"]), expected)
    augment = batched_randaugment.DeviceAugmentation(data.IMAGENET_MEAN, data.IMAGENET_STD)
    normalized = transforms.ImageCollator(data.IMAGENET_MEAN, data.IMAGENET_STD)(
        [{"pixel_values": e, "labels": 0} for e in expected]
    )
    assert torch.equal(augment(batch["pixel_values"], batch["randaugment"]), normalized["pixel_values"])
    with pytest.raises(ValueError, match="uint8 pixel_values"):
        augment(normalized["pixel_values"])


def test_trainer_augments_and_normalizes_batches_on_the_device(tmp_path):
    # the model's forward sees exactly the per-image path's normalized pixels, in training and in evaluation
    from transformers import TrainingArguments

    from qsr_hf.training.image_trainer import ImageClassificationTrainer
    from qsr_hf.training.models import build_model

    table, mean, std = rgb_table(4), data.IMAGENET_MEAN, data.IMAGENET_STD
    train_tf = transforms.TrainTransform(16, randaugment_depth=2, randaugment_on_device=True)
    cpu_rows = data.ImageDataset(table, transforms.TrainTransform(16, randaugment_depth=2), 0).__getitems__(
        [0, 1, 2, 3]
    )
    eval_rows = data.ImageDataset(table, transforms.EvalTransform(16)).__getitems__([0, 1, 2, 3])
    expected = {
        name: transforms.ImageCollator(mean, std)(rows)["pixel_values"]
        for name, rows in (("train", cpu_rows), ("eval", eval_rows))
    }
    model = build_model("demo_vit", ["a", "b"], image_size=16, config_overrides="patch_size=8")
    seen = []
    model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["pixel_values"].detach().clone()), with_kwargs=True
    )
    args = TrainingArguments(
        str(tmp_path), max_steps=1, per_device_train_batch_size=4, per_device_eval_batch_size=4, use_cpu=True,
        report_to="none", save_strategy="no", learning_rate=0.0,
    )  # fmt: skip
    trainer = ImageClassificationTrainer(
        model=model, args=args, train_dataset=data.ImageDataset(table, train_tf, 0),
        eval_dataset=data.ImageDataset(table, transforms.EvalTransform(16)),
        data_collator=transforms.ImageCollator(mean, std, normalize=False),
        device_augmentation=batched_randaugment.DeviceAugmentation(mean, std),
    )  # fmt: skip
    trainer.train()
    trainer.evaluate()
    assert len(seen) == 2
    for got, name in zip(seen, ("train", "eval"), strict=True):  # the sampler shuffles: match rows as a set
        assert sorted(map(tuple, got.flatten(1).tolist())) == sorted(map(tuple, expected[name].flatten(1).tolist()))
