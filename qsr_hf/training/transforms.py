"""Image transforms on uint8, as the official code's ffcv pipeline: decode + crop/resize, flip, RandAugment, then
float conversion and normalization on whole batches in the collator ([`ImageCollator`]); or, with
``randaugment_on_device``, the loader only draws the RandAugment ops and the trainer applies them and normalizes on
the device ([`~qsr_hf.training.batched_randaugment.DeviceAugmentation`]).

Training: RandomResizedCrop (torchvision's sampling: area fraction ``U(crop_scale_min, 1)``, log-uniform aspect ratio
in [3/4, 4/3], 10 tries, then a center crop) + horizontal flip + RandAugment ([`rand_augment`], composer's). Evaluation:
the center ``crop_pct`` of the short side (224/256), resized to ``image_size`` (= resize to 256, center crop 224).
A JPEG is decoded straight at the smallest 1/2, 1/4 or 1/8 scale that still covers the crop (PIL draft mode), then
the crop is resized with PIL's antialiased bilinear filter, so no step touches floats or full-size pixels it does
not need. Randomness comes from a `numpy.random.Generator` passed per image ([`ImageDataset`] seeds it by sample
index and epoch).
"""

import io
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from qsr_hf.training.randaugment import encode_ops, rand_augment, sample_ops


_BILINEAR = Image.Resampling.BILINEAR
_LOG_RATIO = (math.log(3 / 4), math.log(4 / 3))


def open_image(image: Any) -> Image.Image:
    """A PIL image from what a dataset holds: PIL, ``{"bytes", "path"}`` (``datasets.Image(decode=False)``), array.

    Encoded images are opened lazily (only the header is read), so a later `draft` can decode them at a reduced size.
    """
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, dict):
        return Image.open(io.BytesIO(image["bytes"]) if image.get("bytes") else image["path"])
    array = np.asarray(image)
    if array.dtype != np.uint8:  # `datasets` hands uint8 pixels back as int64 in numpy format
        array = array.astype(np.uint8)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return Image.fromarray(array)


def random_resized_crop_box(
    width: int, height: int, rng: np.random.Generator, scale_min: float = 0.08
) -> tuple[float, float, float, float]:
    """RandomResizedCrop's box ``(left, top, right, bottom)``, sampled as torchvision and ffcv do."""
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(scale_min, 1.0)
        ratio = math.exp(rng.uniform(*_LOG_RATIO))
        w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    w, h = width, height  # fallback (torchvision's): the whole image, cut to the ratio range, centered
    if width / height < 3 / 4:
        h = round(width / (3 / 4))
    elif width / height > 4 / 3:
        w = round(height * (4 / 3))
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def center_crop_box(width: int, height: int, crop_pct: float) -> tuple[float, float, float, float]:
    """The centered square of side ``crop_pct`` x the short side (resize to S / crop_pct, then crop S)."""
    side = min(width, height) * crop_pct
    left, top = (width - side) / 2, (height - side) / 2
    return left, top, left + side, top + side


def crop_resize(image: Image.Image, box: tuple[float, ...], size: int, mode: str, draft: bool = True) -> Image.Image:
    """Crop ``box`` (original pixel coordinates) and resize it to ``size x size`` in ``mode``, decoding JPEGs small."""
    if draft and image.format == "JPEG":
        shrink = min(box[2] - box[0], box[3] - box[1]) / size  # decode at 1/2, 1/4, 1/8 while the crop covers size
        if shrink >= 2:
            full = image.size
            image.draft("RGB" if mode == "RGB" else "L", (math.ceil(full[0] / shrink), math.ceil(full[1] / shrink)))
            sx, sy = image.size[0] / full[0], image.size[1] / full[1]
            box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
    if image.mode != mode:
        image = image.convert(mode)
    return image.resize((size, size), _BILINEAR, box=box)


