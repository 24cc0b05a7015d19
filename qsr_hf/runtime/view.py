"""`AveragedView`: the model as the average of the ranks' models, for an evaluation or a checkpoint, then put back.

With ``qsr_eval_copy`` (the default) each rank's local tensors are kept aside, the ranks average (with an outer
optimizer: its step, not committed, so the view is the outer-updated model and the outer state is untouched), and
:meth:`AveragedView.leave` puts the local tensors back bitwise: the training trajectory is the one without the
evaluation. Right after a scheduled sync the model is averaged already and nothing is communicated (with
``qsr_fragments``, only right after a whole-model average: a round end averages its last fragments only).
"""

import torch

from qsr_hf.runtime.protocol import SyncRuntime
from qsr_hf.sync.agreement import EXTRA_SYNC
from qsr_hf.sync.batchnorm import batchnorm_statistics
from qsr_hf.sync.fragments import in_sync


class AveragedView:
    """Enter and leave the averaged view of one runtime's model.

    Args:
        sync ([`SyncRuntime`]): the runtime whose model is viewed.
    """

    def __init__(self, sync: SyncRuntime) -> None:
        self.sync = sync
        self._held: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # (tensor, its local value)
        self._synced_before = -1

    @property
    def active(self) -> bool:
        """Whether the model is in the averaged view now."""
        return self._held is not None

    def enter(self, batchnorm: bool = False) -> None:
        """Make the model the average of the ranks' models (see the module docstring).

        Args:
            batchnorm (`bool`, defaults to `False`): also keep the BatchNorm statistics aside (a re-estimation for
                the evaluation will overwrite them).
        """
        sync = self.sync
        if self._held is not None:
            return
        sync.finish_overlap()
        if not sync.config.qsr_eval_copy:
            sync.sync_now()
            return
        needs_average = sync.distributed and not in_sync(sync.clock, sync.config.qsr_fragments, sync.synced_at)
        kept = []
        if needs_average:
            sync.averager.ensure_views()
            kept = list(sync.averager.tensors)
        if batchnorm:
            kept += batchnorm_statistics(sync.engine.module)
        self._held = [(t, t.detach().clone()) for t in kept]
        self._synced_before = sync.synced_at  # the local tensors come back: they are not averaged ones
        if needs_average:
            sync.average(EXTRA_SYNC, commit=False)

    def leave(self) -> int | None:
        """Put back the local tensors kept aside by :meth:`enter` (bitwise).

        Returns:
            `int` or `None`: the runtime's ``synced_at`` from before :meth:`enter` (the local tensors are back, not
            averaged ones), for the runtime to restore; `None` when the model was not in the view.
        """
        if self._held is None:
            return None
        with torch.no_grad():
            for target, local in self._held:
                target.copy_(local)
            self.sync.after_restore()
        self._held = None
        return self._synced_before
