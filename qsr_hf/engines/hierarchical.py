"""`HierarchicalEngine`: a node is one QSR worker. Gradients are averaged inside the node every step, parameters
across nodes every H steps.

The layout of torch's ``PostLocalSGDOptimizer`` with its default per-node subgroup: DDP stays wrapped over all ranks,
but a communication hook sends each gradient bucket's all-reduce to the rank's node group instead of the world, so
the processes of a node take identical steps on the node's combined batch. A sync then averages parameters across the
inter-node group: the ranks holding the same local rank on every node (parameters already agree inside a node).
Floating-point buffers (BatchNorm statistics) are averaged across nodes and then inside the node, so every rank ends
a sync with the mean over all ranks.

The inter-node floor (``split_sync=True``, the default): parameters agree inside a node, so local rank j averages
only slice j (1/k) of the flat parameters across nodes and the node all-gathers the averaged slices
([`NodeSlices`]): one model's worth per node crosses the inter-node link per sync instead of k. With two nodes the
result is bitwise that of averaging the whole model on every process (a sum of two values does not depend on the
order); with more nodes the all-reduce of a slice may add in another order (rounding-level differences).
``qsr_overlap_sync`` is refused on this path (:meth:`HierarchicalEngine.check_config`): the slices are copies, so the
delayed fold-in would overwrite the step taken while the average was in flight. The all-gather and the buffers
averaged inside the node are added to ``qsr/bytes_intra_node`` as they happen.

Nodes are ``rank // node_size`` (the contiguous layout torchrun and ``accelerate launch`` use). ``node_size`` comes
from ``qsr_node_size`` or the launcher's ``LOCAL_WORLD_SIZE``.
"""

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import ProcessGroup
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from qsr_hf.core.config import QSRConfig
from qsr_hf.core.logging_utils import get_logger
from qsr_hf.engines.base import Engine
from qsr_hf.sync.averaging import ParameterAverager
from qsr_hf.sync.node_slices import NodeSlices
from qsr_hf.sync.tensor_selection import averaged_tensors


logger = get_logger(__name__)

OVERLAP_UNSUPPORTED = (
    "qsr_overlap_sync=True is not supported with {engine}: a sync there averages copies ({copies}) and writes them "
    "back, so the one-step-delayed fold-in would overwrite the optimizer step taken while the average was in flight "
    "and drop its local change. Set qsr_overlap_sync=False{alternative}"
)


def resolve_node_size(world_size: int, node_size: int | None = None) -> int:
    """Processes per node: ``node_size`` if given, else the launcher's ``LOCAL_WORLD_SIZE``; checked against the world.

    Args:
        world_size (`int`): processes in the run.
        node_size (`int`, *optional*): the ``qsr_node_size`` setting.

    Returns:
        `int`: processes per node, a divisor of ``world_size``.

    Raises:
        `ValueError`: no node size is known, or it does not divide the world size.
    """
    if node_size is None:
        env = os.environ.get("LOCAL_WORLD_SIZE")
        if env is None:
            raise ValueError(
                "qsr_worker='node' needs the number of processes per node: launch with torchrun/accelerate launch "
                "(they set LOCAL_WORLD_SIZE) or set qsr_node_size"
            )
        node_size = int(env)
    if node_size < 1 or world_size % node_size:
        raise ValueError(
            f"qsr_node_size must be >= 1 and divide the world size {world_size}, got {node_size}: set it to the "
            "number of processes on each node (every node must run the same number)"
        )
    return node_size


def node_groups(node_size: int) -> tuple[ProcessGroup, ProcessGroup]:
    """Create this rank's node group and inter-node group (a collective call: every rank must make it).

    Args:
        node_size (`int`): processes per node; nodes are ``rank // node_size``.

    Returns:
        `tuple[ProcessGroup, ProcessGroup]`: (ranks of this node, ranks with this local rank on every node).
    """
    world_size = dist.get_world_size()
    nodes = world_size // node_size
    intra, _ = dist.new_subgroups_by_enumeration(
        [list(range(n * node_size, (n + 1) * node_size)) for n in range(nodes)]
    )
    inter, _ = dist.new_subgroups_by_enumeration(
        [list(range(local, world_size, node_size)) for local in range(node_size)]
    )
    return intra, inter


