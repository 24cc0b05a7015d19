"""Compile the DeepSpeed CPU ops the tests use, once, before the test run (CI calls this from `.ci/run`).

DeepSpeed JIT-compiles its C++ ops with the system compiler on first use and caches them in
``~/.cache/torch_extensions``: the shared-memory collective ``deepspeed_shm_comm`` (any engine on CPU) and
``fused_adam`` (DeepSpeed's FusedAdam, which gets the flat-master ``FP16_Optimizer``). Built here, the compile
(about a minute on 2 cores) is part of the set-up instead of the timed test run. Run: ``python tests/build_deepspeed_ops.py``.
"""

import time

from deepspeed.accelerator import get_accelerator


if __name__ == "__main__":
    for name in ("ShareMemCommBuilder", "FusedAdamBuilder"):
        start = time.perf_counter()
        get_accelerator().create_op_builder(name).load()
        print(f"{name}: ready in {time.perf_counter() - start:.1f} s")
