"""Shared helpers for the benchmark scripts: machine info, spawned gloo runs, result files, tables.

Not part of the library and not run by the unit tests.
"""

import argparse
import datetime
import json
import math
import os
import platform
import resource
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


RESULTS_DIR = Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    import accelerate
    import torch
    import transformers

    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = float("nan")
    return {
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "memory_gib": round(mem_gib, 1),
        "device": "cuda" if torch.cuda.is_available() else "cpu (no GPU)",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "python": platform.python_version(),
        "kernel": platform.release(),
        # the machine may be shared: a load average above the core count means the numbers are noisy
        "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()],
    }


def peak_rss_gib(who: int = resource.RUSAGE_SELF) -> float:
    """Peak resident memory so far (``ru_maxrss``, KiB on Linux) in GiB: of this process, or with
    ``resource.RUSAGE_CHILDREN`` of its largest child process that ended (spawned ranks, replica processes)."""
    return resource.getrusage(who).ru_maxrss / 2**20


def write_result(name: str, payload: dict[str, Any]) -> Path:
    """Write ``results/<name>.json`` with the machine, the date, the command line and the peak memory of this
    process and of its largest child (:func:`peak_rss_gib`), plus ``payload``; then its figure
    ``results/<name>.png`` (`plots.draw`)."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    record = {
        "benchmark": name,
        "command": "python " + " ".join([os.path.relpath(sys.argv[0]), *sys.argv[1:]]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "peak_rss_gib": {
            "main_process": round(peak_rss_gib(), 2),
            "largest_child_process": round(peak_rss_gib(resource.RUSAGE_CHILDREN), 2),
        },
        **payload,
    }
    path.write_text(json.dumps(record, indent=2) + "\n")
    import plots  # benchmarks/plots.py: the figure of this JSON, if the docs' benchmarks page shows one

    plots.draw(name, path)
    return path


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print a Markdown table (so it can be pasted into the README)."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            if math.isnan(v):
                return "-"
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    cells = [[fmt(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |")
    print("| " + " | ".join("-" * w for w in widths) + " |")
    for r in cells:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")


def netns_parser(
    doc: str, steps: int, methods: list[str], timeout: float, timeout_help: str, variants: Sequence[str] = ()
) -> argparse.ArgumentParser:
    """The flags shared by the network-namespace benchmarks (slow_link*.py), and the hidden ones of their workers."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--methods", nargs="+", default=methods, choices=[*methods, *variants])
    parser.add_argument("--timeout", type=float, default=timeout, help=timeout_help)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--ifname", help=argparse.SUPPRESS)
    return parser


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def quantile(xs: Sequence[float], q: float) -> float:
    """The ``q`` quantile (linear interpolation) of ``xs``."""
    if not xs:
        return float("nan")
    ys = sorted(xs)
    pos = q * (len(ys) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ys) - 1)
    return ys[lo] + (ys[hi] - ys[lo]) * (pos - lo)


# one spawned-gloo runner for tests and benchmarks: the one in tests/testing_utils.py
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from testing_utils import run_distributed  # noqa: E402


__all__ = [
    "adamw_cosine",
    "machine_info",
    "mean_std",
    "median",
    "netns_parser",
    "paper_lr_schedule",
    "print_table",
    "quantile",
    "run_distributed",
    "run_pool",
    "sim_stats",
    "write_result",
]


def paper_lr_schedule(
    total_steps: int, warmup_steps: int, peak_lr: float, min_lr: float, init_lr: float | None = None
) -> list[float]:
    """The paper's ViT-B lr shape: linear warm-up from ``init_lr`` (default ``min_lr``), then cosine to ``min_lr``.

    Entry ``t`` is the lr used by optimizer step ``t``.
    """
    init_lr = min_lr if init_lr is None else init_lr
    lrs = []
    for t in range(total_steps):
        if t < warmup_steps:
            lrs.append(init_lr + (peak_lr - init_lr) * t / warmup_steps)
        else:
            frac = (t - warmup_steps) / max(1, total_steps - warmup_steps)
            lrs.append(min_lr + (peak_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * frac)))
    return lrs


# ------------------------------------------------------------------------ the simulated studies (generalization, lm_study)
def adamw_cosine(args: argparse.Namespace, total_steps: int, warmup_steps: int) -> tuple[Any, Any]:
    """(optimizer_fn, scheduler_fn) of the simulated studies: ``args.optimizer`` (adamw or sgd with momentum 0.9) at
    peak ``args.lr`` and ``args.weight_decay``; linear warm-up, then cosine to ``args.min_lr_rate`` x peak."""
    import torch
    from transformers import get_scheduler

    if args.optimizer == "adamw":

        def optimizer_fn(m: Any) -> Any:
            return torch.optim.AdamW(m.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay)
    else:

        def optimizer_fn(m: Any) -> Any:
            return torch.optim.SGD(m.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)

    def scheduler_fn(o: Any) -> Any:
        return get_scheduler(
            "cosine_with_min_lr",
            o,
            num_warmup_steps=warmup_steps,
            num_training_steps=total_steps,
            scheduler_specific_kwargs={"min_lr_rate": args.min_lr_rate},
        )

    return optimizer_fn, scheduler_fn


def run_pool(run_one: Any, jobs: list[dict], processes: int, initializer: Any, initargs: tuple, describe: Any) -> list:
    """Run ``run_one`` over ``jobs`` in ``processes`` spawned processes (``initializer`` sets one thread and loads the
    data); print ``describe(result)`` with the elapsed minutes as each run finishes."""
    import multiprocessing as mp
    import time

    start, runs = time.time(), []
    with mp.get_context("spawn").Pool(processes, initializer=initializer, initargs=initargs) as pool:
        for run in pool.imap_unordered(run_one, jobs):
            runs.append(run)
            print(f"[{(time.time() - start) / 60:5.1f} min] {describe(run)}", flush=True)
    return runs


def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for fewer than 2 values) of ``xs``; nan for none."""
    if not xs:
        return float("nan"), 0.0
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def sim_stats(sim: Any, h_trace: Sequence[int], start: float, cpu_start: float) -> dict[str, Any]:
    """What every simulated run reports besides its metrics: steps, syncs, communication vs data-parallel, the steps
    where H changed (``[step, H]``), wall and CPU seconds since ``start`` / ``cpu_start``."""
    import time

    return {
        "steps": sim.stats.steps,
        "syncs": sim.stats.syncs,
        "comm_vs_ddp": sim.stats.comm_volume_vs_ddp,
        "h_changes": [[i, h] for i, h in enumerate(h_trace) if i == 0 or h != h_trace[i - 1]],
        "seconds": time.time() - start,
        "cpu_seconds": time.process_time() - cpu_start,
    }
