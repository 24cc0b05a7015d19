"""`FlatBucket`: the tensors of one (device, dtype) laid out in one flat buffer, for one collective per bucket.

Pure tensor bookkeeping (no collectives): [`ParameterAverager`] reduces the buffers.
"""

from collections.abc import Sequence

import torch
from torch.distributed.tensor import DTensor


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The tensor whose storage holds this rank's values: a DTensor's local shard, else the tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


class FlatBucket:
    """The tensors of one (device, dtype) and the flat buffer one collective reduces.

    ``rebind=True`` (in-place mode): the tensors are re-bound as views of ``flat`` (dtype of the tensors).
    ``rebind=False`` (copy mode): ``flat`` is a persistent send buffer in the reduce dtype; a sync copies the tensors
    in (``gather``) and the result back (``scatter``); the tensors keep their storage.

    ``spare`` values after ``flat`` may ride along in the same collective (a sync header, `qsr_hf.sync.header`):
    ``wire`` is then ``flat`` followed by them, in the reduce dtype. A bucket averaged in another dtype than its
    tensors' gets its wire buffer at each sync; a single tensor averaged where it is has none (``spare`` is then 0).
    ``keep_single=False`` re-binds a single tensor too (into a buffer with the spare room), as several are.
    """

    def __init__(
        self,
        tensors: Sequence[torch.Tensor],
        rebind: bool,
        reduce_dtype: torch.dtype,
        spare: int = 0,
        keep_single: bool = True,
    ) -> None:
        self.tensors = list(tensors)
        self.rebind = rebind
        first = local_tensor(self.tensors[0])
        self.dtype = first.dtype  # of the tensors (``flat`` is in the reduce dtype in copy mode)
        self.spare = spare
        self.wire: torch.Tensor | None = None
        numel = sum(local_tensor(t).numel() for t in self.tensors)
        kept_dtype = reduce_dtype if not rebind else first.dtype
        if keep_single and rebind and len(self.tensors) == 1 and first.is_contiguous():
            # a single contiguous tensor (e.g. an optimizer's flat master copy) is averaged where it is
            self.flat = first.data.view(-1)
            self.spare = spare if first.dtype != reduce_dtype else 0
        else:
            self._allocate(numel, kept_dtype, reduce_dtype)
        locals_ = [local_tensor(t) for t in self.tensors]
        self.layout = [(local.data_ptr() if rebind else 0, local.shape) for local in locals_]

    def _allocate(self, numel: int, kept_dtype: torch.dtype, reduce_dtype: torch.dtype) -> None:
        # the buffer the tensors live in (in-place mode) or are copied into (copy mode), with the spare room
        first = local_tensor(self.tensors[0])
        room = self.spare if kept_dtype == reduce_dtype else 0
        buffer = torch.empty(numel + room, dtype=kept_dtype, device=first.device)
        self.flat = buffer[:numel]
        self.wire = buffer if kept_dtype == reduce_dtype else None
        if self.rebind:
            with torch.no_grad():
                for t, view in self.views(self.flat):
                    view.copy_(t.data)
                    t.data = view

    def pad_to_multiple(self, multiple: int) -> int:
        """Replace ``flat`` with zeros padded to a multiple of ``multiple`` values (copy mode: equal slices of it);
        returns the length of one slice."""
        chunk = -(-self.flat.numel() // multiple)
        self.flat = torch.zeros(chunk * multiple, dtype=self.flat.dtype, device=self.flat.device)
        return chunk

    def views(self, flat: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Pairs (tensor, its slice of ``flat`` shaped like it), in bucket order."""
        pairs, offset = [], 0
        for t in self.tensors:
            local = local_tensor(t)
            n = local.numel()
            pairs.append((t, flat[offset : offset + n].view(local.shape)))
            offset += n
        return pairs

    def gather(self, flat: torch.Tensor) -> torch.Tensor:
        """Copy the tensors' current values into ``flat`` (cast to its dtype); returns ``flat``."""
        for t, view in self.views(flat):
            view.copy_(local_tensor(t))
        return flat

    def send_buffer(self, reduce_dtype: torch.dtype, tail: Sequence[float] = ()) -> torch.Tensor:
        """The buffer one collective reduces: the values to average in ``reduce_dtype``, then ``tail`` (a header).

        In-place mode in the tensors' dtype: ``flat`` itself (or ``wire``); otherwise a copy (copy mode: the persistent
        send buffer; in-place mode in another dtype: a new buffer).
        """
        n = self.flat.numel()
        if not self.rebind:
            self.gather(self.flat)
            buffer = self.wire if tail else self.flat
        elif reduce_dtype == self.flat.dtype:
            buffer = self.wire if tail else self.flat
        else:
            buffer = torch.empty(n + len(tail), dtype=reduce_dtype, device=self.flat.device)
            buffer[:n].copy_(self.flat)
        if tail:
            buffer[n:] = torch.tensor(tail, dtype=reduce_dtype, device=buffer.device)
        return buffer

    def scatter(self, flat: torch.Tensor) -> None:
        """Copy ``flat`` back into the tensors (cast to their dtype)."""
        for t, view in self.views(flat):
            local_tensor(t).copy_(view)

    def intact(self) -> bool:
        """Whether every tensor still has the dtype, device, shape and (in-place mode) storage it was bucketed with."""
        return all(
            (not self.rebind or local.data_ptr() == ptr)
            and local.dtype == self.dtype
            and local.device == self.flat.device
            and local.shape == shape
            for local, (ptr, shape) in zip(map(local_tensor, self.tensors), self.layout, strict=True)
        )
