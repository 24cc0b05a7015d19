"""DeepSpeed adapter: local steps on a `DeepSpeedEngine` with ZeRO stage 0, and nothing communicated between syncs.

What a local step needs from DeepSpeed 0.19, and how this adapter gets it:

- Gradient all-reduce off: ``engine.enable_backward_allreduce = False`` (the flag DeepSpeed's backward epilogue and
  its unmanaged-accumulation ``step()`` test). ``engine.no_sync()`` is no alternative: it forbids ``engine.step()``.
- Gradient clipping on this rank's gradients, as in the official QSR code: the fp32 path (``clip_fp32_gradients``)
  all-reduces the norm across ranks every step, so it is replaced on this engine by a local
  `torch.nn.utils.clip_grad_norm_`; the bf16/fp16 optimizers already clip with a local norm.
- The bf16/fp16 overflow check: with ``enable_backward_allreduce`` off, DeepSpeed all-reduces a 1-byte overflow flag
  every step. It is made local (each rank skips its own step on overflow and keeps its own loss scale).
- bf16/fp16: the optimizer keeps fp32 master weights and overwrites the model with them at every step, so the
  masters are what is averaged; they are then copied into the low-precision model weights.

ZeRO stages 1-3 are refused: they partition the optimizer state and fp32 masters (stage 1), gradients (2) or
parameters (3), so each rank updates only its shard from reduced gradients and all-gathers parameters every step.
A local step needs every rank to own a full optimizer state (per-rank Adam moments) and full masters, which is ZeRO
stage 0; without the gradient reduction, stages 1/2 fail in ``step()`` (``KeyError`` on ``averaged_gradients``).
"""

from typing import Any

import torch
import torch.distributed as dist
from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
from torch import nn
from torch.distributed import ProcessGroup

from qsr_hf.core.lr_scheduler import step_scheduler
from qsr_hf.engines.base import Engine
from qsr_hf.sync.tensor_selection import averaged_tensors


_ZERO_UNSUPPORTED = (
    "qsr_hf needs DeepSpeed ZeRO stage 0, got stage {stage}: ZeRO-1/2/3 shard the optimizer state and fp32 master "
    "weights (and gradients, parameters) across ranks and all-gather the parameters after every step, while a local "
    "step needs every rank to hold its own full optimizer state (per-rank Adam moments) and full masters. Set "
    '`"zero_optimization": {{"stage": 0}}` (or `DeepSpeedPlugin(zero_stage=0)`), or use DDP; ZeRO-0 with bf16 '
    "needs about the per-rank memory of DDP with mixed precision"
)


def _validate(engine: Any) -> None:
    """Refuse what cannot take local steps, before training starts."""
    stage = int(engine.zero_optimization_stage())
    if stage != 0:
        raise NotImplementedError(_ZERO_UNSUPPORTED.format(stage=stage))
    refused = {
        "pipeline parallelism": engine.pipeline_parallelism,
        "tensor/model parallelism": engine.mp_world_size > 1,
        "sequence parallelism": getattr(engine, "sequence_parallel_size", 1) > 1,
        "mixture-of-experts layers": engine.has_moe_layers,
    }
    for what, present in refused.items():
        if present:
            raise NotImplementedError(f"qsr_hf supports data-parallel DeepSpeed ZeRO-0 only, not {what}")
    optimizer = engine.optimizer
    if optimizer is None or not hasattr(optimizer, "step"):
        raise ValueError("the DeepSpeed engine has no optimizer: pass one to deepspeed.initialize or in the config")
    if isinstance(optimizer, FP16_Optimizer | FP16_UnfusedOptimizer):
        if getattr(optimizer, "fused_adam_legacy", False) or getattr(optimizer, "fused_lamb_legacy", False):
            raise NotImplementedError(
                "DeepSpeed's legacy fused optimizer step all-reduces an overflow flag every step: "
                'set "optimizer": {"legacy_fusion": false} in the DeepSpeed config'
            )
    elif optimizer is not engine.basic_optimizer:
        raise NotImplementedError(
            f"qsr_hf does not support DeepSpeed's {type(optimizer).__name__} at ZeRO stage 0 (it keeps fp32 masters "
            "partitioned across ranks); use fp32, fp16 or bf16 without pipeline parallelism"
        )


