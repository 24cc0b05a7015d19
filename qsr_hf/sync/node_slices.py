"""`NodeSlices`: the inter-node floor of a hierarchical sync (each process of a node averages 1/k of the model).

With ``qsr_worker="node"`` the k processes of a node hold bitwise equal parameters. Instead of every process
all-reducing the whole model between nodes (k copies of it on the inter-node link), local rank j takes slice j of the
flat parameters, only that slice is averaged across nodes (by the [`ParameterAverager`] over the inter-node group),
and the node's processes then all-gather the averaged slices. One sync then sends one model's worth per node
between nodes, split across its processes (the floor), plus one all-gather of the model inside the node.

The flat layout is that of [`FlatBucket`] (one per device and dtype), zero-padded to a multiple of k.
"""

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from qsr_hf.sync.flat_buckets import FlatBucket


class NodeSlices:
    """This rank's slices of node-equal tensors (copy-in), and the all-gather that puts the averaged slices back.

    Args:
        node_group (`ProcessGroup`): the ranks of this node (they hold equal values of the tensors).

    Example:

    ```python
    slices = NodeSlices(node_group)
    pieces = slices.pieces(params)  # this rank's 1/k of the parameters, copied in
    ParameterAverager(pieces, inter_node_group).average()
    slices.gather()  # every rank of the node: the averaged parameters
    ```
    """

    def __init__(self, node_group: ProcessGroup) -> None:
        self.node_group = node_group
        self.node_size = dist.get_world_size(node_group)
        self.local_rank = dist.get_rank(node_group)
        self._tensors: list[torch.Tensor] = []
        self._buckets: list[FlatBucket] = []
        self._pieces: list[torch.Tensor] = []

    def _build(self, tensors: list[torch.Tensor]) -> None:
        groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for t in tensors:
            groups.setdefault((t.device, t.dtype), []).append(t)
        self._tensors = list(tensors)
        self._buckets, self._pieces = [], []
        for (device, dtype), ts in groups.items():
            bucket = FlatBucket(ts, rebind=False, reduce_dtype=dtype)
            chunk = bucket.pad_to_multiple(self.node_size)  # k equal slices
            self._buckets.append(bucket)
            self._pieces.append(torch.empty(chunk, dtype=dtype, device=device))

    @torch.no_grad()
    def pieces(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Copy this rank's slice of ``tensors`` into persistent tensors (one per device and dtype) and return them.

        Args:
            tensors (`list[torch.Tensor]`): tensors whose values agree on every rank of the node (the parameters).

        Returns:
            `list[torch.Tensor]`: the slices; average them across nodes, then call :meth:`gather`.
        """
        same = len(tensors) == len(self._tensors) and all(a is b for a, b in zip(tensors, self._tensors, strict=False))
        if not same or not all(b.intact() for b in self._buckets):
            self._build(tensors)
        for bucket, piece in zip(self._buckets, self._pieces, strict=True):
            bucket.gather(bucket.flat)
            piece.copy_(bucket.flat[self.local_rank * piece.numel() :][: piece.numel()])
        return list(self._pieces)

    @torch.no_grad()
    def gather(self) -> None:
        """All-gather the slices inside the node and copy the result into the tensors (a collective of the node)."""
        for bucket, piece in zip(self._buckets, self._pieces, strict=True):
            dist.all_gather_single(bucket.flat, piece, group=self.node_group)
            bucket.scatter(bucket.flat)

    @property
    def gather_bytes(self) -> int:
        """Bytes one all-gather brings to this rank from the other processes of its node."""
        return sum(p.numel() * p.element_size() * (self.node_size - 1) for p in self._pieces)
