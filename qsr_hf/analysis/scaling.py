"""Predict wall-clock time of data-parallel vs local (QSR) training from compute time, model size and bandwidth. Pure.

The cost model is the simplest one that matches the paper's data-parallel baseline (no overlap of communication with
compute):

- data-parallel: every optimizer step = compute + one ring all-reduce of the gradients;
- local training: every optimizer step = compute; every sync (end of a round, see [`Plan`]) = one ring all-reduce of
  the parameters.

A ring all-reduce of ``B`` bytes over ``N`` workers sends ``2 (N - 1) / N * B`` bytes through each worker's link and
takes ``2 (N - 1)`` latency-bound hops, so it lasts ``2 (N - 1) / N * B / bandwidth + 2 (N - 1) * latency``.
Everything else (stragglers, data loading, evaluation, NCCL's achieved fraction of the line rate) is outside the
model; `implied_allreduce_seconds` recovers the all-reduce time that measured wall-clock times imply, to compare.
"""

from dataclasses import dataclass

from qsr_hf.analysis.planner import Plan


def ring_allreduce_seconds(
    num_bytes: float, bandwidth_bits_per_s: float, num_workers: int, latency_s: float = 0.0
) -> float:
    """Time of one ring all-reduce.

    Args:
        num_bytes (`float`): bytes each worker contributes (e.g. 4 x parameters for fp32 gradients).
        bandwidth_bits_per_s (`float`): link bandwidth of one worker, in bits per second (25 Gbps = ``25e9``).
        num_workers (`int`): N, the number of workers in the ring.
        latency_s (`float`, defaults to 0.0): latency of one hop, in seconds.

    Returns:
        `float`: seconds; 0 for a single worker.
    """
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    if not bandwidth_bits_per_s > 0:
        raise ValueError(f"bandwidth_bits_per_s must be > 0, got {bandwidth_bits_per_s}")
    if num_workers == 1:
        return 0.0
    hops = 2 * (num_workers - 1)
    return hops / num_workers * num_bytes * 8 / bandwidth_bits_per_s + hops * latency_s


def ring_bandwidth_bits_per_s(num_bytes: float, allreduce_s: float, num_workers: int) -> float:
    """Link bandwidth that makes a ring all-reduce of ``num_bytes`` over ``num_workers`` last ``allreduce_s``.

    The inverse of [`ring_allreduce_seconds`] without latency: the "bus bandwidth" of nccl-tests.

    Args:
        num_bytes (`float`): bytes each worker contributes.
        allreduce_s (`float`): measured (or implied) seconds of one all-reduce.
        num_workers (`int`): N (>= 2).

    Returns:
        `float`: bits per second.
    """
    if num_workers < 2 or not allreduce_s > 0:
        raise ValueError(f"need num_workers >= 2 and allreduce_s > 0, got {num_workers} and {allreduce_s}")
    return 2 * (num_workers - 1) / num_workers * num_bytes * 8 / allreduce_s


@dataclass(frozen=True)
class WallClockPrediction:
    """Predicted wall-clock time of one run, data-parallel vs local training.

    Args:
        steps (`int`): optimizer steps.
        syncs (`int`): parameter averages of the local run.
        compute_s (`float`): compute seconds of the run (steps x compute per step), the same for both.
        allreduce_s (`float`): seconds of one gradient all-reduce (data-parallel).
        sync_s (`float`): seconds of one parameter all-reduce (local training).
        ddp_overlap (`float`): fraction of each gradient all-reduce hidden behind compute.
    """

    steps: int
    syncs: int
    compute_s: float
    allreduce_s: float
    sync_s: float
    ddp_overlap: float = 0.0

    @property
    def ddp_s(self) -> float:
        """Seconds of the data-parallel run: compute + one exposed gradient all-reduce per step."""
        return self.compute_s + self.steps * self.allreduce_s * (1.0 - self.ddp_overlap)

    @property
    def local_s(self) -> float:
        """Seconds of the local run: compute + one parameter all-reduce per sync."""
        return self.compute_s + self.syncs * self.sync_s

    @property
    def speedup(self) -> float:
        """``ddp_s / local_s``."""
        return self.ddp_s / self.local_s if self.local_s else float("inf")

    @property
    def comm_fraction_ddp(self) -> float:
        """Share of the data-parallel run spent in (exposed) communication."""
        return 1.0 - self.compute_s / self.ddp_s if self.ddp_s else 0.0

    def to_dict(self) -> dict[str, float]:
        """Inputs and predictions as a flat dict (hours included, for reports)."""
        return {
            "steps": float(self.steps),
            "syncs": float(self.syncs),
            "compute_s": self.compute_s,
            "allreduce_s": self.allreduce_s,
            "sync_s": self.sync_s,
            "ddp_s": self.ddp_s,
            "local_s": self.local_s,
            "ddp_h": self.ddp_s / 3600,
            "local_h": self.local_s / 3600,
            "speedup": self.speedup,
        }


