"""Backend adapters ("engines"): detect how the model is wrapped, switch its per-step gradient all-reduce off, say
what to average.

One module per backend, each an [`Engine`] subclass, and one registry entry each in `_REGISTRY` below: a predicate on
the (wrapped) model and a factory. [`detect_engine`] walks the registry once, at the start of training.

- `ddp.DDPEngine`: `DistributedDataParallel`.
- `hierarchical.HierarchicalEngine`: DDP with ``qsr_worker="node"`` (gradients all-reduced inside the node).
- `fsdp2.FSDP2Engine`: FSDP2 (``fully_shard``) on each node's 1-D mesh; replicas of a shard are averaged.
- `deepspeed.DeepSpeedEngineAdapter`: a `DeepSpeedEngine` with ZeRO stage 0 (imported only when one is found).
- `single_process.SingleProcessEngine`: one process, nothing to do.
- FSDP1, FSDP2 sharded across all ranks or with its own hybrid sharding: refused (nothing local to average, or a
  per-step all-reduce across replicas that cannot be switched off).
"""

import contextlib
import gc
from collections.abc import Callable
from typing import NamedTuple

import torch.distributed as dist
from torch import nn
from torch.distributed import ProcessGroup

from qsr_hf.engines.base import Engine
from qsr_hf.engines.ddp import DDPEngine
from qsr_hf.engines.single_process import SingleProcessEngine


__all__ = ["FSDP_UNSUPPORTED", "Engine", "Topology", "detect_engine", "find_wrapper"]

FSDP_UNSUPPORTED = (
    "qsr_hf does not support FSDP1 nor FSDP sharded across all ranks: local steps need replicas that hold their "
    "own parameters and optimizer state; use DDP (the default of `accelerate launch`/torchrun), DeepSpeed ZeRO stage "
    '0, or FSDP2 sharded inside each node (fully_shard(model, mesh=mesh["shard"]), see qsr_hf.engines.fsdp2)'
)
_NODE_DEEPSPEED = (
    "qsr_worker='node' is not supported with DeepSpeed: use DDP (accelerate's multi-GPU launch) for hierarchical QSR, "
    "or qsr_worker='process' with DeepSpeed ZeRO stage 0"
)


class Topology(NamedTuple):
    """What one QSR worker is (``QSRConfig.qsr_worker``) and the processes per node (``qsr_node_size``)."""

    worker: str = "process"
    node_size: int | None = None


def _unwrap_compiled(model: nn.Module) -> nn.Module:
    # torch.compile wraps the DDP module in an OptimizedModule that keeps it as `_orig_mod`
    return getattr(model, "_orig_mod", model)


def _is_deepspeed(model: nn.Module) -> bool:
    return any(c.__name__ == "DeepSpeedEngine" for c in type(model).__mro__)


def _is_ddp(model: nn.Module) -> bool:
    return isinstance(model, nn.parallel.DistributedDataParallel)


def _is_fsdp1(model: nn.Module) -> bool:
    return type(model).__name__ == "FullyShardedDataParallel" or any(
        type(m).__name__ == "FullyShardedDataParallel" for m in model.modules()
    )


def _is_fsdp2(model: nn.Module) -> bool:
    with contextlib.suppress(ImportError):
        from torch.distributed.fsdp import FSDPModule

        return any(isinstance(m, FSDPModule) for m in model.modules())
    return False


def _refuse_fsdp(model: nn.Module, topology: Topology) -> Engine:
    raise NotImplementedError(FSDP_UNSUPPORTED)


def _fsdp2_engine(model: nn.Module, topology: Topology) -> Engine:
    from qsr_hf.engines.fsdp2 import FSDP2Engine

    return FSDP2Engine(model)  # the shard group is the worker, whatever qsr_worker says


def _deepspeed_engine(model: nn.Module, topology: Topology) -> Engine:
    if topology.worker == "node":
        raise NotImplementedError(_NODE_DEEPSPEED)
    from qsr_hf.engines.deepspeed import DeepSpeedEngineAdapter

    return DeepSpeedEngineAdapter(model)


def _ddp_engine(model: nn.Module, topology: Topology) -> Engine:
    if dist.get_world_size(model.process_group) == 1:
        return SingleProcessEngine(model.module)
    return DDPEngine(model)


def _is_node_ddp(model: nn.Module, topology: Topology) -> bool:
    return topology.worker == "node" and _is_ddp(model) and dist.get_world_size(model.process_group) > 1


def _hierarchical_engine(model: nn.Module, topology: Topology) -> Engine:
    from qsr_hf.engines.hierarchical import HierarchicalEngine

    return HierarchicalEngine(model, topology.node_size)


def _any(predicate: Callable[[nn.Module], bool]) -> Callable[[nn.Module, Topology], bool]:
    return lambda model, topology: predicate(model)


# (is this the backend?, build its engine): the first match wins; a new backend is one module and one entry here
_REGISTRY: list[tuple[Callable[[nn.Module, Topology], bool], Callable[[nn.Module, Topology], Engine]]] = [
    (_any(_is_fsdp1), _refuse_fsdp),
    (_any(_is_fsdp2), _fsdp2_engine),
    (_any(_is_deepspeed), _deepspeed_engine),
    (_is_node_ddp, _hierarchical_engine),
    (_any(_is_ddp), _ddp_engine),
]


def _is_wrapper(model: nn.Module) -> bool:
    return any(matches(model, Topology()) for matches, _ in _REGISTRY)


def find_wrapper(module: nn.Module) -> nn.Module | None:
    """Find the live data-parallel wrapper (DDP, DeepSpeed engine, FSDP) whose ``.module`` is ``module``.

    Trainer callbacks receive the unwrapped model only, so the wrapper is looked up among live objects once, at the
    start of training (about 0.1 s).

    Args:
        module (`nn.Module`): the unwrapped model.

    Returns:
        `nn.Module` or `None`: the wrapper, if one exists.
    """
    for obj in gc.get_objects():
        wraps = issubclass(type(obj), nn.Module) and obj is not module and getattr(obj, "module", None) is module
        if wraps and _is_wrapper(obj):
            return obj
    return None


def detect_engine(
    model: nn.Module, process_group: ProcessGroup | None = None, topology: Topology | None = None
) -> Engine:
    """Return the adapter for ``model`` (wrapped or not), or raise a clear error for what local steps cannot run on.

    Args:
        model (`nn.Module`): a DDP-wrapped model, a DeepSpeed engine, or an unwrapped model (its wrapper is searched).
        process_group (`ProcessGroup`, *optional*): for an unwrapped model in a multi-process run, the group to use.
        topology ([`Topology`], *optional*): what a QSR worker is; defaults to one process (the paper).

    Returns:
        [`Engine`]: the adapter ([`SingleProcessEngine`] for a single-process run).

    Raises:
        `NotImplementedError`: FSDP1, FSDP2 sharded across all ranks or on a 2-D (HSDP) mesh, or a DeepSpeed ZeRO
            stage other than 0.
        `ValueError`: a multi-process run whose model is not wrapped for data parallelism.
    """
    model = _unwrap_compiled(model)
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1
    if distributed and not _is_wrapper(model):
        wrapper = find_wrapper(model)
        if wrapper is None:
            raise ValueError(
                f"this is a {dist.get_world_size(process_group)}-process run but the model is not wrapped for data "
                "parallelism: pass the model returned by `accelerator.prepare` (DistributedDataParallel) or a "
                "DeepSpeed engine"
            )
        model = wrapper
    topology = Topology() if topology is None else topology
    for matches, build in _REGISTRY:
        if matches(model, topology):
            return build(model, topology)
    return SingleProcessEngine(model)
