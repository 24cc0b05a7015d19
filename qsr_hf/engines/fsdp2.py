"""`FSDP2Engine`: local steps on a model sharded with FSDP2 (``fully_shard``) inside each node; a node is one QSR
worker, and a sync averages every rank's local shards across nodes.

The model is sharded on the node's 1-D mesh, e.g. ``fully_shard(model, mesh=mesh["shard"])`` with ``mesh`` a 2-D
``(replicate, shard)`` `DeviceMesh`: FSDP all-gathers parameters and reduce-scatters gradients inside the node only,
and parameters plus optimizer state stay sharded there. The ranks holding the same shard on every node (the
``replicate`` dimension) form the group a sync averages over. Each rank averages its own shard, so the inter-node
traffic of one sync is one model's worth split across the node's processes (the floor).

Why not FSDP2's own HSDP (``fully_shard(model, mesh=mesh)`` on the 2-D mesh) with
``set_requires_all_reduce(False)``: that flag is meant for gradient accumulation. FSDP keeps the reduce-scattered
gradient for a later all-reduce and leaves ``param.grad`` unset (torch 2.13), so the optimizer does not step and the
replicas stay equal. Such a model is refused with a message saying how to shard it instead.

Averaging: DTensor local shards cannot be re-bound to views of a flat buffer, so the shards are copied into
persistent fp32 (the sharded parameters' own dtype, also under a `MixedPrecisionPolicy`) tensors before the
all-reduce and copied back after it.
For the same reason ``qsr_overlap_sync`` is refused (the delayed fold-in would overwrite the step taken while the
average was in flight). ``qsr/bytes_intra_node`` counts FSDP's per-step all-gathers and reduce-scatters
([`fsdp2_bytes_per_step`]).
"""

import math

import torch
import torch.distributed as dist
from torch import nn

from qsr_hf.core.config import QSRConfig
from qsr_hf.core.logging_utils import get_logger
from qsr_hf.engines.hierarchical import OVERLAP_UNSUPPORTED, NodeWorkerEngine, node_groups


logger = get_logger(__name__)


HSDP_UNSUPPORTED = (
    "qsr_hf cannot take local steps with FSDP2's own hybrid sharding (a 2-D mesh given to fully_shard): HSDP "
    "all-reduces gradients across replicas every step, and set_requires_all_reduce(False) only defers that "
    "all-reduce (param.grad stays unset, the optimizer would not step). Shard inside the node instead: "
    'fully_shard(model, mesh=mesh["shard"]) on a 2-D (replicate, shard) mesh (Accelerate: '
    'fully_shard(model, mesh=accelerator.torch_device_mesh["dp_shard_cp"]) before accelerator.prepare)'
)
FULL_SHARD_UNSUPPORTED = (
    "qsr_hf does not support FSDP sharded across all {world} ranks (no replicas to average): shard inside the "
    'node only, fully_shard(model, mesh=mesh["shard"]) with mesh = init_device_mesh(device, (nodes, '
    'per_node), mesh_dim_names=("replicate", "shard")), or use DDP'
)


def _sharded_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def validate_fsdp2(model: nn.Module) -> int:
    """Check that ``model`` is sharded inside nodes only; return the shard group size (processes per node).

    Args:
        model (`nn.Module`): the root module given to ``fully_shard``.

    Returns:
        `int`: processes per node.

    Raises:
        `NotImplementedError`: a 2-D (HSDP) mesh, or sharding across all ranks.
    """
    meshes = [p.device_mesh for p in _sharded_params(model) if hasattr(p, "device_mesh")]
    if not meshes or any(m != meshes[0] for m in meshes):
        raise NotImplementedError("qsr_hf needs every trainable FSDP2 parameter sharded on one and the same mesh")
    mesh = meshes[0]
    if mesh.ndim != 1:
        raise NotImplementedError(HSDP_UNSUPPORTED)
    world = dist.get_world_size()
    if mesh.size() == world:
        raise NotImplementedError(FULL_SHARD_UNSUPPORTED.format(world=world))
    ranks = mesh.mesh.flatten().tolist()
    node = dist.get_rank() // mesh.size()
    if ranks != list(range(node * mesh.size(), (node + 1) * mesh.size())):
        raise NotImplementedError(
            f"qsr_hf expects each FSDP2 shard group to be a node's consecutive ranks, got {ranks} on rank "
            f"{dist.get_rank()}: build the mesh as init_device_mesh(device, (nodes, per_node))"
        )
    return mesh.size()


