"""`LocalOptimizer`: QSR local training for hand-written `accelerate launch` loops."""

import functools
import os
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.distributed import ProcessGroup

from qsr_hf.checkpoint.resume import restore_local_state, save_local_state
from qsr_hf.core.config import QSRConfig, make_config
from qsr_hf.core.logging_utils import get_logger
from qsr_hf.engines import Engine, Topology, detect_engine
from qsr_hf.runtime.synchronizer import Synchronizer
from qsr_hf.sync.batchnorm import ForwardFn


logger = get_logger(__name__)


def scheduler_steps_per_optimizer_step(lr_scheduler: Any) -> int:
    """How many times ``lr_scheduler.step()`` advances the underlying scheduler per optimizer step.

    A scheduler passed through ``accelerator.prepare`` (an `AcceleratedScheduler`) steps ``num_processes`` times per
    call unless ``split_batches`` is set or it is not stepped with the optimizer: accelerate's convention is that the
    scheduler is built with the step counts of a single-process run.
    """
    from accelerate.scheduler import AcceleratedScheduler
    from accelerate.state import AcceleratorState

    if not isinstance(lr_scheduler, AcceleratedScheduler):
        return 1
    if not lr_scheduler.step_with_optimizer or lr_scheduler.split_batches:
        return 1
    return AcceleratorState().num_processes


