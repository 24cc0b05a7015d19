"""`AverageHandle`: one average of some flat buckets, started and then finished by ``wait()``.

Started by ``ParameterAverager.average`` (blocking: waited at once; ``async_op=True``: returned in flight) with
everything it needs as arguments. It owns what happens between the collectives and the tensors: the division, the
outer optimizer's transform, the local change kept by the overlap, the sync header's verdict (`qsr_hf.sync.header`),
and the write-back; it reports its end through ``on_done``.
"""

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from qsr_hf.sync.flat_buckets import FlatBucket as _Bucket
from qsr_hf.sync.flat_buckets import local_tensor as _local
from qsr_hf.sync.header import SyncHeader


Transform = Callable[[int, torch.Tensor], None] | None  # (bucket index, its average) -> rewrites it in place


@contextlib.contextmanager
def named_failure() -> Iterator[None]:
    """Re-raise a backend error inside an average (gloo: a timeout, a closed connection, a size mismatch) with its
    likely cause."""
    try:
        yield
    except RuntimeError as error:
        raise RuntimeError(
            "qsr_hf: an average's all-reduce failed on this rank: another rank is not at a sync (it stopped early, "
            "skipped or added optimizer steps, or is in another collective) or it died. Every rank must run the same "
            f"number of optimizer steps. Backend error: {error}"
        ) from error


@torch.no_grad()
def write_back(
    index: int, bucket: _Bucket, average: torch.Tensor, transform: Transform, sent: torch.Tensor | None
) -> None:
    """Write one bucket's average into its tensors: ``transform`` it (the outer step), then, with ``sent`` (the
    bucket's values when the average was sent, flat, in ``average``'s dtype; consumed), add the change made locally
    since the send. The one fold of every average, plain (`AverageHandle`) or compressed (`qsr_hf.sync.compressed`).
    """
    if transform is not None:
        transform(index, average)  # e.g. the outer optimizer's step (`SyncedState.advance`)
    if sent is not None:
        for t, view in bucket.views(sent.neg_()):
            view.add_(_local(t))  # sent := current - sent, the local change since the send
        average.add_(sent)
    if not bucket.rebind:
        bucket.scatter(average)
    elif average.data_ptr() != bucket.flat.data_ptr():  # averaged in another dtype
        bucket.flat.copy_(average)


class AverageHandle:
    """An average in flight, returned by ``ParameterAverager.average(async_op=True)``; :meth:`wait` finishes it.

    Copy mode: the tensors are untouched until :meth:`wait`, which folds the result into them. In-place mode: the
    collective writes into the tensors' own storage while in flight, so they must not be used until :meth:`wait`.

    Args:
        buckets (`Sequence[tuple[int, FlatBucket, torch.dtype]]`): the buckets to average, each with its index (passed
            to ``transform``) and the dtype it is summed in.
        process_group (`ProcessGroup`, *optional*): the group of the all-reduces (`None`: WORLD).
        divisor (`int`): what the sums are divided by (unless the header's verdict sets another).
        async_op (`bool`): start the collectives without waiting.
        keep_local_change (`bool`): at :meth:`wait`, keep the change made locally since the send.
        transform (`Transform`): rewrites each bucket's average in place before the write-back.
        header ([`SyncHeader`], *optional*): sent in the bucket of index ``header_index``.
        header_index (`int`, *optional*): which bucket carries ``header``.
        num_bytes (`int`): what :meth:`wait` returns (bytes this rank contributed).
        on_done (`Callable[[AverageHandle], None]`, *optional*): called once :meth:`wait` has written the average.
    """

    def __init__(
        self,
        buckets: Sequence[tuple[int, _Bucket, torch.dtype]],
        process_group: ProcessGroup | None,
        divisor: int,
        async_op: bool,
        keep_local_change: bool,
        transform: Transform,
        header: SyncHeader | None = None,
        header_index: int | None = None,
        num_bytes: int = 0,
        on_done: "Callable[[AverageHandle], None] | None" = None,
    ) -> None:
        self._divisor = divisor
        self._transform = transform
        self._header = header
        self._on_done = on_done
        self._summed_header: torch.Tensor | None = None
        self._pending: list[tuple[int, _Bucket, torch.Tensor, Any, torch.Tensor | None]] = []
        self._bytes = num_bytes
        for index, bucket, wire_dtype in buckets:
            tail = header.values if header is not None and index == header_index else []
            wire = bucket.send_buffer(wire_dtype, tail)
            wide = wire[: bucket.flat.numel()] if tail else wire
            if tail:
                self._summed_header = wire[wide.numel() :]
            sent = wide.clone() if keep_local_change else None
            with named_failure():
                work = dist.all_reduce(wire, group=process_group, async_op=async_op)
            self._pending.append((index, bucket, wide, work, sent))

    @property
    def buckets(self) -> set[int]:
        """The indices of the buckets this average has not yet written back."""
        return {index for index, *_ in self._pending}

    @property
    def arrived(self) -> bool:
        """Whether every collective has completed (:meth:`wait` would not block)."""
        return all(work is None or work.is_completed() for _, _, _, work, _ in self._pending)

    @property
    def done(self) -> bool:
        """Whether :meth:`wait` has run."""
        return not self._pending

    @torch.no_grad()
    def wait(self) -> int:
        """Wait for the collectives, divide, and write the average into the tensors (once; later calls do nothing).

        With ``keep_local_change=True`` each tensor becomes ``average + (current value - value sent)``: the change
        made locally while the average was in flight is kept on top of it.

        Returns:
            `int`: bytes this rank contributed to the collectives.
        """
        for _, _, _, work, _ in self._pending:
            if work is not None:
                with named_failure():
                    work.wait()
        if self._header is not None:  # every collective has completed: a header that raises leaves none pending
            divisor = self._header.resolve(self._summed_header.tolist())
            self._divisor = self._divisor if divisor is None else divisor
        for index, bucket, wide, _, sent in self._pending:
            write_back(index, bucket, wide.div_(self._divisor), self._transform, sent)
        self._pending.clear()
        if self._on_done is not None:
            self._on_done(self)
        return self._bytes