def fsdp2_bytes_per_step(model: nn.Module, node_size: int) -> int:
    """Bytes one rank moves inside its node per optimizer step under FSDP2 (the [`SyncStats`] conventions).

    Per parameter group (one per ``fully_shard`` call): one all-gather in forward, a second in backward if the group
    reshards after forward (FSDP2's default for every group but the root), one reduce-scatter of the gradients. Each
    moves (k - 1) x this rank's padded shard (dim 0 padded to a multiple of k), all-gathers in the compute dtype
    (``MixedPrecisionPolicy.param_dtype``), reduce-scatters in ``reduce_dtype``. Read from FSDP2's parameter groups
    (private attributes of torch 2.13) before the first forward.

    Args:
        model (`nn.Module`): the root module given to ``fully_shard``.
        node_size (`int`): k, the processes of the shard group.

    Returns:
        `int`: bytes per step (0 if FSDP2's layout could not be read).
    """
    from torch.distributed.fsdp import FSDPModule

    total = 0
    try:
        for module in model.modules():
            if not isinstance(module, FSDPModule):
                continue
            state = module._get_fsdp_state()
            root_keeps = module is model and state._auto_reshard_after_forward
            for group in state._fsdp_param_groups:
                params = group.fsdp_params
                numel = sum(math.prod(fp.padded_sharded_param_size) for fp in params)
                gather = group.mp_policy.param_dtype or params[0].sharded_param.dtype
                reduce = group.mp_policy.reduce_dtype or gather
                gathers = 2 if group.post_forward_mesh_info is not None and not root_keeps else 1
                total += (node_size - 1) * numel * (gathers * gather.itemsize + reduce.itemsize)
    except AttributeError:  # another torch version's private layout: count nothing rather than fail the run
        logger.warning(
            "qsr_hf: could not read FSDP2's parameter groups; qsr/bytes_intra_node leaves out FSDP's per-step traffic",
            main_process_only=True,
        )
        return 0
    return total


class FSDP2Engine(NodeWorkerEngine):
    """Adapter for a model sharded with FSDP2 inside each node: the shard group is one QSR worker.

    Args:
        model (`nn.Module`): the root module given to ``fully_shard`` on the node's 1-D mesh.

    Raises:
        `NotImplementedError`: HSDP on a 2-D mesh, sharding across all ranks, or a non-contiguous shard group.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.node_size = validate_fsdp2(model)
        self.node_group, self.process_group = node_groups(self.node_size)
        self.world_size = dist.get_world_size(self.process_group)
        self._shards: list[torch.Tensor] = []
        self._copies: list[torch.Tensor] = []
        self.intra_node_bytes_per_step = fsdp2_bytes_per_step(model, self.node_size)

    def check_config(self, config: QSRConfig) -> None:
        """Refuse ``qsr_overlap_sync`` (a sync averages copies of the DTensor shards)."""
        if config.qsr_overlap_sync:
            raise NotImplementedError(
                OVERLAP_UNSUPPORTED.format(
                    engine="FSDP2 sharded inside nodes",
                    copies="of the local shards, copied back into the DTensors afterwards",
                    alternative=" (syncs block; they send one model's worth per node, the floor)",
                )
            )

    def _local_shards(self) -> list[torch.Tensor]:
        return [p.to_local() for p in _sharded_params(self.module)]

    @torch.no_grad()
    def parameter_tensors(self) -> list[torch.Tensor]:
        """Copies of this rank's local shards, refreshed at each call (copy-in); averaged across nodes."""
        shards = self._local_shards()
        if len(shards) != len(self._copies) or any(
            a.shape != b.shape or a.dtype != b.dtype for a, b in zip(shards, self._copies, strict=False)
        ):
            self._copies = [torch.empty_like(s) for s in shards]
        for copy, shard in zip(self._copies, shards, strict=True):
            copy.copy_(shard)
        self._shards = shards
        return list(self._copies)

    @torch.no_grad()
    def after_parameters_averaged(self) -> None:
        """Copy the averaged shards back into the sharded parameters (copy-out)."""
        for shard, copy in zip(self._shards, self._copies, strict=True):
            shard.copy_(copy)
