"""`DDPEngine`: local steps on `torch.nn.parallel.DistributedDataParallel`.

DDP's public ``no_sync()`` context is entered once and kept open for the whole run, so the C++ reducer never
communicates (a nested ``no_sync`` from ``accelerator.accumulate`` restores it to off), and DDP's per-step buffer
broadcast is skipped as well.
"""

import contextlib

import torch.distributed as dist
from torch import nn

from qsr_hf.engines.base import Engine


class DDPEngine(Engine):
    """Adapter for `DistributedDataParallel`: gradient all-reduce off for the whole run, parameters averaged in place.

    Args:
        ddp (`DistributedDataParallel`): the wrapped model.
    """

    can_compress_delta = True
    can_fragment = True

    def __init__(self, ddp: nn.parallel.DistributedDataParallel) -> None:
        super().__init__(ddp.module)
        self.ddp = ddp
        self.process_group = ddp.process_group
        self.world_size = dist.get_world_size(ddp.process_group)
        self._no_sync = contextlib.ExitStack()

    def disable_gradient_sync(self) -> None:
        """Enter ``ddp.no_sync()`` and keep it open until :meth:`restore_gradient_sync`."""
        self.restore_gradient_sync()
        self._no_sync.enter_context(self.ddp.no_sync())
        # DDP broadcasts rank 0's buffers in the first forward after construction even under no_sync (the flag starts
        # True and only forwards update it): that would overwrite each rank's own restored buffers on resume.
        self.ddp.require_forward_param_sync = False

    def restore_gradient_sync(self) -> None:
        """Leave the ``no_sync`` context: DDP reduces gradients again."""
        self._no_sync.close()
        self._no_sync = contextlib.ExitStack()
