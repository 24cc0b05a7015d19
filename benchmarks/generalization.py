"""Small-scale replication of the QSR paper's generalization claim (GitHub issue 7).

K simulated workers (qsr_hf.analysis.simulation, one process per run) train the same small CNN on Fashion-MNIST with
every sync rule: data-parallel (gradients averaged every step), constant H in {2, 4, 8}, post-local, and the
power rules linear / QSR / cubic. Same init, same data order and same AdamW + cosine schedule for all rules within a
seed, so differences between rules are paired. Writes benchmarks/results/generalization.{json,md,png}.

    python benchmarks/generalization.py              # the committed run (14 min on 2 CPU cores)
    python benchmarks/generalization.py --quick      # smoke test (~1 min)
    python benchmarks/generalization.py --variants   # QSR vs QSR + qsr_overlap_sync vs QSR + qsr_compress_delta
    python benchmarks/generalization.py --merge benchmarks/results/generalization_variants.json --rules qsr_overlap2
        # adds a rule (here: the average folded in 2 steps late) to a finished run, with its setup and seeds
    python benchmarks/generalization.py --merge benchmarks/results/generalization_variants.json --rules qsr_int8 \
        qsr_int8ef qsr_overlap2_int8   # int8 deltas, with error feedback, and in flight 2 steps late (issue 28)

Data: /usr/share/datasets/fashion-mnist (Debian package dataset-fashion-mnist). Without it, the run falls back to
scikit-learn's digits with a warning; those numbers say nothing about the paper's claim.
"""

import argparse
import dataclasses
import gzip
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import plots
import torch
import torch.nn.functional as F
from _common import adamw_cosine, run_pool, sim_stats
from torch import nn

from qsr_hf import QSRConfig
from qsr_hf.analysis.lr_schedule import lr_sequence
from qsr_hf.analysis.planner import plan
from qsr_hf.analysis.simulation import DataParallelSimulation, LocalTrainingSimulation, shard_batch


FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
RESULTS = Path(__file__).parent / "results"
RULES = ["ddp", "constant2", "constant4", "constant8", "post_local", "linear", "qsr", "cubic"]
VARIANTS = ["ddp", "qsr", "qsr_overlap", "qsr_compress"]  # --variants: issue 14's overlap and compression
DEPTHS = {"qsr_overlap2": 2, "qsr_overlap3": 3}  # qsr_overlap_steps (issue 20): the average arrives that late
INT8 = ["qsr_int8", "qsr_int8ef", "qsr_overlap2_int8"]  # qsr_compress_format="int8" (issue 28)
EXTRA = ["qsr_nesterov", *DEPTHS, "qsr_fragments4", *INT8]  # rules added to a finished --variants run with --merge
OUTER = {"qsr_outer_optimizer": "nesterov", "qsr_outer_lr": 0.7, "qsr_outer_momentum": 0.9}  # DiLoCo's outer step
LABELS = {
    "ddp": "data-parallel",
    "constant2": "constant H=2",
    "constant4": "constant H=4",
    "constant8": "constant H=8",
    "post_local": "post-local",
    "linear": "linear rule",
    "qsr": "QSR",
    "cubic": "cubic rule",
    "qsr_overlap": "QSR + overlap (one-step-delayed)",
    "qsr_compress": "QSR + bf16 delta compression",
    "qsr_nesterov": "QSR + Nesterov outer step (0.7, 0.9)",
    "qsr_fragments4": "QSR + 4 fragments (staggered syncs)",
    "qsr_overlap2": "QSR + overlap, 2 steps late",
    "qsr_overlap3": "QSR + overlap, 3 steps late",
    "qsr_int8": "QSR + int8 delta compression",
    "qsr_int8ef": "QSR + int8 delta compression + error feedback",
    "qsr_overlap2_int8": "QSR + int8 delta compression in flight, 2 steps late",
}
# the paper's ViT-B recipe: alpha = 0.0175 at peak lr 0.008 with H_base = 4, i.e. 1.09375 * peak_lr * sqrt(H_base)
PAPER_ALPHA_RATIO = 0.0175 / (0.008 * math.sqrt(4))


# ----------------------------------------------------------------------------------------------------------- data
def _read_idx(path: Path, header: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=header)


