"""`ParameterAverager`: average tensors across a process group with one all-reduce per (device, dtype) bucket.

The tensors are re-bound as views of one flat buffer per (device, dtype) (``t.data = flat[a:b].view_as(t)``), so a
sync is a single in-place all-reduce of that buffer: no flatten copy, no per-parameter calls. If something re-binds a
tensor afterwards (``model.to(dtype)``, a reloaded state dict that replaced storage), the views are detected as
broken before the next sync and the buckets are rebuilt.
"""

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import ProcessGroup

from qsr_hf.logging_utils import get_logger


logger = get_logger(__name__)

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def averaged_tensors(module: nn.Module, average_buffers: bool) -> list[torch.Tensor]:
    """Select what a sync averages: trainable parameters and, optionally, persistent floating-point buffers.

    Frozen parameters and non-persistent buffers (constants such as position ids) are left out: they are equal on all
    ranks already, and averaging equal values is not bit-exact for every world size.

    Args:
        module (`nn.Module`): the unwrapped model.
        average_buffers (`bool`): include persistent floating-point buffers (BatchNorm running statistics).

    Returns:
        `list[torch.Tensor]`: the tensors, each once, in module order.
    """
    seen: set[int] = set()
    tensors: list[torch.Tensor] = []
    for p in module.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            tensors.append(p)
    if average_buffers:
        for sub in module.modules():
            for name, buf in sub.named_buffers(recurse=False):
                persistent = name not in getattr(sub, "_non_persistent_buffers_set", set())
                if buf is not None and buf.is_floating_point() and persistent and id(buf) not in seen:
                    seen.add(id(buf))
                    tensors.append(buf)
    return tensors


def optimizer_state_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The optimizer's per-parameter floating-point state tensors (momentum, Adam moments), in parameter order.

    Scalars (Adam's ``step``) are left out: they are equal on every rank. Parameters without state yet (before the
    first step) contribute nothing, so the list grows once the optimizer has stepped.

    Args:
        optimizer (`torch.optim.Optimizer`): the (possibly wrapped) optimizer; its ``param_groups`` and ``state``.

    Returns:
        `list[torch.Tensor]`: the tensors, in the order of ``param_groups`` (the same on every rank).
    """
    tensors: list[torch.Tensor] = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            for value in optimizer.state.get(p, {}).values():
                if torch.is_tensor(value) and value.is_floating_point() and value.dim() > 0:
                    tensors.append(value)
    return tensors


class _Bucket:
    """One flat buffer whose slices are the storage of ``tensors``."""

    def __init__(self, tensors: Sequence[torch.Tensor]) -> None:
        self.tensors = list(tensors)
        first = self.tensors[0]
        if len(self.tensors) == 1 and first.is_contiguous():
            # a single contiguous tensor (e.g. an optimizer's flat master copy) is averaged where it is
            self.flat = first.data.view(-1)
        else:
            numel = sum(t.numel() for t in self.tensors)
            self.flat = torch.empty(numel, dtype=first.dtype, device=first.device)
            offset = 0
            with torch.no_grad():
                for t in self.tensors:
                    n = t.numel()
                    view = self.flat[offset : offset + n].view_as(t)
                    view.copy_(t.data)
                    t.data = view
                    offset += n
        self.pointers = [t.data_ptr() for t in self.tensors]

    def intact(self) -> bool:
        """Whether every tensor still lives in this bucket's buffer."""
        return all(
            t.data_ptr() == ptr and t.dtype == self.flat.dtype and t.device == self.flat.device
            for t, ptr in zip(self.tensors, self.pointers, strict=True)
        )


class ParameterAverager:
    """Average tensors across the ranks of a process group, in place, one collective per (device, dtype) bucket.

    Args:
        tensors (`Iterable[torch.Tensor]` or `Callable[[], Iterable[torch.Tensor]]`):
            What to average (see [`averaged_tensors`]); they are re-bound as views of flat buffers. Pass a callable
            that re-collects them (``lambda: averaged_tensors(model, True)``) so that tensors replaced later, such as
            buffers after ``model.to(dtype)``, are picked up.
        process_group (`ProcessGroup`, *optional*):
            The data-parallel group; `None` means the default (WORLD) group.
        fp32_average (`bool`, defaults to `True`):
            Sum bf16/fp16 buckets in fp32 (one temporary fp32 copy of the bucket), as the paper does.

    Example:

    ```python
    averager = ParameterAverager(averaged_tensors(model, average_buffers=True))
    bytes_sent = averager.average()  # parameters now bitwise equal on every rank
    ```
    """

    def __init__(
        self,
        tensors: Iterable[torch.Tensor] | Callable[[], Iterable[torch.Tensor]],
        process_group: ProcessGroup | None = None,
        fp32_average: bool = True,
    ) -> None:
        self._collect = tensors if callable(tensors) else None
        self.tensors = list(tensors() if callable(tensors) else tensors)
        self.process_group = process_group
        self.fp32_average = fp32_average
        self.buckets = self._build()

    def _build(self) -> list[_Bucket]:
        groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for t in self.tensors:
            groups.setdefault((t.device, t.dtype), []).append(t)
        return [_Bucket(ts) for ts in groups.values()]

    @property
    def num_buckets(self) -> int:
        """Number of collectives one sync issues."""
        return len(self.buckets)

    @property
    def bytes_per_sync(self) -> int:
        """Bytes one rank contributes to the all-reduces of one sync (after any fp32 up-cast)."""
        return sum(b.flat.numel() * self._reduce_dtype(b.flat.dtype).itemsize for b in self.buckets)

    def _reduce_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return torch.float32 if self.fp32_average and dtype in _LOW_PRECISION else dtype

    def ensure_views(self) -> None:
        """Rebuild the buckets if a tensor was re-bound or replaced since they were built (e.g. by ``model.to``)."""
        if self._collect is not None:
            current = list(self._collect())
            kept = len(current) >= len(self.tensors) and all(
                a is b for a, b in zip(current, self.tensors, strict=False)
            )
            if kept and len(current) > len(self.tensors) and all(b.intact() for b in self.buckets):
                # only new tensors (optimizer state created by the first step): regroup, nothing was broken
                self.tensors = current
                self.buckets = self._build()
                return
            if not kept:
                self.tensors = current
                self.buckets = []
        if not self.buckets or not all(b.intact() for b in self.buckets):
            logger.warning(
                "qsr_hf: averaged tensors were moved, re-cast or replaced since the last sync (model.to, a reloaded state); "
                "rebuilding the flat buffers",
                main_process_only=True,
            )
            self.buckets = self._build()

    @torch.no_grad()
    def average(self, divisor: int | None = None) -> int:
        """All-reduce every bucket and divide by the world size (or ``divisor``), in place.

        Args:
            divisor (`int`, *optional*): what the sums are divided by; e.g. the number of ranks that contributed
                when the others zeroed their buffers (``qsr_on_nonfinite="skip_rank"``).

        Returns:
            `int`: bytes this rank contributed to the collectives.
        """
        self.ensure_views()
        world_size = divisor or dist.get_world_size(self.process_group)
        for bucket in self.buckets:
            reduce_dtype = self._reduce_dtype(bucket.flat.dtype)
            if reduce_dtype == bucket.flat.dtype:
                dist.all_reduce(bucket.flat, group=self.process_group)
                bucket.flat.div_(world_size)
            else:
                wide = bucket.flat.to(reduce_dtype)
                dist.all_reduce(wide, group=self.process_group)
                bucket.flat.copy_(wide.div_(world_size))
        return self.bytes_per_sync