class DeepSpeedEngineAdapter(Engine):
    """Adapter for a `deepspeed.DeepSpeedEngine` with ZeRO stage 0: local steps, then averaging of the fp32 weights.

    Built by [`detect_engine`] from the engine returned by ``deepspeed.initialize`` or ``accelerator.prepare``
    (Trainer: ``trainer.model_wrapped``). The configuration is checked at once, before any step.

    Args:
        engine (`deepspeed.DeepSpeedEngine`):
            The engine. ZeRO stage 0; fp32, fp16 or bf16; no pipeline, tensor, sequence or expert parallelism.
        process_group (`ProcessGroup`, *optional*):
            The group to average over; defaults to the engine's data-parallel group.

    Raises:
        `NotImplementedError`: a ZeRO stage other than 0, or a parallelism or optimizer wrapper that communicates
            every step or shards the optimizer state.
    """

    can_average_optimizer_state = False  # DeepSpeed's optimizer wrappers keep the moments and masters themselves

    def __init__(self, engine: Any, process_group: ProcessGroup | None = None) -> None:
        _validate(engine)
        super().__init__(engine.module)
        self.engine = engine
        self.process_group = process_group if process_group is not None else engine.seq_data_parallel_group
        self.world_size = dist.get_world_size(self.process_group)
        optimizer = engine.optimizer
        self.has_masters = isinstance(optimizer, FP16_Optimizer | FP16_UnfusedOptimizer)
        self._flat_masters = isinstance(optimizer, FP16_Optimizer)  # one flat fp32 master per parameter group
        self._step_lr: float | None = None
        self._lr_hook: Any = None
        self._skips_caught_up = 0  # engine.skipped_steps already made up for on the lr scheduler

    # -- per-step communication ---------------------------------------------------------------------------------
    def disable_gradient_sync(self) -> None:
        """Switch off the gradient all-reduce, the cross-rank clipping norm and the cross-rank overflow check."""
        engine = self.engine
        engine.enable_backward_allreduce = False
        # fp32 path: DeepSpeed's clip_grad_norm_ averages the norm over the data-parallel group; clip locally instead
        engine.clip_fp32_gradients = self._clip_local_gradients
        checker = getattr(engine.optimizer, "overflow_checker", None)
        if checker is not None:
            # CheckOverflow all-reduces the flag when `deepspeed.enable_backward_allreduce` is False; without the
            # engine reference the check stays on this rank (no model parallelism here, see _validate)
            checker.deepspeed = None
        if self._lr_hook is None:
            self._skips_caught_up = engine.skipped_steps
            self._lr_hook = engine.module.register_forward_pre_hook(self._record_lr)

    def restore_gradient_sync(self) -> None:
        """Switch DeepSpeed's per-step gradient all-reduce, clipping norm and overflow check back on."""
        engine = self.engine
        engine.enable_backward_allreduce = True
        engine.__dict__.pop("clip_fp32_gradients", None)
        checker = getattr(engine.optimizer, "overflow_checker", None)
        if checker is not None:
            checker.deepspeed = engine
        if self._lr_hook is not None:
            self._lr_hook.remove()
            self._lr_hook = None

    def _clip_local_gradients(self) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.engine.gradient_clipping())

    def _record_lr(self, module: nn.Module, args: Any) -> None:
        # The engine steps its lr scheduler inside `accelerator.backward`, before `LocalOptimizer.step` runs: the lr
        # the step used is the one current at the forward pass. A step skipped on overflow (on this rank only, now
        # that the overflow check is local) skipped the scheduler's step too: make it up first.
        engine = self.engine
        if engine.lr_scheduler is not None:
            step_scheduler(engine.lr_scheduler, engine.skipped_steps - self._skips_caught_up, "the engine's step")
        self._skips_caught_up = engine.skipped_steps
        self._step_lr = engine.optimizer.param_groups[0]["lr"]

    def catch_up_lr(self, lr_scheduler: Any, scheduler_steps: int) -> int:
        """Nothing to do here: the engine steps its own scheduler, and a lag is made up before each forward pass
        (from ``engine.skipped_steps``), before the step's lr is recorded."""
        return 0

    def step_lr(self, optimizer: torch.optim.Optimizer) -> float:
        """The lr recorded at the last forward pass: the engine has already stepped its scheduler by the time
        ``optimizer.step()`` is called (inside ``accelerator.backward``)."""
        return super().step_lr(optimizer) if self._step_lr is None else self._step_lr

    # -- averaging ----------------------------------------------------------------------------------------------
    def _master_groups(self) -> list[tuple[list[torch.Tensor], list[nn.Parameter]]]:
        """(fp32 masters, low-precision parameters) per parameter group; fused: one flat master per group."""
        optimizer = self.engine.optimizer
        if self._flat_masters:
            return [
                ([flat], group) for flat, group in zip(optimizer.fp32_groups_flat, optimizer.fp16_groups, strict=True)
            ]
        return [
            (list(masters), group) for masters, group in zip(optimizer.fp32_groups, optimizer.fp16_groups, strict=True)
        ]

    def averaged_tensors(self, average_buffers: bool) -> list[torch.Tensor]:
        """The fp32 masters of the trainable parameters (bf16/fp16) or the parameters (fp32), plus float buffers.

        Args:
            average_buffers (`bool`): include the module's persistent floating-point buffers.

        Returns:
            `list[torch.Tensor]`: the tensors a sync averages.
        """
        if not self.has_masters:
            return averaged_tensors(self.module, average_buffers)
        tensors: list[torch.Tensor] = []
        for masters, params in self._master_groups():
            if self._flat_masters:  # the flat master holds the whole group, frozen parameters included
                tensors.extend(masters)
            else:
                tensors.extend(m for m, p in zip(masters, params, strict=True) if p.requires_grad)
        buffers = averaged_tensors(self.module, average_buffers)
        return tensors + [t for t in buffers if not isinstance(t, nn.Parameter)]

    @torch.no_grad()
    def after_average(self) -> None:
        """Copy the averaged fp32 masters into the low-precision model weights, as DeepSpeed's own step does."""
        if not self.has_masters:
            return
        for masters, params in self._master_groups():
            if self._flat_masters:
                flat, offset = masters[0], 0
                for p in params:
                    p.data.copy_(flat[offset : offset + p.numel()].view_as(p))
                    offset += p.numel()
            else:
                for m, p in zip(masters, params, strict=True):
                    p.data.copy_(m.data)

    # -- per-rank checkpoint state ------------------------------------------------------------------------------
    def local_state_dict(self) -> dict[str, Any]:
        """This rank's optimizer state: moments, fp32 masters and loss scale (DeepSpeed saves rank 0's only).

        Returns:
            `dict[str, Any]`: ``{"optimizer": ..., "skipped_steps": ...}``; save it with ``torch.save``.
        """
        return {"optimizer": self.engine.optimizer.state_dict(), "skipped_steps": self.engine.skipped_steps}

    def load_local_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`local_state_dict` returned, then copy the masters into the model weights.

        Args:
            state (`dict[str, Any]`): this rank's saved state.
        """
        self.engine.optimizer.load_state_dict(state["optimizer"])
        self.engine.skipped_steps = state.get("skipped_steps", self.engine.skipped_steps)
        self._skips_caught_up = self.engine.skipped_steps  # the saved scheduler state already made up for them
        self.after_average()
