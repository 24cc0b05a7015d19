"""`CompressedAverager`: average the round's parameter change in bf16 with fp32 sums (``qsr_compress_delta``).

Not in the paper nor the official code, which average the parameters in fp32. Every rank keeps an fp32 *anchor*: the
tensors' value after the last average, the same on every rank. A sync over K ranks and N values:

1. delta = tensors (as fp32) - anchor, cast to bf16, padded with zeros to Np = K x ceil(N / K) values;
2. ``all_to_all_single``: rank j receives chunk j (Np / K values) of every rank's delta;
3. rank j sums the K chunks in fp32, in rank order, divides by the number of ranks that count, casts to bf16;
4. ``all_gather_single``: every rank receives the K averaged bf16 chunks;
5. anchor += averaged delta (in fp32); the tensors := anchor (cast to their dtype). With an outer optimizer
   (``qsr_outer_optimizer``) the averaged delta is its pseudo-gradient: the anchor takes the outer step instead.

The anchor is the run's `SyncedState` (the one copy of the last synced values, shared with the outer optimizer).

Every rank adds the same bf16 values to the same anchor, so the tensors are bitwise identical after a sync.

**Bytes.** The all-to-all's input and the all-gather's output hold 2 bytes per value each (4 B/param in all,
:attr:`CompressedAverager.collective_bytes`). On the wire one rank sends (K-1)/K of each, 4 (K-1)/K B/param: what a
ring all-reduce of a 2-byte-per-value buffer sends (it sends 2 (K-1)/K of its buffer). `SyncStats` counts parameter
syncs and data-parallel gradients by their all-reduce buffer (4 B/param in fp32), so a compressed sync is recorded
as 2 B/param (:attr:`CompressedAverager.bytes_per_sync`): half a plain fp32 sync, which keeps ``comm_volume_vs_ddp``
comparable with the other rows.

**Rounding.** Per value, with delta_k rank k's change and u = 2^-8 (bf16's unit roundoff), the result differs from
anchor + mean_k(delta_k) computed exactly by at most ``ROUNDING_BOUND`` = 2u (1 + u) max_k |delta_k| (two bf16
roundings: each delta, then their mean) plus fp32 rounding of the sum and of the anchor update (a few 2^-24 of the
values). The rounding scales with the change of one round, not with the parameters.
"""

import math
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from qsr_hf.sync.averaging import ParameterAverager, Transform
from qsr_hf.sync.flat_buckets import FlatBucket
from qsr_hf.sync.outer import OuterStep
from qsr_hf.sync.synced_state import SyncedState


WIRE_DTYPE = torch.bfloat16
ROUNDING_BOUND = 2 * 2**-8 * (1 + 2**-8)  # times max_k |delta_k|, per value (see the module docstring)


def padded_numel(numel: int, world_size: int) -> int:
    """``numel`` rounded up to a multiple of ``world_size`` (equal chunks for the all-to-all)."""
    return world_size * math.ceil(numel / world_size)


def compressed_sync_bytes(numel: int, world_size: int) -> int:
    """Bytes one compressed sync of ``numel`` values records: 2 per padded value (the module docstring says why)."""
    return padded_numel(numel, world_size) * WIRE_DTYPE.itemsize


def mean_delta(deltas: Sequence[torch.Tensor], divisor: int) -> torch.Tensor:
    """Sum bf16 deltas in fp32, in the order given (rank order), divide by ``divisor``; return the mean in bf16.

    Args:
        deltas (`Sequence[torch.Tensor]`): one bf16 tensor per rank, same shape.
        divisor (`int`): the number of ranks that count.

    Returns:
        `torch.Tensor`: the mean, cast to bf16.
    """
    total = deltas[0].to(torch.float32, copy=True)
    for delta in deltas[1:]:
        total.add_(delta)  # bf16 -> fp32 is exact; the sum is fp32
    return total.div_(divisor).to(WIRE_DTYPE)