def load_data(data_dir: Path):
    """(x_train, y_train, x_test, y_test, name) as float tensors normalised to mean 0 / std 1, shape (N, 1, H, W)."""
    files = {
        s: (data_dir / f"{s}-images-idx3-ubyte.gz", data_dir / f"{s}-labels-idx1-ubyte.gz") for s in ("train", "t10k")
    }
    if all(p.exists() for pair in files.values() for p in pair):
        out = []
        for split in ("train", "t10k"):
            images, labels = files[split]
            x = _read_idx(images, 16).reshape(-1, 1, 28, 28).astype(np.float32) / 255.0
            out += [torch.from_numpy((x - 0.2860) / 0.3530), torch.from_numpy(_read_idx(labels, 8).astype(np.int64))]
        return (*out, "fashion-mnist")
    print(
        f"WARNING: Fashion-MNIST not found in {data_dir} (install it: apt-get install dataset-fashion-mnist). "
        "Falling back to scikit-learn digits (1,797 8x8 images): too easy to compare sync rules; "
        "these results say nothing about the paper's claim.",
        file=sys.stderr,
    )
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = (x - x.mean()) / x.std()
    y = torch.tensor(d.target, dtype=torch.int64)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    x, y = x[perm], y[perm]
    return x[:1400], y[:1400], x[1400:], y[1400:], "sklearn-digits (fallback)"


# ---------------------------------------------------------------------------------------------------------- model
def make_model(width: int, image_size: int) -> nn.Module:
    """Two strided conv layers + MLP head (no pooling: max-pooling made the CNN 5x slower on CPU).

    No normalization layers, so a sync averages parameters only (no BatchNorm-buffer question).
    """
    side = (image_size + 3) // 4
    return nn.Sequential(
        nn.Conv2d(1, width, 5, stride=2, padding=2),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(2 * width * side * side, 8 * width),
        nn.ReLU(),
        nn.Linear(8 * width, 10),
    )


