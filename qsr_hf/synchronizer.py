"""`Synchronizer`: the one runtime behind both front ends (Trainer callback and Accelerate optimizer wrapper).

It ties a backend adapter (gradient all-reduce off), a [`ParameterAverager`] (or the compressed one), a
[`SyncClock`] (rounds from the schedule) and [`SyncStats`] (what was communicated) together, and owns their state.
The rest of a sync has one module each: synced values and outer optimizer (`qsr_hf.synced_state`, `qsr_hf.outer`),
checks (`qsr_hf.sync_checks`), overlap (`qsr_hf.overlap`), fragments (`qsr_hf.fragments`), evaluation view
(`qsr_hf.averaged_view`).
"""

import functools
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist

from qsr_hf import fragments, position, sync_checks
from qsr_hf.accounting import SyncStats
from qsr_hf.agreement import EXTRA_SYNC, FRAGMENT_SYNC, ROUND_END
from qsr_hf.averaged_view import AveragedView
from qsr_hf.averaging import ParameterAverager
from qsr_hf.batchnorm import ForwardFn, batchnorm_statistics, reestimate_batchnorm
from qsr_hf.clock import SyncClock
from qsr_hf.compressed_averaging import CompressedAverager
from qsr_hf.config import QSRConfig
from qsr_hf.engines import Engine
from qsr_hf.logging_utils import get_logger
from qsr_hf.outer import OuterStep
from qsr_hf.overlap import OverlappedSync
from qsr_hf.synced_state import SyncedState
from qsr_hf.tensor_selection import optimizer_state_tensors


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
        engine.check_support(config, optimizer)  # refuse what this backend cannot run, before anything is built
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
        self.synced: SyncedState | None = None  # the last synced values (outer optimizer, compression)
        self.view = AveragedView(self)
        self._gradient_sync = True  # the backend's own per-step gradient all-reduce
        if self.distributed:
            # overlap (qsr_overlap_sync, see qsr_hf.overlap): copy-mode averager, the average folded in one step late
            overlapped, tensors = config.qsr_overlap_sync, functools.partial(self._synced_tensors, optimizer)
            outer = OuterStep.from_config(config)
            plain = {id(b) for b in engine.module.buffers()}  # averaged plainly under an outer optimizer
            # the synced state is taken here, where the ranks agree (checked by check_start)
            if config.qsr_compress_delta:
                self.averager = CompressedAverager(tensors, engine.process_group, outer, plain)
                self.synced = self.averager.synced
            else:
                mode = "copy" if overlapped else "inplace"
                self.averager = engine.make_averager(tensors, config.qsr_fp32_average, mode, config.qsr_fragments)
                if outer is not None:
                    self.synced = SyncedState(self.averager.buckets, outer, plain, config.qsr_outer_state_on_cpu)
            self.overlap = (
                OverlappedSync(self.averager, config.qsr_overlap_steps, config.qsr_overlap_auto)
                if overlapped
                else None
            )
            if outer is not None:
                self.stats.outer_lr = outer.lr
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
        h = self.clock.round_length  # of the round this step belongs to (end_step closes it)
        due = self.clock.end_step()
        self.stats.steps = self.clock.step
        # before the next step's backward: the switch from phase 1 must not all-reduce the first local gradients
        self._set_gradient_sync(self._data_parallel_step(self.clock.step))
        if data_parallel and not self._data_parallel_step(self.clock.step) and self.synced is not None:
            self.synced.reset(self.averager.buckets, self.clock.lr_sum)  # the first local round: here, ranks equal
        self.finish_overlap(scheduled=not due)  # overlap: the last average, qsr_overlap_steps late or now
        if due and data_parallel:
            # the backend all-reduced this step's gradients: parameters already agree, nothing to average
            self.stats.record_sync(self.stats.grad_bytes_per_step if self.distributed else 0, scheduled=True)
            return False
        if due:
            self.average(ROUND_END, buckets=fragments.due_buckets(self, h))
        elif chosen := fragments.due_buckets(self, h):  # qsr_fragments: the fragments due inside the round
            self.average(FRAGMENT_SYNC, buckets=chosen)
        return due and self.distributed

    def sync_now(self) -> bool:
        """Average outside the schedule (before evaluation or a checkpoint); the round schedule is unchanged.

        Returns:
            `bool`: whether an average happened (not in a single-process run, nor right after a scheduled sync).
        """
        self.finish_overlap()  # overlap: an exact average before evaluation or a checkpoint
        if not self.distributed or fragments.in_sync(self.clock, self.config.qsr_fragments, self.synced_at):
            return False
        self.average(EXTRA_SYNC)
        return True

    def enter_averaged_view(self, batchnorm: bool = False) -> None:
        """Make the model the average of the ranks' models for an evaluation or a checkpoint (`AveragedView.enter`).

        Args:
            batchnorm (`bool`, defaults to `False`): also keep the BatchNorm statistics aside.
        """
        self.view.enter(batchnorm)

    def leave_averaged_view(self) -> None:
        """Put back the local tensors kept aside by :meth:`enter_averaged_view` (bitwise)."""
        self.view.leave()

    def average(self, kind: int, commit: bool = True, buckets: list[int] | None = None) -> None:
        """Average now (after the checks); ``kind`` is the `qsr_hf.agreement` point, ``commit=False`` an
        evaluation's average that leaves the synced state (outer optimizer) as it was, ``buckets`` the averager's
        buckets to average (``qsr_fragments``; `None`: all)."""
        scheduled = kind == ROUND_END
        if self.averager is None:
            if scheduled:
                self.stats.syncs += 1
            return
        last = self.clock.total_steps is not None and self.clock.step >= self.clock.total_steps
        first = buckets[0] if buckets else 0
        # the sync's (lr_sum, step): an overlapped one's where it starts, else read as it lands (torchft heals first)
        point = self.clock.point() if self.overlap is not None else self.clock.point
        transform = None
        if self.synced is not None:
            transform = functools.partial(self.synced.advance, commit=commit, first=first, point=point)
        with torch.no_grad():
            self.averager.ensure_views()
            if self.synced is not None:
                self.synced.check_layout(self.averager.buckets)
            storage = self.averaged_storage(buckets)
            if sync_checks.folds_checks(self, buckets):  # the checks ride on the average's own collective
                num_bytes = sync_checks.average_checked(self, kind, storage, transform, buckets=buckets)
            else:
                overlap = self.overlap is not None and scheduled and not last
                num_bytes = sync_checks.exchange_then_average(self, kind, storage, transform, overlap, buckets)
                if num_bytes is None:  # started overlapped: folded in at a later end_step
                    self.stats.record_sync(self.averager.bytes_per_sync, scheduled)
                    return
            self.engine.after_average()
        if buckets is None:  # the whole model: every rank holds the same tensors now
            self.synced_at = self.clock.step
        self.stats.record_sync(num_bytes, scheduled, fragment=kind == FRAGMENT_SYNC)
        if commit and self.synced is not None and self.synced.outer is not None:
            self.stats.pseudo_grad_norm = self.synced.pseudo_grad_norm

    def averaged_storage(self, buckets: list[int] | None = None) -> list[torch.Tensor]:
        """Where this rank's values to average live: the flat buffers (in place; those of ``buckets`` if given), the
        tensors themselves (copy mode), or this rank's change (compression: zeroing it contributes nothing)."""
        if self.averager.mode == "inplace":
            chosen = range(len(self.averager.buckets)) if buckets is None else buckets
            return [self.averager.buckets[i].flat for i in chosen]
        if self.averager.mode == "delta":
            return self.averager.stage()
        return list(self.averager.tensors)

    def finish_overlap(self, scheduled: bool = False) -> None:
        """Fold in an average still in flight (``qsr_overlap_sync``), if any; ``scheduled``: only once it is due."""
        if self.overlap is None:
            return
        if self.overlap.step_done() if scheduled else self.overlap.finish():
            with torch.no_grad():
                self.engine.after_average()
            if self.synced is not None and self.synced.outer is not None:
                self.stats.pseudo_grad_norm = self.synced.pseudo_grad_norm

    def agreement_values(self, kind: int) -> list[int]:
        """What every rank must agree on at a synchronization point of ``kind`` (`sync_checks.agreement_values`)."""
        return sync_checks.agreement_values(self, kind)

    def check_start(self, defer_parameters: bool = False) -> None:
        """At train begin and after a resume: same settings, step and world size on every rank, identical
        parameters when training starts or resumes at a sync (inside a round they differ), and identical synced
        state (outer optimizer, compression anchor) always, within each averaging group.

        Args:
            defer_parameters (`bool`, defaults to `False`): raise a value difference at the first step instead,
                unless a schedule position is loaded before it (per-rank state loaded after building the wrapper).

        Raises:
            `RuntimeError`: on every rank, when the ranks differ. Different starting values are refused rather than
                overwritten with rank 0's: they mean a rank loaded other weights or state than the others.
        """
        if not self.distributed:
            return
        error = sync_checks.check_start(self)
        if error is not None and not defer_parameters:
            raise error
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
            averager = ParameterAverager(statistics, self.engine.process_group, self.config.qsr_fp32_average)
            self.stats.record_sync(averager.average(), scheduled=False)
        return used

    def close(self) -> None:
        """Check that every rank ends at the same step, then switch the backend's gradient all-reduce back on."""
        self.finish_overlap()
        if self.distributed:
            with torch.no_grad():
                sync_checks.check_end(self)
        self._set_gradient_sync(True)

    def meta(self) -> dict[str, int]:
        """What a per-rank state file records about the run: world size, optimizer step, config fingerprint."""
        world = dist.get_world_size() if self.distributed else 1
        return {"world_size": world, "step": self.clock.step, "config_fingerprint": self.config.fingerprint()}

    def _synced_tensors(self, optimizer: torch.optim.Optimizer | None) -> list[torch.Tensor]:
        tensors = self.local_tensors()
        if self.config.qsr_average_optimizer_state:
            tensors += optimizer_state_tensors(optimizer)
        return tensors

    def local_tensors(self) -> list[torch.Tensor]:
        """This rank's tensors a sync averages (from the engine)."""
        return self.engine.averaged_tensors(self.config.qsr_average_buffers)

    def state_dict(self) -> dict[str, Any]:
        """Schedule position, counters, the synced state (outer optimizer, compression) and the overlap depth."""
        return position.state_of(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        position.load_state(self, state)
