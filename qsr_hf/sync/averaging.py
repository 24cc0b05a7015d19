"""`ParameterAverager`: average tensors across a process group with one all-reduce per (device, dtype) bucket.

In-place mode re-binds the tensors as views of one flat buffer per bucket, so a sync is one in-place all-reduce of
it; copy mode (FSDP2 shards, overlap) copies through a persistent send buffer. With ``fragments`` F > 1 the buckets
are per (fragment, device, dtype) and an average may select some (`qsr_hf.sync.fragments`). A tensor re-bound or
re-cast later (``model.to(dtype)``, a reloaded state dict) is detected before the next sync: the buckets are rebuilt.
"""

from collections.abc import Callable, Iterable, Sequence
from typing import Literal, overload

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup
from torch.distributed.tensor import DTensor

from qsr_hf.core.logging_utils import get_logger
from qsr_hf.sync.flat_buckets import FlatBucket as _Bucket
from qsr_hf.sync.flat_buckets import local_tensor as _local
from qsr_hf.sync.fragments import partition
from qsr_hf.sync.handle import AverageHandle, Transform
from qsr_hf.sync.header import SyncHeader, encode, header_slots


logger = get_logger(__name__)

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def reduce_dtype(dtype: torch.dtype, fp32_average: bool) -> torch.dtype:
    """The dtype a tensor of ``dtype`` is summed in: fp32 for bf16/fp16 when ``fp32_average`` (as the paper does)."""
    return torch.float32 if fp32_average and dtype in _LOW_PRECISION else dtype


AveragerMode = Literal["inplace", "copy"]