def compressed_average(anchor: torch.Tensor, values: Sequence[torch.Tensor], divisor: int) -> torch.Tensor:
    """The new anchor a sync gives, computed in one process from every rank's values (simulation, tests).

    The same arithmetic as [`CompressedAverager`] (whose chunks only split it between ranks): anchor + the bf16
    mean of the ranks' bf16 changes ``value - anchor``.

    Args:
        anchor (`torch.Tensor`): fp32 anchor.
        values (`Sequence[torch.Tensor]`): each rank's current values, in rank order (any float dtype).
        divisor (`int`): the number of ranks that count.

    Returns:
        `torch.Tensor`: the new fp32 anchor; the tensors become it, cast to their dtype.
    """
    return anchor + mean_delta([(v.to(torch.float32) - anchor).to(WIRE_DTYPE) for v in values], divisor)


class CompressedAverager:
    """Average tensors across a process group by their change since the last average, sent in bf16.

    Same call shape as [`ParameterAverager`] (``average(divisor=None) -> int``); its copy-mode buckets hold the
    layout and an fp32 copy of the tensors (the staged deltas). The anchor is set from the tensors at construction,
    so build it when the ranks hold identical tensors (start of training), and restore it with the tensors on a
    resume inside a round (``Synchronizer.state_dict`` holds it). It must be equal on every rank; the
    [`Synchronizer`] takes it again (``SyncedState.reset``) where the ranks agree outside a sync (post-local's switch
    to local steps, a resume that falls back without state files).

    Args:
        tensors (`Iterable[torch.Tensor]` or `Callable[[], Iterable[torch.Tensor]]`):
            What to average, all on one device (see [`ParameterAverager`]).
        process_group (`ProcessGroup`, *optional*):
            The data-parallel group; `None` means the default (WORLD) group.
        outer ([`OuterStep`], *optional*): an outer optimizer applied to the averaged change (see `SyncedState`).
        plain (`set[int]`, *optional*): ``id()`` of tensors that take the plain average under ``outer`` (buffers).

    Example:

    ```python
    averager = CompressedAverager(averaged_tensors(model, average_buffers=True))  # ranks identical here
    ...  # local steps
    bytes_recorded = averager.average()  # tensors = anchor + the mean change; bitwise equal on every rank
    ```
    """

    mode = "delta"

    def __init__(
        self,
        tensors: Iterable[torch.Tensor] | Callable[[], Iterable[torch.Tensor]],
        process_group: ProcessGroup | None = None,
        outer: OuterStep | None = None,
        plain: set[int] | None = None,
    ) -> None:
        self._layout = ParameterAverager(tensors, process_group, fp32_average=True, mode="copy")
        self.process_group = process_group
        self.world_size = dist.get_world_size(process_group)
        wide = {b.flat.dtype for b in self.buckets}
        devices = {b.flat.device for b in self.buckets}
        if wide != {torch.float32} or len(devices) != 1:
            raise ValueError(
                "qsr_compress_delta averages fp32/bf16/fp16 tensors on one device, got accumulation dtypes "
                f"{sorted(map(str, wide))} on {sorted(map(str, devices))}; set qsr_compress_delta=False"
            )
        self.numel = sum(b.flat.numel() for b in self.buckets)
        size = padded_numel(self.numel, self.world_size)
        device = devices.pop()
        self.synced = SyncedState(self.buckets, outer, plain, pad_to=size)  # the anchor, taken now
        self._send = torch.zeros(size, dtype=WIRE_DTYPE, device=device)  # the padding stays zero
        self._received = torch.empty(size, dtype=WIRE_DTYPE, device=device)
        self._gathered = torch.empty(size, dtype=WIRE_DTYPE, device=device)
        self._staged = False

    @property
    def buckets(self) -> list[FlatBucket]:
        """The copy-mode buckets (one per tensor dtype); their ``flat`` buffers hold the staged fp32 deltas."""
        return self._layout.buckets

    @property
    def anchor(self) -> torch.Tensor:
        """The fp32 anchor (the synced state's values, zero-padded to the all-to-all's size)."""
        return self.synced.anchor

    @property
    def tensors(self) -> list[torch.Tensor]:
        """The averaged tensors."""
        return self._layout.tensors

    @property
    def num_buckets(self) -> int:
        """Collectives one sync issues: one all-to-all and one all-gather."""
        return 2

    @property
    def bytes_per_sync(self) -> int:
        """Bytes one sync records in `SyncStats`: 2 per padded value (the all-reduce-equivalent, see above)."""
        return compressed_sync_bytes(self.numel, self.world_size)

    @property
    def collective_bytes(self) -> int:
        """Bytes of the two collectives' buffers: the all-to-all's bf16 input plus the all-gather's bf16 output."""
        return 2 * self._send.numel() * WIRE_DTYPE.itemsize

    def ensure_views(self) -> None:
        """Rebuild the buckets if a tensor was replaced; refuse if the layout the anchor follows changed."""
        self._layout.ensure_views()
        self.synced.check_layout(self.buckets)

    @torch.no_grad()
    def storage(self, buckets: Sequence[int] | None = None) -> list[torch.Tensor]:
        """Where this rank's values to average live: its change since the last sync (:meth:`stage`; zeroing it
        contributes nothing). ``buckets`` must be `None` (no fragments with compression)."""
        return self.stage()

    def stage(self) -> list[torch.Tensor]:
        """Compute this rank's fp32 deltas (tensors - anchor) into the buckets' buffers and return them.

        The non-finite check reads them, and a rank that must not count zeroes them (a zero delta). The next
        :meth:`average` sends what they hold; calling :meth:`stage` again before it changes nothing.
        """
        if not self._staged:
            self.ensure_views()
            for bucket, anchor in zip(self.buckets, self.synced.slices(), strict=True):
                bucket.gather(bucket.flat).sub_(anchor)
            self._staged = True
        return [b.flat for b in self.buckets]

    @torch.no_grad()
    def average(self, divisor: int | None = None, transform: Transform = None) -> int:
        """Average the staged (or current) deltas across the group and write anchor + mean delta into the tensors.

        Args:
            divisor (`int`, *optional*): what the fp32 sum is divided by; `None` means the world size. A rank that
                must not count contributes a zero delta (zero its :meth:`stage` buffers) and the others pass the
                number of ranks that do.
            transform (`Callable[[int, torch.Tensor], None]`, *optional*): what turns each bucket's plain average
                (anchor + mean change, fp32) into the new values; defaults to the synced state's committed step.

        Returns:
            `int`: bytes recorded for this sync (:attr:`bytes_per_sync`).
        """
        if divisor is not None and (isinstance(divisor, bool) or not isinstance(divisor, int) or divisor < 1):
            raise ValueError(f"divisor must be a positive int (the number of ranks that count), got {divisor!r}")
        divisor = self.world_size if divisor is None else divisor
        offset = 0
        for flat in self.stage():
            self._send[offset : offset + flat.numel()].copy_(flat)  # round to nearest bf16
            offset += flat.numel()
        self._staged = False
        dist.all_to_all_single(self._received, self._send, group=self.process_group)
        mine = mean_delta(self._received.view(self.world_size, -1).unbind(0), divisor)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # the name before torch 2.10
        gather(self._gathered, mine, group=self.process_group)
        transform = transform or self.synced.advance
        for index, (bucket, anchor, mean) in enumerate(
            zip(self.buckets, self.synced.slices(), self.synced.slices(self._gathered), strict=True)
        ):
            torch.add(anchor, mean, out=bucket.flat)  # the staged buffer is free again: the plain average
            transform(index, bucket.flat)  # commits it as the new anchor (or the outer step's result)
            bucket.scatter(bucket.flat)
        return self.bytes_per_sync
