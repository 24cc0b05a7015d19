"""The parts of a distributed sync, built once from the settings: the averager, the synced state and the overlap."""

from collections.abc import Callable
from typing import NamedTuple

import torch

from qsr_hf.core.config import QSRConfig
from qsr_hf.engines.base import Engine
from qsr_hf.sync.averaging import AveragerMode, ParameterAverager
from qsr_hf.sync.compressed import CompressedAverager
from qsr_hf.sync.outer import OuterStep
from qsr_hf.sync.overlap import OverlappedSync
from qsr_hf.sync.synced_state import SyncedState


Tensors = Callable[[], list[torch.Tensor]]


class SyncParts(NamedTuple):
    """What a [`Synchronizer`] averages with (see :func:`build_parts`)."""

    averager: ParameterAverager | CompressedAverager
    synced: SyncedState | None  # the last synced values (outer optimizer, compression)
    overlap: OverlappedSync | None  # qsr_overlap_sync
    outer: OuterStep | None  # qsr_outer_optimizer


def build_parts(
    config: QSRConfig,
    engine: Engine,
    tensors: Tensors,
    make_averager: Callable[[Tensors, AveragerMode], ParameterAverager],
) -> SyncParts:
    """Build the averager (compressed, or ``make_averager``'s: in copy mode under ``qsr_overlap_sync``, whose
    average is folded in steps later), the synced state an outer optimizer or compression keeps (taken here, where
    the ranks agree: checked by the start check) and the overlapped sync.

    Args:
        config ([`QSRConfig`]): the QSR settings.
        engine ([`Engine`]): the backend adapter (its process group and module).
        tensors (`Callable[[], list[torch.Tensor]]`): re-collects the tensors a sync averages.
        make_averager (`Callable`): builds the plain averager from ``tensors`` and a mode.
    """
    outer = OuterStep.from_config(config)
    plain = {id(b) for b in engine.module.buffers()}  # averaged plainly under an outer optimizer
    synced = None
    if config.qsr_compress_delta:
        feedback = config.qsr_compress_error_feedback
        averager = CompressedAverager(
            tensors, engine.process_group, outer, plain, config.qsr_compress_format, feedback,
            config.qsr_overlap_sync, config.qsr_fragments,
        )  # fmt: skip
        synced = averager.synced
    else:
        averager = make_averager(tensors, "copy" if config.qsr_overlap_sync else "inplace")
        if outer is not None:
            synced = SyncedState(averager.buckets, outer, plain, config.qsr_outer_state_on_cpu)
    overlap = None
    if config.qsr_overlap_sync:
        overlap = OverlappedSync(averager, config.qsr_overlap_steps, config.qsr_overlap_auto)
    return SyncParts(averager, synced, overlap, outer)
