"""`Synchronizer`: the one runtime behind both front ends (Trainer callback and Accelerate optimizer wrapper).

It ties a backend adapter (gradient all-reduce off), a [`ParameterAverager`], a [`SyncClock`] (rounds from the
schedule) and [`SyncStats`] (what was communicated) together, and owns their state.
"""

import functools
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist

from qsr_hf import agreement
from qsr_hf.accounting import SyncStats
from qsr_hf.agreement import END, EXTRA_SYNC, ROUND_END, START, exchange
from qsr_hf.averaging import ParameterAverager, optimizer_state_tensors
from qsr_hf.batchnorm import ForwardFn, batchnorm_statistics, reestimate_batchnorm
from qsr_hf.clock import SyncClock
from qsr_hf.compressed_averaging import CompressedAverager
from qsr_hf.config import QSRConfig
from qsr_hf.engines import Engine
from qsr_hf.logging_utils import get_logger
from qsr_hf.overlap import OverlappedSync


logger = get_logger(__name__)


class Synchronizer:
    """Runs the round schedule on one rank: ``begin_step(lr)`` / optimizer step / ``end_step()``.

    Args:
        engine: backend adapter from [`detect_engine`].
        config ([`QSRConfig`]): the QSR settings.
        warmup_steps (`int`): lr warm-up in optimizer steps (H = H_base during it).
        total_steps (`int` or `None`): optimizer steps of the run, to end training on a sync.
        optimizer (`torch.optim.Optimizer`, *optional*): the optimizer whose state a sync also averages when
            ``config.qsr_average_optimizer_state`` is set.
    """

    def __init__(
        self,
        engine: Engine,
        config: QSRConfig,
        warmup_steps: int,
        total_steps: int | None,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        engine.check_config(config)  # refusals of settings this backend cannot run, before anything is built
        self.engine = engine
        self.config = config
        self.clock = SyncClock(config.build_schedule(warmup_steps), total_steps)
        self.warmup_steps = warmup_steps
        self.distributed = engine.world_size > 1
        trainable = [p for p in engine.module.parameters() if p.requires_grad]
        self.stats = SyncStats(
            grad_bytes_per_step=sum(p.numel() * p.element_size() for p in trainable),
            intra_node_bytes_per_step=engine.intra_node_bytes_per_step,
        )
        engine.stats = self.stats  # the engine adds the bytes it moves inside the node at a sync
        self.averager: ParameterAverager | CompressedAverager | None = None
        self.overlap: OverlappedSync | None = None
        self.synced_at = -1  # optimizer step of the last average: the ranks' tensors are identical there
        self._start_error: RuntimeError | None = None  # deferred by check_start(defer_parameters=True)
        if config.qsr_average_optimizer_state and (optimizer is None or not engine.can_average_optimizer_state):
            raise NotImplementedError(
                f"qsr_average_optimizer_state=True is not supported with {type(engine).__name__}"
                + ("" if optimizer is None else ": its optimizer state is not a plain torch optimizer's")
                + "; set qsr_average_optimizer_state=False (the paper keeps optimizer state local)"
            )
        if config.qsr_compress_delta and self.distributed and not engine.can_compress_delta:
            raise ValueError(
                f"qsr_compress_delta=True is supported with DDP only, not with {type(engine).__name__}: set "
                "qsr_compress_delta=False"
            )
        self._held: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # local tensors kept aside (eval copy)
        self._held_anchor: torch.Tensor | None = None  # compression: the anchor before an eval-copy average
        self._synced_before_view = -1
        self._gradient_sync = True  # the backend's own per-step gradient all-reduce
        if self.distributed:
            # overlap (qsr_overlap_sync, see qsr_hf.overlap): copy-mode averager, the average folded in one step late
            overlapped, tensors = config.qsr_overlap_sync, functools.partial(self._synced_tensors, optimizer)
            if config.qsr_compress_delta:  # its anchor is taken here, where the ranks agree (checked by check_start)
                self.averager = CompressedAverager(tensors, engine.process_group)
            else:
                mode = "copy" if overlapped else "inplace"
                self.averager = ParameterAverager(tensors, engine.process_group, config.qsr_fp32_average, mode=mode)
            self.overlap = OverlappedSync(self.averager) if overlapped else None
            self._set_gradient_sync(self._data_parallel_step(0))
        else:
            logger.warning(
                "qsr_hf: single-process run, so there is nothing to synchronize; training runs as usual",
                main_process_only=True,
            )

    def _data_parallel_step(self, step: int) -> bool:
        # post-local SGD's first phase is true data-parallel training (gradients all-reduced every step), as in
        # Lin et al. and torch's PostLocalSGDOptimizer; it is not local training with H = 1
        return self.config.qsr_rule == "post_local" and step < self.config.qsr_switch_step

    def _set_gradient_sync(self, on: bool) -> None:
        if on == self._gradient_sync or not self.distributed:
            return
        if on:
            self.engine.restore_gradient_sync()
        else:
            self.engine.disable_gradient_sync()
        self._gradient_sync = on

    def begin_step(self, lr: float) -> int:
        """Start an optimizer step that uses learning rate ``lr``; returns the current round's H."""
        if self._start_error is not None:
            error, self._start_error = self._start_error, None
            raise error
        h = self.clock.begin_step(lr)
        self.stats.round_length = h
        return h

    def end_step(self) -> bool:
        """Finish an optimizer step; average the parameters if the round is over. Returns whether it averaged."""
        data_parallel = self._data_parallel_step(self.clock.step)
        due = self.clock.end_step()
        self.stats.steps = self.clock.step
        # before the next step's backward: the switch from phase 1 must not all-reduce the first local gradients
        self._set_gradient_sync(self._data_parallel_step(self.clock.step))
        self._finish_overlap()  # overlap: the previous round's average, one step late
        if due and data_parallel:
            # the backend all-reduced this step's gradients: parameters already agree, nothing to average
            self.stats.record_sync(self.stats.grad_bytes_per_step if self.distributed else 0, scheduled=True)
            return False
        if due:
            self._average(ROUND_END)
        return due and self.distributed

    def sync_now(self) -> bool:
        """Average outside the schedule (before evaluation or a checkpoint); the round schedule is unchanged.

        Returns:
            `bool`: whether an average happened (not in a single-process run, nor right after a scheduled sync).
        """
        self._finish_overlap()  # overlap: an exact average before evaluation or a checkpoint
        if not self.distributed or not self.clock.in_round or self.clock.steps_into_round == 0:
            return False
        self._average(EXTRA_SYNC)
        return True

    def enter_averaged_view(self, batchnorm: bool = False) -> None:
        """Make the model the average of the ranks' models, for an evaluation or a checkpoint.

        With ``qsr_eval_copy`` (the default) each rank's local tensors are kept aside and put back by
        :meth:`leave_averaged_view`, so the training trajectory is the one without the evaluation; otherwise this is
        an extra sync (:meth:`sync_now`). Right after a scheduled sync the model is averaged already and nothing is
        communicated.

        Args:
            batchnorm (`bool`, defaults to `False`): also keep the BatchNorm statistics aside (a re-estimation for
                the evaluation will overwrite them).
        """
        if self._held is not None:
            return
        self._finish_overlap()
        if not self.config.qsr_eval_copy:
            self.sync_now()
            return
        needs_average = self.distributed and self.clock.in_round and self.clock.steps_into_round > 0
        kept = []
        if needs_average:
            self.averager.ensure_views()
            kept = list(self.averager.tensors)
        if batchnorm:
            kept += batchnorm_statistics(self.engine.module)
        self._held = [(t, t.detach().clone()) for t in kept]
        self._synced_before_view = self.synced_at  # the local tensors come back: they are not averaged ones
        if needs_average and self.averager.mode == "delta":
            self._held_anchor = self.averager.anchor.clone()  # and so does the anchor the average moved
        if needs_average:
            self._average(EXTRA_SYNC)

    def leave_averaged_view(self) -> None:
        """Put back the local tensors kept aside by :meth:`enter_averaged_view` (bitwise)."""
        if self._held is None:
            return
        with torch.no_grad():
            for target, local in self._held:
                target.copy_(local)
            if self._held_anchor is not None:
                self.averager.load_anchor(self._held_anchor)
            self.engine.after_restore()
        self._held = self._held_anchor = None
        self.synced_at = self._synced_before_view

    def _average(self, kind: int) -> None:
        scheduled = kind == ROUND_END
        if self.averager is None:
            if scheduled:
                self.stats.syncs += 1
            return
        last = self.clock.total_steps is not None and self.clock.step >= self.clock.total_steps
        with torch.no_grad():
            self.averager.ensure_views()
            finite = agreement.all_finite(self._averaged_storage())
            flags = exchange(self.agreement_values(kind), [int(not finite)])
            divisor = self._exclude_nonfinite([r for r, (bad,) in enumerate(flags) if bad])
            if self.overlap is not None and scheduled and not last and divisor is None:
                self.stats.record_sync(self.overlap.start(), scheduled)  # overlap: folded in at the next end_step
                return
            num_bytes = self.averager.average() if divisor is None else self.averager.average(divisor)
            self.engine.after_average()
        self.synced_at = self.clock.step
        self.stats.record_sync(num_bytes, scheduled)

    def _averaged_storage(self) -> list[torch.Tensor]:
        # where the values to average live: the flat buffers (in place) or the tensors themselves (copy mode)
        if self.averager.mode == "inplace":
            return [b.flat for b in self.averager.buckets]
        if self.averager.mode == "delta":
            return self.averager.stage()  # compression: this rank's change; zeroing it = contributing nothing
        return list(self.averager.tensors)

    def _finish_overlap(self) -> None:
        if self.overlap is not None and self.overlap.finish():
            with torch.no_grad():
                self.engine.after_average()

    def agreement_values(self, kind: int) -> list[int]:
        """What every rank must agree on at a synchronization point of ``kind`` (see `qsr_hf.agreement.COMMON`)."""
        clock = self.clock
        h = self.stats.round_length if kind == ROUND_END else clock.round_length
        tensors = self.averager.tensors if self.averager is not None else self._local_tensors()
        total = -1 if clock.total_steps is None else clock.total_steps
        return [
            kind,
            clock.step,
            clock.round_index,
            h,
            total,
            self.config.fingerprint(),
            agreement.layout_fingerprint(tensors),
            dist.get_world_size(),
        ]

    def _exclude_nonfinite(self, bad: list[int]) -> int | None:
        """Apply ``qsr_on_nonfinite`` when ranks ``bad`` hold NaN/inf; return the divisor of the average."""
        if not bad:
            return None
        where = f"rank(s) {bad} hold NaN/inf in the tensors to average at optimizer step {self.clock.step}"
        group = self.engine.process_group
        members = dist.get_process_group_ranks(group) if group is not None else range(dist.get_world_size())
        finite = [r for r in members if r not in bad]
        if self.config.qsr_on_nonfinite == "error" or not finite:
            raise RuntimeError(
                f"qsr_hf: {where}; every rank stops here so that they do not spread through the average. Lower the "
                "learning rate or enable gradient clipping, resume from the last checkpoint, or set "
                "qsr_on_nonfinite='skip_rank' to average the finite ranks only"
                + ("" if finite else " (no rank of this averaging group is finite)")
            )
        if dist.get_rank() in bad:
            for t in self._averaged_storage():
                t.zero_()  # contributes nothing; receives the finite ranks' average
            logger.warning(
                f"qsr_hf: rank {dist.get_rank()} holds NaN/inf at optimizer step {self.clock.step}: its tensors are "
                f"replaced by the average of ranks {finite} (qsr_on_nonfinite='skip_rank')",
                main_process_only=False,
            )
        else:
            logger.warning(f"qsr_hf: {where}; averaging ranks {finite} only (qsr_on_nonfinite='skip_rank')")
        self.stats.nonfinite_syncs += 1
        return len(finite)

    def check_start(self, defer_parameters: bool = False) -> None:
        """At train begin and after a resume: same settings, step and world size on every rank, and identical
        parameters when training starts or resumes at a sync (inside a round the ranks' parameters differ).

        Args:
            defer_parameters (`bool`, defaults to `False`): raise a parameter difference at the first step instead,
                unless a schedule position is loaded before it (per-rank state loaded after building the wrapper).

        Raises:
            `RuntimeError`: on every rank, when the ranks differ. Different starting parameters are refused rather than
                overwritten with rank 0's: they mean a rank loaded other weights or state than the others.
        """
        if not self.distributed:
            return
        # parameters only: buffers (BatchNorm statistics) already differ after a first forward pass on per-rank data
        parameters = [p for p in self.engine.module.parameters() if p.requires_grad]
        group = self.engine.process_group
        leader = min(dist.get_process_group_ranks(group)) if group is not None else 0
        rows = exchange(self.agreement_values(START), [agreement.tensors_checksum(parameters), leader])
        if not self.clock.in_round or self.synced_at == self.clock.step:
            try:
                agreement.require_identical_start([row[0] for row in rows], [row[1] for row in rows])
            except RuntimeError as error:
                if not defer_parameters:
                    raise
                self._start_error = error

    def reestimate_batchnorm(self, batches: Iterable[Any], forward: ForwardFn) -> int:
        """Recompute BatchNorm statistics on ``batches`` with the current (averaged) parameters, then average them.

        The official code's way of handling BatchNorm (see `qsr_hf.batchnorm`). Counted as an extra sync.

        Returns:
            `int`: the number of batches used on this rank.
        """
        used = reestimate_batchnorm(self.engine.module, batches, forward)
        statistics = batchnorm_statistics(self.engine.module)
        if self.distributed and statistics:
            num_bytes = ParameterAverager(
                statistics, self.engine.process_group, self.config.qsr_fp32_average
            ).average()
            self.stats.record_sync(num_bytes, scheduled=False)
        return used

    def close(self) -> None:
        """Check that every rank ends at the same step, then switch the backend's gradient all-reduce back on."""
        self._finish_overlap()
        if self.distributed:
            exchange(self.agreement_values(END))
        self._set_gradient_sync(True)

    def meta(self) -> dict[str, int]:
        """What a per-rank state file records about the run: world size, optimizer step, config fingerprint."""
        world = dist.get_world_size() if self.distributed else 1
        return {"world_size": world, "step": self.clock.step, "config_fingerprint": self.config.fingerprint()}

    def _synced_tensors(self, optimizer: torch.optim.Optimizer | None) -> list[torch.Tensor]:
        tensors = self._local_tensors()
        if self.config.qsr_average_optimizer_state:
            tensors += optimizer_state_tensors(optimizer)
        return tensors

    def _local_tensors(self) -> list[torch.Tensor]:
        return self.engine.averaged_tensors(self.config.qsr_average_buffers)

    def local_state_dict(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Everything this rank needs to resume exactly: its optimizer state, the averaged tensors, the position.

        The tensors are saved too because checkpoints hold rank 0's model in a format that not every model class
        reloads faithfully; with them, resume does not depend on it.
        """
        state = {
            "optimizer": optimizer.state_dict(),
            "qsr": self.state_dict(),
            "tensors": [t.detach().to("cpu", copy=True) for t in self._local_tensors()],
        }
        engine_state = self.engine.local_state_dict()
        if engine_state:
            state["engine"] = engine_state
        return state

    def load_local_state_dict(self, state: dict[str, Any], optimizer: torch.optim.Optimizer) -> None:
        """Restore what :meth:`local_state_dict` returned on this rank."""
        tensors = self._local_tensors()
        if len(state["tensors"]) != len(tensors):
            raise ValueError(
                f"the saved QSR state holds {len(state['tensors'])} tensors but this model averages {len(tensors)}: "
                "was it saved from another model or with another qsr_average_buffers?"
            )
        with torch.no_grad():
            for target, saved in zip(tensors, state["tensors"], strict=True):
                target.copy_(saved)
        optimizer.load_state_dict(state["optimizer"])
        if "engine" in state:
            self.engine.load_local_state_dict(state["engine"])
        self.engine.after_average()
        self.load_state_dict(state["qsr"])

    def state_dict(self) -> dict[str, Any]:
        """Schedule position, counters and, with ``qsr_compress_delta``, the fp32 anchor (identical on every rank)."""
        state = {"clock": self.clock.state_dict(), "stats": self.stats.state_dict(), "synced_at": self.synced_at}
        if isinstance(self.averager, CompressedAverager):
            state["anchor"] = self.averager.anchor.to("cpu", copy=True)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.clock.load_state_dict(state["clock"])
        self.stats.load_state_dict(state["stats"])
        self._set_gradient_sync(self._data_parallel_step(self.clock.step))
        self.synced_at = int(state.get("synced_at", -1))
        if isinstance(self.averager, CompressedAverager):
            if "anchor" not in state:
                raise ValueError(
                    "qsr_compress_delta=True but the saved QSR state has no anchor (saved without compression?): "
                    "resume with the settings it was saved with"
                )
            self.averager.load_anchor(state["anchor"])
        self._start_error = None  # a resumed position: the start check happens after the state is loaded
