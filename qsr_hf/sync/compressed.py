"""`CompressedAverager`: average the round's parameter change in a wire format with fp32 sums (``qsr_compress_delta``).

Not in the paper nor the official code, which average the parameters in fp32. Every rank keeps an fp32 *anchor*: the
tensors' value after the last average, the same on every rank. ``qsr_compress_format`` picks the format
(`qsr_hf.sync.wire_codec`: ``bf16``, or ``int8`` / ``fp8`` with an fp32 scale per block of 256 values); every format
takes the same steps. A sync over K ranks and N values:

1. delta = tensors (as fp32) - anchor (+ this rank's residual, with ``qsr_compress_error_feedback``), zero-padded to
   Np values (`qsr_hf.core.wire.padded_numel`: K equal chunks of whole blocks), encoded chunk by chunk;
2. ``all_to_all_single``: rank j receives chunk j of every rank's encoded delta (values and scales in one buffer);
3. rank j decodes the K chunks to fp32, sums them in rank order, divides by the number of ranks that count, and
   encodes that mean chunk (int8 / fp8: new scales from the mean);
4. ``all_gather_single``: every rank receives the K encoded mean chunks and decodes them to fp32;
5. anchor += mean delta (in fp32); the tensors := anchor (cast to their dtype). With an outer optimizer
   (``qsr_outer_optimizer``) the mean delta is its pseudo-gradient: the anchor takes the outer step instead.

With error feedback each rank keeps what step 1's encoding lost (its residual: the sent delta minus its decoded
value) and adds it to the next round's delta; an evaluation's average (not committed) leaves it as it was. A rank
left out by ``skip_rank`` sends zeros and its residual becomes zero. The residual is this rank's own state: it is
saved in this rank's state file (`qsr_hf.checkpoint.payload`), not compared across ranks.

The anchor is the run's `SyncedState` (the one copy of the last synced values, shared with the outer optimizer).
Every rank adds the same decoded values to the same anchor, so the tensors are bitwise identical after a sync.

With ``qsr_fragments`` each fragment takes steps 1 to 4 over a buffer of its own (`qsr_hf.sync.wire_segments`); with
``qsr_overlap_sync`` they run on a worker thread while training goes on (`qsr_hf.sync.compressed_flight`).

**Bytes.** The all-to-all's input and the all-gather's output hold B = `qsr_hf.core.wire.wire_bytes` (N, K) bytes
each: bf16 2 Np, int8 / fp8 Np + 4 Np / 256. One rank sends (K-1)/K of each, 2 (K-1)/K x B: what a ring all-reduce
of a B-byte buffer sends. So `SyncStats` records a compressed sync as B (:attr:`CompressedAverager.bytes_per_sync`),
comparable with a plain fp32 sync's 4 N: bf16 0.5 of it, int8 / fp8 (1 + 1/64) / 4 = 0.254 (plus padding). An
all-gather of every rank's encoded delta instead sends (K-1) x B per rank: the same at K = 2, more beyond.

**Rounding (bf16).** Per value, with delta_k rank k's change and u = 2^-8 (bf16's unit roundoff), the result differs
from anchor + mean_k(delta_k) computed exactly by at most ``ROUNDING_BOUND`` = 2u (1 + u) max_k |delta_k| (two bf16
roundings: each delta, then their mean) plus fp32 rounding of the sum and of the anchor update (a few 2^-24 of the
values). int8 rounds each value to within half a step, absmax / 254 of its block, twice (delta, mean).
"""

import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from qsr_hf.core.wire import padded_numel
from qsr_hf.sync.averaging import ParameterAverager, Transform
from qsr_hf.sync.compressed_flight import CollectiveWorker, CompressedFlight
from qsr_hf.sync.flat_buckets import FlatBucket
from qsr_hf.sync.handle import write_back
from qsr_hf.sync.outer import OuterStep
from qsr_hf.sync.synced_state import SyncedState
from qsr_hf.sync.wire_codec import WireCodec
from qsr_hf.sync.wire_segments import WireSegment, build_segments, select_segments


ROUNDING_BOUND = 2 * 2**-8 * (1 + 2**-8)  # bf16: times max_k |delta_k|, per value (see the module docstring)


