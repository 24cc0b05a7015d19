"""RandAugment as the official QSR code runs it: composer's ``augmentation_sets["all"]``, depth 2, severity 10.

Each image gets ``depth`` operations drawn uniformly (with replacement) from 13; every operation draws its own
strength at random up to the maximum that ``severity`` (0-10) allows, as composer's ``randaugment_image`` does:

- a level ``u ~ U(0.1, severity)`` scales the op's maximum by ``u / 10``: posterize (up to 4 bits removed),
  rotate (up to 30 degrees), solarize (threshold from 256 down to 1), shear (up to 0.3), translate (up to a third of
  the image side); rotate, shear and translate then take a random sign;
- color, contrast, brightness and sharpness take an enhancement factor from composer's symmetric draw around 1: with
  probability 1/2 ``U(1, severity)``, else ``U(1 - 0.09 severity, 1)`` (brightness factors above 1 are scaled by
  0.75);
- autocontrast and equalize have no strength.

Written here on PIL uint8 images (composer cannot be imported next to this torch); randomness comes from the
`numpy.random.Generator` passed in, so a seeded generator gives the same augmentation in any process.
"""

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps


# The official code's op list, in composer's order (`augmentation_sets["all"]`).
OP_NAMES: tuple[str, ...] = (
    "autocontrast", "equalize", "posterize", "rotate", "solarize", "shear_x", "shear_y", "translate_x",
    "translate_y", "color", "contrast", "brightness", "sharpness",
)  # fmt: skip
_AFFINE = Image.Transform.AFFINE
_BILINEAR = Image.Resampling.BILINEAR


def _scaled(rng: np.random.Generator, severity: float, max_value: float) -> float:
    return float(rng.uniform(0.1, severity)) * max_value / 10.0


def _signed(rng: np.random.Generator, value: float) -> float:
    return -value if rng.uniform() > 0.5 else value


def _symmetric(rng: np.random.Generator, severity: float) -> float:
    if rng.uniform() > 0.5:
        return float(rng.uniform(1.0, severity))
    return float(rng.uniform(1.0 - 0.09 * severity, 1.0))


def _brightness(rng: np.random.Generator, severity: float) -> float:
    factor = _symmetric(rng, severity)
    return factor * 0.75 if factor > 1 else factor


def _affine(image: Image.Image, matrix: tuple[float, ...]) -> Image.Image:
    return image.transform(image.size, _AFFINE, matrix, resample=_BILINEAR)


# name -> (draw(rng, severity, (width, height)) -> strength, apply(image, strength) -> image)
_OPS: dict[str, tuple[Callable[..., Any], Callable[[Image.Image, Any], Image.Image]]] = {
    "autocontrast": (lambda rng, s, size: None, lambda im, v: ImageOps.autocontrast(im)),
    "equalize": (lambda rng, s, size: None, lambda im, v: ImageOps.equalize(im)),
    "posterize": (lambda rng, s, size: 4 - int(_scaled(rng, s, 4)), lambda im, v: ImageOps.posterize(im, v)),
    "rotate": (lambda rng, s, size: _signed(rng, int(_scaled(rng, s, 30))), lambda im, v: im.rotate(v, _BILINEAR)),
    "solarize": (lambda rng, s, size: 256 - int(_scaled(rng, s, 256)), lambda im, v: ImageOps.solarize(im, v)),
    "shear_x": (
        lambda rng, s, size: _signed(rng, _scaled(rng, s, 0.3)),
        lambda im, v: _affine(im, (1, v, 0, 0, 1, 0)),
    ),
    "shear_y": (
        lambda rng, s, size: _signed(rng, _scaled(rng, s, 0.3)),
        lambda im, v: _affine(im, (1, 0, 0, v, 1, 0)),
    ),
    "translate_x": (
        lambda rng, s, size: _signed(rng, int(_scaled(rng, s, size[0] / 3))),
        lambda im, v: _affine(im, (1, 0, v, 0, 1, 0)),
    ),
    "translate_y": (
        lambda rng, s, size: _signed(rng, int(_scaled(rng, s, size[1] / 3))),
        lambda im, v: _affine(im, (1, 0, 0, 0, 1, v)),
    ),
    "color": (lambda rng, s, size: _symmetric(rng, s), lambda im, v: ImageEnhance.Color(im).enhance(v)),
    "contrast": (lambda rng, s, size: _symmetric(rng, s), lambda im, v: ImageEnhance.Contrast(im).enhance(v)),
    "brightness": (lambda rng, s, size: _brightness(rng, s), lambda im, v: ImageEnhance.Brightness(im).enhance(v)),
    "sharpness": (lambda rng, s, size: _symmetric(rng, s), lambda im, v: ImageEnhance.Sharpness(im).enhance(v)),
}
assert tuple(_OPS) == OP_NAMES


