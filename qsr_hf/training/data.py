"""Image-classification data: hub or local datasets, the offline Fashion-MNIST loader, kornia transforms, mixup.

Every dataset goes through one path: a `datasets` dataset with an image column (PIL images, as ImageNet-1k is
published, or arrays) and an integer label column, then `with_transform` (lazily, per example) to
``{"pixel_values", "labels"}``. Per-worker sharding is the Trainer's (its distributed sampler).

Augmentation follows the paper (PAPER.md) with `kornia.augmentation`: train = RandomResizedCrop + horizontal flip
(+ RandAugment for ViT), eval = resize to ``image_size / eval_crop_pct`` (256 for 224) + center crop. Mixup is
applied to whole training batches by [`mixup_batch`], from the training step (the Trainer has one collator for
training and evaluation, and evaluation must not be mixed).
"""

import gzip
from pathlib import Path
from typing import Any

import datasets
import kornia.augmentation as K
import numpy as np
import torch
from accelerate.logging import get_logger
from kornia.augmentation.auto import RandAugment
from kornia.augmentation.auto.rand_augment.rand_augment import default_policy
from PIL import Image
from torch import nn


logger = get_logger(__name__)

IMAGENET_MEAN: list[float] = [0.485, 0.456, 0.406]
IMAGENET_STD: list[float] = [0.229, 0.224, 0.225]
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist
FASHION_MNIST_LABELS: list[str] = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
# Names that load a dataset shipped on the machine instead of the hub (DATA.md).
LOCAL_DATASETS: list[str] = ["fashion_mnist_local", "sklearn_digits_local"]


def _read_idx(path: Path, header: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=header)


def _image_dataset(images: np.ndarray, labels: np.ndarray, names: list[str]) -> datasets.Dataset:
    # Same column names as ImageNet-1k on the hub (image + ClassLabel label); the images stay uint8 arrays rather
    # than PNG-encoded PIL images (encoding 60k images costs each process seconds), and `to_tensor` takes both.
    shape = images.shape[1:]
    image = datasets.Array2D(shape, "uint8") if len(shape) == 2 else datasets.Array3D(shape, "uint8")
    features = datasets.Features({"image": image, "label": datasets.ClassLabel(names=names)})
    return datasets.Dataset.from_dict({"image": images, "label": labels.astype(np.int64)}, features=features)


def load_fashion_mnist(split: str, data_dir: str | None = None, max_samples: int | None = None) -> datasets.Dataset:
    """Load Fashion-MNIST from its idx files (no network), as a dataset with ``image`` and ``label`` columns.

    Falls back, with a warning, to scikit-learn's digits when the files are absent.

    Args:
        split (`str`): ``train`` (60,000 images) or ``test`` (10,000).
        data_dir (`str`, *optional*): folder of the 4 ``*-ubyte.gz`` files; default: the Debian package's folder.
        max_samples (`int`, *optional*): keep the first ``max_samples`` images (read before encoding, so it is fast).

    Returns:
        [`datasets.Dataset`]: 28x28 grey uint8 images (``Array2D``), 10 classes (``ClassLabel``).
    """
    if split not in ("train", "test"):
        raise ValueError(f"fashion_mnist_local has splits 'train' and 'test', got {split!r}")
    folder = Path(data_dir or FASHION_MNIST_DIR)
    prefix = "train" if split == "train" else "t10k"
    image_file, label_file = folder / f"{prefix}-images-idx3-ubyte.gz", folder / f"{prefix}-labels-idx1-ubyte.gz"
    if not (image_file.is_file() and label_file.is_file()):
        logger.warning(
            f"Fashion-MNIST not found in {folder} (install it with `apt-get install dataset-fashion-mnist`, or set "
            "data_dir); falling back to scikit-learn's digits (8x8, 1,797 images): accuracies are not comparable",
            main_process_only=True,
        )
        return load_sklearn_digits(split, max_samples)
    images = _read_idx(image_file, 16).reshape(-1, 28, 28)[:max_samples]
    labels = _read_idx(label_file, 8)[:max_samples]
    return _image_dataset(images, labels, FASHION_MNIST_LABELS)


