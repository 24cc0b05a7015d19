"""`WireSegment`: one fragment's compressed exchange (`qsr_hf.sync.compressed`, steps 1 to 4 of a sync).

A segment is the buckets of one fragment (``qsr_fragments``; the whole model without fragments) laid out one after
the other in a buffer zero-padded to K equal chunks of whole blocks (`qsr_hf.core.wire.padded_numel` of the
fragment's values), with the wire buffers of its all-to-all and all-gather. Each fragment's change is thus encoded
over its own buffer: its int8 / fp8 blocks, chunks and bytes depend on that fragment alone, whichever sync sends it
(its own step of the round, or a sync of the whole model, which exchanges every segment in turn). Segments use
disjoint buffers, so several can be in flight at once (fragments in flight).
"""

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from qsr_hf.core.wire import padded_numel, wire_bytes
from qsr_hf.sync.wire_codec import WireCodec, mean_delta


class WireSegment:
    """The buckets of one fragment and the buffers of their compressed exchange.

    Args:
        buckets (`Sequence[int]`): the averager's bucket indices, in order.
        sizes (`Sequence[int]`): their numbers of values.
        offset (`int`): where the segment starts in the averager's delta and residual buffers.
        world_size (`int`): K, the ranks of the group.
        codec ([`WireCodec`]): the wire format.
        device (`torch.device`): where the buffers live.
    """

    def __init__(
        self,
        buckets: Sequence[int],
        sizes: Sequence[int],
        offset: int,
        world_size: int,
        codec: WireCodec,
        device: torch.device,
    ) -> None:
        self.buckets, self.sizes, self.offset = list(buckets), list(sizes), offset
        self.numel = sum(sizes)
        self.size = padded_numel(self.numel, world_size, codec.fmt)
        self.world_size, self.codec, self.chunk = world_size, codec, self.size // world_size
        self.send, self.received, self.gathered = (codec.buffer(world_size, self.chunk, device) for _ in range(3))
        self.mine = codec.buffer(1, self.chunk, device)

    @property
    def bytes(self) -> int:
        """Bytes one exchange records (the all-to-all's input: `qsr_hf.core.wire.wire_bytes`)."""
        return wire_bytes(self.numel, self.world_size, self.codec.fmt)

    @property
    def collective_bytes(self) -> int:
        """Bytes of the two collectives' buffers: the all-to-all's input plus the all-gather's output."""
        return self.send.numel() + self.gathered.numel()

    def of(self, tensor: torch.Tensor) -> torch.Tensor:
        """This segment's part (padding included) of an averager-wide buffer (the deltas, the residual)."""
        return tensor[self.offset : self.offset + self.size]

    def views(self, segment: torch.Tensor) -> list[torch.Tensor]:
        """Each bucket's values in a segment-long tensor, in bucket order."""
        return list(segment[: self.numel].split(self.sizes))

    def bucket_view(self, tensor: torch.Tensor, index: int) -> torch.Tensor:
        """Bucket ``index``'s (one of this segment's) values in an averager-wide buffer."""
        return self.views(self.of(tensor))[self.buckets.index(index)]

    @torch.no_grad()
    def exchange(self, delta: torch.Tensor, divisor: int, feedback: bool, group: ProcessGroup | None) -> torch.Tensor:
        """Encode this rank's ``delta`` (segment-long fp32; with ``feedback`` it keeps what the encoding lost: the
        next residual), all-to-all, sum the chunk this rank owns in rank order and divide by ``divisor``, encode,
        all-gather; returns the decoded mean (segment-long fp32), bitwise equal on every rank."""
        rows, codec = delta.view(self.world_size, self.chunk), self.codec
        codec.encode(rows, self.send)
        if feedback:
            rows.sub_(codec.decode(self.send, self.chunk))
        dist.all_to_all_single(self.received, self.send, group=group)
        mine = mean_delta(codec.decode(self.received, self.chunk).unbind(0), divisor)
        codec.encode(mine.view(1, -1), self.mine)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # the name before torch 2.10
        gather(self.gathered, self.mine, group=group)
        return codec.decode(self.gathered, self.chunk).view(-1)


def build_segments(
    fragments: Sequence[int], sizes: Sequence[int], world_size: int, codec: WireCodec, device: torch.device
) -> list[WireSegment]:
    """One [`WireSegment`] per fragment, from each bucket's fragment and size (buckets listed fragment by fragment),
    laid out one after the other."""
    segments, offset = [], 0
    for fragment in dict.fromkeys(fragments):
        chosen = [i for i, f in enumerate(fragments) if f == fragment]
        segments.append(WireSegment(chosen, [sizes[i] for i in chosen], offset, world_size, codec, device))
        offset += segments[-1].size
    return segments


def select_segments(segments: list[WireSegment], buckets: Sequence[int] | None) -> list[WireSegment]:
    """The segments of ``buckets`` (`None`: all), which must be whole segments' (fragments')."""
    if buckets is None:
        return segments
    chosen = [s for s in segments if not set(s.buckets).isdisjoint(buckets)]
    if sorted(i for s in chosen for i in s.buckets) != sorted(buckets):
        raise ValueError(f"a compressed average sends whole fragments: the buckets {list(buckets)} split one")
    return chosen
