"""Data path: hub-format (parquet, PIL + ClassLabel) and local Fashion-MNIST through one loader; transforms; mixup."""

from pathlib import Path

import numpy as np
import pytest
import torch
from _train_utils import make_imagenet_like
from accelerate import PartialState

from qsr_hf.training import data
from qsr_hf.training.models import MODEL_TYPES, build_image_processor, build_model


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
@pytest.mark.parametrize("randaugment_n", [0, 2])
def test_transforms_give_normalized_float_crops(imagenet_like, train, randaugment_n):
    ds = data.load_image_dataset(str(imagenet_like), "train")
    pipeline = data.build_transform(
        16, data.IMAGENET_MEAN, data.IMAGENET_STD, train=train, randaugment_n=randaugment_n, randaugment_m=10
    )
    ds = data.apply_transform(ds, data.ImageTransform(pipeline))
    rows = [ds[i] for i in range(6)]  # RGB, grey, CMYK, RGBA images of different sizes
    batch = data.collate_images(rows)
    assert batch["pixel_values"].shape == (6, 3, 16, 16) and batch["pixel_values"].dtype == torch.float32
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == [0, 1, 2, 0, 1, 2]
    assert torch.isfinite(batch["pixel_values"]).all()
    assert batch["pixel_values"].min() < -0.5 < 0.5 < batch["pixel_values"].max(), "normalized, not [0, 1]"


def test_eval_transform_resizes_short_side_then_center_crops():
    image = torch.zeros(1, 1, 40, 80)
    image[..., 20:, :] = 1.0  # bottom half white
    out = data.build_transform(16, [0.0], [1.0], train=False, num_channels=1, eval_crop_pct=0.5)(image)
    # 40x80 -> short side 32 -> 32x64 -> center 16x16 crop: rows 8..24 of 32, half black, half white
    assert out.shape == (1, 1, 16, 16)
    assert torch.allclose(out.mean(), torch.tensor(0.5), atol=0.07)


@pytest.mark.parametrize(
    ("image", "channels"),
    [
        (np.full((5, 7), 255, dtype=np.int64), 1),  # `datasets` numpy format gives int64 pixels
        (np.full((5, 7), 255, dtype=np.int64), 3),
        (np.full((5, 7, 3), 255, dtype=np.uint8), 1),
        (np.full((5, 7, 4), 255, dtype=np.uint8), 3),
        (np.full((5, 7, 3), 255, dtype=np.uint8).tolist(), 3),  # python format: nested lists
    ],
)
def test_to_tensor_converts_arrays_and_channels(image, channels):
    out = data.to_tensor(image, channels)
    assert out.shape == (1, channels, 5, 7) and out.dtype == torch.float32
    assert torch.allclose(out, torch.ones_like(out))


def test_grey_randaugment_skips_color_ops():
    pipeline = data.build_transform(12, [0.5], [0.5], train=True, num_channels=1, randaugment_n=3, randaugment_m=20)
    for _ in range(20):  # every op of the policy gets drawn eventually; none may need RGB
        assert pipeline(torch.rand(1, 1, 14, 14)).shape == (1, 1, 12, 12)


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
    pipeline = data.build_transform(28, [0.286], [0.353], train=True, num_channels=1, crop_scale_min=1.0)
    batch = data.collate_images([train.with_transform(data.ImageTransform(pipeline, num_channels=1))[0]])
    assert batch["pixel_values"].shape == (1, 1, 28, 28)


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


@pytest.mark.parametrize("model_type", sorted(MODEL_TYPES))
def test_models_build_from_config(model_type):
    big = model_type in ("vit_b16", "resnet152")
    overrides = "num_hidden_layers=1" if model_type == "vit_b16" else None  # config_overrides path
    model = build_model(model_type, ["a", "b", "c"], image_size=224 if big else 32, config_overrides=overrides)
    assert model.config.num_labels == 3 and model.config.id2label[2] == "c"
    size = 224 if model_type == "vit_b16" else 32  # a ResNet takes any size
    with torch.no_grad():
        model.eval()
        logits = model(pixel_values=torch.zeros(1, 3, size, size)).logits
    assert logits.shape == (1, 3)


def test_paper_model_sizes():
    labels = [str(i) for i in range(1000)]
    assert sum(p.numel() for p in build_model("resnet152", labels).parameters()) == 60_192_808  # torchvision's
    vit = build_model("vit_b16", labels)
    assert sum(p.numel() for p in vit.parameters()) == 86_567_656  # SimpleViT: 86,381,800 (models.py)
    assert vit.config.hidden_dropout_prob == 0.0 and vit.config.patch_size == 16


def test_unknown_model_type_is_named():
    with pytest.raises(ValueError, match="model_type"):
        build_model("vit_huge", ["a"])


def test_image_processor_matches_eval_transform():
    processor = build_image_processor(None, 28, [0.286], [0.353], crop_pct=1.0)
    assert processor.size == {"shortest_edge": 28} and processor.crop_pct == 1.0
    assert processor.image_mean == [0.286] and processor.image_std == [0.353]
    assert build_image_processor(None, 224).image_mean == data.IMAGENET_MEAN
