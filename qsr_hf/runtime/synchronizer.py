"""`Synchronizer`: the one runtime behind both front ends (Trainer callback and Accelerate optimizer wrapper).

It ties a backend adapter (gradient all-reduce off), a [`ParameterAverager`] (or the compressed one), a
[`SyncClock`] (rounds from the schedule) and [`SyncStats`] (what was communicated) together, and is the only writer
of its state: its position (:meth:`state_dict`, :meth:`restart_at`) included. What happens at a sync reads top down
from :meth:`end_step` to :meth:`average`, then the sync path chosen at construction (`qsr_hf.runtime.paths`: which
checks, folded into the average or separate, and whether it overlaps), what it checks (`qsr_hf.runtime.checks`) and
the mechanics in `qsr_hf.sync` (averaging, synced values and outer step, overlap, fragments).
"""

import functools
from collections.abc import Callable, Iterable
from typing import Any

import torch

from qsr_hf.core.accounting import SyncStats
from qsr_hf.core.clock import SyncClock
from qsr_hf.core.config import QSRConfig
from qsr_hf.core.logging_utils import get_logger
from qsr_hf.engines import Engine
from qsr_hf.runtime import checks as sync_checks
from qsr_hf.runtime.parts import build_parts
from qsr_hf.runtime.paths import SyncPath, choose_path
from qsr_hf.runtime.view import AveragedView
from qsr_hf.sync import fragments
from qsr_hf.sync.agreement import EXTRA_SYNC, FRAGMENT_SYNC, ROUND_END, START, SyncPoint
from qsr_hf.sync.averaging import AveragerMode, ParameterAverager
from qsr_hf.sync.batchnorm import ForwardFn, average_batchnorm_statistics, reestimate_batchnorm
from qsr_hf.sync.compressed import CompressedAverager
from qsr_hf.sync.overlap import OverlappedSync
from qsr_hf.sync.synced_state import SyncedState
from qsr_hf.sync.tensor_selection import optimizer_state_tensors


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

    path_class: type[SyncPath] | None = None  # a subclass's own sync path (torchft); None: from the settings

    def __init__(
        self,
        engine: Engine,
        config: QSRConfig,
        warmup_steps: int,
        total_steps: int | None,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        engine.check_support(config, optimizer)  # refuse what this backend cannot run, before anything is built
        self.engine, self.config = engine, config
        self.clock = SyncClock(config.build_schedule(warmup_steps), total_steps)
        self.distributed = engine.world_size > 1
        trainable = [p for p in engine.module.parameters() if p.requires_grad]
        self.stats = SyncStats(
            grad_bytes_per_step=sum(p.numel() * p.element_size() for p in trainable),
            intra_node_bytes_per_step=engine.intra_node_bytes_per_step,
        )
        self.averager: ParameterAverager | CompressedAverager | None = None
        self.overlap: OverlappedSync | None = None
        self.synced_at = -1  # optimizer step of the last average: the ranks' tensors are identical there
        self._start_error: RuntimeError | None = None  # deferred by check_start(defer_parameters=True)
        self.synced: SyncedState | None = None  # the last synced values (outer optimizer, compression)
        self.view = AveragedView(self)
        self._gradient_sync = True  # the backend's own per-step gradient all-reduce
        if self.distributed:
            tensors = functools.partial(self._synced_tensors, optimizer)
            parts = build_parts(config, engine, tensors, self._make_averager)
            self.averager, self.synced, self.overlap = parts.averager, parts.synced, parts.overlap
            if parts.outer is not None:
                self.stats.record_outer(lr=parts.outer.lr)
            self._set_gradient_sync(self._data_parallel_step(0))
        else:
            logger.warning(
                "qsr_hf: single-process run, so there is nothing to synchronize; training runs as usual",
                main_process_only=True,
            )
        self.path = choose_path(self, self.path_class)  # how every sync checks and averages, chosen once

    def _make_averager(self, tensors: Callable[[], list[torch.Tensor]], mode: AveragerMode) -> ParameterAverager:
        # the averager of a sync, from the engine (a subclass may build its own: torchft's ReplicaSynchronizer)
        config = self.config
        return self.engine.make_averager(tensors, config.qsr_fp32_average, mode, config.qsr_fragments)

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
        self.stats.record_step_begin(h)
        return h

    def end_step(self) -> bool:
        """Finish an optimizer step; average the parameters if the round is over. Returns whether it averaged."""
        data_parallel = self._data_parallel_step(self.clock.step)
        h = self.clock.round_length  # of the round this step belongs to (end_step closes it)
        due = self.clock.end_step()
        self.stats.record_steps(self.clock.step)
        # before the next step's backward: the switch from phase 1 must not all-reduce the first local gradients
        self._set_gradient_sync(self._data_parallel_step(self.clock.step))
        if data_parallel and not self._data_parallel_step(self.clock.step) and self.synced is not None:
            self.synced.reset(self.averager.buckets, self.clock.lr_sum)  # the first local round: here, ranks equal
        chosen = self._due_buckets(h)  # the buckets to average now (None: all; qsr_fragments: the fragments due)
        self.finish_overlap(scheduled=not due, sending=chosen)  # overlap: OverlappedSync.step_done, all at round ends
        if due and data_parallel:
            # the backend all-reduced this step's gradients: parameters already agree, nothing to average
            self.stats.record_sync(self.stats.grad_bytes_per_step if self.distributed else 0, scheduled=True)
            return False
        if due or chosen:  # a round end, or (qsr_fragments) the fragments due inside the round
            self.average(ROUND_END if due else FRAGMENT_SYNC, buckets=chosen)
        return due and self.distributed

    def _due_buckets(self, round_length: int) -> list[int] | None:
        # `fragments.due_after_step` as the averager's bucket indices (None: every bucket, [] none)
        chosen = fragments.due_after_step(self.clock, self.config.qsr_fragments, round_length)
        if not chosen:
            return chosen
        return [] if self.averager is None else self.averager.buckets_of(chosen)

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
        """Make the model the ranks' average for an evaluation or a checkpoint (`AveragedView.enter`; ``batchnorm``:
        also keep the BatchNorm statistics aside)."""
        self.view.enter(batchnorm)

    def leave_averaged_view(self) -> None:
        """Put back the local tensors kept aside by :meth:`enter_averaged_view` (bitwise)."""
        synced_before = self.view.leave()
        if synced_before is not None:
            self.synced_at = synced_before

    def average(self, kind: SyncPoint, commit: bool = True, buckets: list[int] | None = None) -> None:
        """Average now (after the checks, `qsr_hf.runtime.paths`); ``kind`` is the `qsr_hf.sync.agreement` point,
        ``commit=False`` an evaluation's average that leaves the synced state (outer optimizer) as it was,
        ``buckets`` the averager's buckets to average (``qsr_fragments``; `None`: all)."""
        scheduled = kind == ROUND_END
        if self.averager is None:
            if scheduled:
                self.stats.record_sync(0, scheduled=True)
            return
        first = buckets[0] if buckets else 0
        # the sync's (lr_sum, step): an overlapped one's where it starts, else read as it lands (torchft heals first)
        point = self.clock.point() if self.overlap is not None else self.clock.point
        advance = None if self.synced is None else self.synced.advance
        transform = advance and functools.partial(advance, commit=commit, first=first, point=point)
        with torch.no_grad():
            self.averager.ensure_views()
            if self.synced is not None:
                self.synced.check_layout(self.averager.buckets)
            num_bytes = self.path.average(kind, self.averager.storage(buckets), transform, buckets)
            if num_bytes is None:  # started overlapped: folded in at a later end_step
                self.stats.record_sync(self.averager.selection_bytes(buckets), scheduled, kind == FRAGMENT_SYNC)
                return
            self.after_average()
        if buckets is None:  # the whole model: every rank holds the same tensors now
            self.synced_at = self.clock.step
        if kind != START:  # the start of training is checked, not counted (torchft: a join)
            self.stats.record_sync(num_bytes, scheduled, fragment=kind == FRAGMENT_SYNC)
        if commit and self.synced is not None and self.synced.outer is not None:
            self.stats.record_outer(pseudo_grad_norm=self.synced.pseudo_grad_norm)

    def after_average(self) -> None:
        """Propagate averaged tensors to where the backend reads them; count the bytes it moved inside the node."""
        self.engine.after_average()
        self.stats.record_intra_node(self.engine.take_intra_node_bytes())

    def after_restore(self) -> None:
        """Propagate tensors put back to their local values (after an averaged view), as :meth:`after_average`."""
        self.engine.after_restore()
        self.stats.record_intra_node(self.engine.take_intra_node_bytes())

    def finish_overlap(self, scheduled: bool = False, sending: list[int] | None = None) -> None:
        """Fold in the averages in flight (``qsr_overlap_sync``), if any; ``scheduled``: only those that are due
        (`OverlappedSync.step_done`, ``sending``: the buckets about to be averaged)."""
        if self.overlap is None:
            return
        if self.overlap.step_done(sending or ()) if scheduled else self.overlap.finish():
            with torch.no_grad():
                self.after_average()
            if self.synced is not None and self.synced.outer is not None:
                self.stats.record_outer(pseudo_grad_norm=self.synced.pseudo_grad_norm)

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

        The official code's way of handling BatchNorm (see `qsr_hf.sync.batchnorm`). Counted as an extra sync.

        Returns:
            `int`: the number of batches used on this rank.
        """
        used = reestimate_batchnorm(self.engine.module, batches, forward)
        if self.distributed:
            group, fp32 = self.engine.process_group, self.config.qsr_fp32_average
            self.stats.record_sync(average_batchnorm_statistics(self.engine.module, group, fp32), scheduled=False)
        return used

    def close(self) -> None:
        """Check that every rank ends at the same step, then switch the backend's gradient all-reduce back on."""
        self.finish_overlap()
        if self.distributed:
            with torch.no_grad():
                self.path.check_end()
        self._set_gradient_sync(True)

    def _synced_tensors(self, optimizer: torch.optim.Optimizer | None) -> list[torch.Tensor]:
        tensors = self.local_tensors()
        if self.config.qsr_average_optimizer_state:
            tensors += optimizer_state_tensors(optimizer)
        return tensors

    def local_tensors(self) -> list[torch.Tensor]:
        """This rank's tensors a sync averages (from the engine)."""
        return self.engine.averaged_tensors(self.config.qsr_average_buffers)

    def state_dict(self) -> dict[str, Any]:
        """The position in training, as saved in each rank's state file: schedule position and counters, the last
        synced step, the synced state (outer optimizer, compression anchor: equal on every rank) and the overlap
        depth (``qsr_overlap_auto`` resumes with the depth it chose)."""
        state = {"clock": self.clock.state_dict(), "stats": self.stats.state_dict(), "synced_at": self.synced_at}
        if self.synced is not None:
            state["synced"] = self.synced.state_dict()
        if self.overlap is not None:
            state["overlap"] = self.overlap.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (a resumed position: the start check follows it)."""
        self.clock.load_state_dict(state["clock"])
        self.stats.load_state_dict(state["stats"])
        self._set_gradient_sync(self._data_parallel_step(self.clock.step))  # post-local: phase 1 or 2
        self.synced_at = int(state.get("synced_at", -1))
        if self.synced is not None:
            self.synced.load_state_dict(state.get("synced", {}))
        if self.overlap is not None and "overlap" in state:
            self.overlap.load_state_dict(state["overlap"])
        self._start_error = None

    def restart_at(self, step: int) -> None:
        """Start a new round at optimizer ``step`` from the model as it is now, the same on every rank (a checkpoint
        without qsr_hf state: its averaged model); the synced state is taken from it."""
        self.clock.reset_to(step)
        if self.synced is not None:
            self.synced.reset(self.averager.buckets, self.clock.lr_sum)
