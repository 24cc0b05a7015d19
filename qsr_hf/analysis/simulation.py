"""Simulate K data-parallel workers in one process: local training with a sync rule, or data-parallel training.

Every worker has its own model and optimizer copy (deep copies of one initial model) and its own shard of every
global batch, as each rank of a DDP run gets its slice. Rounds come from the library's `QSRConfig.build_schedule`
and `SyncClock`; a sync uses [`ParameterAverager`]'s arithmetic: per averaged tensor, sum the replicas in rank order
(fp32 for bf16/fp16), divide by K, copy to every replica. With K = 2 this is bitwise what a 2-process gloo run of
[`LocalOptimizer`] computes (``tests/test_simulation.py``). The data-parallel baseline is true data-parallel
training (one optimizer on the averaged gradient, like DDP), not local training with H = 1, which keeps per-worker
AdamW moments. ``qsr_overlap_sync`` (folded ``qsr_overlap_steps`` late, as `qsr_hf.sync.overlap`) and ``qsr_compress_delta`` (with
`qsr_hf.analysis.compression`: each fragment flat in the averager's layout; every format, error feedback, with the
overlap and fragments too) are simulated too, also checked bitwise, and so is the outer
optimizer (``qsr_outer_optimizer``: the same `qsr_hf.sync.outer.OuterStep` on each parameter tensor's average, with the
clock's ``(lr_sum, step)`` for ``qsr_outer_scaling`` / ``qsr_outer_momentum_warmup`` as `SyncedState`), and
``qsr_fragments`` (the same `qsr_hf.sync.fragments` partition of the averaged tensors and steps; with the overlap,
each fragment's average folded ``qsr_overlap_steps`` after its step, or at the next round end). Evaluations here never
change the trajectory (the real library folds an overlapped average in flight before an evaluation).

This module holds the local-training simulation; the data-parallel baseline is in `data_parallel.py` and the
batch sharding in `sharding.py`, both importable from here too.
"""

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from qsr_hf.analysis.compression import SimulatedCompression
from qsr_hf.analysis.data_parallel import DataParallelSimulation
from qsr_hf.analysis.sharding import LossFn, OptimizerFn, SchedulerFn, shard_batch, trainable_bytes
from qsr_hf.core.accounting import SyncStats
from qsr_hf.core.clock import SyncClock
from qsr_hf.core.config import QSRConfig
from qsr_hf.sync.averaging import reduce_dtype
from qsr_hf.sync.fragments import due_after_step, in_sync, partition
from qsr_hf.sync.outer import OuterStep
from qsr_hf.sync.tensor_selection import averaged_tensors


__all__ = ["DataParallelSimulation", "LocalTrainingSimulation", "shard_batch"]  # the first and last live next door