def load_sklearn_digits(split: str, max_samples: int | None = None) -> datasets.Dataset:
    """scikit-learn's 8x8 digits as an image dataset: a fixed shuffled 80/20 split (``train`` / ``test``)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    cut = int(0.8 * len(order))
    keep = order[:cut] if split == "train" else order[cut:]
    images = (digits.images[keep] * (255 / 16)).round().astype(np.uint8)  # 0..16 -> 0..255
    return _image_dataset(images[:max_samples], digits.target[keep][:max_samples], [str(i) for i in range(10)])


def load_image_dataset(
    name: str,
    split: str,
    config: str | None = None,
    data_dir: str | None = None,
    streaming: bool = False,
    max_samples: int | None = None,
) -> datasets.Dataset | datasets.IterableDataset:
    """Load one split of an image-classification dataset.

    Args:
        name (`str`):
            A hub id (``ILSVRC/imagenet-1k``), a local folder or file that `datasets.load_dataset` understands
            (image folder, parquet, arrow), or a local dataset name: ``fashion_mnist_local``,
            ``sklearn_digits_local``.
        split (`str`): split name, e.g. ``train``, ``validation``, ``test``.
        config (`str`, *optional*): dataset configuration name.
        data_dir (`str`, *optional*): ``data_dir`` of `load_dataset`; for ``fashion_mnist_local``, the idx folder.
        streaming (`bool`, defaults to `False`): stream instead of downloading (hub datasets).
        max_samples (`int`, *optional*): keep the first ``max_samples`` examples.

    Returns:
        [`datasets.Dataset`] or [`datasets.IterableDataset`]: the split.
    """
    if name == "fashion_mnist_local":
        return load_fashion_mnist(split, data_dir, max_samples)
    if name == "sklearn_digits_local":
        return load_sklearn_digits(split, max_samples)
    ds = datasets.load_dataset(name, config, split=split, data_dir=data_dir, streaming=streaming)
    if max_samples is not None:
        ds = ds.take(max_samples) if streaming else ds.select(range(min(max_samples, len(ds))))
    return ds


def class_names(ds: datasets.Dataset | datasets.IterableDataset, label_column: str = "label") -> list[str]:
    """Class names in label-id order, from the label column's `ClassLabel` feature."""
    feature = (ds.features or {}).get(label_column)
    if not isinstance(feature, datasets.ClassLabel):
        raise TypeError(
            f"column {label_column!r} must be a datasets.ClassLabel (to know the classes), got {feature!r}; "
            "cast it with ds.cast_column(label_column, datasets.ClassLabel(names=[...]))"
        )
    return list(feature.names)


def build_transform(
    image_size: int,
    mean: list[float],
    std: list[float],
    train: bool,
    num_channels: int = 3,
    crop_scale_min: float = 0.08,
    hflip: bool = True,
    randaugment_n: int = 0,
    randaugment_m: int = 15,
    eval_crop_pct: float = 0.875,
) -> nn.Sequential:
    """The kornia pipeline for one image batch ``(B, C, H, W)`` of floats in [0, 1], ending with normalization.

    Args:
        image_size (`int`): side of the output crop in pixels (224 in the paper).
        mean (`list[float]`), std (`list[float]`): per-channel normalization (the model's).
        train (`bool`): training pipeline (random crop, flip, RandAugment) or evaluation (resize + center crop).
        num_channels (`int`, defaults to 3): 1 for grey images (RandAugment then skips its color op).
        crop_scale_min (`float`, defaults to 0.08): smallest crop area fraction of RandomResizedCrop.
        hflip (`bool`, defaults to `True`): random horizontal flip.
        randaugment_n (`int`, defaults to 0): RandAugment ops per image; 0 turns it off.
        randaugment_m (`int`, defaults to 15): RandAugment magnitude on kornia's scale, in (0, 30).
        eval_crop_pct (`float`, defaults to 0.875): evaluation resizes the short side to ``image_size / eval_crop_pct``
            (224 / 0.875 = 256), then center-crops ``image_size``.

    Returns:
        `torch.nn.Sequential`: the pipeline.
    """
    if train:
        ops: list[nn.Module] = [K.RandomResizedCrop((image_size, image_size), scale=(crop_scale_min, 1.0))]
        if hflip:
            ops.append(K.RandomHorizontalFlip())
        if randaugment_n > 0:
            policy = [p for p in default_policy if num_channels == 3 or p[0][0] != "color"]  # color needs RGB
            ops.append(RandAugment(randaugment_n, randaugment_m, policy=policy))
    else:
        resize = round(image_size / eval_crop_pct)
        ops = [K.Resize(resize, side="short", antialias=True), K.CenterCrop(image_size)]
    ops.append(K.Normalize(mean=torch.tensor(mean), std=torch.tensor(std)))
    return nn.Sequential(*ops)


