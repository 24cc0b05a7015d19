"""`SyncedState`: the averaged tensors' values at the last sync, in fp32, equal on every rank. One owner.

Two features need the last synced values and share this one copy instead of keeping their own:

- ``qsr_compress_delta`` sends each rank's change since then (`qsr_hf.sync.compressed`: the *anchor*);
- ``qsr_outer_optimizer`` steps them with the averaged round change (`qsr_hf.sync.outer`), with a momentum buffer.

Every average that goes through a sync calls :meth:`SyncedState.advance` on each bucket's averaged values: it turns
the plain average into the new synced values (the outer step on parameters; buffers such as BatchNorm statistics
keep the plain average) and, when ``commit``, remembers them. An evaluation's average does not commit, so the view of
the outer-updated model costs no copy of this state. The layout follows the averager's buckets (bucket ``i`` is
slice ``i``); with ``on_cpu`` the state lives in host memory and is streamed through the device in chunks.

Each bucket also remembers the clock's ``lr_sum`` at its last sync (``lr_marks``): the pseudo-gradient of its next sync
covers the optimizer steps since then, whose summed lrs S_r scale the outer step under ``qsr_outer_scaling="round_lr"``
(a fragment's bucket: since that fragment's last sync).
"""

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from qsr_hf.core.memory import CHUNK
from qsr_hf.sync.flat_buckets import FlatBucket
from qsr_hf.sync.outer import OuterStep


Point = tuple[float, int] | Callable[[], tuple[float, int]] | None  # (clock's lr_sum, step) of a sync, or a getter


def _runs(bucket: FlatBucket, plain: set[int]) -> list[tuple[int, int, bool]]:
    # contiguous (start, end, outer) runs of the bucket's flat layout; parameters take the outer step, the rest not
    runs: list[tuple[int, int, bool]] = []
    offset = 0
    for t, view in bucket.views(bucket.flat):
        outer = id(t) not in plain
        if runs and runs[-1][2] == outer:
            runs[-1] = (runs[-1][0], offset + view.numel(), outer)
        else:
            runs.append((offset, offset + view.numel(), outer))
        offset += view.numel()
    return runs


