"""Backend adapters ("engines"): detect how the model is wrapped, switch its per-step gradient all-reduce off, say
what to average.

One module per backend, each an [`Engine`] subclass, and one registry entry each in `_REGISTRY` below: a predicate on
the (wrapped) model and a factory. [`detect_engine`] walks the registry once, at the start of training.

- `ddp.DDPEngine`: `DistributedDataParallel`.
- `deepspeed.DeepSpeedEngineAdapter`: a `DeepSpeedEngine` with ZeRO stage 0 (imported only when one is found).
- `single_process.SingleProcessEngine`: one process, nothing to do.
- FSDP and other sharded wrappers: refused, because each rank must hold full parameters and its own optimizer state.
"""

import contextlib
import gc
from collections.abc import Callable

import torch.distributed as dist
from torch import nn
from torch.distributed import ProcessGroup

from qsr_hf.engines.base import Engine
from qsr_hf.engines.ddp import DDPEngine
from qsr_hf.engines.single_process import SingleProcessEngine


__all__ = ["FSDP_UNSUPPORTED", "Engine", "detect_engine", "find_wrapper"]

FSDP_UNSUPPORTED = (
    "qsr_hf does not support FSDP: local steps need every rank to hold full parameters and its own optimizer state; "
    "use DDP (the default of `accelerate launch`/torchrun) or DeepSpeed ZeRO stage 0"
)


def _unwrap_compiled(model: nn.Module) -> nn.Module:
    # torch.compile wraps the DDP module in an OptimizedModule that keeps it as `_orig_mod`
    return getattr(model, "_orig_mod", model)


def _is_deepspeed(model: nn.Module) -> bool:
    return any(c.__name__ == "DeepSpeedEngine" for c in type(model).__mro__)


def _is_ddp(model: nn.Module) -> bool:
    return isinstance(model, nn.parallel.DistributedDataParallel)


def _is_fsdp(model: nn.Module) -> bool:
    if type(model).__name__ == "FullyShardedDataParallel":
        return True
    with contextlib.suppress(ImportError):
        from torch.distributed.fsdp import FSDPModule

        return any(isinstance(m, FSDPModule) for m in model.modules())
    return False


def _refuse_fsdp(model: nn.Module) -> Engine:
    raise NotImplementedError(FSDP_UNSUPPORTED)


def _deepspeed_engine(model: nn.Module) -> Engine:
    from qsr_hf.engines.deepspeed import DeepSpeedEngineAdapter

    return DeepSpeedEngineAdapter(model)


def _ddp_engine(model: nn.Module) -> Engine:
    if dist.get_world_size(model.process_group) == 1:
        return SingleProcessEngine(model.module)
    return DDPEngine(model)


# (is this the backend?, build its engine): the first match wins; a new backend is one module and one entry here
_REGISTRY: list[tuple[Callable[[nn.Module], bool], Callable[[nn.Module], Engine]]] = [
    (_is_fsdp, _refuse_fsdp),
    (_is_deepspeed, _deepspeed_engine),
    (_is_ddp, _ddp_engine),
]


def _is_wrapper(model: nn.Module) -> bool:
    return any(matches(model) for matches, _ in _REGISTRY)


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


def detect_engine(model: nn.Module, process_group: ProcessGroup | None = None) -> Engine:
    """Return the adapter for ``model`` (wrapped or not), or raise a clear error for what local steps cannot run on.

    Args:
        model (`nn.Module`): a DDP-wrapped model, a DeepSpeed engine, or an unwrapped model (its wrapper is searched).
        process_group (`ProcessGroup`, *optional*): for an unwrapped model in a multi-process run, the group to use.

    Returns:
        [`Engine`]: the adapter ([`SingleProcessEngine`] for a single-process run).

    Raises:
        `NotImplementedError`: FSDP, or a DeepSpeed ZeRO stage other than 0.
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
    for matches, build in _REGISTRY:
        if matches(model):
            return build(model)
    return SingleProcessEngine(model)