def to_tensor(image: Any, num_channels: int = 3) -> torch.Tensor:
    """An image (PIL, or an ``(H, W[, C])`` array of 0..255 values) as a ``(1, C, H, W)`` float32 tensor in [0, 1]."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("L" if num_channels == 1 else "RGB"))
    # `datasets` hands uint8 pixels back as int64 in numpy format: go through float32 in every case.
    array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
    if array.ndim == 2:
        array = array.unsqueeze(-1)
    array = array.permute(2, 0, 1)
    if array.shape[0] != num_channels:  # grey <-> RGB, or RGBA -> RGB
        if num_channels == 1:
            array = array[:3].mean(0, keepdim=True)
        elif array.shape[0] == 1:
            array = array.expand(num_channels, -1, -1)
        else:
            array = array[:num_channels]
    return array.unsqueeze(0)


class ImageTransform:
    """Batch transform for `datasets` (``with_transform``): image + label columns -> ``pixel_values`` + ``labels``.

    Each image is augmented on its own (its own crop and RandAugment ops), as torchvision-style pipelines do.

    Args:
        pipeline (`torch.nn.Module`): from [`build_transform`].
        image_column (`str`, defaults to ``"image"``), label_column (`str`, defaults to ``"label"``): column names.
        num_channels (`int`, defaults to 3): channels the model expects.
    """

    def __init__(
        self, pipeline: nn.Module, image_column: str = "image", label_column: str = "label", num_channels: int = 3
    ) -> None:
        self.pipeline = pipeline
        self.image_column = image_column
        self.label_column = label_column
        self.num_channels = num_channels

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        """Transform a batch of rows (``{column: [values]}``) into ``{"pixel_values": [...], "labels": [...]}``."""
        with torch.no_grad():
            pixels = [self.pipeline(to_tensor(img, self.num_channels))[0] for img in batch[self.image_column]]
        return {"pixel_values": pixels, "labels": [int(y) for y in batch[self.label_column]]}


def apply_transform(
    ds: datasets.Dataset | datasets.IterableDataset, transform: ImageTransform
) -> datasets.Dataset | datasets.IterableDataset:
    """Attach ``transform`` lazily: ``with_transform`` for map-style datasets, a lazy ``map`` when streaming."""
    if isinstance(ds, datasets.IterableDataset):
        return ds.map(transform, batched=True, batch_size=16, remove_columns=list(ds.column_names or []))
    return ds.with_transform(transform)


def collate_images(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack ``pixel_values`` into ``(B, C, H, W)`` float32 and ``labels`` into ``(B,)`` int64."""
    return {
        "pixel_values": torch.stack([torch.as_tensor(e["pixel_values"], dtype=torch.float32) for e in examples]),
        "labels": torch.tensor([int(e["labels"]) for e in examples], dtype=torch.long),
    }


def mixup_batch(
    pixel_values: torch.Tensor, labels: torch.Tensor, alpha: float, num_labels: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup (Zhang et al., 2018) with one coefficient per batch, as the official QSR code.

    λ ~ Beta(α, α) once per batch; each image is mixed with another of the batch (a random permutation). kornia's
    ``RandomMixUpV2`` draws λ uniformly per sample instead, hence this function.

    Args:
        pixel_values (`torch.Tensor`): ``(B, C, H, W)`` images.
        labels (`torch.Tensor`): ``(B,)`` class ids.
        alpha (`float`): α of the Beta distribution (0.2 in the paper's ViT recipe); must be > 0.
        num_labels (`int`): number of classes.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: the mixed images and ``(B, num_labels)`` float soft labels (rows sum to 1).
    """
    if not alpha > 0:
        raise ValueError(f"mixup_alpha must be > 0 to mix, got {alpha}")
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    perm = torch.randperm(labels.shape[0], device=labels.device)
    mixed = pixel_values.mul(lam).add_(pixel_values[perm], alpha=1.0 - lam)
    one_hot = torch.nn.functional.one_hot(labels, num_labels).to(pixel_values.dtype)
    return mixed, one_hot.mul(lam).add_(one_hot[perm], alpha=1.0 - lam)