class ParameterAverager:
    """Average tensors across the ranks of a process group, one collective per (device, dtype) bucket.

    Two modes share the bucket code. ``"inplace"`` (the default, fastest): the tensors are re-bound as views of one
    flat buffer per bucket, and a sync is one in-place all-reduce of it. ``"copy"``: the tensors keep their storage;
    a sync copies them into a persistent flat send buffer (already in the reduce dtype), all-reduces it and copies the
    result back. Copy mode is for tensors that cannot be re-bound (FSDP2's DTensor shards: their local shards are
    used) and for keeping the tensors usable while an asynchronous average is in flight.

    Args:
        tensors (`Iterable[torch.Tensor]` or `Callable[[], Iterable[torch.Tensor]]`):
            What to average (see [`averaged_tensors`]). Pass a callable that re-collects them
            (``lambda: averaged_tensors(model, True)``) so that tensors replaced later, such as buffers after
            ``model.to(dtype)``, are picked up.
        process_group (`ProcessGroup`, *optional*):
            The data-parallel group; `None` means the default (WORLD) group.
        fp32_average (`bool`, defaults to `True`):
            Sum bf16/fp16 buckets in fp32, as the paper does.
        mode (`str`, defaults to `"inplace"`):
            `"inplace"` (re-bind into flat buffers) or `"copy"` (copy in, all-reduce, copy out).
        fragments (`int`, defaults to 1):
            F: split the tensors, in order, into F contiguous parts of about equal size (`qsr_hf.sync.fragments.partition`)
            with buckets of their own, listed fragment by fragment; :attr:`bucket_fragments` gives each one's part.

    Example:

    ```python
    averager = ParameterAverager(averaged_tensors(model, average_buffers=True))
    bytes_sent = averager.average()  # parameters now bitwise equal on every rank
    handle = averager.average(async_op=True)  # start; ...; then
    handle.wait()
    ```
    """

    def __init__(
        self,
        tensors: Iterable[torch.Tensor] | Callable[[], Iterable[torch.Tensor]],
        process_group: ProcessGroup | None = None,
        fp32_average: bool = True,
        mode: AveragerMode = "inplace",
        fragments: int = 1,
    ) -> None:
        if mode not in ("inplace", "copy"):
            raise ValueError(f"ParameterAverager mode must be 'inplace' or 'copy', got {mode!r}")
        self._collect = tensors if callable(tensors) else None
        self.tensors = list(tensors() if callable(tensors) else tensors)
        self.process_group = process_group
        self.fp32_average = fp32_average
        self.mode = mode
        self.fragments = fragments
        self.bucket_fragments: list[int] = []  # the fragment of each bucket
        self._in_flight: list[AverageHandle] = []  # started asynchronously, not yet waited (fragments: several)
        self.buckets = self._build()

    def _build(self) -> list[_Bucket]:
        groups: dict[tuple[int, torch.device, torch.dtype], list[torch.Tensor]] = {}
        fragment_of = partition([t.numel() for t in self.tensors], self.fragments)
        for t, fragment in zip(self.tensors, fragment_of, strict=True):
            if self.mode == "inplace" and isinstance(t, DTensor):
                raise ValueError(
                    "ParameterAverager(mode='inplace') cannot re-bind DTensor (FSDP2) parameters; use mode='copy'"
                )
            local = _local(t)
            groups.setdefault((fragment, local.device, local.dtype), []).append(t)
        world = dist.get_world_size(self.process_group) if dist.is_initialized() else 1
        # every bucket that can carry the sync header gets room for it: an average of some buckets sends it in the
        # first selected one that has room. With fragments (DDP parameters) a single tensor is re-bound as well, so
        # that a fragment of one tensor carries it too (with one fragment it is averaged where it is: a flat master)
        buckets = []
        for (_, _, dt), ts in groups.items():
            wide = self._reduce_dtype(dt)
            buckets.append(_Bucket(ts, self.mode == "inplace", wide, header_slots(world, wide), self.fragments == 1))
        self.bucket_fragments = [fragment for fragment, _, _ in groups]
        return buckets

    def header_index(self, buckets: Sequence[int] | None = None) -> int | None:
        """The bucket whose collective carries the sync header of an average of ``buckets`` (`None`: all): the first
        of them with room for it, or `None` when none has (no float32/float64 values there)."""
        selected = range(len(self.buckets)) if buckets is None else buckets
        return next((i for i in selected if self.buckets[i].spare), None)

    def buckets_of(self, fragments: Iterable[int]) -> list[int]:
        """The indices of the buckets of ``fragments`` (see ``fragments`` in the class docstring), in order."""
        chosen = set(fragments)
        return [i for i, fragment in enumerate(self.bucket_fragments) if fragment in chosen]

    def make_header(
        self,
        values: Sequence[int],
        counted: bool,
        on_unhealthy: Callable[[], int | None],
        buckets: Sequence[int] | None = None,
    ) -> SyncHeader:
        """A [`SyncHeader`] for :meth:`average` (`qsr_hf.sync.header`): ``values`` to agree on, whether this rank's
        values count, and what to do on every rank when the summed headers are not healthy; ``buckets``: the
        selection the average will send (`None`: all)."""
        world = dist.get_world_size(self.process_group)
        dtype = self._reduce_dtype(self.buckets[self.header_index(buckets)].dtype)
        return SyncHeader(encode(values, counted, world, dtype), world, on_unhealthy)

    def storage(self, buckets: Sequence[int] | None = None) -> list[torch.Tensor]:
        """Where this rank's values to average live (zeroing them contributes nothing): the flat buffers of
        ``buckets`` (`None`: all) in place, their tensors themselves in copy mode."""
        chosen = range(len(self.buckets)) if buckets is None else buckets
        if self.mode == "inplace":
            return [self.buckets[i].flat for i in chosen]
        return [t for i in chosen for t in self.buckets[i].tensors]

    @property
    def num_buckets(self) -> int:  # noqa: D102 - the collectives one sync issues
        return len(self.buckets)

    @property
    def bytes_per_sync(self) -> int:
        """Bytes one rank contributes to the all-reduces of one sync of every bucket (after any fp32 up-cast)."""
        return self.selection_bytes()

    def selection_bytes(self, buckets: Sequence[int] | None = None) -> int:
        """Bytes one rank contributes to the all-reduces of an average of ``buckets`` (`None`: all)."""
        selected = self.buckets if buckets is None else [self.buckets[i] for i in buckets]
        return sum(b.flat.numel() * self._reduce_dtype(b.flat.dtype).itemsize for b in selected)

    def _reduce_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return reduce_dtype(dtype, self.fp32_average)

    def ensure_views(self) -> None:
        """Rebuild the buckets if a tensor was re-bound or replaced since they were built (e.g. by ``model.to``); with
        averages in flight (fragments in flight) the buckets must not have changed."""
        current = list(self._collect()) if self._collect is not None else self.tensors
        kept = len(current) >= len(self.tensors) and all(a is b for a, b in zip(current, self.tensors, strict=False))
        intact = bool(self.buckets) and all(b.intact() for b in self.buckets)
        if kept and intact and len(current) == len(self.tensors):
            return  # nothing changed: the one case allowed while averages are in flight
        if self._in_flight:
            raise RuntimeError("an asynchronous average is in flight: call wait() on its handle first")
        self.tensors = current
        if not (kept and intact):  # (kept and intact: only new tensors, the optimizer state of the first step)
            logger.warning(
                "qsr_hf: averaged tensors were moved, re-cast or replaced since the last sync (model.to, a reloaded state); "
                "rebuilding the flat buffers",
                main_process_only=True,
            )
        self.buckets = self._build()

    @overload
    def average(
        self,
        divisor: int | None = None,
        async_op: Literal[False] = False,
        keep_local_change: bool = False,
        transform: Transform = None,
        header: SyncHeader | None = None,
        buckets: Sequence[int] | None = None,
    ) -> int: ...

    @overload
    def average(
        self,
        divisor: int | None = None,
        *,
        async_op: Literal[True],
        keep_local_change: bool = False,
        transform: Transform = None,
        header: SyncHeader | None = None,
        buckets: Sequence[int] | None = None,
    ) -> AverageHandle: ...

    @torch.no_grad()
    def average(
        self,
        divisor: int | None = None,
        async_op: bool = False,
        keep_local_change: bool = False,
        transform: Transform = None,
        header: SyncHeader | None = None,
        buckets: Sequence[int] | None = None,
    ) -> int | AverageHandle:
        """All-reduce every bucket (or those of ``buckets``) and divide, writing the average into the tensors.

        Args:
            divisor (`int`, *optional*):
                What the sum is divided by; `None` means the world size of the process group. A rank that must not
                count (non-finite values) contributes zeros and the others pass the number of ranks that do.
            async_op (`bool`, defaults to `False`):
                Return an [`AverageHandle`] at once instead of blocking; its ``wait()`` finishes the average.
            keep_local_change (`bool`, defaults to `False`):
                With ``async_op=True`` in copy mode only: at ``wait()`` each tensor becomes the average plus the change
                made to it locally since the send (the one-step-delayed overlap).
            transform (`Callable[[int, torch.Tensor], None]`, *optional*):
                Called with each bucket's index and average (flat, reduce dtype) before it is written back and
                before any local change is added; it may rewrite the average in place (the outer optimizer's step).
            header ([`SyncHeader`], *optional*):
                Values sent in the same collective as the bucket :meth:`header_index` picks (the sync's agreement
                check, `qsr_hf.sync.header`); once every collective completed, its ``resolve`` sees their sum and may
                raise or set the divisor. Needs such a bucket (float32/float64 values to average) in the selection.
            buckets (`Sequence[int]`, *optional*):
                The indices of the buckets to average, in increasing order (one fragment's, :meth:`buckets_of`);
                `None`: all of them.

        Returns:
            `int` (bytes this rank contributed to the collectives), or an [`AverageHandle`] when ``async_op=True``.
        """
        if divisor is not None and (isinstance(divisor, bool) or not isinstance(divisor, int) or divisor < 1):
            raise ValueError(f"divisor must be a positive int (the number of ranks that count), got {divisor!r}")
        if keep_local_change and not (async_op and self.mode == "copy"):
            raise ValueError("keep_local_change=True needs async_op=True and ParameterAverager(mode='copy')")
        self.ensure_views()
        if header is not None and self.header_index(buckets) is None:
            raise ValueError("no selected bucket of this averager can carry a sync header (no float32/float64 values)")
        divisor = dist.get_world_size(self.process_group) if divisor is None else divisor
        selected = range(len(self.buckets)) if buckets is None else buckets
        if any(not h.buckets.isdisjoint(selected) for h in self._in_flight):  # its send buffers are in use
            raise RuntimeError("an asynchronous average of these buckets is in flight: wait() on its handle first")
        wires = [(i, self.buckets[i], self._reduce_dtype(self.buckets[i].dtype)) for i in selected]
        handle = AverageHandle(
            wires,
            self.process_group,
            divisor,
            async_op,
            keep_local_change,
            transform,
            header,
            self.header_index(buckets),
            self.selection_bytes(buckets),
            on_done=self._finished,
        )
        if not async_op:
            return handle.wait()
        self._in_flight.append(handle)
        return handle

    def _finished(self, handle: AverageHandle) -> None:
        self._in_flight = [h for h in self._in_flight if h is not handle]

    @torch.no_grad()
    def snapshot(self) -> list[torch.Tensor]:
        """Copies of the averaged tensors' current values, one flat tensor per bucket (see :meth:`restore`)."""
        self.ensure_views()
        return [b.flat.clone() if b.rebind else b.gather(torch.empty_like(b.flat)) for b in self.buckets]

    @torch.no_grad()
    def restore(self, snapshot: Sequence[torch.Tensor]) -> None:
        """Write back what :meth:`snapshot` returned, bitwise.

        Raises:
            `ValueError`: if the snapshot does not match the buckets (another model, or tensors added since).
        """
        self.ensure_views()
        shapes = [(tuple(b.flat.shape), b.flat.dtype) for b in self.buckets]
        if [(tuple(s.shape), s.dtype) for s in snapshot] != shapes:
            raise ValueError(
                f"the snapshot's buffers {[(tuple(s.shape), s.dtype) for s in snapshot]} do not match this averager's "
                f"buckets {shapes}: take the snapshot from the same averager after the same tensors were added"
            )
        for bucket, saved in zip(self.buckets, snapshot, strict=True):
            if bucket.rebind:
                bucket.flat.copy_(saved)
            else:
                bucket.scatter(saved)
