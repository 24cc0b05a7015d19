"""`SimulatedCompression`: ``qsr_compress_delta`` in the one-process simulation (`qsr_hf.analysis.simulation`).

Each fragment's tensors (the whole model without ``qsr_fragments``) are laid out flat as the compressed averager's
segment of that fragment lays out its buckets (`qsr_hf.sync.wire_segments`: per fragment, one bucket per dtype in
order of first appearance, each holding its tensors in order), so that `compressed_average` sees the same int8 / fp8
blocks; every worker keeps its residual per fragment (``qsr_compress_error_feedback``).
"""

from collections.abc import Sequence

import torch

from qsr_hf.core.wire import wire_bytes
from qsr_hf.sync.wire_codec import compressed_average


class SimulatedCompression:
    """The compressed averages of K simulated workers.

    Args:
        tensors (`Sequence[torch.Tensor]`): worker 0's averaged tensors (shapes and dtypes).
        fragment_of (`Sequence[int]`): each tensor's fragment (`qsr_hf.sync.fragments.partition`).
        num_workers (`int`): K.
        fmt (`str`): ``qsr_compress_format``.
        error_feedback (`bool`): ``qsr_compress_error_feedback``.
    """

    def __init__(
        self,
        tensors: Sequence[torch.Tensor],
        fragment_of: Sequence[int],
        num_workers: int,
        fmt: str,
        error_feedback: bool,
    ) -> None:
        self.fragment_of, self.num_workers, self.fmt = list(fragment_of), num_workers, fmt
        self.segments: list[list[int]] = []  # per fragment, its tensors' indices in the averager's bucket order
        for fragment in dict.fromkeys(fragment_of):
            members = [i for i, f in enumerate(fragment_of) if f == fragment]
            dtypes = dict.fromkeys(tensors[i].dtype for i in members)
            self.segments.append([i for d in dtypes for i in members if tensors[i].dtype == d])
        self.numel = [sum(tensors[i].numel() for i in segment) for segment in self.segments]
        self.residuals = [[torch.zeros(n) for n in self.numel] for _ in range(num_workers)] if error_feedback else None

    def _chosen(self, indices: Sequence[int]) -> list[int]:
        # the fragments (segments) of the tensors ``indices``
        fragments = {self.fragment_of[i] for i in indices}
        return [n for n, segment in enumerate(self.segments) if self.fragment_of[segment[0]] in fragments]

    def bytes(self, indices: Sequence[int]) -> int:
        """Bytes one sync of the tensors ``indices`` (whole fragments) records, as `CompressedAverager` does."""
        return sum(wire_bytes(self.numel[n], self.num_workers, self.fmt) for n in self._chosen(indices))

    @torch.no_grad()
    def averages(
        self, tensors: Sequence[Sequence[torch.Tensor]], anchors: Sequence[torch.Tensor], indices: Sequence[int],
        commit: bool,
    ) -> list[torch.Tensor]:  # fmt: skip
        """The plain average (anchor + decoded mean change, fp32) of each tensor of ``indices``, from every worker's
        ``tensors`` and the ``anchors``; the residuals move when ``commit`` (a sync, not an evaluation)."""
        means: dict[int, torch.Tensor] = {}
        for n in self._chosen(indices):
            order = self.segments[n]
            flat = [torch.cat([ts[i].detach().float().reshape(-1) for i in order]) for ts in tensors]
            anchor = torch.cat([anchors[i].reshape(-1) for i in order])
            residuals = None if self.residuals is None else [r[n] for r in self.residuals]
            mean = compressed_average(anchor, flat, self.num_workers, self.fmt, residuals, commit)
            means.update(zip(order, mean.split([anchors[i].numel() for i in order]), strict=True))
        return [means[i].view_as(anchors[i]) for i in indices]
