"""`QSRCallback`: QSR local training for `transformers.Trainer`, with one added line. Glue only: Trainer events drive
the same `Synchronizer` (schedule, averaging, accounting) and per-rank checkpoint files as `LocalOptimizer`.
"""

import gc
import itertools
import os
import sys
import weakref
from typing import Any

from transformers import DefaultFlowCallback, Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from qsr_hf.checkpoint.resume import restore_local_state, save_local_state
from qsr_hf.core.config import QSRConfig, make_config
from qsr_hf.core.logging_utils import get_logger
from qsr_hf.core.lr_scheduler import planned_lrs
from qsr_hf.engines import FSDP_UNSUPPORTED, Topology, detect_engine
from qsr_hf.frontends.lr_schedule_check import check_planned_lrs
from qsr_hf.runtime.synchronizer import Synchronizer


logger = get_logger(__name__)


class QSRCallback(TrainerCallback):
    """Turn a `Trainer` run on several processes (DDP or DeepSpeed ZeRO-0) into QSR local training.

    From the first step on, no gradient is all-reduced; each rank takes local optimizer steps and the parameters
    (and floating-point buffers) are averaged at the end of each round, whose length H comes from the sync rule and
    the learning rate of the round's first step. Evaluations and checkpoints mid-round see an averaged copy of the
    model; each rank's local parameters are put back afterwards, so they do not change what is trained
    (``qsr_eval_copy``). The model is averaged at the end of training, so the saved and pushed model is the average.
    Every rank writes ``qsr_state_rank{r}.pt`` (its local parameters, optimizer state and the schedule position) into
    each checkpoint folder, and reads it back on ``trainer.train(resume_from_checkpoint=...)``. The ``qsr/*`` metrics
    are added to the Trainer's own logs (loss, learning rate, grad norm), so every ``report_to`` backend gets both.

    Args:
        config ([`QSRConfig`], *optional*):
            QSR settings.
        trainer ([`Trainer`], *optional*):
            The Trainer this callback runs in. Without it (the one-line form), the Trainer holding this callback is
            looked up once at the start of training.
        **kwargs:
            `QSRConfig` fields, with or without the ``qsr_`` prefix (``alpha=0.0175, h_base=4``).

    Example:

    ```python
    trainer = Trainer(model, args, train_dataset=ds, callbacks=[QSRCallback(alpha=0.0175, h_base=4)])
    # or, explicitly bound:
    trainer.add_callback(QSRCallback(alpha=0.0175, h_base=4, trainer=trainer))
    ```
    """

    def __init__(self, config: QSRConfig | None = None, *, trainer: Trainer | None = None, **kwargs: Any) -> None:
        self.config = make_config(config, **kwargs)
        self.synchronizer: Synchronizer | None = None
        self._trainer: weakref.ReferenceType[Trainer] | None = weakref.ref(trainer) if trainer is not None else None

    @property
    def trainer(self) -> Trainer | None:
        """The Trainer this callback runs in (a weak reference: no Trainer <-> callback cycle to outlive training)."""
        return self._trainer() if self._trainer is not None else None

    # -- set-up -------------------------------------------------------------------------------------------------
    def _find_trainer(self) -> Trainer | None:
        # callbacks receive neither the Trainer nor the wrapped model: find the Trainer that holds this callback
        for obj in gc.get_objects():
            # type(), not isinstance(): the latter reads __class__, which warns on some deprecated module proxies
            if issubclass(type(obj), Trainer) and self in obj.callback_handler.callbacks:
                return obj
        return None

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Validate the run, switch gradient all-reduce off, and restore per-rank state when resuming."""
        if kwargs.get("lr_scheduler") is None:
            raise ValueError("QSRCallback needs an lr scheduler: QSR picks each round's length from the current lr")
        if args.fsdp:
            raise NotImplementedError(f"{FSDP_UNSUPPORTED} (remove `fsdp` from TrainingArguments)")
        if getattr(args, "average_tokens_across_devices", False):
            # it all-gathers a token count on every step: local steps must not communicate
            logger.info("qsr_hf: setting average_tokens_across_devices=False (it communicates on every step)")
            args.average_tokens_across_devices = False
        trainer = self.trainer or self._find_trainer()
        self._trainer = weakref.ref(trainer) if trainer is not None else None
        if trainer is None and self.config.qsr_bn_reestimate_batches:
            logger.warning(
                "qsr_hf: QSRCallback could not find its Trainer, so BatchNorm statistics cannot be re-estimated "
                "(qsr_bn_reestimate_batches); pass it explicitly: QSRCallback(..., trainer=trainer)",
                main_process_only=False,
            )
        if trainer is not None:
            # right after DefaultFlowCallback (which sets should_evaluate/should_save/should_log) and before the
            # report_to integrations, so the qsr/* metrics are in `logs` when they see them
            others = [c for c in trainer.callback_handler.callbacks if c is not self]
            flow = [i for i, c in enumerate(others) if isinstance(c, DefaultFlowCallback)]
            at = flow[-1] + 1 if flow else 0
            trainer.callback_handler.callbacks = [*others[:at], self, *others[at:]]
        model = trainer.model_wrapped if trainer is not None else kwargs["model"]
        engine = detect_engine(model, topology=Topology(self.config.qsr_worker, self.config.qsr_node_size))
        warmup = args.get_warmup_steps(state.max_steps)
        check_planned_lrs(self.config, planned_lrs(kwargs["lr_scheduler"], state.max_steps), warmup)
        self.synchronizer = Synchronizer(engine, self.config, warmup, state.max_steps, kwargs.get("optimizer"))
        if state.global_step > 0:
            directory = self._resume_directory(args, state)
            restore_local_state(self.synchronizer, directory, kwargs["optimizer"], state.global_step)
        self.synchronizer.check_start()

    def _resume_directory(self, args: TrainingArguments, state: TrainerState) -> str:
        # `trainer.train(resume_from_checkpoint=PATH)` reaches callbacks nowhere (args.resume_from_checkpoint stays
        # unset): read it from the Trainer's training loop, which takes it as an argument and is on the call stack
        frame = sys._getframe()
        while frame is not None:
            if frame.f_code.co_name == "_inner_training_loop" and frame.f_locals.get("self") is self.trainer:
                path = frame.f_locals.get("resume_from_checkpoint")
                if isinstance(path, str | os.PathLike):
                    return os.fspath(path)
            frame = frame.f_back
        if isinstance(args.resume_from_checkpoint, str):
            return args.resume_from_checkpoint
        return os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")

    # -- the step ----------------------------------------------------------------------------------------------
    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Put back the local parameters an evaluation replaced; open a round if needed, its H set by this step's lr
        (this rank's lr follows the global step, also after a step it skipped on overflow)."""
        self.synchronizer.leave_averaged_view()
        self.synchronizer.engine.catch_up_lr(kwargs.get("lr_scheduler"), state.global_step)
        self.synchronizer.begin_step(kwargs["optimizer"].param_groups[0]["lr"])

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Average the parameters when the step ends a round."""
        self.synchronizer.end_step()

    def _consistency_point(self, control: TrainerControl) -> None:
        # evaluation and checkpoint saving see the averaged model (a copy unless qsr_eval_copy=False); the local
        # tensors come back at the next step, the save of this step's checkpoint, or the end of training
        evaluate = control.should_evaluate and self.config.qsr_sync_before_eval
        if control.should_save or evaluate:
            self.synchronizer.enter_averaged_view(batchnorm=evaluate and self.config.qsr_bn_reestimate_batches > 0)
        if evaluate:
            self._reestimate_batchnorm()

    def _reestimate_batchnorm(self) -> None:
        # the official code's BatchNorm handling: statistics recomputed on training batches, then averaged
        n = self.config.qsr_bn_reestimate_batches
        if not n or self.trainer is None:
            return
        trainer = self.trainer
        batches = itertools.islice(trainer.get_train_dataloader(), n)
        self.synchronizer.reestimate_batchnorm(batches, lambda model, batch: model(**trainer._prepare_inputs(batch)))

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Put the averaged model in place for an evaluation or save that follows this step."""
        self._consistency_point(control)

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Sync before an end-of-epoch evaluation or save."""
        self._consistency_point(control)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        """Add ``qsr/*`` to the Trainer's own log entry (its loss, lr and grad norm stay as they are)."""
        if logs is None or self.synchronizer is None or "loss" not in logs:  # only the Trainer's training log
            return
        qsr_logs = self.synchronizer.stats.to_logs()
        logs.update(qsr_logs)
        # the Trainer appended a copy of `logs` to the history before calling the callbacks
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(qsr_logs)

    # -- checkpoints and the end ---------------------------------------------------------------------------------
    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """Put the local parameters back, then write them, the local optimizer state and the schedule position."""
        self.synchronizer.leave_averaged_view()
        directory = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        save_local_state(self.synchronizer, directory, kwargs["optimizer"])

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Average an unfinished last round, record the summary in the log history, switch gradient sync back on."""
        if self.synchronizer is None:
            return
        self.synchronizer.leave_averaged_view()
        self.synchronizer.sync_now()
        self._reestimate_batchnorm()
        if self.trainer is not None:
            self.trainer.log({f"{key}_final": value for key, value in self.summary().items()})
        self.synchronizer.close()

    def summary(self) -> dict[str, float]:
        """Final QSR metrics of the run (for the model card): ``qsr/syncs``, ``qsr/comm_volume_vs_ddp``, ..."""
        if self.synchronizer is None:
            return {}
        logs = self.synchronizer.stats.to_logs()
        logs["qsr/steps"] = float(self.synchronizer.stats.steps)
        return logs