def predict_wall_clock(
    plan: Plan,
    compute_s_per_step: float,
    model_bytes: float,
    bandwidth_bits_per_s: float,
    num_workers: int,
    *,
    latency_s: float = 0.0,
    sync_bytes: float | None = None,
    ddp_overlap: float = 0.0,
) -> WallClockPrediction:
    """Predict the wall-clock time of data-parallel training and of local training with ``plan``'s rounds.

    Args:
        plan ([`Plan`]): the local run's rounds (from [`plan`]); its ``total_steps`` is also the data-parallel length.
        compute_s_per_step (`float`): seconds of one optimizer step of one worker without communication
            (forward, backward, optimizer; at the per-worker batch size of this ``num_workers``).
        model_bytes (`float`): bytes of one gradient all-reduce (4 x trainable parameters for fp32 gradients).
        bandwidth_bits_per_s (`float`): per-worker link bandwidth in bits per second.
        num_workers (`int`): N.
        latency_s (`float`, defaults to 0.0): per-hop latency in seconds.
        sync_bytes (`float`, *optional*): bytes of one parameter average; defaults to ``model_bytes`` (fp32 both).
        ddp_overlap (`float`, defaults to 0.0): fraction of each gradient all-reduce hidden behind the backward pass;
            0 is the paper's baseline, which did not overlap.

    Returns:
        [`WallClockPrediction`]: both times and their inputs.

    Example:

    ```python
    p = plan(QSRConfig(qsr_alpha=0.0175), lrs, warmup_steps=10_000)
    pred = predict_wall_clock(p, 0.75, 4 * 86_381_800, 25e9, 16)
    pred.ddp_s / 3600, pred.local_s / 3600
    ```
    """
    if compute_s_per_step < 0:
        raise ValueError(f"compute_s_per_step must be >= 0, got {compute_s_per_step}")
    if not 0.0 <= ddp_overlap <= 1.0:
        raise ValueError(f"ddp_overlap must be in [0, 1], got {ddp_overlap}")
    allreduce_s = ring_allreduce_seconds(model_bytes, bandwidth_bits_per_s, num_workers, latency_s)
    sync_s = ring_allreduce_seconds(
        model_bytes if sync_bytes is None else sync_bytes, bandwidth_bits_per_s, num_workers, latency_s
    )
    return WallClockPrediction(
        steps=plan.total_steps,
        syncs=plan.syncs,
        compute_s=plan.total_steps * compute_s_per_step,
        allreduce_s=allreduce_s,
        sync_s=sync_s,
        ddp_overlap=ddp_overlap,
    )


def implied_allreduce_seconds(ddp_s: float, local_s: float, steps: int, syncs: int) -> float:
    """All-reduce time that measured data-parallel and local wall-clock times imply under this cost model.

    Both runs share the compute, so ``ddp_s - local_s = (steps - syncs) * allreduce_s``.

    Args:
        ddp_s (`float`): measured seconds of the data-parallel run.
        local_s (`float`): measured seconds of the local run.
        steps (`int`): optimizer steps of both runs.
        syncs (`int`): syncs of the local run.

    Returns:
        `float`: seconds of one all-reduce.
    """
    if steps <= syncs:
        raise ValueError(f"need steps > syncs, got steps={steps}, syncs={syncs}")
    return (ddp_s - local_s) / (steps - syncs)


