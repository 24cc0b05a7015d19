"""The memory a rank's syncs hold beside the model and its optimizer, by what holds it (pure: no torch).

The averagers allocate exactly these buffers (`qsr_hf.sync`); tests/test_sync_memory.py checks the sizes against the
tensors a real 2-rank averager holds, and ``qsr-hf plan`` prints them for a recipe.
"""

import math
from dataclasses import asdict, dataclass
from typing import Any

from qsr_hf.core.config import QSRConfig
from qsr_hf.core.wire import bytes_per_value


CHUNK = 1 << 22  # values per chunk of the outer step's work buffers (16 MiB in fp32), and of a streamed sync


@dataclass(frozen=True)
class SyncMemory:
    """The memory a rank holds for its syncs beside the model and its optimizer (:func:`sync_memory`).

    Args:
        per_param (`dict[str, float]`): bytes per averaged value for the whole run, by what holds them.
        in_flight_per_param (`float`): bytes per averaged value held more while an average is in flight
            (``qsr_overlap_sync``: the values sent, which the fold keeps this rank's later local change against).
        fixed_bytes (`int`): work buffers of a bounded size (the outer step's chunks).
        host_parts (`tuple[str, ...]`): the parts of ``per_param`` in host memory (``qsr_outer_state_on_cpu``).
    """

    per_param: dict[str, float]
    in_flight_per_param: float
    fixed_bytes: int
    host_parts: tuple[str, ...]

    @property
    def peak_per_param(self) -> float:
        """Bytes per averaged value at the peak (an average in flight included)."""
        return sum(self.per_param.values()) + self.in_flight_per_param

    def total_bytes(self, numel: int) -> int:
        """Peak bytes for ``numel`` averaged values."""
        return math.ceil(self.peak_per_param * numel) + self.fixed_bytes * min(numel, CHUNK) // CHUNK

    def to_dict(self, numel: float | None = None) -> dict[str, Any]:
        """The fields, the peak per value and, given the number of averaged values, the peak in bytes."""
        out = {**asdict(self), "peak_bytes_per_param": self.peak_per_param}
        return out if numel is None else {**out, "peak_bytes": self.total_bytes(int(numel))}

    def describe(self, numel: float | None = None) -> str:
        """One line: the parts, where they live and, given the number of averaged values, the peak in GiB."""
        parts = ", ".join(f"{name} {value:.3g}" for name, value in self.per_param.items())
        line = f"{sum(self.per_param.values()):.3g} B ({parts})"
        if self.in_flight_per_param:
            line += f", +{self.in_flight_per_param:.3g} B while an average is in flight (the values sent)"
        if self.fixed_bytes:
            line += f", + at most {self.fixed_bytes / 2**20:.0f} MiB of outer-step work buffers"
        if self.host_parts:
            line += f"; {' and '.join(self.host_parts)} in host memory"
        if numel is not None:
            line += f" = {self.total_bytes(int(numel)) / 2**30:.2f} GiB at the peak for {int(numel)} values"
        return line


def sync_memory(config: QSRConfig, world_size: int = 2) -> SyncMemory:
    """The memory ``config``'s syncs hold per rank, as the averagers allocate it (checked against the tensors a real
    2-rank averager holds in tests/test_sync_memory.py).

    Per averaged value (fp32 accumulation): the last synced values (the anchor, with an outer optimizer or
    compression), the outer momentum, the copy-mode buffers an average is staged in (compression, the overlap), the
    fp32 deltas and the wire buffers of a compressed average (its all-to-all input and output, the all-gather
    output and this rank's share), the error-feedback residual, and while an average is in flight the values sent.
    The outer step also keeps two work buffers of at most 16 MiB each (four when its state is in host memory).

    Args:
        config ([`QSRConfig`]): the sync settings.
        world_size (`int`, defaults to 2): ranks a sync averages over (a compressed average's share is 1/world).
    """
    outer = config.qsr_outer_optimizer != "none"
    compressed = config.qsr_compress_delta
    parts: dict[str, float] = {}
    if outer or compressed:
        parts["anchor"] = 4
    if outer and config.qsr_outer_momentum > 0:
        parts["outer momentum"] = 4
    if compressed or config.qsr_overlap_sync:
        parts["copy buffers"] = 4
    if compressed:
        parts["deltas"] = 4
        parts["wire buffers"] = (3 + 1 / world_size) * bytes_per_value(config.qsr_compress_format)
        if config.qsr_compress_error_feedback:
            parts["error-feedback residual"] = 4
    host = tuple(p for p in ("anchor", "outer momentum") if p in parts and outer and config.qsr_outer_state_on_cpu)
    work = (4 if config.qsr_outer_state_on_cpu else 2) * CHUNK * 4 if outer else 0
    return SyncMemory(parts, 4.0 if config.qsr_overlap_sync else 0.0, work, host)