def _loss(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> tuple[float, float]:
    """(accuracy, mean cross-entropy)."""
    model.eval()
    correct, loss = 0, 0.0
    for i in range(0, len(y), batch):
        logits = model(x[i : i + batch])
        correct += (logits.argmax(1) == y[i : i + batch]).sum().item()
        loss += F.cross_entropy(logits, y[i : i + batch], reduction="sum").item()
    model.train()
    return correct / len(y), loss / len(y)


# -------------------------------------------------------------------------------------------------------- schedule
def rule_configs(args, lrs: list[float], warmup_steps: int) -> dict[str, QSRConfig | None]:
    """QSRConfig of every rule (None: data-parallel). Power-rule coefficients leave H_base at the same lr."""
    h = args.h_base
    alpha_qsr = args.alpha_ratio * args.lr * math.sqrt(h)
    # H leaves H_base once (alpha_g / lr)^g >= H_base + 1; matching that lr for g = 1, 2, 3 gives
    # alpha_g = alpha_qsr * (H_base + 1) ** (1/g - 1/2)
    alphas = {g: alpha_qsr * (h + 1) ** (1 / g - 1 / 2) for g in (1, 2, 3)}
    configs: dict[str, QSRConfig | None] = {"ddp": None}
    for c in (2, 4, 8):
        configs[f"constant{c}"] = QSRConfig(qsr_rule="constant", qsr_h_base=c, qsr_average_buffers=False)
    switch = int(args.post_local_switch * len(lrs))
    configs["post_local"] = QSRConfig(qsr_rule="post_local", qsr_h_base=h, qsr_switch_step=switch)
    for name, g in (("linear", 1), ("qsr", 2), ("cubic", 3)):
        configs[name] = QSRConfig(qsr_rule=name, qsr_alpha=alphas[g], qsr_h_base=h)
        peak_h = configs[name].build_schedule(0).round_length(0, args.lr)
        if peak_h != h:
            print(f"WARNING: {name} gives H={peak_h} at the peak lr, not H_base={h}", file=sys.stderr)
    configs["qsr_overlap"] = dataclasses.replace(configs["qsr"], qsr_overlap_sync=True)
    configs["qsr_compress"] = dataclasses.replace(configs["qsr"], qsr_compress_delta=True)
    configs["qsr_nesterov"] = dataclasses.replace(configs["qsr"], **OUTER)
    for name, depth in DEPTHS.items():
        configs[name] = dataclasses.replace(configs["qsr_overlap"], qsr_overlap_steps=depth)
    configs["qsr_fragments4"] = dataclasses.replace(configs["qsr"], qsr_fragments=4)  # Streaming DiLoCo's pattern
    configs["qsr_int8"] = dataclasses.replace(configs["qsr_compress"], qsr_compress_format="int8")
    configs["qsr_int8ef"] = dataclasses.replace(configs["qsr_int8"], qsr_compress_error_feedback=True)
    configs["qsr_overlap2_int8"] = dataclasses.replace(configs["qsr_int8"], qsr_overlap_sync=True, qsr_overlap_steps=2)
    return configs


# ------------------------------------------------------------------------------------------------------------ runs
_DATA = None


def _init_worker(data_dir: str) -> None:
    global _DATA
    torch.set_num_threads(1)
    _DATA = load_data(Path(data_dir))


def run_one(job: dict) -> dict:
    """Train one (rule, seed) run and return its curves and final metrics."""
    args, rule, seed = argparse.Namespace(**job["args"]), job["rule"], job["seed"]
    x_train, y_train, x_test, y_test, _ = _DATA
    n = min(args.train_subset or len(y_train), len(y_train))
    subset = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(12345))[:n]  # same for every run
    x_train, y_train = x_train[subset], y_train[subset]
    steps_per_epoch = n // args.global_batch
    total, warmup = job["total_steps"], job["warmup_steps"]
    config = QSRConfig(**job["config"]) if job["config"] else None

    torch.manual_seed(seed)
    model = make_model(args.width, x_train.shape[-1])
    opt_fn, sched_fn = adamw_cosine(args, total, warmup)
    if config is None:
        sim = DataParallelSimulation(model, opt_fn, args.workers, sched_fn)
    else:
        sim = LocalTrainingSimulation(model, opt_fn, config, args.workers, total, warmup, sched_fn)
    data_gen = torch.Generator().manual_seed(seed)  # data order depends on the seed only: runs are paired
    eval_steps = {round(total * (i + 1) / args.evals) for i in range(args.evals)}
    curve, losses, h_trace = [], [], []
    start, cpu_start, step = time.time(), time.process_time(), 0
    for _ in range(args.epochs):
        perm = torch.randperm(n, generator=data_gen)
        for b in range(steps_per_epoch):
            idx = perm[b * args.global_batch : (b + 1) * args.global_batch]
            shards = shard_batch((x_train[idx], y_train[idx]), args.workers)
            batch_losses = []

            def loss_fn(m, s, batch_losses=batch_losses):
                loss = _loss(m, s)
                batch_losses.append(loss.item())
                return loss

            sim.step(shards, loss_fn)
            step += 1
            losses.append(sum(batch_losses) / len(batch_losses))
            h_trace.append(sim.stats.round_length if config is not None else 1)
            if step in eval_steps:
                acc, loss = evaluate(sim.averaged_model(), x_test, y_test)
                curve.append(
                    {
                        "step": step,
                        "test_acc": acc,
                        "test_loss": loss,
                        "train_loss": float(np.mean(losses[-steps_per_epoch:])),
                    }
                )
    final = sim.averaged_model()
    test_acc, test_loss = evaluate(final, x_test, y_test)
    train_acc, train_loss = evaluate(final, x_train, y_train)
    return {
        "rule": rule,
        "seed": seed,
        "test_acc": test_acc,
        "test_loss": test_loss,
        "train_acc": train_acc,
        "train_loss": train_loss,
        "curve": curve,
        **sim_stats(sim, h_trace, start, cpu_start),
    }


def describe(run: dict) -> str:
    return (
        f"{run['rule']:>10} seed {run['seed']}: test {100 * run['test_acc']:.2f}% train {100 * run['train_acc']:.2f}% "
        f"syncs {run['syncs']} ({run['seconds']:.0f} s)"
    )