@dataclass(frozen=True)
class NodeLayout:
    """Nodes of ``per_node`` processes: a fast link inside a node, one slower link (per node) between nodes.

    Collectives that span nodes are costed at their two-level floor (reduce-scatter inside the node, all-reduce of the
    shards between nodes, all-gather inside): a node's link carries ``2 (nodes - 1) / nodes`` times the bytes once,
    however many of its processes take part.

    Args:
        nodes (`int`): number of nodes.
        per_node (`int`): processes per node.
        intra_bits_per_s (`float`): bandwidth of each process's link inside a node (NVLink, PCIe), bits per second.
        inter_bits_per_s (`float`): bandwidth of each node's network link, bits per second.
        latency_s (`float`, defaults to 0.0): per-hop latency, in seconds (both levels).
    """

    nodes: int
    per_node: int
    intra_bits_per_s: float
    inter_bits_per_s: float
    latency_s: float = 0.0

    def intra_allreduce_s(self, num_bytes: float) -> float:
        """One ring all-reduce of ``num_bytes`` inside a node."""
        return ring_allreduce_seconds(num_bytes, self.intra_bits_per_s, self.per_node, self.latency_s)

    def inter_allreduce_s(self, num_bytes: float) -> float:
        """A node's link carrying one ring all-reduce of ``num_bytes`` between nodes (split across its processes)."""
        return ring_allreduce_seconds(num_bytes, self.inter_bits_per_s, self.nodes, self.latency_s)

    def allreduce_s(self, num_bytes: float) -> float:
        """One all-reduce over all processes at the two-level floor: inside the node, then between nodes."""
        return self.intra_allreduce_s(num_bytes) + self.inter_allreduce_s(num_bytes)

    def intra_allgather_s(self, num_bytes: float) -> float:
        """One ring all-gather of ``num_bytes`` (the gathered size) inside a node: half a ring all-reduce."""
        hops = self.per_node - 1
        return hops / self.per_node * num_bytes * 8 / self.intra_bits_per_s + hops * self.latency_s


def predict_node_modes(
    plan: Plan, compute_s_per_step: float, model_bytes: float, layout: NodeLayout, ddp_overlap: float = 0.0
) -> dict[str, float]:
    """Predict the seconds of a run in each mode on ``layout``, all with ``plan``'s rounds.

    - ``ddp``: a gradient all-reduce over all processes every step (at the two-level floor);
    - ``qsr_process``: every process is a worker (the paper); one all-reduce over all processes per sync;
    - ``qsr_node`` (``qsr_worker="node"``, the engine's default floor path): a gradient all-reduce inside the node
      every step; at each sync local rank j all-reduces slice j (1/k of the model) with its peers on the other nodes
      (together one model's all-reduce on the node's link: the floor), then the node all-gathers the slices;
    - ``qsr_node_whole`` (``HierarchicalEngine.split_sync = False``): as ``qsr_node``, but each of the node's k
      processes all-reduces the whole model with its peers, so the node's link carries k times the floor;
    - ``qsr_fsdp2``: FSDP2 sharded inside the node (all-gather in forward and backward, reduce-scatter of the
      gradients: 1.5 intra-node all-reduces per step); at each sync every process averages its shard: the floor.

    Args:
        plan ([`Plan`]): the rounds; ``total_steps`` is also the data-parallel length.
        compute_s_per_step (`float`): seconds of one optimizer step without communication.
        model_bytes (`float`): bytes of the gradients (or parameters) of the whole model.
        layout ([`NodeLayout`]): nodes, processes per node and the two bandwidths.
        ddp_overlap (`float`, defaults to 0.0): share of the data-parallel all-reduce hidden behind backward.

    Returns:
        `dict[str, float]`: seconds per mode (``ddp_s``, ``qsr_process_s``, ``qsr_node_s``, ``qsr_node_whole_s``,
        ``qsr_fsdp2_s``) and the one-sync floor ``sync_floor_s``.
    """
    compute = plan.total_steps * compute_s_per_step
    intra, inter = layout.intra_allreduce_s(model_bytes), layout.inter_allreduce_s(model_bytes)
    node_steps = compute + plan.total_steps * intra
    return {
        "ddp_s": compute + plan.total_steps * (intra + inter) * (1.0 - ddp_overlap),
        "qsr_process_s": compute + plan.syncs * (intra + inter),
        "qsr_node_s": node_steps + plan.syncs * (inter + layout.intra_allgather_s(model_bytes)),
        "qsr_node_whole_s": node_steps + plan.syncs * layout.per_node * inter,
        "qsr_fsdp2_s": compute + plan.total_steps * 1.5 * intra + plan.syncs * inter,
        "sync_floor_s": inter,
    }
