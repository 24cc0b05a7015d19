"""Sizes of the wire formats of ``qsr_compress_delta`` (pure: no torch; the arithmetic is `qsr_hf.sync.wire_codec`).

A compressed sync over K ranks sends N values as K equal chunks (`qsr_hf.sync.compressed`): the all-to-all's input
and the all-gather's output each hold :func:`wire_bytes` bytes. ``bf16`` sends 2 bytes per value; ``int8`` and
``fp8`` send 1 byte per value and one fp32 scale per block of ``BLOCK`` values of the flat change, and pad N to a
multiple of K x ``BLOCK`` so that every chunk holds whole blocks.
"""

import math
from typing import NamedTuple


BLOCK = 256  # values per fp32 scale (int8, fp8): 4 / 256 = 0.016 B/value of scales
SCALE_BYTES = 4  # one fp32 scale


class WireSize(NamedTuple):
    """Bytes per value on the wire and values per scale (0: no scales) of one format."""

    value_bytes: int
    block: int


FORMATS: dict[str, WireSize] = {"bf16": WireSize(2, 0), "int8": WireSize(1, BLOCK), "fp8": WireSize(1, BLOCK)}


def padded_numel(numel: int, world_size: int, fmt: str = "bf16") -> int:
    """``numel`` rounded up to a multiple of ``world_size`` x the format's block (equal chunks of whole blocks)."""
    unit = world_size * max(1, FORMATS[fmt].block)
    return unit * math.ceil(numel / unit)


def wire_bytes(numel: int, world_size: int, fmt: str = "bf16") -> int:
    """Bytes of one rank's all-to-all input (and of its all-gather output) for ``numel`` values: the padded values
    in the format plus, for a blocked format, one fp32 scale per block."""
    size = FORMATS[fmt]
    padded = padded_numel(numel, world_size, fmt)
    scales = padded // size.block * SCALE_BYTES if size.block else 0
    return padded * size.value_bytes + scales


def bytes_per_value(fmt: str) -> float:
    """Bytes per value of a format, scales included, padding left out (the limit for a large model)."""
    size = FORMATS[fmt]
    return size.value_bytes + (SCALE_BYTES / size.block if size.block else 0.0)
