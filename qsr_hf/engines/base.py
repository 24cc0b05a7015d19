"""`Engine`: what the runtime needs from a training backend. Every backend adapter implements all of it.

An engine answers four questions for the [`Synchronizer`]: how to switch the backend's per-step gradient all-reduce
off (and back on), which tensors a sync averages and over which process group, what to do after they were averaged
(e.g. copy fp32 masters into low-precision weights), and which per-rank state the backend keeps outside the optimizer
a checkpoint must hold.
"""

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.distributed import ProcessGroup

from qsr_hf.core.config import QSRConfig
from qsr_hf.core.lr_scheduler import catch_up_scheduler
from qsr_hf.sync.averaging import AveragerMode, ParameterAverager
from qsr_hf.sync.tensor_selection import averaged_tensors


class Engine:
    """Base class of the backend adapters; the defaults are those of a plain module trained in one process.

    Args:
        module (`nn.Module`): the unwrapped model.

    Attributes:
        module (`nn.Module`): the unwrapped model (what evaluation, BatchNorm re-estimation and checkpoints use).
        process_group (`ProcessGroup` or `None`): the group a sync averages over; `None` for a single process.
        world_size (`int`): number of QSR workers in that group.
        can_average_optimizer_state (`bool`): whether the optimizer is a torch optimizer whose state tensors can be
            averaged (``qsr_average_optimizer_state``).
        can_compress_delta (`bool`): whether a sync may average the round's change in bf16 (``qsr_compress_delta``;
            tested with DDP only).
        can_fragment (`bool`): whether a sync may average some fragments of the model only (``qsr_fragments``;
            DDP only: the other backends average copies, flat masters or several groups that the fragments would
            have to follow).
        intra_node_bytes_per_step (`int`): bytes each rank all-reduces inside its node on every optimizer step
            (hierarchical QSR: the gradients; FSDP2: its all-gathers and reduce-scatters; 0 where a worker is one
            process).
    """

    process_group: ProcessGroup | None = None
    world_size: int = 1
    can_average_optimizer_state: bool = True
    can_compress_delta: bool = False
    can_fragment: bool = False
    intra_node_bytes_per_step: int = 0

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self._intra_node_bytes = 0  # moved inside the node since the last take_intra_node_bytes()

    def check_config(self, config: QSRConfig) -> None:
        """Refuse, before training, QSR settings this backend cannot run (every setting runs by default).

        Raises:
            `NotImplementedError`: with a message that says which setting to change.
        """

    def check_support(self, config: QSRConfig, optimizer: torch.optim.Optimizer | None) -> None:
        """Refuse, before training, what this backend cannot run: :meth:`check_config`, then the settings that need
        a capability it lacks (``can_average_optimizer_state``, ``can_compress_delta``, ``can_fragment``).

        Args:
            config ([`QSRConfig`]): the QSR settings.
            optimizer (`torch.optim.Optimizer`, *optional*): the optimizer whose state
                ``qsr_average_optimizer_state`` would average.

        Raises:
            `NotImplementedError` or `ValueError`: with a message that says which setting to change.
        """
        self.check_config(config)
        if config.qsr_average_optimizer_state and (optimizer is None or not self.can_average_optimizer_state):
            raise NotImplementedError(
                f"qsr_average_optimizer_state=True is not supported with {type(self).__name__}"
                + ("" if optimizer is None else ": its optimizer state is not a plain torch optimizer's")
                + "; set qsr_average_optimizer_state=False (the paper keeps optimizer state local)"
            )
        if self.world_size > 1 and config.qsr_compress_delta and not self.can_compress_delta:
            raise ValueError(
                f"qsr_compress_delta=True is supported with DDP only, not with {type(self).__name__}: set "
                "qsr_compress_delta=False"
            )
        if self.world_size > 1 and config.qsr_fragments > 1 and not self.can_fragment:
            raise NotImplementedError(
                f"qsr_fragments={config.qsr_fragments} is supported with DDP only, not with {type(self).__name__} "
                "(its syncs average copies of shards or slices, or flat optimizer masters): set qsr_fragments=1"
            )

    def count_intra_node_bytes(self, num_bytes: int) -> None:
        """Count ``num_bytes`` moved inside the node at a sync (reported by :meth:`take_intra_node_bytes`)."""
        self._intra_node_bytes += num_bytes

    def take_intra_node_bytes(self) -> int:
        """The bytes moved inside the node since the last call (the runtime adds them to ``qsr/bytes_intra_node``)."""
        num_bytes, self._intra_node_bytes = self._intra_node_bytes, 0
        return num_bytes

    def disable_gradient_sync(self) -> None:
        """Switch the backend's per-step gradient all-reduce off (start of local training)."""

    def restore_gradient_sync(self) -> None:
        """Switch the backend's per-step gradient all-reduce back on (end of local training)."""

    def averaged_tensors(self, average_buffers: bool) -> list[torch.Tensor]:
        """The tensors a sync averages: trainable parameters and, optionally, persistent floating-point buffers."""
        return averaged_tensors(self.module, average_buffers)

    def make_averager(
        self, tensors: Callable[[], list[torch.Tensor]], fp32_average: bool, mode: AveragerMode, fragments: int = 1
    ) -> ParameterAverager:
        """The averager a sync runs (a [`ParameterAverager`] over :attr:`process_group`, in ``fragments`` parts;
        torchft: over the Manager)."""
        return ParameterAverager(tensors, self.process_group, fp32_average, mode=mode, fragments=fragments)

    def after_average(self) -> None:
        """Propagate averaged tensors to where the backend reads them (nothing for plain parameters)."""

    def after_restore(self) -> None:
        """Propagate tensors put back to their local values (after an averaged view); as :meth:`after_average`."""
        self.after_average()

    def step_lr(self, optimizer: torch.optim.Optimizer) -> float:
        """The learning rate of the optimizer step about to be taken (the rule's η)."""
        return float(optimizer.param_groups[0]["lr"])

    def catch_up_lr(self, lr_scheduler: Any, scheduler_steps: int) -> int:
        """Step ``lr_scheduler`` up to ``scheduler_steps`` if it lags (an optimizer step skipped on this rank only).

        Called before the lr of an optimizer step is read. See `qsr_hf.core.lr_scheduler.catch_up_scheduler`.

        Returns:
            `int`: how many scheduler steps it was behind.
        """
        return catch_up_scheduler(lr_scheduler, scheduler_steps)

    def local_state_dict(self) -> dict[str, Any]:
        """Per-rank backend state a checkpoint must hold besides the optimizer's (none by default)."""
        return {}

    def load_local_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`local_state_dict` returned."""