class LocalTrainingSimulation:
    """K workers that each take local optimizer steps and average their parameters at the end of every round.

    Args:
        model (`nn.Module`):
            The initial model; each worker gets a deep copy, so all start from identical parameters.
        optimizer_fn (`Callable[[nn.Module], torch.optim.Optimizer]`):
            Builds one worker's optimizer for its model copy. Optimizer states stay local, as in the paper.
        config ([`QSRConfig`]):
            The sync rule (``qsr``, ``linear``, ``cubic``, ``constant``, ``post_local`` or ``ddp`` for H = 1).
            ``post_local`` runs true data-parallel steps (gradients averaged, as DDP does) until its switch step,
            like `Synchronizer`.
        num_workers (`int`):
            K, the number of simulated workers (ranks).
        num_training_steps (`int`):
            Total optimizer steps; the last round is clipped so training ends on a sync.
        num_warmup_steps (`int`, defaults to 0):
            Optimizer steps of lr warm-up, during which the power rules use H_base.
        scheduler_fn (`Callable[[torch.optim.Optimizer], LRScheduler]`, *optional*):
            Builds one worker's lr scheduler; every worker steps its own once per optimizer step (global step).

    Example:

    ```python
    sim = LocalTrainingSimulation(model, lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3), config, 4, 1000)
    for x, y in loader:  # global batches
        synced = sim.step(shard_batch((x, y), 4), lambda m, b: F.cross_entropy(m(b[0]), b[1]))
    evaluate(sim.averaged_model())
    ```
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer_fn: OptimizerFn,
        config: QSRConfig,
        num_workers: int,
        num_training_steps: int,
        num_warmup_steps: int = 0,
        scheduler_fn: SchedulerFn | None = None,
    ) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if config.qsr_overlap_auto:
            raise ValueError(
                "qsr_overlap_auto=True depends on measured transfer times, which a simulation has none of: "
                "set qsr_overlap_steps to the depth to simulate and qsr_overlap_auto=False"
            )
        self.config = config
        self.num_workers = num_workers
        self.replicas = [copy.deepcopy(model) for _ in range(num_workers)]
        self.optimizers = [optimizer_fn(m) for m in self.replicas]
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        self.schedulers = [scheduler_fn(o) for o in self.optimizers] if scheduler_fn is not None else []
        self.clock = SyncClock(config.build_schedule(num_warmup_steps), num_training_steps)
        self._tensors = [averaged_tensors(m, config.qsr_average_buffers) for m in self.replicas]
        self.stats = SyncStats(grad_bytes_per_step=trainable_bytes(model))
        self._fragment_of = partition([t.numel() for t in self._tensors[0]], config.qsr_fragments)
        self._synced_at = -1  # the step of the last whole-model average (qsr_fragments: see fragments.in_sync)
        self._compression = None  # qsr_compress_delta: each fragment flat in the averager's layout
        if config.qsr_compress_delta:
            fmt, feedback = config.qsr_compress_format, config.qsr_compress_error_feedback
            self._compression = SimulatedCompression(self._tensors[0], self._fragment_of, num_workers, fmt, feedback)
        self.bytes_per_sync = self._bytes(None)
        self._outer = OuterStep.from_config(config)
        plain = {id(b) for b in self.replicas[0].buffers()}  # buffers take the plain average under an outer step
        self._outer_tensor = [self._outer is not None and id(t) not in plain for t in self._tensors[0]]
        # the tensors after the last sync in fp32 (SyncedState's values), and the outer momentum per tensor
        self._anchor: list[torch.Tensor] = []
        self._momentum: list[torch.Tensor | None] = [None] * len(self._tensors[0])
        if config.qsr_compress_delta or self._outer is not None:
            self._reset_anchor()
        if self._outer is not None and self._outer.state_tensors:
            pairs = zip(self._anchor, self._outer_tensor, strict=True)
            self._momentum = [torch.zeros_like(a).view(-1) if o else None for a, o in pairs]
        # overlap: the averages in flight, each (step started, tensor indices, [(tensor, value sent in the summing
        # dtype, its average)])
        self._pending: list[tuple[int, set[int], list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]] = []

    def _bytes(self, chosen: list[int] | None) -> int:
        # bytes of one rank's all-reduces of the tensors ``chosen`` (indices; None: all), as ParameterAverager counts
        if self._compression is not None:
            return self._compression.bytes(range(len(self._tensors[0])) if chosen is None else chosen)
        tensors = self._tensors[0] if chosen is None else [self._tensors[0][i] for i in chosen]
        return sum(t.numel() * reduce_dtype(t.dtype, self.config.qsr_fp32_average).itemsize for t in tensors)

    def _reset_anchor(self) -> None:
        self._anchor = [t.detach().to(torch.float32, copy=True) for t in self._tensors[0]]
        self._lr_marks = [self.clock.lr_sum] * len(self._anchor)  # the clock's lr_sum at each tensor's last sync

    def _round(self, i: int, commit: bool) -> tuple[float, float | None]:
        # SyncedState._round for tensor i: (μ_t, S_r) of a sync now, S_r from the tensor's last sync
        lr_sum, step = self.clock.point()
        work = lr_sum - self._lr_marks[i] if self._outer.round_lr else None
        if commit:
            self._lr_marks[i] = lr_sum
        return self._outer.momentum_at(step), work

    @property
    def lr(self) -> float:
        """Learning rate the next optimizer step uses (worker 0's first parameter group; equal on all workers)."""
        return self.optimizers[0].param_groups[0]["lr"]

    def step(self, shards: Sequence[Any], loss_fn: LossFn) -> bool:
        """One optimizer step on every worker, each on its own shard; average if the round ends.

        Args:
            shards (`Sequence`): K shards of one global batch (see [`shard_batch`]); worker k gets ``shards[k]``.
            loss_fn (`Callable[[nn.Module, Any], torch.Tensor]`): the mean loss of a model on one shard.

        Returns:
            `bool`: whether this step ended a round (the parameters were averaged).
        """
        if len(shards) != self.num_workers:
            raise ValueError(f"expected {self.num_workers} shards, got {len(shards)}")
        self.stats.record_step_begin(self.clock.begin_step(self.lr))
        data_parallel = self.config.qsr_rule == "post_local" and self.clock.step < self.config.qsr_switch_step
        if data_parallel:
            self._data_parallel_gradients(shards, loss_fn)
        else:
            for model, shard in zip(self.replicas, shards, strict=True):
                loss_fn(model, shard).backward()
        for optimizer in self.optimizers:
            optimizer.step()
        h = self.clock.round_length
        due = self.clock.end_step()
        fragments = due_after_step(self.clock, self.config.qsr_fragments, h)
        chosen = None if fragments is None else [i for i, f in enumerate(self._fragment_of) if f in fragments]
        self.stats.record_steps(self.clock.step)
        last = self.clock.total_steps is not None and self.clock.step >= self.clock.total_steps
        self._fold_pending(None if due else chosen or [])  # overlap: as the Synchronizer's end_step
        if due and data_parallel:  # one gradient all-reduce; the replicas agree already: no average (as Synchronizer)
            self.stats.record_sync(self.stats.grad_bytes_per_step, scheduled=True)
            due = False
            if self._anchor and self.clock.step >= self.config.qsr_switch_step:
                self._reset_anchor()  # local rounds start here (Synchronizer.end_step's reset)
        elif due or chosen:  # a round end, or (qsr_fragments) the fragments due inside the round
            if self.config.qsr_overlap_sync and not last:
                self._start(chosen)
            else:
                self.average(chosen)
            num_bytes = self.bytes_per_sync if chosen is None else self._bytes(chosen)
            self.stats.record_sync(num_bytes, scheduled=due, fragment=not due)
        for scheduler in self.schedulers:
            scheduler.step()
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        return due

    @torch.no_grad()
    def _start(self, chosen: list[int] | None) -> None:
        # OverlappedSync.start: the average (outer step included) of the tensors ``chosen`` (None: all), folded later
        indices = range(len(self._tensors[0])) if chosen is None else chosen
        pairs = list(zip(indices, self._averages(commit=True, chosen=chosen), strict=True))
        sent = [(ts[i], ts[i].to(m.dtype, copy=True), m) for ts in self._tensors for i, m in pairs]
        self._pending.append((self.clock.step, set(indices), sent))

    @torch.no_grad()
    def _fold_pending(self, sending: list[int] | None) -> None:
        # OverlappedSync.step_done (``sending`` None: finish): fold those qsr_overlap_steps old and those of a tensor
        # ``sending`` averages again, with AverageHandle.wait's rule
        steps, kept = self.config.qsr_overlap_steps, []
        for started, indices, flight in self._pending:
            if sending is not None and self.clock.step - started < steps and indices.isdisjoint(sending):
                kept.append((started, indices, flight))
                continue
            for t, sent, mean in flight:  # the average + the local change since the send
                t.copy_(mean + (t.to(sent.dtype) - sent))
        self._pending = kept

    def _data_parallel_gradients(self, shards: Sequence[Any], loss_fn: LossFn) -> None:
        # DDP: every forward starts from worker 0's buffers; each gradient times 1/K, summed in rank order
        with torch.no_grad():
            for model in self.replicas[1:]:
                for b, b0 in zip(model.buffers(), self.replicas[0].buffers(), strict=True):
                    b.copy_(b0)
        for model, shard in zip(self.replicas, shards, strict=True):
            loss_fn(model, shard).backward()
        params = [[p for p in m.parameters() if p.requires_grad] for m in self.replicas]
        with torch.no_grad():
            for group in zip(*params, strict=True):
                total = group[0].grad.mul(1.0 / self.num_workers)
                for p in group[1:]:
                    total.add_(p.grad.mul(1.0 / self.num_workers))
                for p in group:
                    p.grad.copy_(total)

    @torch.no_grad()
    def _averages(self, commit: bool = False, chosen: list[int] | None = None) -> list[torch.Tensor]:
        # ParameterAverager's arithmetic: sum over ranks (rank order) in fp32 when low precision, then divide by K;
        # then SyncedState.advance's: the outer step on parameter tensors, remembered when ``commit``. ``chosen``:
        # the indices of the tensors to average (qsr_fragments), None: all
        indices = range(len(self._tensors[0])) if chosen is None else chosen
        if self._compression is not None:
            out = self._compression.averages(self._tensors, self._anchor, indices, commit)
        else:
            out = []
            for group in ([ts[i] for ts in self._tensors] for i in indices):
                dtype = reduce_dtype(group[0].dtype, self.config.qsr_fp32_average)
                total = group[0].detach().to(dtype, copy=True)
                for t in group[1:]:
                    total.add_(t.detach().to(dtype))
                out.append(total.div_(self.num_workers))
        for i, mean in zip(indices, out, strict=True):
            if self._outer_tensor[i]:
                wide = mean.float().view(-1)
                scratch = (torch.empty_like(wide), torch.empty_like(wide))
                mu, work = self._round(i, commit)
                self._outer.apply(wide, self._anchor[i].view(-1), self._momentum[i], scratch, commit, mu, work)
                mean.copy_(wide.view_as(mean))
            elif commit and self._anchor:
                self._anchor[i] = mean.to(torch.float32, copy=True)
        return out

    @torch.no_grad()
    def average(self, chosen: list[int] | None = None) -> None:
        """Average the selected tensors across workers and copy the result into every replica (one sync).

        Args:
            chosen (`list[int]`, *optional*): indices of the averaged tensors to average (a fragment's); all if `None`.
        """
        indices = range(len(self._tensors[0])) if chosen is None else chosen
        for i, mean in zip(indices, self._averages(commit=True, chosen=chosen), strict=True):
            for ts in self._tensors:
                ts[i].copy_(mean)
        if chosen is None:
            self._synced_at = self.clock.step

    def averaged_model(self) -> nn.Module:
        """A copy of worker 0's model holding the workers' average, for evaluation; training is not disturbed.

        Right after a sync the replicas already hold the synced values and are returned as they are (as the
        library's `AveragedView` does): averaging again would apply the outer step a second time (with momentum,
        a lookahead of η_out μ² m that training never takes).
        """
        model = copy.deepcopy(self.replicas[0])
        if not self._pending and in_sync(self.clock, self.config.qsr_fragments, self._synced_at):
            return model
        with torch.no_grad():
            for t, mean in zip(
                averaged_tensors(model, self.config.qsr_average_buffers), self._averages(), strict=True
            ):
                t.copy_(mean)
        return model