class _HookState:
    """State of the comm hook: which group the gradient buckets are averaged over, and how many times."""

    def __init__(self, node_group: ProcessGroup) -> None:
        self.node_group = node_group
        self.local = False
        self.node_allreduces = 0

    def set_local(self, local: bool) -> None:
        """Average gradient buckets inside the node (``True``) or over all ranks."""
        self.local = local

    def group(self) -> ProcessGroup | None:
        """The group of the next gradient bucket's all-reduce."""
        if self.local:
            self.node_allreduces += 1
            return self.node_group
        return None  # the world: plain data-parallel training


def _node_allreduce_hook(state: _HookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    return allreduce_hook(state.group(), bucket)


class NodeWorkerEngine(Engine):
    """Common part of the engines whose QSR worker is a node (a group of ranks that agree on the parameters).

    Subclasses set ``node_group`` (this node's ranks), ``process_group`` (the inter-node group) and ``node_size``,
    and may override :meth:`parameter_tensors` / :meth:`after_parameters_averaged`. Float buffers differ between the
    ranks of a node (each saw its own batches): they are averaged across nodes with the parameters, then inside the
    node, so a sync leaves every rank with the mean over all ranks.
    """

    node_group: ProcessGroup
    node_size: int = 1

    def __init__(self, module: nn.Module) -> None:
        super().__init__(module)
        self._buffer_averager: ParameterAverager | None = None
        self._buffer_copies: list[torch.Tensor] = []
        self._average_buffers = False
        self._restoring = False

    def parameter_tensors(self) -> list[torch.Tensor]:
        """The parameter tensors a sync averages across nodes (trainable parameters by default)."""
        return averaged_tensors(self.module, average_buffers=False)

    def after_parameters_averaged(self) -> None:
        """Propagate averaged parameter tensors (nothing by default)."""

    def _buffers(self) -> list[torch.Tensor]:
        return [t for t in averaged_tensors(self.module, True) if not isinstance(t, nn.Parameter)]

    def averaged_tensors(self, average_buffers: bool) -> list[torch.Tensor]:
        """Parameters (:meth:`parameter_tensors`) and, optionally, float buffers; all averaged across nodes."""
        self._average_buffers = average_buffers
        return self.parameter_tensors() + (self._buffers() if average_buffers else [])

    def after_average(self) -> None:
        """Propagate the parameters, then average the float buffers inside the node."""
        self.after_parameters_averaged()
        if self._restoring:  # after a checkpoint load: the buffers are this rank's saved ones, keep them
            self._restoring = False
            return
        if not self._average_buffers or self.node_size == 1:
            return
        buffers = self._buffers()
        if not buffers:
            return
        # the buffers are views of the inter-node averager's flat buffer: average copies, so neither re-binds them
        if self._buffer_averager is None or len(self._buffer_copies) != len(buffers):
            self._buffer_copies = [b.detach().clone() for b in buffers]
            self._buffer_averager = ParameterAverager(self._buffer_copies, self.node_group)
        with torch.no_grad():
            for copy, buffer in zip(self._buffer_copies, buffers, strict=True):
                copy.copy_(buffer)
            self.count_intra_node_bytes(self._buffer_averager.average())
            for copy, buffer in zip(self._buffer_copies, buffers, strict=True):
                buffer.copy_(copy)

    def after_restore(self) -> None:
        """Propagate the parameters only: the buffers were put back to this rank's own values, keep them."""
        self.after_parameters_averaged()

    def local_state_dict(self) -> dict[str, Any]:
        """The node layout, checked on resume."""
        return {"node_size": self.node_size}

    def load_local_state_dict(self, state: dict[str, Any]) -> None:
        """Refuse a checkpoint written with another number of processes per node."""
        self._restoring = True
        if state.get("node_size", self.node_size) != self.node_size:
            raise ValueError(
                f"this checkpoint was written with {state['node_size']} processes per node, the run has "
                f"{self.node_size}: resume with the same layout"
            )


class HierarchicalEngine(NodeWorkerEngine):
    """Adapter for DDP over all ranks with one QSR worker per node.

    Args:
        ddp (`DistributedDataParallel`): the model, wrapped over the default (world) group.
        node_size (`int`, *optional*): processes per node (``qsr_node_size``); defaults to ``LOCAL_WORLD_SIZE``.
        split_sync (`bool`, *optional*): each process averages 1/k of the parameters across nodes, then the node
            all-gathers them (the inter-node floor); `False`: every process averages the whole model across nodes.
            Defaults to the class attribute ``HierarchicalEngine.split_sync`` (`True`).

    Raises:
        `ValueError`: the node size is unknown or does not divide the world size, or DDP is not over the world.
        `RuntimeError`: DDP already has a communication hook (DDP takes one only).
    """

    split_sync: bool = True

    def __init__(
        self, ddp: nn.parallel.DistributedDataParallel, node_size: int | None = None, split_sync: bool | None = None
    ) -> None:
        super().__init__(ddp.module)
        if dist.get_world_size(ddp.process_group) != dist.get_world_size():
            raise ValueError("qsr_worker='node' needs the model wrapped in DDP over all ranks (the default group)")
        if getattr(ddp, "_comm_hooks", None):
            raise RuntimeError(
                "qsr_worker='node' registers a DDP communication hook, but this model already has one (DDP takes "
                "one only): remove it, or use qsr_worker='process'"
            )
        self.ddp = ddp
        self.node_size = resolve_node_size(dist.get_world_size(), node_size)
        self.node_group, self.process_group = node_groups(self.node_size)
        self.world_size = dist.get_world_size(self.process_group)  # QSR workers: the nodes
        self._hook = _HookState(self.node_group)
        ddp.register_comm_hook(self._hook, _node_allreduce_hook)
        if ddp.find_unused_parameters:
            logger.warning(
                "qsr_hf: find_unused_parameters=True makes DDP all-reduce a small used-parameter map over all ranks "
                "on every step (between nodes too); set ddp_find_unused_parameters=False if every parameter is used",
                main_process_only=True,
            )
        self._broadcast_buffers = ddp.broadcast_buffers
        split = type(self).split_sync if split_sync is None else split_sync
        self._slices = NodeSlices(self.node_group) if split and self.node_size > 1 else None

    def parameter_tensors(self) -> list[torch.Tensor]:
        """The parameters, or with ``split_sync`` this rank's slice of them (copied in at each call)."""
        params = super().parameter_tensors()
        return params if self._slices is None else self._slices.pieces(params)

    def check_config(self, config: QSRConfig) -> None:
        """Refuse ``qsr_overlap_sync`` on the floor path (each process averages a copy of its slice)."""
        if config.qsr_overlap_sync and self._slices is not None:
            raise NotImplementedError(
                OVERLAP_UNSUPPORTED.format(
                    engine="qsr_worker='node' on the inter-node floor path (HierarchicalEngine.split_sync, the default)",
                    copies="each process's slice of the parameters, all-gathered inside the node afterwards",
                    alternative=", or average the whole model on every process with HierarchicalEngine.split_sync = "
                    "False (k times the bytes between nodes), or use qsr_worker='process'",
                )
            )

    def after_parameters_averaged(self) -> None:
        """With ``split_sync``: all-gather the averaged slices inside the node into the parameters."""
        if self._slices is not None:
            self._slices.gather()
            self.count_intra_node_bytes(self._slices.gather_bytes)

    @property
    def intra_node_bytes_per_sync(self) -> int:
        """Bytes each rank receives inside its node per sync from the all-gather of the slices (0 without split).

        0 before the first sync (the slices are laid out then); the BatchNorm statistics averaged inside the node come
        on top.
        """
        return 0 if self._slices is None else self._slices.gather_bytes

    @property
    def node_allreduces(self) -> int:
        """Gradient-bucket all-reduces sent inside the node since local training started."""
        return self._hook.node_allreduces

    @property
    def intra_node_bytes_per_step(self) -> int:
        """Bytes each rank all-reduces inside its node per optimizer step (the gradients)."""
        return sum(p.numel() * p.element_size() for p in self.module.parameters() if p.requires_grad)

    def disable_gradient_sync(self) -> None:
        """Average gradient buckets inside the node only, and stop DDP's per-step buffer broadcast over all ranks."""
        self._hook.set_local(True)
        self.ddp.broadcast_buffers = False

    def restore_gradient_sync(self) -> None:
        """Average gradients over all ranks again (plain data-parallel training)."""
        self._hook.set_local(False)
        self.ddp.broadcast_buffers = self._broadcast_buffers
