"""`SyncStats`: what local training communicated, and how that compares with data-parallel training. Pure Python."""

from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class SyncStats:
    """Communication counters of one rank.

    Data-parallel training all-reduces every trainable parameter's gradient once per optimizer step; that is the
    reference volume. ``comm_volume_vs_ddp`` = bytes averaged / (steps x gradient bytes per step); with parameters and
    gradients of the same dtype it equals the number of syncs per step, the paper's "communication" figure.

    Args:
        grad_bytes_per_step (`int`): bytes of one data-parallel gradient all-reduce (trainable parameters).
        steps (`int`): optimizer steps taken.
        syncs (`int`): scheduled syncs (end of a round).
        extra_syncs (`int`): syncs forced outside the schedule (before evaluation, checkpoint, end of training).
        bytes_averaged (`int`): bytes this rank put into parameter all-reduces.
        round_length (`int`): H of the current round.
        intra_node_bytes_per_step (`int`): bytes this rank moves inside its node on every optimizer step when a node
            is one worker (hierarchical QSR: its gradient all-reduce; FSDP2 inside nodes: its all-gathers and
            reduce-scatters); 0 when every process is a worker.
        intra_node_sync_bytes (`int`): bytes this rank moved inside its node at syncs so far (the all-gather of the
            hierarchical floor path, the BatchNorm statistics averaged inside the node); added by the engine.
        nonfinite_syncs (`int`): syncs at which some rank held NaN/inf and was left out
            (``qsr_on_nonfinite="skip_rank"``).
        outer_lr (`float`, *optional*): the outer optimizer's learning rate (``qsr_outer_optimizer``), else `None`.
        replicas (`int`, *optional*): fault-tolerant runs (`qsr_hf.ft`): replica groups whose values the last sync
            averaged (a replica that joined at that sync receives the average without contributing), else `None`.
        pseudo_grad_norm (`float`, *optional*): L2 norm of the last sync's averaged round change (the outer
            optimizer's pseudo-gradient) over the values this rank holds (its node slice or shard where a node is one
            worker), else `None`.
        overlap_steps (`int`, *optional*): with ``qsr_overlap_sync``, the optimizer steps the last overlapped average
            was given to arrive (``qsr_overlap_steps``, or the depth ``qsr_overlap_auto`` chose), else `None`.

    Inter-node bytes are those averaged between QSR workers (``bytes_averaged``): with ``qsr_worker="node"`` that is
    the only traffic between nodes; with one worker per process on several nodes the averaging crosses nodes too.
    Byte conventions, per rank and exact: an all-reduce counts its buffer (as data-parallel's gradient all-reduce
    does); an all-gather counts what this rank receives from the other k - 1 processes of its node, and a
    reduce-scatter what it sends to them ((k - 1) / k of the full buffer each). With k = 2 every count is what a rank
    sends over the node's link.
    """

    grad_bytes_per_step: int = 0
    steps: int = 0
    syncs: int = 0
    extra_syncs: int = 0
    bytes_averaged: int = 0
    round_length: int = 0
    intra_node_bytes_per_step: int = 0
    intra_node_sync_bytes: int = 0
    nonfinite_syncs: int = 0
    outer_lr: float | None = None
    pseudo_grad_norm: float | None = None
    replicas: int | None = None
    overlap_steps: int | None = None

    def record_sync(self, num_bytes: int, scheduled: bool, fragment: bool = False) -> None:
        """Count one sync that all-reduced ``num_bytes``; ``fragment``: a fragment's average inside a round
        (``qsr_fragments``), whose bytes count and which is no sync (``syncs`` counts rounds)."""
        self.bytes_averaged += num_bytes
        if fragment:
            return
        if scheduled:
            self.syncs += 1
        else:
            self.extra_syncs += 1

    def record_step_begin(self, round_length: int) -> None:
        """An optimizer step of a round of ``round_length`` steps begins (``qsr/H``)."""
        self.round_length = round_length

    def record_steps(self, steps: int) -> None:
        """``steps`` optimizer steps are done."""
        self.steps = steps

    def record_outer(self, lr: float | None = None, pseudo_grad_norm: float | None = None) -> None:
        """The outer optimizer's learning rate (once) or the last sync's pseudo-gradient norm."""
        if lr is not None:
            self.outer_lr = lr
        if pseudo_grad_norm is not None:
            self.pseudo_grad_norm = pseudo_grad_norm

    def record_nonfinite_sync(self) -> None:
        """Count a sync at which some rank held NaN/inf and was left out (``qsr_on_nonfinite="skip_rank"``)."""
        self.nonfinite_syncs += 1

    def record_overlap_depth(self, steps: int) -> None:
        """The optimizer steps the last overlapped average was given to arrive."""
        self.overlap_steps = steps

    def record_replicas(self, replicas: int) -> None:
        """Replica groups whose values the last fault-tolerant sync averaged."""
        self.replicas = replicas

    def record_intra_node(self, num_bytes: int) -> None:
        """Add ``num_bytes`` moved inside the node at a sync (an engine's count, see ``Engine.after_average``)."""
        self.intra_node_sync_bytes += num_bytes

    @property
    def ddp_bytes(self) -> int:
        """Bytes data-parallel training would have all-reduced in the same number of steps."""
        return self.steps * self.grad_bytes_per_step

    @property
    def bytes_intra_node(self) -> int:
        """Bytes moved inside the node so far: steps x ``intra_node_bytes_per_step`` + ``intra_node_sync_bytes``."""
        return self.steps * self.intra_node_bytes_per_step + self.intra_node_sync_bytes

    @property
    def bytes_inter_node(self) -> int:
        """Bytes averaged between QSR workers so far (the inter-node traffic with ``qsr_worker="node"``)."""
        return self.bytes_averaged

    @property
    def comm_volume_vs_ddp(self) -> float:
        """Bytes averaged relative to data-parallel training of the same length (0 before the first step)."""
        return self.bytes_averaged / self.ddp_bytes if self.ddp_bytes else 0.0

    def to_logs(self) -> dict[str, float]:
        """Metrics for `Trainer.log` / trackers, grouped under the ``qsr/`` prefix."""
        outer = {} if self.outer_lr is None else {"qsr/outer_lr": self.outer_lr}
        if self.pseudo_grad_norm is not None:
            outer["qsr/pseudo_grad_norm"] = self.pseudo_grad_norm
        if self.replicas is not None:
            outer["qsr/replicas"] = float(self.replicas)
        if self.overlap_steps is not None:
            outer["qsr/overlap_steps"] = float(self.overlap_steps)
        return {
            "qsr/H": float(self.round_length),
            "qsr/syncs": float(self.syncs),
            "qsr/extra_syncs": float(self.extra_syncs),
            "qsr/bytes_averaged": float(self.bytes_averaged),
            "qsr/comm_volume_vs_ddp": self.comm_volume_vs_ddp,
            "qsr/bytes_inter_node": float(self.bytes_inter_node),
            "qsr/bytes_intra_node": float(self.bytes_intra_node),
            "qsr/nonfinite_syncs": float(self.nonfinite_syncs),
            **outer,
        }

    def state_dict(self) -> dict[str, Any]:
        """Counters as a plain dict."""
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore counters saved by :meth:`state_dict` (bytes per step are recomputed, not restored)."""
        counters = ("steps", "syncs", "extra_syncs", "bytes_averaged", "round_length", "intra_node_sync_bytes")
        for key in (*counters, "nonfinite_syncs"):
            setattr(self, key, int(state.get(key, 0)))
        if state.get("pseudo_grad_norm") is not None:
            self.pseudo_grad_norm = float(state["pseudo_grad_norm"])
