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
    """

    def __init__(self, tensors: Sequence[torch.Tensor], rebind: bool, reduce_dtype: torch.dtype) -> None:
        self.tensors = list(tensors)
        self.rebind = rebind
        first = local_tensor(self.tensors[0])
        self.dtype = first.dtype  # of the tensors (``flat`` is in the reduce dtype in copy mode)
        numel = sum(local_tensor(t).numel() for t in self.tensors)
        if not rebind:
            self.flat = torch.empty(numel, dtype=reduce_dtype, device=first.device)
        elif len(self.tensors) == 1 and first.is_contiguous():
            # a single contiguous tensor (e.g. an optimizer's flat master copy) is averaged where it is
            self.flat = first.data.view(-1)
        else:
            self.flat = torch.empty(numel, dtype=first.dtype, device=first.device)
            with torch.no_grad():
                for t, view in self.views(self.flat):
                    view.copy_(t.data)
                    t.data = view
        locals_ = [local_tensor(t) for t in self.tensors]
        self.layout = [(local.data_ptr() if rebind else 0, local.shape) for local in locals_]

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