# ---------------------------------------------------------------------------------------------------------- report
def summarize(runs: list[dict], rules: list[str]) -> list[dict]:
    by_seed_ddp = {r["seed"]: r["test_acc"] for r in runs if r["rule"] == "ddp"}
    by_seed_qsr = {r["seed"]: r["test_acc"] for r in runs if r["rule"] == "qsr"}
    rows = []
    for rule in rules:
        rs = sorted((r for r in runs if r["rule"] == rule), key=lambda r: r["seed"])
        acc = np.array([r["test_acc"] for r in rs]) * 100
        diff = np.array([100 * (r["test_acc"] - by_seed_ddp[r["seed"]]) for r in rs if r["seed"] in by_seed_ddp])
        vs_qsr = [100 * (r["test_acc"] - by_seed_qsr[r["seed"]]) for r in rs if r["seed"] in by_seed_qsr]
        rows.append(
            {
                "rule": rule,
                "label": LABELS[rule],
                "test_acc_mean": float(acc.mean()),
                "test_acc_std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
                "diff_vs_ddp_mean": float(diff.mean()) if len(diff) else None,
                "diff_vs_ddp_std": float(diff.std(ddof=1)) if len(diff) > 1 else 0.0,
                # paired with plain QSR (same seed): what a variant of QSR changes
                "diff_vs_qsr_per_seed": vs_qsr,
                "diff_vs_qsr_mean": float(np.mean(vs_qsr)) if vs_qsr else None,
                "diff_vs_qsr_std": float(np.std(vs_qsr, ddof=1)) if len(vs_qsr) > 1 else 0.0,
                "train_acc_mean": float(np.mean([r["train_acc"] for r in rs]) * 100),
                "test_loss_mean": float(np.mean([r["test_loss"] for r in rs])),
                "syncs": rs[0]["syncs"],
                "steps": rs[0]["steps"],
                "comm_vs_ddp": rs[0]["comm_vs_ddp"],
                "seeds": [r["seed"] for r in rs],
            }
        )
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    a, jobs = meta["args"], meta["jobs"]
    variants = any(r["rule"].startswith("qsr_") for r in rows)
    runs = sum(len(r["seeds"]) for r in rows)
    cpu = "The runs' CPU time" if not meta.get("added") else f"The CPU time of all {runs} runs (the added rows' too)"
    machine = (
        f"Machine: {meta['machine']}. Wall time {meta['wall_seconds'] / 60:.1f} min with {jobs} runs in parallel; "
        f"load average {meta['load_before']:.1f} before / {meta['load_after']:.1f} after (a shared machine). "
        f"{cpu} adds up to {meta['cpu_seconds'] / 60:.1f} min: about "
        f"{meta['cpu_seconds'] / 60 / jobs:.1f} min on {jobs} idle cores."
    )
    alphas = ", ".join(f"{k} {v:.4g}" for k, v in meta["alphas"].items())
    setup = (
        f"Setup: {meta['dataset']}, {meta['train_examples']} training / {meta['test_examples']} test images, "
        f"CNN with {meta['parameters']:,} parameters, K={a['workers']} simulated workers, global batch "
        f"{a['global_batch']}, {a['epochs']} epochs = {meta['total_steps']} steps ({meta['warmup_steps']} warm-up), "
        f"{a['optimizer']} peak lr {a['lr']}, weight decay {a['weight_decay']}, cosine to {a['min_lr_rate']} x peak; "
        f"H_base={a['h_base']}; alphas: {alphas}; post-local: H=1 until step {meta['post_local_switch_step']}, "
        f"then H={a['h_base']}."
    )
    lines = [
        "# Generalization benchmark (issue 7)"
        + (": overlap and compression variants (issue 14)" if any(r["rule"] in VARIANTS[2:] for r in rows) else "")
        + (", outer optimizer (issue 18)" if any(r["rule"] == "qsr_nesterov" for r in rows) else "")
        + (", overlap depth (issue 20)" if any(r["rule"] in DEPTHS for r in rows) else "")
        + (", fragments (issue 20)" if any(r["rule"] == "qsr_fragments4" for r in rows) else "")
        + (", int8 compression (issue 28)" if any(r["rule"] in INT8 for r in rows) else ""),
        "",
        f"Command: `{meta['command']}`  ",
        machine + "  ",
        *(
            f"Added by `{x['command']}`: {', '.join(LABELS[r] for r in x['rules'])} ({x['wall_seconds'] / 60:.1f} min, "
            f"load average {x['load_before']:.1f} before / {x['load_after']:.1f} after).  "
            for x in meta.get("added", [])
        ),
        setup,
        "",
        "| rule | test acc % (mean ± std) | vs data-parallel (paired) "
        + ("| vs QSR (paired; per seed) " if variants else "")
        + "| train acc % | syncs | comm vs data-parallel |",
        "| --- | --- | --- " + ("| --- " if variants else "") + "| --- | --- | --- |",
    ]
    for r in rows:
        diff = (
            "—"
            if r["rule"] == "ddp" or r["diff_vs_ddp_mean"] is None
            else f"{r['diff_vs_ddp_mean']:+.2f} ± {r['diff_vs_ddp_std']:.2f}"
        )
        vs_qsr = ""
        if variants:  # what a variant of QSR changes, paired with plain QSR (same seed)
            per_seed = ", ".join(f"{d:+.2f}" for d in r.get("diff_vs_qsr_per_seed") or [])
            vs_qsr = (
                "— "
                if not r["rule"].startswith("qsr_") or r.get("diff_vs_qsr_mean") is None
                else f"{r['diff_vs_qsr_mean']:+.2f} ± {r['diff_vs_qsr_std']:.2f} ({per_seed}) "
            ) + "| "
        lines.append(
            f"| {r['label']} | {r['test_acc_mean']:.2f} ± {r['test_acc_std']:.2f} | {diff} | {vs_qsr}"
            f"{r['train_acc_mean']:.2f} | {r['syncs']} | {100 * r['comm_vs_ddp']:.1f}% |"
        )
    lines += [
        "",
        (
            f"Seeds: {rows[0]['seeds']} (std over seeds, ddof=1; 'paired' = per-seed difference with the "
            "data-parallel (or QSR) run of the same init and data order)."
        ),
        (
            "Paper (ImageNet, single runs): ViT-B AdamW data-parallel 79.86, constant H=4 79.32, QSR 80.98 "
            "(10.4% comm); ResNet-152 SGD data-parallel 79.53, QSR 80.27 (20.1% comm)."
        ),
    ]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------------ main