class SyncedState:
    """The last synced values of the averaged tensors (fp32) and, with an outer optimizer, its momentum.

    Args:
        buckets (`Sequence[FlatBucket]`): the averager's buckets; the state is laid out as their flat buffers.
        outer ([`OuterStep`], *optional*): the outer optimizer; `None` keeps the plain average (compression only).
        plain (`set[int]`, *optional*): ``id()`` of the tensors that take the plain average under an outer
            optimizer (floating-point buffers); every other tensor is a parameter.
        on_cpu (`bool`, defaults to `False`): keep the state in host memory (pinned when the buckets are on CUDA).
        pad_to (`int`, *optional*): total length of the anchor buffer, zero-padded past the buckets' values (the
            compressed averager's equal all-to-all chunks).

    Call the constructor (or :meth:`reset`) only where every rank holds the same values: the start of training, or
    right after a sync. A resume restores the state with :meth:`load_state_dict`.
    """

    def __init__(
        self,
        buckets: Sequence[FlatBucket],
        outer: OuterStep | None = None,
        plain: set[int] | None = None,
        on_cpu: bool = False,
        pad_to: int | None = None,
    ) -> None:
        devices = {b.flat.device for b in buckets}
        if len(devices) != 1:
            raise ValueError(
                f"the synced state (qsr_outer_optimizer, qsr_compress_delta) needs the averaged tensors on one "
                f"device, got {sorted(map(str, devices))}: place the model on one device per rank"
            )
        self.device = devices.pop()
        self.outer = outer
        self.signature = self._signature(buckets)
        self.numel = sum(n for _, n in self.signature)
        plain = plain or set()
        self._runs = [_runs(b, plain) if outer is not None else [(0, b.flat.numel(), False)] for b in buckets]
        home = torch.device("cpu") if on_cpu else self.device
        pin = on_cpu and self.device.type == "cuda"
        size = max(pad_to or 0, self.numel)
        self.anchor = torch.zeros(size, dtype=torch.float32, device=home, pin_memory=pin)
        self.momentum = None
        if outer is not None and outer.state_tensors:
            self.momentum = torch.zeros(self.numel, dtype=torch.float32, device=home, pin_memory=pin)
        self.streamed = on_cpu and home != self.device
        scratch = min(CHUNK, self.numel) if outer is not None else 0
        count = 4 if self.streamed else 2  # pseudo-gradient and momentum work buffers, + staged anchor and momentum
        self._scratch = tuple(torch.empty(scratch, dtype=torch.float32, device=self.device) for _ in range(count))
        self.pseudo_grad_sq = 0.0  # squared norm of the pseudo-gradient at the last sync (this rank's part)
        self.lr_marks = [0.0] * len(buckets)  # the clock's lr_sum at each bucket's last sync
        self.committed = True  # whether the last advance committed (a sync; not an evaluation's average)
        self.reset(buckets)

    @staticmethod
    def _signature(buckets: Sequence[FlatBucket]) -> list[tuple[str, int]]:
        return [(str(b.dtype), b.flat.numel()) for b in buckets]

    @property
    def nbytes(self) -> int:
        """Bytes this state holds (anchor and momentum; not the fixed-size scratch buffers)."""
        return sum(t.numel() * t.element_size() for t in (self.anchor, self.momentum) if t is not None)

    def slices(self, tensor: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Bucket ``i``'s part of ``tensor`` (default: the anchor), as views."""
        tensor = self.anchor if tensor is None else tensor
        out, offset = [], 0
        for _, n in self.signature:
            out.append(tensor[offset : offset + n])
            offset += n
        return out

    def check_layout(self, buckets: Sequence[FlatBucket]) -> None:
        """Refuse buckets whose layout is not the one this state follows (a model re-cast or changed in training)."""
        if self._signature(buckets) != self.signature:
            raise RuntimeError(
                "qsr_hf: the averaged tensors changed dtype or number since the synced state was taken "
                f"({self.signature} -> {self._signature(buckets)}, model.to?); cast the model before training starts"
            )

    @torch.no_grad()
    def reset(self, buckets: Sequence[FlatBucket], lr_sum: float = 0.0) -> None:
        """Take the tensors' current values as the synced ones (only where every rank holds the same values), at
        the clock's ``lr_sum``."""
        self.check_layout(buckets)
        self.lr_marks = [float(lr_sum)] * len(buckets)
        for bucket, anchor in zip(buckets, self.slices(), strict=True):
            if anchor.device == bucket.flat.device:
                bucket.gather(anchor)
            else:
                anchor.copy_(bucket.gather(torch.empty_like(bucket.flat, dtype=torch.float32)))

    @torch.no_grad()
    def advance(
        self, index: int, averaged: torch.Tensor, commit: bool = True, first: int = 0, point: Point = None
    ) -> None:
        """Turn bucket ``index``'s plain average into the synced values, in place; remember them if ``commit``.

        Args:
            index (`int`): the bucket.
            averaged (`torch.Tensor`): its flat averaged values (any float dtype; computed in fp32).
            commit (`bool`, defaults to `True`): a sync (update the state); `False` for an evaluation's average.
            first (`int`, defaults to 0): the first bucket this average advances (a fragment's, ``qsr_fragments``):
                the pseudo-gradient's norm is summed from there.
            point (`tuple[float, int]` or a callable returning one, *optional*): the clock's ``(lr_sum, step)`` of
                this sync (`SyncClock.point`; an overlapped one: where it started), read when the average arrives;
                `None`: μ, unscaled (no ``qsr_outer_scaling`` / ``qsr_outer_momentum_warmup``).
        """
        if index == first:
            self.pseudo_grad_sq = 0.0
        self.committed = commit
        mu, work = self._round(index, point, commit)
        wide = averaged if averaged.dtype == torch.float32 else averaged.float()
        anchor, momentum = self.slices()[index], None
        if self.momentum is not None:
            momentum = self.slices(self.momentum)[index]
        for start, end, outer in self._runs[index]:
            step = max(1, min(CHUNK, end - start) if (self.streamed or outer) else end - start)
            for a in range(start, end, step):
                b = min(a + step, end)
                part = None if momentum is None else momentum[a:b]
                self._advance_chunk(wide[a:b], anchor[a:b], part, outer, commit, mu, work)
        if wide is not averaged:
            averaged.copy_(wide)

    def _round(self, index: int, point: Point, commit: bool) -> tuple[float | None, float | None]:
        # (μ_t, S_r) of bucket ``index``'s sync at ``point``; S_r = lr_sum now - lr_sum at its last sync
        if self.outer is None or point is None:
            return None, None
        lr_sum, step = point() if callable(point) else point
        work = lr_sum - self.lr_marks[index] if self.outer.round_lr else None
        if commit:
            self.lr_marks[index] = lr_sum
        return self.outer.momentum_at(step), work

    def _advance_chunk(
        self,
        avg: torch.Tensor,
        anchor: torch.Tensor,
        momentum: torch.Tensor | None,
        outer: bool,
        commit: bool,
        mu: float | None = None,
        work: float | None = None,
    ) -> None:
        if not outer:  # the plain average (buffers; every value when there is no outer optimizer)
            if commit:
                anchor.copy_(avg)
            return
        n = avg.numel()
        staged_anchor, staged_momentum = anchor, momentum
        if self.streamed:  # host memory: bring the chunk to the device, write it back after
            staged_anchor = self._scratch[2][:n].copy_(anchor, non_blocking=True)
            if momentum is not None:
                staged_momentum = self._scratch[3][:n].copy_(momentum, non_blocking=True)
        self.pseudo_grad_sq += self.outer.apply(
            avg, staged_anchor, staged_momentum, self._scratch[:2], commit, mu, work
        )
        if self.streamed and commit:
            anchor.copy_(staged_anchor)
            if momentum is not None:
                momentum.copy_(staged_momentum)

    @property
    def pseudo_grad_norm(self) -> float:
        """L2 norm of the last sync's pseudo-gradient over the values this rank holds (of the buckets it averaged)."""
        return math.sqrt(self.pseudo_grad_sq)

    def state_dict(self) -> dict[str, Any]:
        """The anchor, with momentum the momentum buffer (CPU copies), with ``round_lr`` the buckets' ``lr_marks``."""
        state = {"anchor": self.anchor.to("cpu", copy=True)}
        if self.momentum is not None:
            state["momentum"] = self.momentum.to("cpu", copy=True)
        if self.outer is not None and self.outer.round_lr:
            state["lr_marks"] = list(self.lr_marks)
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (same model and world size)."""
        for name in ("anchor", "momentum"):
            mine = getattr(self, name)
            if mine is None:
                continue
            if name not in state:
                raise ValueError(
                    f"the saved QSR state has no synced {name} but these settings need one (saved with another "
                    "qsr_outer_optimizer / qsr_outer_momentum / qsr_compress_delta?): resume with the settings it "
                    "was saved with"
                )
            if tuple(state[name].shape) != tuple(mine.shape):
                raise ValueError(
                    f"the saved synced {name} has shape {tuple(state[name].shape)}, this model needs "
                    f"{tuple(mine.shape)}: was it saved from another model or world size?"
                )
            mine.copy_(state[name])
        if self.outer is not None and self.outer.round_lr:
            marks = state.get("lr_marks")
            if marks is None or len(marks) != len(self.lr_marks):
                raise ValueError(
                    f"the saved QSR state has {'no' if marks is None else len(marks)} lr marks, qsr_outer_scaling="
                    f"'round_lr' needs {len(self.lr_marks)}: resume with the settings it was saved with"
                )
            self.lr_marks = [float(m) for m in marks]

    def tensors(self) -> list[torch.Tensor]:
        """The state's tensors (for checksums); with ``round_lr`` the lr marks too."""
        marks = (
            [torch.tensor(self.lr_marks, dtype=torch.float64)]
            if self.outer is not None and self.outer.round_lr
            else []
        )
        return [t for t in (self.anchor, self.momentum) if t is not None] + marks