class CompressedAverager:
    """Average tensors across a process group by their change since the last average, sent in a wire format.

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
        fmt (`str`, defaults to `"bf16"`): the wire format, ``qsr_compress_format`` (`qsr_hf.sync.wire_codec`).
        error_feedback (`bool`, defaults to `False`): keep this rank's encoding residual and add it to the next
            round's delta (``qsr_compress_error_feedback``).
        overlap (`bool`, defaults to `False`): ``qsr_overlap_sync``: build the worker thread and process group that
            ``average(async_op=True)`` runs on (`qsr_hf.sync.compressed_flight`; collective: on every rank).

    Example:

    ```python
    averager = CompressedAverager(averaged_tensors(model, average_buffers=True), fmt="int8")  # ranks identical here
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
        fmt: str = "bf16",
        error_feedback: bool = False,
        overlap: bool = False,
        fragments: int = 1,
    ) -> None:
        self._layout = ParameterAverager(tensors, process_group, fp32_average=True, mode="copy", fragments=fragments)
        self.process_group = process_group
        self.world_size = dist.get_world_size(process_group)
        wide = {b.flat.dtype for b in self.buckets}
        devices = {b.flat.device for b in self.buckets}
        if wide != {torch.float32} or len(devices) != 1:
            raise ValueError(
                "qsr_compress_delta averages fp32/bf16/fp16 tensors on one device, got accumulation dtypes "
                f"{sorted(map(str, wide))} on {sorted(map(str, devices))}; set qsr_compress_delta=False"
            )
        self.codec = WireCodec(fmt)
        sizes = [b.flat.numel() for b in self.buckets]
        self.numel, device = sum(sizes), devices.pop()
        self.segments = build_segments(self.bucket_fragments, sizes, self.world_size, self.codec, device)
        self._segment_of = {i: s for s in self.segments for i in s.buckets}
        size = padded_numel(self.numel, self.world_size, fmt)  # one fragment: the segment's layout
        self.synced = SyncedState(self.buckets, outer, plain, pad_to=size)  # the anchor, taken now
        total = sum(s.size for s in self.segments)
        self._delta = torch.zeros(total, dtype=torch.float32, device=device)  # the padding stays zero
        self.residual = torch.zeros(total, dtype=torch.float32, device=device) if error_feedback else None
        self._staged: set[int] = set()  # buckets whose flat buffer holds this rank's delta
        self._worker = CollectiveWorker(process_group) if overlap else None  # qsr_overlap_sync: averages in flight
        self._flights: list[CompressedFlight] = []

    @property
    def buckets(self) -> list[FlatBucket]:
        """The copy-mode buckets (one per fragment and tensor dtype); their ``flat`` buffers hold staged deltas."""
        return self._layout.buckets

    @property
    def bucket_fragments(self) -> list[int]:
        """The fragment of each bucket (``qsr_fragments``)."""
        return self._layout.bucket_fragments

    def buckets_of(self, fragments: Iterable[int]) -> list[int]:
        """The indices of the buckets of ``fragments``, in order."""
        return self._layout.buckets_of(fragments)

    @property
    def anchor(self) -> torch.Tensor:
        """The fp32 anchor (the synced state's values, zero-padded to a whole model's all-to-all size)."""
        return self.synced.anchor

    @property
    def tensors(self) -> list[torch.Tensor]:
        """The averaged tensors."""
        return self._layout.tensors

    @property
    def num_buckets(self) -> int:
        """Collectives one sync of the whole model issues: an all-to-all and an all-gather per fragment."""
        return 2 * len(self.segments)

    @property
    def bytes_per_sync(self) -> int:
        """Bytes one sync records in `SyncStats`: the all-to-all's input (the all-reduce equivalent, see above)."""
        return self.selection_bytes()

    @property
    def collective_bytes(self) -> int:
        """Bytes of the two collectives' buffers: the all-to-all's input plus the all-gather's output."""
        return sum(s.collective_bytes for s in self.segments)

    def ensure_views(self) -> None:
        """Rebuild the buckets if a tensor was replaced; refuse if the layout the anchor follows changed."""
        self._layout.ensure_views()
        self.synced.check_layout(self.buckets)

    def _delta_view(self, tensor: torch.Tensor, index: int) -> torch.Tensor:
        return self._segment_of[index].bucket_view(tensor, index)  # in the deltas' layout (the deltas, the residual)

    def storage(self, buckets: Sequence[int] | None = None) -> list[torch.Tensor]:
        """Where this rank's values to average live: its deltas (:meth:`stage`; zeroing them sends zeros)."""
        return self.stage(buckets)

    @torch.no_grad()
    def stage(self, buckets: Sequence[int] | None = None) -> list[torch.Tensor]:
        """Compute this rank's fp32 deltas of ``buckets`` (`None`: all; tensors - anchor, + the residual with error
        feedback) into the buckets' buffers and return them.

        The non-finite check reads them, and a rank that must not count zeroes them (a zero delta). The next
        :meth:`average` of them sends what they hold; calling :meth:`stage` again before it changes nothing.
        """
        chosen = range(len(self.buckets)) if buckets is None else buckets
        if not self._staged.issuperset(chosen):
            self.ensure_views()
        anchors = self.synced.slices()
        for index in chosen:
            if index not in self._staged:
                delta = self.buckets[index].gather(self.buckets[index].flat).sub_(anchors[index])
                if self.residual is not None:
                    delta.add_(self._delta_view(self.residual, index))
                self._staged.add(index)
        return [self.buckets[i].flat for i in chosen]

    def state_dict(self) -> dict[str, Any]:
        """This rank's own state: with error feedback its residual (a CPU copy); else nothing."""
        return {} if self.residual is None else {"residual": self.residual.to("cpu", copy=True)}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore what :meth:`state_dict` returned; `None` (an elastic resume: residuals of other ranks) zeroes it."""
        if self.residual is None:
            return
        saved = None if state is None else state.get("residual")
        if saved is None:
            self.residual.zero_()
        elif tuple(saved.shape) != tuple(self.residual.shape):
            raise ValueError(
                f"the saved compression residual has shape {tuple(saved.shape)}, this run needs "
                f"{tuple(self.residual.shape)}: was it saved from another model, world size or qsr_compress_format?"
            )
        else:
            self.residual.copy_(saved)

    def selection_bytes(self, buckets: Sequence[int] | None = None) -> int:
        """Bytes one sync of ``buckets`` (`None`: all; whole fragments) records: its fragments' all-to-all inputs."""
        return sum(s.bytes for s in select_segments(self.segments, buckets))

    @torch.no_grad()
    def average(
        self,
        divisor: int | None = None,
        transform: Transform = None,
        async_op: bool = False,
        keep_local_change: bool = False,
        buckets: Sequence[int] | None = None,
    ) -> "int | CompressedFlight":
        """Average the staged (or current) deltas across the group and write anchor + mean delta into the tensors.

        Args:
            divisor (`int`, *optional*): what the fp32 sum is divided by; `None` means the world size. A rank that
                must not count contributes a zero delta (zero its :meth:`stage` buffers) and the others pass the
                number of ranks that do.
            transform (`Callable[[int, torch.Tensor], None]`, *optional*): what turns each bucket's plain average
                (anchor + mean change, fp32) into the new values; defaults to the synced state's committed step.
                The residual (error feedback) changes only when it commits (`SyncedState.committed`).
            async_op (`bool`, defaults to `False`): run it on the worker (``overlap=True``); return a
                [`CompressedFlight`] whose ``wait()`` folds it in, keeping with ``keep_local_change`` the change
                made locally since the send: ``anchor' + (now - sent)`` (`OverlappedSync`).
            keep_local_change (`bool`, defaults to `False`): see ``async_op``.
            buckets (`Sequence[int]`, *optional*): whole fragments' buckets (:meth:`buckets_of`); `None`: all.

        Returns:
            `int` (bytes recorded for this sync), or the [`CompressedFlight`].
        """
        if divisor is not None and (isinstance(divisor, bool) or not isinstance(divisor, int) or divisor < 1):
            raise ValueError(f"divisor must be a positive int (the number of ranks that count), got {divisor!r}")
        if (async_op and self._worker is None) or (keep_local_change and not async_op):
            raise ValueError("async_op needs CompressedAverager(overlap=True); keep_local_change needs async_op")
        segments = select_segments(self.segments, buckets)
        chosen = [i for s in segments for i in s.buckets]
        if any(not f.buckets.isdisjoint(chosen) for f in self._flights):  # their buffers are the worker's
            raise RuntimeError("a compressed average of these buckets is in flight: wait() on it first")
        divisor = self.world_size if divisor is None else divisor
        sent = None
        if keep_local_change:  # the values sent, for the fold
            sent = {i: self.buckets[i].gather(torch.empty_like(self.buckets[i].flat)) for i in chosen}
        for index, flat in zip(chosen, self.stage(chosen), strict=True):
            self._delta_view(self._delta, index).copy_(flat)
        self._staged.difference_update(chosen)
        fold = functools.partial(self._write, segments, transform or self.synced.advance, sent)
        exchange = functools.partial(self._exchange, segments, divisor)
        if not async_op:
            fold(exchange(self.process_group))
            return self.selection_bytes(buckets)
        flight = CompressedFlight(self._worker.submit(exchange), fold, set(chosen), self._flights.remove)
        self._flights.append(flight)
        return flight

    def _exchange(self, segments: list[WireSegment], divisor: int, group: ProcessGroup | None) -> list[torch.Tensor]:
        # steps 1 to 4 of each segment, in order: the mean deltas (segment-long fp32), equal on every rank. Reads
        # and writes the segments' buffers and their part of the staged deltas only (the worker thread's, if async)
        feedback = self.residual is not None
        return [s.exchange(s.of(self._delta), divisor, feedback, group) for s in segments]

    @torch.no_grad()
    def _write(
        self,
        segments: list[WireSegment],
        transform: Transform,
        sent: dict[int, torch.Tensor] | None,
        means: list[torch.Tensor],
    ) -> None:
        # step 5: anchor + mean delta, transformed (committing the anchor), with the local change since the send
        anchors = self.synced.slices()
        for segment, mean in zip(segments, means, strict=True):
            for index, part in zip(segment.buckets, segment.views(mean), strict=True):
                bucket = self.buckets[index]
                torch.add(anchors[index], part, out=bucket.flat)  # the plain average
                write_back(index, bucket, bucket.flat, transform, None if sent is None else sent[index])
        if self.residual is not None and self.synced.committed:
            for segment in segments:
                segment.of(self.residual).copy_(segment.of(self._delta))