def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke test: 2 seeds, 2 epochs on 2,048 examples")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--workers", type=int, default=4, help="K simulated workers")
    p.add_argument("--global-batch", type=int, default=256, help="B; each worker gets B/K per step")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--train-subset", type=int, default=0, help="training examples used (0: all 60,000)")
    p.add_argument("--width", type=int, default=16, help="CNN channels: width, 2*width; head 8*width")
    p.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    p.add_argument("--lr", type=float, default=4e-3, help="peak lr")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-fraction", type=float, default=0.1, help="paper ViT-B: 10,000 of 93,600 steps")
    p.add_argument("--min-lr-rate", type=float, default=1.25e-4, help="final lr / peak lr (paper ViT-B: 1e-6/0.008)")
    p.add_argument("--h-base", type=int, default=4)
    p.add_argument("--alpha-ratio", type=float, default=PAPER_ALPHA_RATIO, help="alpha_QSR / (peak_lr*sqrt(H_base))")
    p.add_argument(
        "--post-local-switch",
        type=float,
        default=0.5,
        help="fraction of steps before post-local goes local (assumption)",
    )
    p.add_argument("--rules", nargs="+", choices=[*RULES, *VARIANTS[2:], *EXTRA], default=RULES)
    p.add_argument(
        "--variants",
        action="store_true",
        help="data-parallel, QSR, QSR + overlap, QSR + compression; 3 seeds; writes results/generalization_variants",
    )
    p.add_argument("--evals", type=int, default=20, help="test evaluations per run")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="runs in parallel (1 thread each)")
    p.add_argument("--data-dir", default=str(FMNIST_DIR))
    p.add_argument("--output", default=str(RESULTS / "generalization"), help="path prefix of the .json/.md/.png")
    p.add_argument("--replot", metavar="JSON", help="only rewrite the .md and .png of a finished run's JSON")
    p.add_argument(
        "--merge",
        metavar="JSON",
        help="run only --rules (with that JSON's setup and seeds) and add them to that finished run's .json/.md/.png",
    )
    return p


def figure_name(out: Path) -> str:
    """The `plots.FIGURES` entry of an output prefix (its own name if registered: figure size)."""
    return out.name if out.name in plots.FIGURES else "generalization"


