"""A compressed average in flight (``qsr_compress_delta`` with ``qsr_overlap_sync``): its two phases progress while
training goes on, and its fold is the overlap's (`qsr_hf.sync.handle.write_back`).

The compressed average (`qsr_hf.sync.compressed`) is two collectives with work between them: the all-to-all of the
encoded deltas, then each rank decodes, sums and re-encodes its chunk, then the all-gather of the mean chunks. An
asynchronous all-to-all alone would leave the sum and the all-gather to the fold, where the main thread would wait
for a whole collective, so the overlap would hide only half of the transfer; launching the all-gather at a fixed
later step would need a second point in the schedule and a second wait. Instead one worker thread runs the
average's phases, in the order the averages were started (a FIFO queue, one thread), on a process group of its own
created collectively when the averager is built:

- gloo (and NCCL) need the collectives of one group issued in the same order on every rank. The main thread keeps
  issuing its own (the next sync's agreement exchange, the checks at evaluation and at the end) on the data-parallel
  group while an average is in flight; a second thread on that same group could interleave with them differently on
  each rank. On a group of its own, only the worker issues collectives, in start order, which every rank shares;
- the main thread touches the average only at :meth:`CompressedFlight.wait` (the fold), where it waits on the
  worker's future: every tensor the worker reads or writes is the averager's own and belongs to the fragments in
  flight (their wire buffers and their part of the staged deltas: `qsr_hf.sync.wire_segments`), and no sync stages
  a new delta of those before the fold (`OverlappedSync` folds an average in flight before the next sync of its
  buckets, and before every evaluation, checkpoint and the end of training; the averager refuses otherwise).

The fold writes ``anchor' + (now - sent)`` into the tensors, ``anchor'`` being the new anchor (``anchor + mean``,
through the outer step when there is one, on arrival) and ``sent`` the tensors' values when the average started; the
error-feedback residual changes only there, and only when the anchor is committed.
"""

import concurrent.futures
import queue
import threading
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from qsr_hf.sync.handle import named_failure


class CollectiveWorker:
    """One thread that runs collective work on a process group of its own, in submission order.

    Build it on every rank of the default group at the same point (``dist.new_group`` is collective).

    Args:
        process_group (`ProcessGroup`, *optional*): the data-parallel group the work averages over; `None` (or a group
            of every rank) is the only one supported: a subgroup's own copy would need every rank of the default
            group to create every subgroup's.
    """

    def __init__(self, process_group: ProcessGroup | None) -> None:
        if process_group is not None and dist.get_world_size(process_group) != dist.get_world_size():
            raise ValueError(
                "qsr_compress_delta with qsr_overlap_sync averages over every rank (its worker's process group is a "
                "copy of the default group): set qsr_overlap_sync=False for a data-parallel subgroup"
            )
        self.group = dist.new_group(backend=dist.get_backend(process_group))
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        # a daemon thread: a process that stops with an average in flight (an error on this rank, another rank gone)
        # does not wait at exit for a collective that may never complete, as a ThreadPoolExecutor's thread would
        threading.Thread(target=self._serve, name="qsr-compressed", daemon=True).start()

    def _serve(self) -> None:
        while True:
            future, work = self._queue.get()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(work(self.group))
                except Exception as error:  # noqa: BLE001 - handed to the main thread, which raises it at the fold
                    future.set_exception(error)

    def submit(self, work: Callable[[ProcessGroup], list[torch.Tensor]]) -> concurrent.futures.Future:
        """Run ``work(group)`` after the work submitted before it; its result through the returned future."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((future, work))
        return future


class CompressedFlight:
    """A compressed average started on a [`CollectiveWorker`]; :meth:`wait` folds it into the tensors (once).

    Args:
        future (`concurrent.futures.Future`): the worker's result: the mean deltas (one per fragment exchanged).
        fold (`Callable[[list[torch.Tensor]], None]`): writes the result into the tensors (the averager's
            write-back, with the values sent and the transform of this average bound).
        buckets (`set[int]`): the averager's buckets it averages (their buffers are in use until the fold).
        on_done (`Callable[[CompressedFlight], None]`): called with it once it has been folded.
    """

    def __init__(
        self,
        future: concurrent.futures.Future,
        fold: Callable[[list[torch.Tensor]], None],
        buckets: set[int],
        on_done: "Callable[[CompressedFlight], None]",
    ) -> None:
        self._future, self._fold, self._on_done = future, fold, on_done
        self.buckets = buckets
        self.done = False

    @property
    def arrived(self) -> bool:
        """Whether both collectives have completed (:meth:`wait` would not block)."""
        return self._future.done()

    def wait(self) -> int:
        """Wait for the worker, then fold the mean change into the tensors (later calls do nothing). Returns 0."""
        if not self.done:
            self.done = True
            try:
                with named_failure():
                    means = self._future.result()
                self._fold(means)
            finally:
                self._on_done(self)
        return 0
