"""Data path: hub-format (parquet, encoded images + ClassLabel) and local Fashion-MNIST through one loader; uint8
transforms, the normalizing collator, mixup."""

from pathlib import Path

import numpy as np
import pytest
import torch
from _train_utils import make_imagenet_like
from accelerate import PartialState
from PIL import Image

from qsr_hf.training import data, transforms
from qsr_hf.training.models import build_image_processor


@pytest.fixture(scope="module")
def imagenet_like(tmp_path_factory):
    return make_imagenet_like(tmp_path_factory.mktemp("imagenet_like"))


def test_hub_format_dataset_loads_through_load_dataset(imagenet_like):
    train = data.load_image_dataset(str(imagenet_like), "train")
    val = data.load_image_dataset(str(imagenet_like), "validation", max_samples=5)
    assert len(train) == 24 and len(val) == 5
    assert data.class_names(train) == ["class_0", "class_1", "class_2"]
    assert train[0]["image"].mode == "RGB" and isinstance(train[0]["label"], int)


def test_class_names_needs_a_class_label():
    import datasets

    ds = datasets.Dataset.from_dict({"image": [np.zeros((2, 2), np.uint8)], "label": [0]})
    with pytest.raises(TypeError, match="ClassLabel"):
        data.class_names(ds)


@pytest.mark.parametrize("train", [True, False])
def test_datasets_give_uint8_crops_and_the_collator_normalizes(imagenet_like, train):
    ds = data.load_image_dataset(str(imagenet_like), "train")
    tf = transforms.TrainTransform(16, randaugment_depth=2) if train else transforms.EvalTransform(16)
    rows = data.ImageDataset(ds, tf, seed=0).__getitems__(list(range(6)))  # RGB, grey, CMYK, RGBA, varied sizes
    assert all(r["pixel_values"].dtype == torch.uint8 and r["pixel_values"].shape == (3, 16, 16) for r in rows)
    batch = transforms.ImageCollator(data.IMAGENET_MEAN, data.IMAGENET_STD)(rows)
    assert batch["pixel_values"].shape == (6, 3, 16, 16) and batch["pixel_values"].dtype == torch.float32
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == [0, 1, 2, 0, 1, 2]
    expected = (rows[0]["pixel_values"].float() / 255 - torch.tensor(data.IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(
        data.IMAGENET_STD
    ).view(3, 1, 1)
    assert torch.allclose(batch["pixel_values"][0], expected, atol=1e-5)


def test_eval_transform_takes_the_center_of_the_short_side():
    image = np.zeros((40, 80), np.uint8)
    image[20:, :] = 255  # bottom half white
    out = transforms.EvalTransform(16, num_channels=1, crop_pct=0.5)(image)
    # the center 20x20 of a 40x80 image (= resize to 32x64, center crop 16), resized to 16: half black, half white
    assert out.shape == (1, 16, 16) and out.dtype == torch.uint8
    assert abs(out.float().mean().item() / 255 - 0.5) < 0.07


@pytest.mark.parametrize(
    ("image", "channels"),
    [
        (np.full((5, 7), 255, dtype=np.int64), 1),  # `datasets` numpy format gives int64 pixels
        (np.full((5, 7), 255, dtype=np.int64), 3),
        (np.full((5, 7, 3), 255, dtype=np.uint8), 1),
        (np.full((5, 7, 4), 255, dtype=np.uint8), 3),
    ],
)
def test_arrays_of_any_channel_count_become_the_model_channels(image, channels):
    out = transforms.EvalTransform(4, num_channels=channels, crop_pct=1.0)(image)
    assert out.shape == (channels, 4, 4) and bool((out == 255).all())


def test_jpeg_draft_decoding_matches_full_decoding(tmp_path):
    # a 400x300 smooth JPEG; the training crop is decoded at a reduced scale, the result stays close to full decoding
    y, x = np.mgrid[0:300, 0:400]
    array = np.stack([x * 255 // 400, y * 255 // 300, (x + y) * 255 // 700], -1).astype(np.uint8)
    Image.fromarray(array).save(tmp_path / "a.jpg", quality=90)
    image = {"bytes": (tmp_path / "a.jpg").read_bytes(), "path": None}
    box = (0.0, 0.0, 300.0, 300.0)
    fast = transforms.crop_resize(transforms.open_image(image), box, 32, "RGB", draft=True)
    slow = transforms.crop_resize(transforms.open_image(image), box, 32, "RGB", draft=False)
    diff = np.abs(np.asarray(fast, np.int16) - np.asarray(slow, np.int16))
    assert diff.mean() < 3 and fast.size == (32, 32)


def test_random_resized_crop_box_samples_as_torchvision():
    rng = np.random.default_rng(0)
    boxes = [transforms.random_resized_crop_box(500, 375, rng) for _ in range(2000)]
    areas = np.array([(r - le) * (b - t) / (500 * 375) for le, t, r, b in boxes])
    ratios = np.array([(r - le) / (b - t) for le, t, r, b in boxes])
    assert all(0 <= le < r <= 500 and 0 <= t < b <= 375 for le, t, r, b in boxes)
    assert areas.min() < 0.1 and areas.max() > 0.95 and ratios.min() < 0.8 and ratios.max() > 1.25
    assert transforms.random_resized_crop_box(100, 10, rng, scale_min=1.0) == (43, 0, 56, 10)  # 4/3 fallback


@pytest.mark.skipif(
    not (Path(data.FASHION_MNIST_DIR) / "train-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)",
)
def test_fashion_mnist_local():
    train = data.load_image_dataset("fashion_mnist_local", "train", max_samples=64)
    test = data.load_fashion_mnist("test", max_samples=10)
    assert len(train) == 64 and len(test) == 10
    assert data.class_names(train) == data.FASHION_MNIST_LABELS
    image = np.asarray(train.with_format("numpy")[0]["image"])
    assert image.shape == (28, 28) and image.max() > 100
    assert set(train["label"]) <= set(range(10))
    row = data.ImageDataset(train, transforms.TrainTransform(28, num_channels=1, crop_scale_min=1.0))[0]
    assert row["pixel_values"].shape == (1, 28, 28)


def test_fashion_mnist_falls_back_to_digits_with_a_warning(tmp_path, caplog):
    PartialState(cpu=True)  # accelerate's logger needs a state
    with caplog.at_level("WARNING"):
        ds = data.load_fashion_mnist("train", data_dir=str(tmp_path), max_samples=50)
    assert "dataset-fashion-mnist" in caplog.text and "digits" in caplog.text
    assert len(ds) == 50 and data.class_names(ds) == [str(i) for i in range(10)]
    assert np.asarray(ds.with_format("numpy")[0]["image"]).shape == (8, 8)
    with pytest.raises(ValueError, match="splits"):
        data.load_fashion_mnist("validation")


def test_digits_split_is_disjoint_and_fixed():
    train, test = data.load_sklearn_digits("train"), data.load_sklearn_digits("test")
    assert len(train) + len(test) == 1797
    assert data.load_sklearn_digits("test")["label"] == test["label"]


def test_mixup_gives_soft_labels_with_one_coefficient():
    torch.manual_seed(0)
    x = torch.arange(8.0).view(8, 1, 1, 1).expand(8, 1, 2, 2).clone()  # image i is constant i
    y = torch.arange(8)
    mixed, soft = data.mixup_batch(x, y, alpha=0.2, num_labels=8)
    assert mixed.shape == x.shape and soft.shape == (8, 8) and soft.dtype == torch.float32
    assert torch.allclose(soft.sum(1), torch.ones(8)) and (soft >= 0).all()
    # images and labels are mixed with the same coefficient and partner: pixel value = expected label index
    assert torch.allclose(mixed[:, 0, 0, 0], soft @ torch.arange(8.0), atol=1e-5)
    # one coefficient for the whole batch (rows paired with themselves keep weight 1)
    assert len({round(v, 5) for v in soft.max(1).values.tolist() if v < 1 - 1e-6}) <= 1
    with pytest.raises(ValueError, match="mixup_alpha"):
        data.mixup_batch(x, y, alpha=0.0, num_labels=8)


def test_image_processor_matches_eval_transform():
    processor = build_image_processor(None, 28, [0.286], [0.353], crop_pct=1.0)
    assert processor.size == {"shortest_edge": 28} and processor.crop_pct == 1.0
    assert processor.image_mean == [0.286] and processor.image_std == [0.353]
    assert build_image_processor(None, 224).image_mean == data.IMAGENET_MEAN
