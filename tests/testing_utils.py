"""Shared test helpers: real multi-process gloo runs, tiny models, markers."""

import contextlib
import importlib.util
import logging
import os
import pickle
import queue as queue_module
import random
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn


require_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")
require_torch_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
require_torch_multi_gpu = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2+ CUDA GPUs")


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_environment(rank: int, world_size: int, port: int) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        ACCELERATE_USE_CPU="true",
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)


def _worker(rank: int, world_size: int, port: int, fn: Callable, kwargs: dict, queue: Any) -> None:
    _rank_environment(rank, world_size, port)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank=rank, world_size=world_size, **kwargs)
        # plain pickle bytes: torch's queue reductions share tensors through fds that die with the child
        queue.put((rank, "ok", pickle.dumps(result)))
    except BaseException:  # noqa: BLE001 — any failure must reach the parent with its traceback
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn: Callable, world_size: int = 2, timeout: float = 300, **kwargs: Any) -> list[Any]:
    """Run ``fn(rank=, world_size=, **kwargs)`` in ``world_size`` spawned gloo processes; return each rank's result.

    A child's exception is re-raised here with its traceback. ``fn`` must be importable (module level).
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, kwargs, queue)) for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) < world_size:
            try:
                rank, status, payload = queue.get(timeout=1.0)
            except queue_module.Empty:
                # a rank that died without reporting (killed, aborted in C++) fails the run now, not at the timeout
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in results]
                if dead or time.monotonic() > deadline:
                    codes = {r: procs[r].exitcode for r in range(world_size) if r not in results}
                    raise RuntimeError(
                        f"ranks {sorted(codes)} did not report (exit codes {codes}; None = still running after "
                        f"{timeout} s)"
                    ) from None
                continue
            if status == "error":
                raise RuntimeError(f"rank {rank} failed:\n{payload}")
            results[rank] = pickle.loads(payload)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world_size)]


class ScenarioFailed(RuntimeError):
    """A scenario of `run_distributed_batch` that failed (or never reported) on at least one rank."""


class BatchResults(dict):
    """Scenario name -> each rank's result; reading a failed scenario raises its ranks' tracebacks."""

    def __getitem__(self, name: str) -> list[Any]:
        if name not in self:
            raise KeyError(f"scenario {name!r} was not run: name it in the test's @pytest.mark.scenarios(...)")
        outcome = super().__getitem__(name)
        if isinstance(outcome, ScenarioFailed):
            raise ScenarioFailed(str(outcome))
        return outcome

    def for_test(self, node: pytest.Item) -> "BatchResults":
        """The scenarios that ``node`` names in its ``scenarios`` marks: a test reads only what it declared."""
        names = {name for mark in node.iter_markers("scenarios") for name in mark.args}
        return BatchResults({name: outcome for name, outcome in self.items() if name in names})


def selected_scenarios(request: pytest.FixtureRequest, scenarios: dict[str, tuple[Callable, dict]]) -> dict:
    """The entries of ``scenarios`` (in their order) that this session's selected tests of the requesting module name
    in their ``@pytest.mark.scenarios(...)``: ``pytest -k one_test`` runs that test's scenarios only."""
    wanted = {
        name
        for item in request.session.items
        if getattr(item, "module", None) is request.module
        for mark in item.iter_markers("scenarios")
        for name in mark.args
    }
    if unknown := wanted - scenarios.keys():
        raise ValueError(f"@pytest.mark.scenarios names unknown scenarios {sorted(unknown)}")
    return {name: scenario for name, scenario in scenarios.items() if name in wanted}


def _loggers() -> list[logging.Logger]:
    return [logging.getLogger()] + [
        lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]


def _process_state() -> dict:
    """What a scenario may change in its process and a fresh process would not have: restored between scenarios."""
    import numpy as np

    return {
        "env": dict(os.environ),
        "torch_rng": torch.get_rng_state(),
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "dtype": torch.get_default_dtype(),
        "dist": dict(vars(dist)),  # collective spies (dist.all_reduce = spy) that a failing scenario left behind
        "loggers": {lg: (list(lg.handlers), lg.level, lg.propagate, lg.disabled) for lg in _loggers()},
        "logging_disable": logging.root.manager.disable,
    }


