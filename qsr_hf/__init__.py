"""qsr_hf: the Quadratic Synchronization Rule (Gu et al., ICLR 2024) for Trainer, Accelerate and DeepSpeed."""

from importlib.metadata import PackageNotFoundError, version

from qsr_hf.accounting import SyncStats
from qsr_hf.averaging import ParameterAverager
from qsr_hf.callback import QSRCallback
from qsr_hf.config import QSRConfig
from qsr_hf.local_optimizer import LocalOptimizer
from qsr_hf.planner import plan
from qsr_hf.schedules import ConstantSchedule, PostLocalSchedule, PowerSchedule, SyncSchedule


try:
    __version__ = version("qsr_hf")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

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
