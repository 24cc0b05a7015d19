"""Which tensors a sync averages: trainable parameters, persistent float buffers, optionally optimizer state."""

import torch
from torch import nn


def averaged_tensors(module: nn.Module, average_buffers: bool) -> list[torch.Tensor]:
    """Select what a sync averages: trainable parameters and, optionally, persistent floating-point buffers.

    Frozen parameters and non-persistent buffers (constants such as position ids) are left out: they are equal on all
    ranks already, and averaging equal values is not bit-exact for every world size.

    Args:
        module (`nn.Module`): the unwrapped model.
        average_buffers (`bool`): include persistent floating-point buffers (BatchNorm running statistics).

    Returns:
        `list[torch.Tensor]`: the tensors, each once, in module order.
    """
    seen: set[int] = set()
    tensors: list[torch.Tensor] = []
    for p in module.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            tensors.append(p)
    if average_buffers:
        for sub in module.modules():
            for name, buf in sub.named_buffers(recurse=False):
                persistent = name not in getattr(sub, "_non_persistent_buffers_set", set())
                if buf is not None and buf.is_floating_point() and persistent and id(buf) not in seen:
                    seen.add(id(buf))
                    tensors.append(buf)
    return tensors


def optimizer_state_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The optimizer's per-parameter floating-point state tensors (momentum, Adam moments), in parameter order.

    Scalars (Adam's ``step``) are left out: they are equal on every rank. Parameters without state yet (before the
    first step) contribute nothing, so the list grows once the optimizer has stepped.

    Args:
        optimizer (`torch.optim.Optimizer`): the (possibly wrapped) optimizer; its ``param_groups`` and ``state``.

    Returns:
        `list[torch.Tensor]`: the tensors, in the order of ``param_groups`` (the same on every rank).
    """
    tensors: list[torch.Tensor] = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            for value in optimizer.state.get(p, {}).values():
                if torch.is_tensor(value) and value.is_floating_point() and value.dim() > 0:
                    tensors.append(value)
    return tensors