def _restore_process_state(saved: dict) -> None:
    import numpy as np
    from accelerate.state import AcceleratorState, GradientState

    # accelerate's singletons: each scenario builds its own Accelerator (mixed precision, gradient accumulation), as
    # in a fresh process; the process group itself stays (as accelerate's own test scripts do between cases)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    os.environ.clear()
    os.environ.update(saved["env"])
    torch.set_rng_state(saved["torch_rng"])
    random.setstate(saved["random"])
    np.random.set_state(saved["numpy"])
    torch.set_default_dtype(saved["dtype"])
    current = vars(dist)
    for name, value in saved["dist"].items():
        if current.get(name) is not value:
            setattr(dist, name, value)
    for lg in _loggers():
        handlers, level, propagate, disabled = saved["loggers"].get(lg, ([], logging.NOTSET, True, False))
        lg.handlers[:] = handlers
        lg.setLevel(level)
        lg.propagate, lg.disabled = propagate, disabled
    logging.disable(saved["logging_disable"])


def _batch_worker(rank: int, world_size: int, port: int, scenarios: list, queue: Any) -> None:
    _rank_environment(rank, world_size, port)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        fresh = _process_state()
        for name, fn, kwargs in scenarios:
            try:
                _restore_process_state(fresh)
                result = fn(rank=rank, world_size=world_size, **kwargs)
                # pickled now: a later scenario must not change what this one returned (a log handler's list)
                payload = pickle.dumps(result)
            except BaseException:  # noqa: BLE001 — reported for this scenario; the parent restarts the rest
                queue.put((rank, name, "error", traceback.format_exc()))
                return  # the ranks may now be out of step in their collectives: this process is done
            queue.put((rank, name, "ok", payload))
    except BaseException:  # noqa: BLE001 — a failure before any scenario (the process group) fails the first
        queue.put((rank, scenarios[0][0] if scenarios else "", "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _spawn_batch(scenarios: list, world_size: int, timeout: float) -> dict[str, Any]:
    """One spawn of ``world_size`` processes that run ``scenarios`` in order, until the first that fails on any rank.

    Returns the outcome of each scenario that completed on every rank (a list of results) and of the first failed
    one (`ScenarioFailed`); the scenarios after it are left out, for the caller to run in a fresh spawn.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_batch_worker, args=(r, world_size, port, scenarios, queue)) for r in range(world_size)
    ]
    for p in procs:
        p.start()
    outcomes: dict[str, Any] = {}
    reported: dict[str, dict[int, Any]] = {name: {} for name, _, _ in scenarios}
    failures: dict[str, dict[int, str]] = {name: {} for name, _, _ in scenarios}  # rank (-1: none) -> traceback
    deadline = time.monotonic() + timeout
    grace: dict[str, float] = {}  # after a scenario's first error, a few seconds for the other ranks' account of it
    try:
        for name, _, _ in scenarios:
            errors = failures[name]
            while len(reported[name]) < world_size:
                with contextlib.suppress(queue_module.Empty):
                    rank, got, status, payload = queue.get(timeout=1.0)
                    if status == "error":
                        failures[got][rank] = payload
                        grace.setdefault(got, time.monotonic() + 5.0)
                    reported[got][rank] = pickle.loads(payload) if status == "ok" else None
                    continue
                gone = {r for r, p in enumerate(procs) if p.exitcode is not None} - set(reported[name])
                if errors and (time.monotonic() > grace[name] or len(gone) + len(reported[name]) >= world_size):
                    break
                if not errors and (gone or time.monotonic() > deadline):
                    codes = {r: procs[r].exitcode for r in range(world_size) if r not in reported[name]}
                    errors[-1] = (
                        f"ranks {sorted(codes)} did not report (exit codes {codes}; None = still running after "
                        f"{timeout} s)"
                    )
                    break
            if errors:
                detail = "\n".join(f"rank {r} failed:\n{tb}" if r >= 0 else tb for r, tb in sorted(errors.items()))
                outcomes[name] = ScenarioFailed(f"scenario {name!r}: {detail}")
                break
            outcomes[name] = [reported[name][r] for r in range(world_size)]
            deadline = time.monotonic() + timeout
    finally:
        for p in procs:
            p.join(timeout=1 if grace else 30)
            if p.is_alive():
                p.kill()
                p.join()
    return outcomes


def run_distributed_batch(
    scenarios: dict[str, tuple[Callable, dict]], world_size: int = 2, timeout: float = 300
) -> BatchResults:
    """Run several scenarios, in order, in the same ``world_size`` spawned gloo processes; return each one's results.

    ``scenarios`` maps a name to ``(fn, kwargs)``; each ``fn(rank=, world_size=, **kwargs)`` runs as `run_distributed`
    would run it, one after another on the same process group, which saves the processes' start-up (importing torch,
    transformers and accelerate) per scenario. Between scenarios the process is put back as it was before the first:
    accelerate's state singletons reset, environment, RNG states, default dtype, ``torch.distributed``'s functions
    (collective spies) and logging handlers restored. A scenario that fails stops that spawn; its tracebacks are
    kept for it alone and the scenarios after it run in a fresh spawn, so reading one failed scenario from the
    returned `BatchResults` raises `ScenarioFailed` and the others still read. ``timeout`` bounds each scenario.
    """
    pending = [(name, fn, kwargs) for name, (fn, kwargs) in scenarios.items()]
    results = BatchResults()
    while pending:
        results.update(_spawn_batch(pending, world_size, timeout))
        pending = [s for s in pending if s[0] not in results]
    return results


class BNMLP(nn.Module):
    """A tiny MLP with BatchNorm (so float buffers are exercised)."""

    def __init__(self, d_in: int = 8, hidden: int = 16, d_out: int = 4) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def tiny_vit_config(**overrides: Any) -> Any:
    """A 2-layer `ViTConfig` for fast CPU tests."""
    from transformers import ViTConfig

    kwargs = {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 37,
        "image_size": 32,
        "patch_size": 8,
        "num_channels": 3,
        "num_labels": 4,
    }
    kwargs.update(overrides)
    return ViTConfig(**kwargs)


def rank_batches(rank: int, steps: int, batch: int = 8, d_in: int = 8, d_out: int = 4, seed: int = 0) -> list:
    """Deterministic per-rank (x, y) batches: different data on each rank."""
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    return [
        (torch.randn(batch, d_in, generator=g), torch.randint(0, d_out, (batch,), generator=g)) for _ in range(steps)
    ]


def flat_params(module: nn.Module) -> torch.Tensor:
    """All parameters and float buffers of ``module`` as one detached fp32 vector."""
    tensors = [p.detach().float().reshape(-1) for p in module.parameters()]
    tensors += [b.detach().float().reshape(-1) for b in module.buffers() if b.is_floating_point()]
    return torch.cat(tensors)


def default_group_sequence_number() -> int:
    """How many collectives the default group has run: Python calls and C++ ones (DDP's reducer, buffer broadcast)."""
    return dist.distributed_c10d._get_default_group()._get_sequence_number_for_group()


COLLECTIVES = (
    "all_reduce", "broadcast", "_broadcast_coalesced", "all_gather", "all_gather_into_tensor", "all_gather_single",
    "reduce_scatter_tensor", "reduce_scatter_single", "all_to_all_single", "barrier",
)  # fmt: skip


@contextlib.contextmanager
def count_collectives(log: list) -> Any:
    """Append (collective, ranks of its group) to ``log`` for every Python-level collective call in this process.

    DDP communication hooks, FSDP2 and qsr_hf's averaging call these; DDP's own C++ reducer does not.
    """
    originals = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}

    def wrap(name: str, fn: Callable) -> Callable:
        def counted(*args: Any, **kwargs: Any) -> Any:
            group = kwargs.get("group", args[0] if name == "_broadcast_coalesced" else None)
            ranks = dist.get_process_group_ranks(group) if group is not None else range(dist.get_world_size())
            log.append((name, tuple(ranks)))
            return fn(*args, **kwargs)

        return counted

    for name, fn in originals.items():
        setattr(dist, name, wrap(name, fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


def lr_step(model: nn.Module, optimizer: Any, lr: float, batch: tuple) -> None:
    """One optimizer step of cross-entropy on ``batch = (x, y)`` at learning rate ``lr`` (set on every param group)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    x, y = batch
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    optimizer.zero_grad()


def recorded_steps(
    model: nn.Module,
    optimizer: Any,
    lrs: list[float],
    batches: list,
    snapshot: Callable,
    save_at: int = -1,
    tmp: str = "",
) -> list:
    """Train one step per batch through a qsr_hf optimizer; per step return (synced, *snapshot(model), collectives).

    The collectives are those `count_collectives` logs during the step. With ``save_at``, the per-rank local state is
    saved to ``tmp`` after that (0-based) step, for a resume test.
    """
    per_step = []
    for step, batch in enumerate(batches):
        log: list = []
        with count_collectives(log):
            lr_step(model, optimizer, lrs[step], batch)
        per_step.append((optimizer.last_step_synced, *snapshot(model), log))
        if step == save_at:
            optimizer.save_local_state(tmp)
    return per_step


def assert_node_groups(log: list, node: tuple, inter: tuple, world_size: int, synced: bool, where: Any) -> None:
    """Between syncs every collective of a step (``log`` from `count_collectives`) stays inside ``node``; a sync adds
    the ``inter``-node group and the agreement check (one small all-gather over all ranks)."""
    groups = {ranks for _, ranks in log}
    allowed = {node, inter, tuple(range(world_size))} if synced else {node}
    assert node in groups and groups <= allowed, (where, groups)
    assert (inter in groups) == synced, where


def view_round_trip(model: nn.Module, optimizer: Any, snapshot: Callable) -> tuple[bool, int]:
    """Enter and leave the averaged (evaluation) view of a qsr_hf optimizer; return whether ``snapshot(model)`` came
    back bitwise and the bytes the two moved inside the node."""
    before, counted = snapshot(model), optimizer.stats.intra_node_sync_bytes
    optimizer.synchronizer.enter_averaged_view()
    optimizer.synchronizer.leave_averaged_view()
    same = all(torch.equal(a, b) for a, b in zip(before, snapshot(model), strict=True))
    return same, optimizer.stats.intra_node_sync_bytes - counted


def record_averages(optimizer: Any, snapshot: Callable, log: list) -> None:
    """Append ``(kind, commit, *snapshot() before, *snapshot() after)`` to ``log`` around every average of a qsr_hf
    optimizer's synchronizer (scheduled, extra and evaluation-view averages)."""
    sync = optimizer.synchronizer
    original = sync.average

    def recorded(kind: int, commit: bool = True, buckets: list[int] | None = None) -> None:
        before = [t.clone() for t in snapshot()]
        original(kind, commit, buckets)
        log.append((kind, commit, *before, *[t.clone() for t in snapshot()]))

    sync.average = recorded


def nesterov_reference(
    anchor: torch.Tensor, average: torch.Tensor, momentum: torch.Tensor | None, lr: float = 0.7, mu: float = 0.9
) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.optim.SGD(nesterov=True)`` on ``anchor`` with gradient ``anchor - average`` (DiLoCo's outer step).

    Returns:
        the new anchor and the momentum buffer.
    """
    p = anchor.clone().requires_grad_(True)
    opt = torch.optim.SGD([p], lr=lr, momentum=mu, nesterov=True)
    if momentum is not None:
        opt.state[p]["momentum_buffer"] = momentum.clone()
    p.grad = anchor - average
    opt.step()
    return p.detach(), opt.state[p]["momentum_buffer"]
