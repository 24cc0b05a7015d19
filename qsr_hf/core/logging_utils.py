"""Rank-aware logging that works with or without an initialised `Accelerator`.

`accelerate.logging.get_logger` refuses to log before `PartialState()` exists, and `LocalOptimizer` may wrap a plain
torch loop. This adapter logs on the main process only (``main_process_only=False`` logs on every rank).
"""

import logging
from collections.abc import MutableMapping
from typing import Any

import torch.distributed as dist


def process_rank() -> int:
    """This process's rank in the default group; 0 without an initialised process group."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class _RankAdapter(logging.LoggerAdapter):
    def log(self, level: int, msg: object, *args: Any, main_process_only: bool = True, **kwargs: Any) -> None:
        rank = process_rank()
        if self.isEnabledFor(level) and (rank == 0 or not main_process_only):
            msg, kwargs = self.process(msg, kwargs)
            self.logger.log(level, msg, *args, **kwargs)

    def process(self, msg: object, kwargs: MutableMapping[str, Any]) -> tuple[object, MutableMapping[str, Any]]:
        return msg, kwargs


def get_logger(name: str) -> logging.LoggerAdapter:
    """Return a logger whose calls accept ``main_process_only`` (default True), like accelerate's."""
    return _RankAdapter(logging.getLogger(name), {})
