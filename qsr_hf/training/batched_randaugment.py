"""RandAugment on whole uint8 batches, on the training device: the ops of [`~qsr_hf.training.randaugment`] in torch.

The loader draws each image's ops and strengths with the same code as the per-image path
([`~qsr_hf.training.randaugment.sample_ops`], from the same seeded generator, so the draws are identical) and ships
them beside the uint8 crop ([`~qsr_hf.training.randaugment.encode_ops`]); [`batched_rand_augment`] applies them to the batch, grouping the samples
that drew the same op. Each op reproduces Pillow's arithmetic: the lookup-table ops (autocontrast, equalize,
posterize, solarize) and sharpness's smoothing are exact integer code; the blends (color, contrast, brightness,
sharpness) use Pillow's float32 formula with truncation; the affine ops (rotate, shears, translations) use Pillow's
output-to-input matrix and its bilinear filter in float64 (edge-clamped neighbours, black outside, truncation).
[`DeviceAugmentation`] then normalizes the batch to floats.
"""

import math
from collections.abc import Callable

import torch

from qsr_hf.training.randaugment import OP_NAMES, decode_ops
from qsr_hf.training.transforms import Normalize


_F64 = torch.float64


def _apply_lut(x: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Per-channel lookup: ``x`` ``(n, C, H, W)`` uint8, ``lut`` ``(n, C, 256)`` integer, clipped to 0-255."""
    n, c, h, w = x.shape
    out = lut.clamp(0, 255).to(torch.uint8).gather(2, x.reshape(n, c, h * w).long())
    return out.view(n, c, h, w)


def _histogram(x: torch.Tensor) -> torch.Tensor:
    """``(n, C, 256)`` int64 counts of each value per image and channel."""
    n, c = x.shape[:2]
    offsets = torch.arange(n * c, device=x.device).view(n, c, 1) * 256
    counts = torch.bincount((x.reshape(n, c, -1).long() + offsets).flatten(), minlength=n * c * 256)
    return counts.view(n, c, 256)


def _autocontrast(x: torch.Tensor, strength: torch.Tensor) -> torch.Tensor:
    # ImageOps.autocontrast: lut[i] = int(i * scale + offset), scale = 255 / (hi - lo), offset = -lo * scale
    lo, hi = x.amin((2, 3)).to(_F64), x.amax((2, 3)).to(_F64)
    scale = torch.full_like(hi, 255.0) / (hi - lo).clamp(min=1)  # tensor / tensor: `255.0 / t` is 255 * (1 / t)
    levels = torch.arange(256, dtype=_F64, device=x.device)
    lut = (levels * scale[..., None] + (-lo * scale)[..., None]).trunc()
    return _apply_lut(x, torch.where((hi > lo)[..., None], lut, levels))


def _equalize(x: torch.Tensor, strength: torch.Tensor) -> torch.Tensor:
    # ImageOps.equalize: step = (count - count of the last used value) // 255; lut[i] = (step // 2 + below i) // step
    hist = _histogram(x)
    levels = torch.arange(256, device=x.device)
    last = torch.where(hist > 0, levels, -1).amax(2, keepdim=True)
    step = (hist.sum(2, keepdim=True) - hist.gather(2, last)) // 255
    lut = (step // 2 + hist.cumsum(2) - hist) // step.clamp(min=1)
    keep = ((hist > 0).sum(2, keepdim=True) <= 1) | (step == 0)
    return _apply_lut(x, torch.where(keep, levels, lut))


def _posterize(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    masks = [~(2 ** (8 - int(b)) - 1) & 255 for b in bits.tolist()]
    return x & torch.tensor(masks, dtype=torch.uint8, device=x.device).view(-1, 1, 1, 1)


def _solarize(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= threshold.to(x.device).view(-1, 1, 1, 1), 255 - x, x)


def _rotation(degrees: float, width: int, height: int) -> list[float]:
    """`PIL.Image.Image.rotate`'s output-to-input matrix (no expand, center of the image)."""
    if degrees % 360.0 == 0:
        return [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    angle = -math.radians(degrees % 360.0)
    a, b = round(math.cos(angle), 15), round(math.sin(angle), 15)
    d, e = round(-math.sin(angle), 15), round(math.cos(angle), 15)
    cx, cy = width / 2, height / 2
    return [a, b, a * -cx + b * -cy + 0.0 + cx, d, e, d * -cx + e * -cy + 0.0 + cy]


def _affine(x: torch.Tensor, matrices: list[list[float]]) -> torch.Tensor:
    """Pillow's AFFINE transform with BILINEAR resampling (Geometry.c), black outside the image."""
    n, c, h, w = x.shape
    m = torch.tensor(matrices, dtype=_F64, device=x.device).view(n, 6, 1, 1)
    xx = torch.arange(w, dtype=_F64, device=x.device) + 0.5
    yy = (torch.arange(h, dtype=_F64, device=x.device) + 0.5).view(h, 1)
    xin = m[:, 0] * xx + m[:, 1] * yy + m[:, 2]
    yin = m[:, 3] * xx + m[:, 4] * yy + m[:, 5]
    inside = (xin >= 0) & (xin < w) & (yin >= 0) & (yin < h)
    xin, yin = xin - 0.5, yin - 0.5
    x0, y0 = xin.floor(), yin.floor()
    dx, dy = (xin - x0).unsqueeze(1), (yin - y0).unsqueeze(1)
    x0, y0 = x0.long(), y0.long()
    flat = x.reshape(n, c, h * w)

    def pixel(yi: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
        index = (yi.clamp(0, h - 1) * w + xi.clamp(0, w - 1)).view(n, 1, h * w).expand(n, c, h * w)
        return flat.gather(2, index).view(n, c, h, w).to(_F64)

    top = pixel(y0, x0)
    top = top + (pixel(y0, x0 + 1) - top) * dx
    bottom = pixel(y0 + 1, x0)
    bottom = bottom + (pixel(y0 + 1, x0 + 1) - bottom) * dx
    value = (top + (bottom - top) * dy).trunc()
    return torch.where(inside.unsqueeze(1), value, 0.0).to(torch.uint8)


def _grey(x: torch.Tensor) -> torch.Tensor:
    """``convert("L")``: ``(n, 1, H, W)`` int32, ITU-R 601-2 luma in Pillow's fixed point."""
    if x.shape[1] == 1:
        return x.to(torch.int32)
    r, g, b = x.to(torch.int32).unbind(1)
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).unsqueeze(1)


def _blend(degenerate: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    # Image.blend in float32: trunc(clip(degenerate + factor * (x - degenerate), 0, 255))
    d = degenerate.to(torch.float32)
    alpha = factor.to(device=x.device, dtype=torch.float32).view(-1, 1, 1, 1)
    return (d + alpha * (x.to(torch.float32) - d)).clamp(0, 255).trunc().to(torch.uint8)


def _smooth(x: torch.Tensor) -> torch.Tensor:
    """``ImageFilter.SMOOTH``: 3x3 kernel [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13, rounded; the border is kept."""
    v = x.to(torch.int32)
    h, w = x.shape[-2:]
    total = 4 * v[..., 1:-1, 1:-1]
    for i in range(3):
        for j in range(3):
            total = total + v[..., i : h - 2 + i, j : w - 2 + j]
    out = x.clone()
    out[..., 1:-1, 1:-1] = ((2 * total + 13) // 26).to(torch.uint8)
    return out


def _mean_grey(x: torch.Tensor) -> torch.Tensor:
    grey = _grey(x)
    total = grey.sum((1, 2, 3), dtype=torch.int64).to(_F64)
    mean = total / torch.full_like(total, grey[0].numel())  # a true division (a scalar divisor may be a reciprocal)
    return (mean + 0.5).floor().view(-1, 1, 1, 1)


def _shear(axis: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def apply(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return _affine(x, [[1, s, 0, 0, 1, 0] if axis == 0 else [1, 0, 0, s, 1, 0] for s in v.tolist()])

    return apply


def _translate(axis: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def apply(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return _affine(x, [[1, 0, t, 0, 1, 0] if axis == 0 else [1, 0, 0, 0, 1, t] for t in v.tolist()])

    return apply


# name -> apply(images (n, C, H, W) uint8, strengths (n,) float64 on the CPU) -> images
_BATCHED: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "autocontrast": _autocontrast,
    "equalize": _equalize,
    "posterize": _posterize,
    "rotate": lambda x, v: _affine(x, [_rotation(a, x.shape[-1], x.shape[-2]) for a in v.tolist()]),
    "solarize": _solarize,
    "shear_x": _shear(0),
    "shear_y": _shear(1),
    "translate_x": _translate(0),
    "translate_y": _translate(1),
    "color": lambda x, v: _blend(_grey(x) if x.shape[1] == 3 else x, x, v),
    "contrast": lambda x, v: _blend(_mean_grey(x), x, v),
    "brightness": lambda x, v: _blend(torch.zeros_like(x), x, v),
    "sharpness": lambda x, v: _blend(_smooth(x), x, v),
}
assert tuple(_BATCHED) == OP_NAMES


def apply_op_batched(images: torch.Tensor, name: str, strengths: torch.Tensor) -> torch.Tensor:
    """Apply op ``name`` to every image of ``images`` (``(n, C, H, W)`` uint8), each with its own strength.

    Args:
        images (`torch.Tensor`): uint8 images on any device, 1 or 3 channels.
        name (`str`): one of [`~qsr_hf.training.randaugment.OP_NAMES`].
        strengths (`torch.Tensor`): ``(n,)`` float64 on the CPU, as [`~qsr_hf.training.randaugment.draw_strength`]
            draws them (0 for autocontrast and equalize).

    Returns:
        `torch.Tensor`: the augmented images, uint8, same shape and device.
    """
    return _BATCHED[name](images, strengths)


def batched_rand_augment(images: torch.Tensor, encoded_ops: torch.Tensor) -> torch.Tensor:
    """Apply each image's RandAugment ops (drawn in the loader) to a batch, grouping images by op.

    Args:
        images (`torch.Tensor`): ``(B, C, H, W)`` uint8, on the device that should do the work.
        encoded_ops (`torch.Tensor`): ``(B, depth, 2)`` int64 from [`~qsr_hf.training.randaugment.encode_ops`] (any device).

    Returns:
        `torch.Tensor`: ``(B, C, H, W)`` uint8, equal per op to the per-image Pillow path (see the module doc).

    Example:

    ```python
    >>> import numpy as np
    >>> from qsr_hf.training.randaugment import encode_ops, sample_ops
    >>> ops = torch.stack([encode_ops(sample_ops(np.random.default_rng(i), 2, 10, (8, 8))) for i in range(4)])
    >>> batched_rand_augment(torch.full((4, 3, 8, 8), 100, dtype=torch.uint8), ops).shape
    torch.Size([4, 3, 8, 8])
    ```
    """
    index, strength = decode_ops(encoded_ops)
    out = images.clone()
    for step in range(index.shape[1]):
        for op in index[:, step].unique().tolist():
            rows = (index[:, step] == op).nonzero().flatten()
            on_device = rows.to(images.device)
            out[on_device] = apply_op_batched(out[on_device], OP_NAMES[op], strength[rows, step])
    return out


class DeviceAugmentation:
    """The batched part of the training pipeline, run by the trainer before the forward: RandAugment (when the batch
    carries ops), then normalization to floats, on the batch's device.

    Args:
        mean (`list[float]`), std (`list[float]`): per-channel normalization (the model's image processor's).
        dtype (`torch.dtype`, defaults to `torch.float32`): dtype of the normalized pixels.

    Example:

    ```python
    >>> augment = DeviceAugmentation([0.5], [0.5])
    >>> augment(torch.full((2, 1, 4, 4), 255, dtype=torch.uint8)).unique().tolist()
    [1.0]
    ```
    """

    def __init__(self, mean: list[float], std: list[float], dtype: torch.dtype = torch.float32) -> None:
        self.normalize = Normalize(mean, std, dtype)

    def __call__(self, pixel_values: torch.Tensor, randaugment: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, C, H, W)`` uint8 (and optional ``(B, depth, 2)`` encoded ops) -> normalized float pixels."""
        if pixel_values.dtype != torch.uint8:
            raise ValueError(
                f"DeviceAugmentation takes uint8 pixel_values (ImageCollator(normalize=False)), got {pixel_values.dtype}"
            )
        if randaugment is not None and randaugment.shape[1] > 0:
            pixel_values = batched_rand_augment(pixel_values, randaugment)
        return self.normalize(pixel_values)