def main(argv: list[str] | None = None) -> None:
    args = make_parser().parse_args(argv)
    if args.replot:
        saved = json.loads(Path(args.replot).read_text())
        out = Path(args.replot).with_suffix("")
        out.with_suffix(".md").write_text(
            markdown(summarize(saved["runs"], saved["meta"]["args"]["rules"]), saved["meta"])
        )
        plots.draw(figure_name(out), args.replot)
        return
    merged = None
    if args.merge:
        merged = json.loads(Path(args.merge).read_text())
        keep = {k: v for k, v in vars(args).items() if k in ("rules", "jobs", "merge")}
        keep.update(quick=False, variants=False)  # the saved args hold the setup those flags had already set
        args = argparse.Namespace(
            **{**merged["meta"]["args"], **keep, "output": str(Path(args.merge).with_suffix(""))}
        )
    if args.quick:
        args.seeds, args.epochs, args.train_subset, args.evals = 2, 2, 2048, 3
        if args.output == str(RESULTS / "generalization"):
            args.output = str(RESULTS / "generalization_quick")
    if args.variants:
        args.rules, args.seeds = VARIANTS, 3
        if args.output == str(RESULTS / "generalization"):
            args.output = str(RESULTS / "generalization_variants")
    if "ddp" not in args.rules and merged is None:
        args.rules = ["ddp", *args.rules]
    if args.global_batch % args.workers:
        raise SystemExit(f"--global-batch {args.global_batch} must be divisible by --workers {args.workers}")
    x_train, y_train, _, y_test, dataset = load_data(Path(args.data_dir))
    n = min(args.train_subset or len(y_train), len(y_train))
    total = args.epochs * (n // args.global_batch)
    warmup = round(args.warmup_fraction * total)
    # the lr of every optimizer step, replayed from the same scheduler type the workers use
    lrs = lr_sequence(args.lr, total, warmup, "cosine_with_min_lr", {"min_lr_rate": args.min_lr_rate})
    configs = rule_configs(args, lrs, warmup)
    for rule in args.rules:
        if configs[rule] is not None:
            p = plan(configs[rule], lrs, warmup)
            print(
                f"{rule:>10}: {p.syncs} syncs in {total} steps ({100 * p.comm_volume_vs_ddp:.1f}%), first round > H_base at step {p.first_step_above(args.h_base)}"
            )
    jobs = [
        {
            "args": vars(args),
            "rule": rule,
            "seed": seed,
            "total_steps": total,
            "warmup_steps": warmup,
            "config": configs[rule] and configs[rule].to_dict(),
        }
        for seed in range(args.seeds)
        for rule in args.rules
    ]
    start, load_before = time.time(), os.getloadavg()[0]
    runs = run_pool(run_one, jobs, args.jobs, _init_worker, (args.data_dir,), describe)
    wall = time.time() - start
    added = {"rules": args.rules, "wall_seconds": wall, "load_before": load_before, "load_after": os.getloadavg()[0]}
    if merged is not None:  # the finished run's other rules; its meta, with the rules added and how
        saved, out = merged["meta"]["args"]["rules"], args.output
        runs += [r for r in merged["runs"] if r["rule"] not in args.rules]
        args = argparse.Namespace(
            **{**merged["meta"]["args"], "rules": [*saved, *(r for r in args.rules if r not in saved)], "output": out}
        )
    rows = summarize(runs, args.rules)
    meta = {
        "command": "python benchmarks/generalization.py"
        + ("" if argv is None and len(sys.argv) == 1 else " " + " ".join(argv if argv is not None else sys.argv[1:])),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, Python {platform.python_version()}",
        "wall_seconds": wall,
        "cpu_seconds": sum(r["cpu_seconds"] for r in runs),
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "jobs": args.jobs,
        "dataset": dataset,
        "train_examples": n,
        "test_examples": len(y_test),
        "parameters": sum(p.numel() for p in make_model(args.width, x_train.shape[-1]).parameters()),
        "total_steps": total,
        "warmup_steps": warmup,
        "alphas": {k: c.qsr_alpha for k, c in configs.items() if c is not None and c.qsr_alpha is not None},
        "post_local_switch_step": configs["post_local"].qsr_switch_step,
        "args": vars(args),
        "lrs": lrs,
    }
    if merged is not None:
        added["command"] = meta["command"]
        meta = {**merged["meta"], "args": vars(args), "alphas": meta["alphas"], "cpu_seconds": meta["cpu_seconds"]}
        meta["added"] = [*merged["meta"].get("added", []), added]
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(
        json.dumps(
            {"meta": meta, "summary": rows, "runs": sorted(runs, key=lambda r: (r["rule"], r["seed"]))}, indent=1
        )
    )
    out.with_suffix(".md").write_text(markdown(rows, meta))
    plots.draw(figure_name(out), out.with_suffix(".json"))  # the figure of benchmarks/plots.py
    print(markdown(rows, meta))
    print(f"wrote {out}.json/.md/.png in {wall / 60:.1f} min")


if __name__ == "__main__":
    main()
