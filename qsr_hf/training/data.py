"""Image-classification data: hub or local datasets, the offline Fashion-MNIST loader, seeded augmentation, mixup.

Every dataset goes through one path: a `datasets` dataset with an image column (encoded images, as ImageNet-1k is
published, or uint8 arrays) and an integer label column, wrapped in [`ImageDataset`], which decodes and augments each
image on uint8 (`qsr_hf.training.transforms`) with a random generator seeded by ``(seed, epoch, sample index)``: the
same sample in the same epoch gets the same augmentation in any process, so a resumed run sees the inputs of an
uninterrupted one. [`~qsr_hf.training.transforms.ImageCollator`] converts whole batches to normalized floats.
Per-worker sharding is the Trainer's (its distributed sampler). Mixup is applied to whole training batches by
[`mixup_batch`], from the training step (the Trainer has one collator for training and evaluation).
"""

import gzip
from pathlib import Path
from typing import Any, Protocol

import datasets
import numpy as np
import torch
from accelerate.logging import get_logger


logger = get_logger(__name__)

IMAGENET_MEAN: list[float] = [0.485, 0.456, 0.406]
IMAGENET_STD: list[float] = [0.229, 0.224, 0.225]
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist
FASHION_MNIST_LABELS: list[str] = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
# Names that load a dataset shipped on the machine instead of the hub.
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
    return load_split(name, split, config, max_samples, data_dir=data_dir, streaming=streaming)


def load_split(
    name: str, split: str, config: str | None = None, max_samples: int | None = None, **load: Any
) -> datasets.Dataset | datasets.IterableDataset:
    """One split through `datasets.load_dataset` (hub id, or local folder/file of parquet, json, text...), cut to its
    first ``max_samples`` examples; ``load`` goes to `load_dataset` (``data_dir``, ``streaming``). The one loader of
    hub data for images and text alike."""
    ds = datasets.load_dataset(name, config, split=split, **load)
    if max_samples is not None:
        streamed = isinstance(ds, datasets.IterableDataset)
        ds = ds.take(max_samples) if streamed else ds.select(range(min(max_samples, len(ds))))
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


class ImageTransformFn(Protocol):
    """What [`ImageDataset`] calls: ``transform(image, rng) -> (C, H, W)`` uint8 tensor, or a dict of the row's
    tensors holding ``pixel_values`` (e.g. with the RandAugment ops to apply on the device)."""

    def __call__(self, image: Any, rng: np.random.Generator) -> torch.Tensor | dict[str, torch.Tensor]: ...  # noqa: D102


def _row(transformed: torch.Tensor | dict[str, torch.Tensor], label: Any) -> dict[str, Any]:
    row = dict(transformed) if isinstance(transformed, dict) else {"pixel_values": transformed}
    row["labels"] = int(label)
    return row


def _undecoded(ds: datasets.Dataset | datasets.IterableDataset, column: str) -> Any:
    # read encoded bytes (PIL decodes them lazily, at a reduced scale when the crop allows) instead of `datasets`
    # decoding every image at full size; uint8 array columns come back as numpy arrays
    feature = (ds.features or {}).get(column)
    if isinstance(feature, datasets.Image) and feature.decode:
        return ds.cast_column(column, datasets.Image(decode=False))
    if isinstance(feature, (datasets.Array2D, datasets.Array3D)) and isinstance(ds, datasets.Dataset):
        return ds.with_format("numpy")
    return ds


class ImageDataset(torch.utils.data.Dataset):
    """A map-style `datasets.Dataset` as ``{"pixel_values": uint8 (C, H, W), "labels": int}`` rows, augmented with a
    generator seeded by ``(seed, epoch, index)``.

    The Trainer fetches the first batches of a resumed run before it restores its random state; seeding by sample
    index and epoch makes those batches, and every later one, equal to an uninterrupted run's.
    [`~qsr_hf.training.image_trainer.ImageClassificationTrainer`] calls [`set_epoch`] at each epoch's start (before
    the loader's workers start, so set ``dataloader_persistent_workers`` to `False`, the Trainer's default).

    Args:
        ds ([`datasets.Dataset`]): rows with an image and a label column.
        transform (`callable`): ``transform(image, rng)``, e.g. [`~qsr_hf.training.transforms.TrainTransform`].
        seed (`int`, defaults to 0): the run's seed.
        image_column (`str`, defaults to ``"image"``), label_column (`str`, defaults to ``"label"``): column names.

    Example:

    ```python
    >>> from qsr_hf.training.transforms import TrainTransform
    >>> train = ImageDataset(load_image_dataset("sklearn_digits_local", "train"), TrainTransform(8, num_channels=1))
    >>> train[0]["pixel_values"].shape, train[0]["pixel_values"].dtype
    (torch.Size([1, 8, 8]), torch.uint8)
    ```
    """

    def __init__(
        self, ds: datasets.Dataset, transform: ImageTransformFn, seed: int = 0, image_column: str = "image",
        label_column: str = "label",
    ) -> None:  # fmt: skip
        self.ds = _undecoded(ds, image_column)
        self.transform = transform
        self.seed = seed
        self.epoch = 0
        self.image_column, self.label_column = image_column, label_column

    def set_epoch(self, epoch: int) -> None:
        """Augment as in epoch ``epoch`` (0-based) from now on."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.ds)

    def rng(self, index: int) -> np.random.Generator:
        """The generator of sample ``index`` in the current epoch."""
        return np.random.default_rng([self.seed, self.epoch, int(index)])

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
        """A batch of rows read from the arrow table at once (the DataLoader's batched fetch)."""
        rows = self.ds[list(indices)]
        images, labels = rows[self.image_column], rows[self.label_column]
        return [
            _row(self.transform(image, self.rng(i)), label)
            for i, image, label in zip(indices, images, labels, strict=True)
        ]


def streaming_image_dataset(
    ds: datasets.IterableDataset, transform: ImageTransformFn, image_column: str = "image", label_column: str = "label"
) -> datasets.IterableDataset:
    """A streamed dataset mapped lazily through ``transform`` (fresh randomness per image: not reproducible)."""
    ds = _undecoded(ds, image_column)

    def apply(row: dict[str, Any]) -> dict[str, Any]:
        return _row(transform(row[image_column], np.random.default_rng()), row[label_column])

    return ds.map(apply, remove_columns=list(ds.column_names or []))


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