def to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL image as a ``(C, H, W)`` uint8 tensor (a view of an ``(H, W, C)`` copy; the collator makes floats)."""
    array = np.array(image, dtype=np.uint8)
    return torch.from_numpy(array[..., None] if array.ndim == 2 else array).permute(2, 0, 1)


@dataclass
class TrainTransform:
    """RandomResizedCrop + flip + RandAugment on uint8, one image at a time.

    Args:
        image_size (`int`): side of the output crop (224 in the paper).
        num_channels (`int`, defaults to 3): 3 (RGB) or 1 (grey).
        crop_scale_min (`float`, defaults to 0.08): smallest crop area fraction.
        hflip (`bool`, defaults to `True`): random horizontal flip with probability 1/2.
        randaugment_depth (`int`, defaults to 0): RandAugment ops per image (0: off; 2 in the paper's ViT recipe).
        randaugment_severity (`float`, defaults to 10): largest op strength, 0-10 (composer's scale).
        draft (`bool`, defaults to `True`): decode JPEGs at a reduced scale when the crop allows it.
        randaugment_on_device (`bool`, defaults to `False`): draw the RandAugment ops and strengths here (same draws
            from the same ``rng``) but leave applying them to
            [`~qsr_hf.training.batched_randaugment.DeviceAugmentation`], on whole batches.
    """

    image_size: int
    num_channels: int = 3
    crop_scale_min: float = 0.08
    hflip: bool = True
    randaugment_depth: int = 0
    randaugment_severity: float = 10.0
    draft: bool = True
    randaugment_on_device: bool = False

    def __call__(self, image: Any, rng: np.random.Generator) -> torch.Tensor | dict[str, torch.Tensor]:
        """Augment one image with randomness from ``rng``.

        Returns:
            ``(C, image_size, image_size)`` uint8; with ``randaugment_on_device``, ``{"pixel_values": that,
            "randaugment": (depth, 2) int64}`` (the ops, [`~qsr_hf.training.randaugment.encode_ops`]).
        """
        image = open_image(image)
        box = random_resized_crop_box(*image.size, rng, self.crop_scale_min)
        mode = "L" if self.num_channels == 1 else "RGB"
        image = crop_resize(image, box, self.image_size, mode, self.draft)
        if self.hflip and rng.uniform() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.randaugment_on_device:
            ops = sample_ops(rng, self.randaugment_depth, self.randaugment_severity, image.size)
            return {"pixel_values": to_uint8_tensor(image), "randaugment": encode_ops(ops)}
        if self.randaugment_depth > 0:
            image = rand_augment(image, rng, self.randaugment_depth, self.randaugment_severity)
        return to_uint8_tensor(image)


@dataclass
class EvalTransform:
    """Center crop of ``crop_pct`` of the short side, resized to ``image_size`` (no randomness).

    Args:
        image_size (`int`): side of the output (224).
        num_channels (`int`, defaults to 3): 3 (RGB) or 1 (grey).
        crop_pct (`float`, defaults to 0.875): 224 / 256.
        draft (`bool`, defaults to `True`): decode JPEGs at a reduced scale when the crop allows it.
    """

    image_size: int
    num_channels: int = 3
    crop_pct: float = 0.875
    draft: bool = True

    def __call__(self, image: Any, rng: np.random.Generator | None = None) -> torch.Tensor:
        """Resize and crop one image; returns ``(C, image_size, image_size)`` uint8 (``rng`` is unused)."""
        image = open_image(image)
        box = center_crop_box(*image.size, self.crop_pct)
        return to_uint8_tensor(
            crop_resize(image, box, self.image_size, "L" if self.num_channels == 1 else "RGB", self.draft)
        )


class Normalize:
    """uint8 pixels to normalized floats, ``(x / 255 - mean) / std``, on the pixels' device.

    Args:
        mean (`list[float]`), std (`list[float]`): per-channel normalization (the model's image processor's).
        dtype (`torch.dtype`, defaults to `torch.float32`): dtype of the result.
    """

    def __init__(self, mean: list[float], std: list[float], dtype: torch.dtype = torch.float32) -> None:
        std_t = torch.tensor(std, dtype=torch.float32)
        self.scale = (1.0 / (255.0 * std_t)).view(-1, 1, 1)
        self.shift = (torch.tensor(mean, dtype=torch.float32) / std_t).view(-1, 1, 1)
        self.dtype = dtype

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(..., C, H, W)`` uint8 -> normalized ``dtype``, on ``pixels.device``."""
        scale, shift = self.scale.to(pixels.device), self.shift.to(pixels.device)
        return pixels.to(torch.float32).mul_(scale).sub_(shift).to(self.dtype)


class ImageCollator:
    """Stack uint8 ``pixel_values`` into a batch, convert to float and normalize: ``(x / 255 - mean) / std``.

    Args:
        mean (`list[float]`), std (`list[float]`): per-channel normalization (the model's image processor's).
        dtype (`torch.dtype`, defaults to `torch.float32`): dtype of ``pixel_values``.
        normalize (`bool`, defaults to `True`): `False` keeps the batch uint8 (4x fewer bytes to the device) for
            [`~qsr_hf.training.batched_randaugment.DeviceAugmentation`] to augment and normalize on the device.

    Rows that carry RandAugment ops (``"randaugment"``, from ``TrainTransform(randaugment_on_device=True)``) have
    them stacked into the batch.

    Example:

    ```python
    >>> collate = ImageCollator([0.5], [0.5])
    >>> batch = collate([{"pixel_values": torch.full((1, 2, 2), 255, dtype=torch.uint8), "labels": 3}])
    >>> batch["pixel_values"].flatten().tolist(), batch["labels"].tolist()
    ([1.0, 1.0, 1.0, 1.0], [3])
    ```
    """

    def __init__(
        self, mean: list[float], std: list[float], dtype: torch.dtype = torch.float32, normalize: bool = True
    ) -> None:
        self.normalize = Normalize(mean, std, dtype) if normalize else None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """``{"pixel_values": (B, C, H, W), "labels": (B,) int64}`` (+ ``"randaugment"``) from per-image rows."""
        pixels = torch.stack([torch.as_tensor(e["pixel_values"]) for e in examples])
        labels = torch.tensor([int(e["labels"]) for e in examples], dtype=torch.long)
        batch = {"pixel_values": self.normalize(pixels) if self.normalize else pixels, "labels": labels}
        if "randaugment" in examples[0]:
            batch["randaugment"] = torch.stack([torch.as_tensor(e["randaugment"]) for e in examples])
        return batch
