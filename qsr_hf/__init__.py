"""qsr_hf: the Quadratic Synchronization Rule (Gu et al., ICLR 2024) for Trainer, Accelerate and DeepSpeed.

Public names are imported on first use (`__getattr__` below), so ``qsr-hf plan`` and ``import qsr_hf.analysis``
do not pay for torch, transformers or DeepSpeed.
"""

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any


if TYPE_CHECKING:
    from qsr_hf.analysis.planner import plan
    from qsr_hf.core.accounting import SyncStats
    from qsr_hf.core.config import QSRConfig
    from qsr_hf.core.schedules import ConstantSchedule, PostLocalSchedule, PowerSchedule, SyncSchedule
    from qsr_hf.frontends.callback import QSRCallback
    from qsr_hf.frontends.local_optimizer import LocalOptimizer
    from qsr_hf.sync.averaging import ParameterAverager

try:
    __version__ = version("qsr_hf")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

# public name -> module that defines it
_PUBLIC = {
    "ConstantSchedule": "qsr_hf.core.schedules",
    "LocalOptimizer": "qsr_hf.frontends.local_optimizer",
    "ParameterAverager": "qsr_hf.sync.averaging",
    "PostLocalSchedule": "qsr_hf.core.schedules",
    "PowerSchedule": "qsr_hf.core.schedules",
    "QSRCallback": "qsr_hf.frontends.callback",
    "QSRConfig": "qsr_hf.core.config",
    "SyncSchedule": "qsr_hf.core.schedules",
    "SyncStats": "qsr_hf.core.accounting",
    "plan": "qsr_hf.analysis.planner",
}

__all__ = [
    "ConstantSchedule",
    "LocalOptimizer",
    "ParameterAverager",
    "PostLocalSchedule",
    "PowerSchedule",
    "QSRCallback",
    "QSRConfig",
    "SyncSchedule",
    "SyncStats",
    "__version__",
    "plan",
]


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'qsr_hf' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