def draw_strength(name: str, rng: np.random.Generator, severity: float, size: tuple[int, int]) -> Any:
    """Draw the strength of op ``name`` as composer does (`None` for autocontrast and equalize).

    Args:
        name (`str`): one of [`OP_NAMES`].
        rng (`numpy.random.Generator`): the source of randomness.
        severity (`float`): 0-10; 10 in the paper's ViT recipe.
        size (`tuple[int, int]`): ``(width, height)`` of the image (translations scale with it).

    Returns:
        The op's parameter: bits kept (posterize), degrees (rotate), threshold (solarize), shear, pixels
        (translate) or enhancement factor (color, contrast, brightness, sharpness).
    """
    return _OPS[name][0](rng, severity, size)


def apply_op(image: Image.Image, name: str, strength: Any) -> Image.Image:
    """Apply op ``name`` with the given strength (from [`draw_strength`]) to a PIL image."""
    return _OPS[name][1](image, strength)


def rand_augment(image: Image.Image, rng: np.random.Generator, depth: int = 2, severity: float = 10) -> Image.Image:
    """Apply ``depth`` random ops of [`OP_NAMES`], each with a random strength up to ``severity``.

    Args:
        image (`PIL.Image.Image`): an ``RGB`` or ``L`` image (uint8).
        rng (`numpy.random.Generator`): the source of randomness (seed it for reproducible augmentation).
        depth (`int`, defaults to 2): ops per image (N of RandAugment).
        severity (`float`, defaults to 10): 0-10, the largest strength each op may draw.

    Returns:
        `PIL.Image.Image`: the augmented image, same size and mode.

    Example:

    ```python
    >>> image = Image.new("RGB", (32, 32), (120, 30, 200))
    >>> rand_augment(image, np.random.default_rng(0)).size
    (32, 32)
    ```
    """
    for name, strength in sample_ops(rng, depth, severity, image.size):
        image = apply_op(image, name, strength)
    return image


def sample_ops(rng: np.random.Generator, depth: int, severity: float, size: tuple[int, int]) -> list[tuple[str, Any]]:
    """Draw ``depth`` ops (uniformly, with replacement) and each one's strength, as [`rand_augment`] applies them.

    The one sampling code of both paths: [`rand_augment`] (Pillow, per image) and
    [`~qsr_hf.training.batched_randaugment.batched_rand_augment`] (torch, per batch).

    Returns:
        `list[tuple[str, Any]]`: ``(op name, strength)`` pairs, in the order they are applied.
    """
    ops = []
    for _ in range(depth):
        name = OP_NAMES[int(rng.integers(len(OP_NAMES)))]
        ops.append((name, draw_strength(name, rng, severity, size)))
    return ops


_F64 = torch.float64


def encode_ops(ops: Sequence[tuple[str, Any]]) -> torch.Tensor:
    """``(depth, 2)`` int64: op index and the float64 bits of its strength (0 for none), from [`sample_ops`].

    Integers, so that no input preparation (DeepSpeed casts floating inputs to bf16/fp16) rounds a strength.
    """
    values = [(float(OP_NAMES.index(name)), 0.0 if strength is None else float(strength)) for name, strength in ops]
    return torch.tensor(values, dtype=_F64).reshape(len(values), 2).view(torch.int64)


def decode_ops(encoded: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(op index int64, strength float64)``, each ``(B, depth)``, on the CPU, from a batch of [`encode_ops`]."""
    values = encoded.detach().to("cpu", torch.int64).contiguous().view(_F64)
    return values[..., 0].to(torch.int64), values[..., 1]
