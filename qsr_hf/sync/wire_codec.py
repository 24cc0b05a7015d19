"""`WireCodec`: a round's change in a wire format (``qsr_compress_format``) and back to fp32. One codec per format.

- ``bf16``: each value rounded to the nearest bf16 (no scales);
- ``int8``: per block of ``BLOCK`` consecutive values of the flat change, scale = absmax / 127 (fp32, symmetric),
  q = round(x / scale) (to nearest, ties to even) clamped to [-127, 127]; decoded as q x scale;
- ``fp8``: the same blocks, scale = absmax / 448 and x / scale cast to ``float8_e4m3fn`` (to nearest, clamped to
  ±448 first: e4m3fn has no infinity); decoded as fp8 x scale.

A block of zeros gets scale 0 and decodes to zeros. Values and scales live in one byte buffer of shape
``(rows, row_bytes)``: per row ``chunk`` values, then ``chunk / BLOCK`` fp32 scales (:meth:`WireCodec.views`), so one
collective moves both.

:func:`mean_delta` is the fp32 mean every format takes; :func:`compressed_average` is a whole compressed sync in one
process (the simulation's, and the tests' reference).
"""

from collections.abc import Sequence

import torch

from qsr_hf.core.wire import FORMATS, SCALE_BYTES


_QMAX = {"int8": 127.0, "fp8": 448.0}


def _dtype(fmt: str) -> torch.dtype:
    if fmt == "bf16":
        return torch.bfloat16
    if fmt == "int8":
        return torch.int8
    dtype = getattr(torch, "float8_e4m3fn", None)
    try:
        torch.ones(2).to(dtype).float()
    except (TypeError, RuntimeError) as error:
        raise ValueError(
            f"qsr_compress_format='fp8' needs torch.float8_e4m3fn casts, which this torch {torch.__version__} build "
            f"lacks on this machine ({error}): set qsr_compress_format='int8'"
        ) from error
    return dtype


class WireCodec:
    """Encode fp32 rows into a format's values and scales, and decode them (see the module docstring).

    Args:
        fmt (`str`): ``"bf16"``, ``"int8"`` or ``"fp8"``.
    """

    def __init__(self, fmt: str) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"qsr_compress_format must be one of {sorted(FORMATS)}, got {fmt!r}")
        self.fmt = fmt
        self.dtype = _dtype(fmt)
        self.block = FORMATS[fmt].block
        self.qmax = _QMAX.get(fmt, 0.0)

    def row_bytes(self, chunk: int) -> int:
        """Bytes of one row of ``chunk`` values (a multiple of the block): the values, then the scales."""
        scales = chunk // self.block * SCALE_BYTES if self.block else 0
        return chunk * self.dtype.itemsize + scales

    def buffer(self, rows: int, chunk: int, device: torch.device) -> torch.Tensor:
        """A zeroed byte buffer of ``rows`` rows of ``chunk`` values."""
        return torch.zeros(rows, self.row_bytes(chunk), dtype=torch.uint8, device=device)

    def views(self, wire: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The values ``(rows, chunk)`` and the fp32 scales ``(rows, chunk / block)`` (or `None`) of a buffer."""
        values = wire[:, : chunk * self.dtype.itemsize].view(self.dtype)
        return values, (wire[:, values.shape[1] * self.dtype.itemsize :].view(torch.float32) if self.block else None)

    @torch.no_grad()
    def encode(self, x: torch.Tensor, wire: torch.Tensor) -> None:
        """Write the fp32 rows ``x`` (``(rows, chunk)``) into ``wire`` in this format."""
        values, scales = self.views(wire, x.shape[1])
        if scales is None:
            values.copy_(x)  # round to nearest bf16
            return
        blocks = x.view(x.shape[0], -1, self.block)
        scales.copy_(blocks.abs().amax(-1) / self.qmax)
        divisor = torch.where(scales > 0, scales, torch.ones_like(scales)).unsqueeze(-1)
        q = blocks / divisor
        if self.fmt == "int8":
            q.round_()
        values.view_as(q).copy_(
            q.clamp_(-self.qmax, self.qmax)
        )  # int8: exact (already whole); fp8: round to nearest e4m3fn

    def decode(self, wire: torch.Tensor, chunk: int) -> torch.Tensor:
        """The fp32 rows ``(rows, chunk)`` that ``wire`` holds."""
        values, scales = self.views(wire, chunk)
        if scales is None:
            return values.float()
        rows = values.shape[0]
        return (values.float().view(rows, -1, self.block) * scales.unsqueeze(-1)).view(rows, chunk)

    def round_trip(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (flat fp32, any length) encoded and decoded, in one process (zero-padded to whole blocks)."""
        n = x.numel()
        chunk = -(-n // max(1, self.block)) * max(1, self.block)
        padded = torch.zeros(1, chunk, dtype=torch.float32, device=x.device)
        padded[0, :n] = x.reshape(-1)
        wire = self.buffer(1, chunk, x.device)
        self.encode(padded, wire)
        return self.decode(wire, chunk).view(-1)[:n].view_as(x)


def mean_delta(deltas: Sequence[torch.Tensor], divisor: int) -> torch.Tensor:
    """Sum decoded deltas in fp32, in the order given (rank order), and divide by ``divisor`` (the ranks that count).

    Args:
        deltas (`Sequence[torch.Tensor]`): one tensor per rank (fp32, or bf16: exact in fp32), same shape.
        divisor (`int`): the number of ranks that count.

    Returns:
        `torch.Tensor`: the fp32 mean (encoded again before it is sent back).
    """
    total = deltas[0].to(torch.float32, copy=True)
    for delta in deltas[1:]:
        total.add_(delta)  # the sum is fp32
    return total.div_(divisor)


def compressed_average(
    anchor: torch.Tensor,
    values: Sequence[torch.Tensor],
    divisor: int,
    fmt: str = "bf16",
    residuals: Sequence[torch.Tensor] | None = None,
    commit: bool = True,
) -> torch.Tensor:
    """The new anchor a sync gives, computed in one process from every rank's values (simulation, tests).

    The same arithmetic as `qsr_hf.sync.compressed.CompressedAverager` (whose chunks of whole blocks only split it
    between ranks): anchor + the encoded-and-decoded mean of the ranks' encoded-and-decoded changes ``value - anchor``
    (+ each rank's residual with error feedback). Blocks start at the first value: for the averager's blocks, pass the
    values flat in its layout (its buckets' buffers, one after the other).

    Args:
        anchor (`torch.Tensor`): fp32 anchor.
        values (`Sequence[torch.Tensor]`): each rank's current values, in rank order (any float dtype).
        divisor (`int`): the number of ranks that count.
        fmt (`str`, defaults to `"bf16"`): the wire format (``qsr_compress_format``).
        residuals (`Sequence[torch.Tensor]`, *optional*): error feedback: each rank's residual (fp32, shaped as the
            values), added to its change; with ``commit`` each becomes what this sync's encoding lost (in place).
        commit (`bool`, defaults to `True`): a sync (not an evaluation's average, which leaves the residuals).

    Returns:
        `torch.Tensor`: the new fp32 anchor; the tensors become it, cast to their dtype.
    """
    codec, deltas = WireCodec(fmt), []
    for rank, value in enumerate(values):
        delta = value.to(torch.float32) - anchor
        if residuals is not None:
            delta.add_(residuals[rank])
        deltas.append(codec.round_trip(delta))
        if residuals is not None and commit:
            residuals[rank].copy_(delta.sub_(deltas[-1]))
    return anchor + codec.round_trip(mean_delta(deltas, divisor))
