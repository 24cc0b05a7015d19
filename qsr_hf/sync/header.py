"""The sync header: the agreement check and the finite-rank count carried by the averaging collective itself.

A healthy sync then needs no collective besides its average. Each rank appends a few values to the first float32 or
float64 buffer it all-reduces: a count (1 when this rank's tensors are finite and count, else 0) and the digits of a
48-bit digest of its agreement values (`qsr_hf.sync.agreement.COMMON`), each digit ``d`` sent as ``d`` and ``d**2``. The
sums tell every rank, from the same reduced values, whether the ranks agree: ``N * sum(d**2) == sum(d)**2`` holds
exactly when all N ranks sent the same digit (Cauchy-Schwarz), and the sums are exact integers because digits are
sized so that ``N * (2**k - 1)**2 < 2**mantissa``. Only when a sum shows a difference or a rank that does not count
does a sync run the detailed exchange (`qsr_hf.sync.agreement.exchange`), so its messages stay as precise as before.
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from qsr_hf.sync.agreement import digest


DIGEST_BITS = 48
_MANTISSA_BITS = {torch.float32: 24, torch.float64: 53}
_MIN_DIGIT_BITS = 4  # below this (over 65,536 ranks in fp32) the header would be long: use the separate exchange


def digit_bits(world_size: int, dtype: torch.dtype) -> int:
    """Bits per digest digit whose sums over ``world_size`` ranks stay exact in ``dtype`` (0: not a float type)."""
    mantissa = _MANTISSA_BITS.get(dtype, 0)
    return max(0, (mantissa - (world_size - 1).bit_length()) // 2)


def header_slots(world_size: int, dtype: torch.dtype) -> int:
    """How many values the header takes in a buffer of ``dtype`` summed over ``world_size`` ranks (0: it cannot)."""
    bits = digit_bits(world_size, dtype)
    return 0 if bits < _MIN_DIGIT_BITS else 1 + 2 * math.ceil(DIGEST_BITS / bits)


def encode(values: Sequence[int], counted: bool, world_size: int, dtype: torch.dtype) -> list[float]:
    """This rank's header: ``[count, d_1 .. d_m, d_1**2 .. d_m**2]`` for the digest of ``values``."""
    bits = digit_bits(world_size, dtype)
    slots = header_slots(world_size, dtype)
    if not slots:
        raise ValueError(f"no sync header fits {dtype} summed over {world_size} ranks")
    value = digest(repr([int(v) for v in values]).encode()) & ((1 << DIGEST_BITS) - 1)
    digits = [(value >> (bits * i)) & ((1 << bits) - 1) for i in range(slots // 2)]
    return [float(counted), *map(float, digits), *(float(d * d) for d in digits)]


@dataclass(frozen=True)
class HeaderSum:
    """What the summed headers say: whether every rank sent the same digest, and how many ranks counted."""

    agree: bool
    counted: int


def decode(summed: Sequence[float], world_size: int) -> HeaderSum:
    """Read the all-reduced header (the same values on every rank)."""
    if not all(math.isfinite(v) for v in summed):
        return HeaderSum(False, 0)
    values = [round(v) for v in summed]
    m = (len(values) - 1) // 2
    sums, squares = values[1 : 1 + m], values[1 + m :]
    agree = all(world_size * q == s * s for s, q in zip(sums, squares, strict=True))
    return HeaderSum(agree, values[0])


@dataclass
class SyncHeader:
    """A header to send with an average, and what to do when its sum is not healthy.

    Args:
        values (`list[float]`): from [`encode`].
        world_size (`int`): ranks of the averaging group.
        on_unhealthy (`Callable[[], int | None]`): called on every rank when the ranks disagree or a rank does not
            count; it raises (a disagreement, or a non-finite rank under ``qsr_on_nonfinite="error"``) or returns the
            divisor of the average (the number of ranks that count).
    """

    values: list[float]
    world_size: int
    on_unhealthy: Callable[[], int | None]

    def resolve(self, summed: Sequence[float]) -> int | None:
        """The divisor the summed header calls for: `None` (keep the averager's) on a healthy sync."""
        total = decode(summed, self.world_size)
        if total.agree and total.counted == self.world_size:
            return None
        return self.on_unhealthy()
