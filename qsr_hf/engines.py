"""Backend adapters: detect how the model is wrapped, switch its per-step gradient all-reduce off, say what to average.

One adapter per backend, chosen once by [`detect_engine`]:

- `DDPEngine`: `torch.nn.parallel.DistributedDataParallel`. Its public ``no_sync()`` context is entered once and kept
  open for the whole run, so the C++ reducer never communicates (nested ``no_sync`` from ``accelerator.accumulate``
  restores it to off), and DDP's per-step buffer broadcast is skipped as well.
- `LocalEngine`: a single process; nothing to switch off, nothing to average.
- DeepSpeed: see `qsr_hf.deepspeed_engine` (ZeRO stage 0 only).
- FSDP and other sharded wrappers: refused, because each rank must hold full parameters and its own optimizer state.
"""

import contextlib
import gc

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import ProcessGroup

from qsr_hf.averaging import averaged_tensors


class LocalEngine:
    """Adapter for a single-process run: training proceeds normally, no averaging happens.

    Args:
        module (`nn.Module`): the model.
    """

    world_size = 1
    process_group: ProcessGroup | None = None
    can_average_optimizer_state = True  # the optimizer is a torch optimizer whose state tensors can be averaged

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def disable_gradient_sync(self) -> None:
        """Nothing to switch off."""

    def restore_gradient_sync(self) -> None:
        """Nothing to restore."""

    def averaged_tensors(self, average_buffers: bool) -> list[torch.Tensor]:
        """Return the tensors a sync would average."""
        return averaged_tensors(self.module, average_buffers)

    def after_average(self) -> None:
        """Nothing to propagate."""


class DDPEngine(LocalEngine):
    """Adapter for `DistributedDataParallel`: gradient all-reduce off for the whole run, parameters averaged in place.

    Args:
        ddp (`DistributedDataParallel`): the wrapped model.
    """

    def __init__(self, ddp: nn.parallel.DistributedDataParallel) -> None:
        super().__init__(ddp.module)
        self.ddp = ddp
        self.process_group = ddp.process_group
        self.world_size = dist.get_world_size(ddp.process_group)
        self._no_sync = contextlib.ExitStack()

    def disable_gradient_sync(self) -> None:
        """Enter ``ddp.no_sync()`` and keep it open until :meth:`restore_gradient_sync`."""
        self.restore_gradient_sync()
        self._no_sync.enter_context(self.ddp.no_sync())
        # DDP broadcasts rank 0's buffers in the first forward after construction even under no_sync (the flag starts
        # True and only forwards update it): that would overwrite each rank's own restored buffers on resume.
        self.ddp.require_forward_param_sync = False

    def restore_gradient_sync(self) -> None:
        """Leave the ``no_sync`` context: DDP reduces gradients again."""
        self._no_sync.close()
        self._no_sync = contextlib.ExitStack()


_FSDP_UNSUPPORTED = (
    "qsr_hf does not support FSDP: local steps need every rank to hold full parameters and its own optimizer state; "
    "use DDP (the default of `accelerate launch`/torchrun) or DeepSpeed ZeRO stage 0"
)


def _unwrap_compiled(model: nn.Module) -> nn.Module:
    # torch.compile wraps the DDP module in an OptimizedModule that keeps it as `_orig_mod`
    return getattr(model, "_orig_mod", model)


def _is_deepspeed(model: nn.Module) -> bool:
    return type(model).__name__ == "DeepSpeedEngine" or any(
        c.__name__ == "DeepSpeedEngine" for c in type(model).__mro__
    )


def _is_fsdp(model: nn.Module) -> bool:
    if type(model).__name__ == "FullyShardedDataParallel":
        return True
    with contextlib.suppress(ImportError):
        from torch.distributed.fsdp import FSDPModule

        return any(isinstance(m, FSDPModule) for m in model.modules())
    return False


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
        is_wrapper = issubclass(type(obj), nn.Module) and obj is not module and getattr(obj, "module", None) is module
        if is_wrapper and (
            isinstance(obj, nn.parallel.DistributedDataParallel) or _is_deepspeed(obj) or _is_fsdp(obj)
        ):
            return obj
    return None


def detect_engine(model: nn.Module, process_group: ProcessGroup | None = None) -> LocalEngine:
    """Return the adapter for ``model`` (wrapped or not), or raise a clear error for what local steps cannot run on.

    Args:
        model (`nn.Module`): a DDP-wrapped model, a DeepSpeed engine, or an unwrapped model (its wrapper is searched).
        process_group (`ProcessGroup`, *optional*): for an unwrapped model in a multi-process run, the group to use.

    Returns:
        The adapter (`LocalEngine` for a single-process run).

    Raises:
        `NotImplementedError`: FSDP, or a DeepSpeed ZeRO stage other than 0.
        `ValueError`: a multi-process run whose model is not wrapped for data parallelism.
    """
    model = _unwrap_compiled(model)
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1
    if distributed and not isinstance(model, nn.parallel.DistributedDataParallel) and not _is_deepspeed(model):
        if _is_fsdp(model):
            raise NotImplementedError(_FSDP_UNSUPPORTED)
        wrapper = find_wrapper(model)
        if wrapper is None:
            raise ValueError(
                f"this is a {dist.get_world_size(process_group)}-process run but the model is not wrapped for data "
                "parallelism: pass the model returned by `accelerator.prepare` (DistributedDataParallel) or a "
                "DeepSpeed engine"
            )
        model = wrapper
    if _is_fsdp(model):
        raise NotImplementedError(_FSDP_UNSUPPORTED)
    if _is_deepspeed(model):
        from qsr_hf.deepspeed_engine import DeepSpeedEngineAdapter

        return DeepSpeedEngineAdapter(model)
    if isinstance(model, nn.parallel.DistributedDataParallel):
        if dist.get_world_size(model.process_group) == 1:
            return LocalEngine(model.module)
        return DDPEngine(model)
    return LocalEngine(model)