def scheduler_lengths(lr_scheduler: Any) -> tuple[int | None, int | None]:
    """Warm-up and total length of ``lr_scheduler`` in optimizer steps, where it declares them.

    `transformers` schedulers (``get_scheduler``, ``get_cosine_schedule_with_warmup``, ...) keep ``num_warmup_steps``
    and ``num_training_steps`` in their lr function; they are divided by
    [`scheduler_steps_per_optimizer_step`]. `None` where the scheduler does not say.
    """
    inner = getattr(lr_scheduler, "scheduler", lr_scheduler)
    keywords: dict[str, Any] = {}
    for fn in getattr(inner, "lr_lambdas", []):
        if isinstance(fn, functools.partial):
            keywords = fn.keywords
    per_step = scheduler_steps_per_optimizer_step(lr_scheduler)
    warmup, total = keywords.get("num_warmup_steps"), keywords.get("num_training_steps")
    return (
        None if warmup is None else -(-int(warmup) // per_step),
        None if total is None else int(total) // per_step,
    )


def _resolve(name: str, given: int | None, derived: int | None, per_step: int) -> int | None:
    if given is not None and derived is not None and given != derived:
        raise ValueError(
            f"{name}={given} but the lr scheduler's is {derived} optimizer steps (it declares {derived * per_step} "
            f"scheduler steps and advances {per_step} per optimizer step, accelerate's convention for a scheduler "
            f"passed through `accelerator.prepare`). Build the scheduler with {name} x num_processes (the "
            f"single-process count), or drop {name} and let LocalOptimizer read it from `lr_scheduler`"
        )
    return derived if given is None else given


class LocalOptimizer(torch.optim.Optimizer):
    """Wrap an optimizer so that each rank takes local steps and parameters are averaged at the end of each round.

    Build it after ``accelerator.prepare``, from the prepared optimizer and model. From then on DDP's gradient
    all-reduce is off; every optimizer step is local, and every H-th step (H from the sync rule and the learning rate
    of the round's first step) averages parameters (and floating-point buffers) across ranks in place. Optimizer
    states (momentum, Adam moments) stay local, as in the paper. Under ``accelerator.accumulate`` a step counts only
    when gradients are synchronised (an optimizer step, not a micro-batch).

    Args:
        optimizer (`torch.optim.Optimizer`):
            The inner optimizer (usually the one returned by ``accelerator.prepare``).
        model (`nn.Module`):
            The prepared model (DDP-wrapped, or a DeepSpeed ZeRO-0 engine).
        config ([`QSRConfig`], *optional*):
            QSR settings; keyword overrides without the ``qsr_`` prefix are accepted too (``alpha=0.02``).
        lr_scheduler (*optional*):
            The (prepared) lr scheduler. A `transformers` scheduler declares its warm-up and length, which are then
            read from it in optimizer steps (accounting for accelerate stepping a prepared scheduler
            ``num_processes`` times per optimizer step), so QSR's warm-up and the lr cannot disagree. After an
            optimizer step skipped on this rank only (GradScaler overflow), the scheduler is stepped to the global
            step, so the ranks' lr and round lengths stay equal; without it such a skip stops every rank at the next
            sync (the ranks' H differ).
        num_training_steps (`int`, *optional*):
            Total optimizer steps; the last round is clipped so training ends on a sync. Read from ``lr_scheduler``
            when it declares it; an explicit value that disagrees is an error.
        num_warmup_steps (`int`, *optional*):
            Optimizer steps of lr warm-up (the rule uses H_base during them); 0 if neither given nor declared.
        process_group (`ProcessGroup`, *optional*):
            Data-parallel group for an unwrapped model (defaults to the wrapper's group).
        engine ([`Engine`], *optional*):
            A backend adapter built by the caller (`qsr_hf.ft`: replica groups through torchft); detected if `None`.

    Example:

    ```python
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    optimizer = LocalOptimizer(optimizer, model, QSRConfig(qsr_alpha=0.02), num_training_steps=1000)  # QSR
    for batch in loader:
        with accelerator.accumulate(model):
            accelerator.backward(model(**batch).loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
    ```
    """

    synchronizer_class: type[Synchronizer] = Synchronizer

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module,
        config: QSRConfig | None = None,
        *,
        lr_scheduler: Any = None,
        num_training_steps: int | None = None,
        num_warmup_steps: int | None = None,
        process_group: ProcessGroup | None = None,
        engine: Engine | None = None,
        **qsr_kwargs: Any,
    ) -> None:
        # like torch's PostLocalSGDOptimizer: share the inner optimizer's groups and state, no Optimizer.__init__
        self.optimizer = optimizer
        self.param_groups = optimizer.param_groups
        self.defaults = getattr(optimizer, "defaults", {})  # DeepSpeed's fp16/bf16 optimizers have none
        self.config = make_config(config, **qsr_kwargs)
        self.lr_scheduler = lr_scheduler
        self._scheduler_steps_per_step = 1
        if lr_scheduler is not None:
            per_step = self._scheduler_steps_per_step = scheduler_steps_per_optimizer_step(lr_scheduler)
            warmup, total = scheduler_lengths(lr_scheduler)
            num_warmup_steps = _resolve("num_warmup_steps", num_warmup_steps, warmup, per_step)
            num_training_steps = _resolve("num_training_steps", num_training_steps, total, per_step)
        self.num_warmup_steps = num_warmup_steps or 0
        self._lr_before: float | None = None  # lr of the previous optimizer step, to check the declared warm-up
        topology = Topology(self.config.qsr_worker, self.config.qsr_node_size)
        self.synchronizer = self.synchronizer_class(
            detect_engine(model, process_group, topology) if engine is None else engine,
            self.config,
            self.num_warmup_steps,
            num_training_steps,
            optimizer,
        )
        self.synchronizer.check_start(defer_parameters=True)
        if self.config.qsr_rule == "ddp":
            logger.info("qsr_hf: qsr_rule='ddp' averages parameters after every step", main_process_only=True)
        self.last_step_synced = False

    @property
    def state(self) -> dict:  # type: ignore[override]
        """The inner optimizer's state (local to this rank)."""
        return self.optimizer.state

    @property
    def stats(self) -> Any:
        """[`SyncStats`] of this run."""
        return self.synchronizer.stats

    def _is_optimizer_step(self) -> bool:
        # accelerate's AcceleratedOptimizer skips its step while accumulating gradients
        gradient_state = getattr(self.optimizer, "gradient_state", None)
        return gradient_state is None or gradient_state.sync_gradients

    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Take one local optimizer step; average parameters if it ends a round (then ``last_step_synced`` is True)."""
        if not self._is_optimizer_step():
            self.last_step_synced = False
            return self._inner_step(closure)
        engine, global_step = self.synchronizer.engine, self.synchronizer.clock.step
        # a step skipped on overflow on this rank only also skipped its scheduler step: keep the lr on the global step
        engine.catch_up_lr(self.lr_scheduler, global_step * self._scheduler_steps_per_step)
        lr = engine.step_lr(self.optimizer)
        self._check_warmup(lr)
        self.synchronizer.begin_step(lr)
        loss = self._inner_step(closure)
        self.last_step_synced = self.synchronizer.end_step()
        return loss

    def _check_warmup(self, lr: float) -> None:
        # the rule uses H_base during the declared warm-up; an lr that falls inside it means the two disagree
        step = self.synchronizer.clock.step
        if self._lr_before is not None and step < self.num_warmup_steps and lr < self._lr_before * (1 - 1e-6):
            logger.warning(
                f"qsr_hf: the lr fell from {self._lr_before:.4g} to {lr:.4g} at optimizer step {step}, inside the "
                f"declared warm-up of {self.num_warmup_steps} steps: is the scheduler stepped num_processes times "
                "per optimizer step (accelerate's convention for a prepared scheduler)? Pass "
                "`lr_scheduler=scheduler` to LocalOptimizer so warm-up and length are read from it",
                main_process_only=False,
            )
            self._lr_before = float("-inf")  # warn once
            return
        if self._lr_before != float("-inf"):
            self._lr_before = lr

    def _inner_step(self, closure: Callable[[], float] | None) -> float | None:
        # accelerate's DeepSpeedOptimizerWrapper.step() takes no closure
        return self.optimizer.step() if closure is None else self.optimizer.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the inner optimizer's gradients."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Not supported: the averaged set of tensors is fixed when the wrapper is built."""
        raise NotImplementedError("add parameter groups to the inner optimizer before wrapping it in LocalOptimizer")

    def sync_now(self) -> bool:
        """Average now, outside the schedule (e.g. before evaluation or saving). Returns whether it averaged."""
        return self.synchronizer.sync_now()

    def reestimate_batchnorm(self, batches: Iterable[Any], forward: ForwardFn) -> int:
        """The official code's BatchNorm step before an evaluation (with ``qsr_average_buffers=False``).

        Call after `sync_now()`: every rank recomputes the running statistics on ``batches`` with the averaged
        parameters, then they are averaged across ranks. E.g.
        ``optimizer.reestimate_batchnorm(itertools.islice(train_loader, 128), lambda m, b: m(b[0]))``.

        Returns:
            `int`: the number of batches used on this rank.
        """
        return self.synchronizer.reestimate_batchnorm(batches, forward)

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state plus the schedule position under ``"qsr"``."""
        return {"optimizer": self.optimizer.state_dict(), "qsr": self.synchronizer.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; a plain optimizer state dict resets the schedule with a warning."""
        if "qsr" not in state_dict:
            logger.warning("qsr_hf: optimizer state has no 'qsr' entry; the sync schedule starts from step 0")
            self.optimizer.load_state_dict(state_dict)
            return
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self.synchronizer.load_state_dict(state_dict["qsr"])

    def save_local_state(self, output_dir: str | os.PathLike) -> str:
        """Write this rank's parameters, optimizer state and schedule position to ``output_dir/qsr_state_rank{r}.pt``.

        Call it on every rank next to ``accelerator.save_state(output_dir)``, which keeps rank 0's optimizer only.
        """
        return save_local_state(self.synchronizer, output_dir, self.optimizer)

    def load_local_state(self, input_dir: str | os.PathLike) -> bool:
        """Load what :meth:`save_local_state` wrote, on every rank; then check that the ranks agree.

        Returns:
            `bool`: True if restored; False (with a warning, on every rank) when no rank has a file.

        Raises:
            `RuntimeError`: on every rank, when some rank's file is missing or invalid, the save was interrupted, or
                the checkpoint was written by another number of processes.
        """
        restored = restore_local_state(self.synchronizer, input_dir, self.optimizer)
        self.synchronizer.check_start()
        return restored

    def close(self) -> None:
        """Final average if the last round is unfinished, then switch gradient all-reduce back on."""
        self.synchronizer.sync_now()
        self.synchronizer.close()
