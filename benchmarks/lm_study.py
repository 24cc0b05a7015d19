"""Does QSR's timing help once an outer optimizer is in play? A pre-registered language-model study (issue 26).

K = 4 simulated workers (qsr_hf.analysis.simulation, checked bitwise against real gloo runs by
tests/test_simulation.py) train a tiny Llama on the offline standard-library corpus (generated tables left out, files
cut to 24,576 characters: qsr_hf/training/corpus.py) with AdamW as LM pretraining runs it (beta2 0.95, gradient
clipping at 1.0 on each worker's own gradient), warm-up and cosine decay, the same tokens for every method. Two phases:

1. Tuning, on ``--tune-seed`` (0; no reported number uses it): the inner lr of data-parallel, constant H and QSR
   (plain averaging, at the first budget; each rule's lr is reused at every budget and with every outer setting), then
   for each rule and budget the outer setting from ONE grid shared by both rules (``OUTER_GRID``: plain averaging,
   Nesterov at four (lr, momentum), SlowMo-style heavy ball at lr 1, and the round-aware Nesterov step once
   ``QSRConfig`` has ``qsr_outer_scaling``; entries whose fields it lacks are skipped with a printed note).
2. Confirmation, on fresh seeds (``--seeds``, default 1 2 3), paired (same init and data order per seed):
   data-parallel, and per budget constant H and QSR, each plain and with its best outer setting.

Budgets: constant H = 20 and 40 (5% and 2.5% of data-parallel's all-reduces); QSR's alpha comes from
`alpha_for_comm_budget` (what `qsr-hf plan --target-comm` runs) at constant H's communication.

    python benchmarks/lm_study.py                          # both phases (about 40 min on 2 cores)
    python benchmarks/lm_study.py --confirm benchmarks/results/lm_study.json --seeds 11 12 --name lm_study_confirm
    python benchmarks/lm_study.py --quick                  # smoke test of both phases (~2 min), results/lm_study_quick.*

``--confirm RESULTS.json`` reruns only phase 2 with the setup and the settings phase 1 chose in RESULTS.json.
``--compress int8`` (issue 28; bf16, int8 or fp8, ``--error-feedback`` to keep the residuals) adds per budget the
best QSR method again with compressed deltas (``qsr_compress_delta``), paired against it on the same seeds;
``--only-compressed-pair`` runs only what that pairing needs (data-parallel, the best QSR methods and their twins);
``--reuse-confirmed`` takes the uncompressed runs from RESULTS.json (same seeds) and runs only the twins:

    python benchmarks/lm_study.py --confirm benchmarks/results/lm_study.json --seeds 1 2 3 --compress int8 \
        --only-compressed-pair --name lm_study_int8
    python benchmarks/lm_study.py --confirm benchmarks/results/lm_study.json --seeds 1 2 3 --compress int8 \
        --error-feedback --only-compressed-pair --reuse-confirmed --name lm_study_int8_ef
Writes results/<name>.{json,md}; the JSON's ``paired`` holds, per budget, ``qsr_vs_constant`` (best QSR method minus
best constant-H method, validation loss in nats, per seed), ``qsr_vs_constant_outer`` (the same between each rule's
best outer setting: the pre-registered criterion, docs/language-models.md) and ``qsr_vs_ddp_pct`` (per seed); with
``--compress``, ``compressed`` (the twin minus the best QSR method per seed, and both vs data-parallel in %).
"""

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import _common
import torch
from _common import mean_std, run_pool, sim_stats, write_result
from transformers import PreTrainedTokenizerFast, get_scheduler

from qsr_hf import QSRConfig
from qsr_hf.analysis.lr_schedule import lr_sequence
from qsr_hf.analysis.planner import alpha_for_comm_budget, plan
from qsr_hf.analysis.simulation import DataParallelSimulation, LocalTrainingSimulation, shard_batch
from qsr_hf.training.corpus import MAX_FILE_CHARS, corpus_version, load_stdlib_corpus
from qsr_hf.training.lm_models import build_causal_lm
from qsr_hf.training.packing import token_blocks
from qsr_hf.training.tokenizer import train_bpe_tokenizer


WARMUP = "warmup"  # stands for the run's lr warm-up steps in OUTER_GRID
# The outer settings, one grid for both rules: name -> QSRConfig fields. "plain": the average itself (outer lr 1,
# no momentum). Nesterov: DiLoCo's 0.7 / 0.9 and lower lr and momentum (Charles et al. 2025: best outer lr about 0.6
# with 2-4 workers at H = 30); sgd 1.0 / 0.5: SlowMo (slow lr 1, slow momentum 0.4-0.8); round_lr: the round-aware
# step (outer lr scaled by the round's lr, momentum warmed up over the lr warm-up), skipped until QSRConfig has it.
OUTER_GRID: dict[str, dict] = {
    "plain": {},
    "nesterov_0.7_0.9": {"qsr_outer_optimizer": "nesterov", "qsr_outer_lr": 0.7, "qsr_outer_momentum": 0.9},
    "nesterov_0.4_0.9": {"qsr_outer_optimizer": "nesterov", "qsr_outer_lr": 0.4, "qsr_outer_momentum": 0.9},
    "nesterov_0.7_0.5": {"qsr_outer_optimizer": "nesterov", "qsr_outer_lr": 0.7, "qsr_outer_momentum": 0.5},
    "nesterov_0.3_0.5": {"qsr_outer_optimizer": "nesterov", "qsr_outer_lr": 0.3, "qsr_outer_momentum": 0.5},
    "slowmo_1.0_0.5": {"qsr_outer_optimizer": "sgd", "qsr_outer_lr": 1.0, "qsr_outer_momentum": 0.5},
    "roundlr_nesterov_0.7_0.9": {
        "qsr_outer_optimizer": "nesterov",
        "qsr_outer_lr": 0.7,
        "qsr_outer_momentum": 0.9,
        "qsr_outer_scaling": "round_lr",
        "qsr_outer_momentum_warmup": WARMUP,
    },
}
RULES = ("constant", "qsr")


# ----------------------------------------------------------------------------------------------------------- data
def prepare_data(args: argparse.Namespace, folder: Path) -> dict:
    """Train the BPE tokenizer on the training files, pack both splits into blocks and save them under ``folder``."""
    train = load_stdlib_corpus("train", max_samples=args.max_files)
    validation = load_stdlib_corpus("validation", max_samples=args.max_files)
    tokenizer = train_bpe_tokenizer(train["text"], args.vocab_size, model_max_length=args.block_size)
    tokenizer.save_pretrained(folder / "tokenizer")
    blocks = {
        s: token_blocks(ds["text"], tokenizer, args.block_size) for s, ds in (("train", train), ("val", validation))
    }
    g = torch.Generator().manual_seed(0)  # a fixed validation subset, the same for every run
    blocks["val"] = blocks["val"][torch.randperm(len(blocks["val"]), generator=g)[: args.val_blocks]]
    torch.save(blocks, folder / "blocks.pt")
    return {
        "corpus": corpus_version(),
        "corpus_rule": f"generated files left out, files cut to {MAX_FILE_CHARS} characters",
        "train_files": len(train),
        "validation_files": len(validation),
        "train_blocks": len(blocks["train"]),
        "val_blocks": len(blocks["val"]),
        "vocab_size": len(tokenizer),
    }


_DATA: dict = {}


def _init_worker(folder: str) -> None:
    torch.set_num_threads(1)
    _DATA.update(torch.load(Path(folder) / "blocks.pt"))
    _DATA["tokenizer"] = PreTrainedTokenizerFast.from_pretrained(Path(folder) / "tokenizer")


def make_model(args: argparse.Namespace) -> torch.nn.Module:
    overrides = (
        f"hidden_size={args.hidden},intermediate_size={3 * args.hidden},num_hidden_layers={args.layers},"
        f"num_attention_heads={args.hidden // 16},num_key_value_heads={args.hidden // 16},"
        f"max_position_embeddings={args.block_size},tie_word_embeddings=True"
    )
    return build_causal_lm("demo_llama", _DATA["tokenizer"], config_overrides=overrides)


def _loss(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(input_ids=x, labels=x).loss


@torch.no_grad()
def val_loss(model: torch.nn.Module, blocks: torch.Tensor, batch: int = 128) -> float:
    """Mean token cross-entropy over ``blocks`` (every block has the same number of predicted tokens)."""
    model.eval()
    losses = [
        _loss(model, blocks[i : i + batch]).item() * len(blocks[i : i + batch]) for i in range(0, len(blocks), batch)
    ]
    model.train()
    return sum(losses) / len(blocks)


# -------------------------------------------------------------------------------------------------------- methods
def warmup_steps(args: argparse.Namespace) -> int:
    return round(args.warmup_fraction * args.steps)


def lr_schedule(args: argparse.Namespace, peak_lr: float) -> list[float]:
    return lr_sequence(
        peak_lr, args.steps, warmup_steps(args), "cosine_with_min_lr", {"min_lr_rate": args.min_lr_rate}
    )


def optimizer_fns(args: argparse.Namespace, peak_lr: float) -> tuple:
    """(optimizer_fn, scheduler_fn): AdamW (beta2 ``args.beta2``) whose every step first clips the gradient of its
    own model to norm ``args.clip`` (a step pre-hook: per worker under local training, the averaged gradient under
    data-parallel, as the Trainer clips each rank's gradient before its step); warm-up, then cosine."""

    def optimizer_fn(model: torch.nn.Module) -> torch.optim.Optimizer:
        params = list(model.parameters())
        opt = torch.optim.AdamW(params, lr=peak_lr, betas=(0.9, args.beta2), weight_decay=args.weight_decay)

        def clip(*_: object) -> None:
            torch.nn.utils.clip_grad_norm_(params, args.clip)

        if args.clip:
            opt.register_step_pre_hook(clip)
        return opt

    def scheduler_fn(opt: torch.optim.Optimizer) -> object:
        kwargs = {"min_lr_rate": args.min_lr_rate}
        return get_scheduler(
            "cosine_with_min_lr", opt, warmup_steps(args), args.steps, scheduler_specific_kwargs=kwargs
        )

    return optimizer_fn, scheduler_fn


def supported(outer: str) -> bool:
    """Whether this QSRConfig has every field of OUTER_GRID[outer] (round_lr arrives with branch ``outer``)."""
    names = {f.name for f in dataclasses.fields(QSRConfig)}
    return set(OUTER_GRID[outer]) <= names


def rule_config(args: argparse.Namespace, rule: str, h: int, peak_lr: float, outer: str) -> QSRConfig:
    """Constant H = ``h``, or QSR with the alpha that communicates as much (``alpha_for_comm_budget``), with the
    outer setting ``outer`` of OUTER_GRID."""
    lrs, warmup = lr_schedule(args, peak_lr), warmup_steps(args)
    fields = {k: (warmup if v == WARMUP else v) for k, v in OUTER_GRID[outer].items()}
    constant = QSRConfig(qsr_rule="constant", qsr_h_base=h)
    if rule == "constant":
        return dataclasses.replace(constant, **fields)
    budget = plan(constant, lrs, warmup).comm_volume_vs_ddp
    probe = QSRConfig(qsr_rule="qsr", qsr_alpha=1.0, qsr_h_base=args.h_base)
    return dataclasses.replace(probe, qsr_alpha=alpha_for_comm_budget(probe, lrs, budget, warmup), **fields)


def method_name(rule: str, h: int, outer: str) -> str:
    return f"{rule}_h{h}_{outer}"


def label(method: str) -> str:
    if method == "ddp":
        return "data-parallel"
    rule, h, outer = method.split("_", 2)
    name = f"constant H={h[1:]}" if rule == "constant" else f"QSR (comm of H={h[1:]})"
    return f"{name}, {outer.replace('_', ' ')}"


def job(args: argparse.Namespace, method: str, seed: int, peak_lr: float, config: QSRConfig | None) -> dict:
    return {"args": vars(args), "method": method, "seed": seed, "lr": peak_lr, "config": config and config.to_dict()}


# ------------------------------------------------------------------------------------------------------------ runs
def run_one(job: dict) -> dict:
    """Train one (method, seed, lr) run; return its validation loss, communication and curve."""
    args, method, seed, peak_lr = argparse.Namespace(**job["args"]), job["method"], job["seed"], job["lr"]
    config = QSRConfig(**job["config"]) if job["config"] else None
    train, val = _DATA["train"], _DATA["val"]
    torch.manual_seed(seed)
    model = make_model(args)
    opt_fn, sched_fn = optimizer_fns(args, peak_lr)
    if config is None:
        sim = DataParallelSimulation(model, opt_fn, args.workers, sched_fn)
    else:
        sim = LocalTrainingSimulation(model, opt_fn, config, args.workers, args.steps, warmup_steps(args), sched_fn)
    g = torch.Generator().manual_seed(seed)  # data order depends on the seed only: runs are paired
    epochs = math.ceil(args.steps * args.global_batch / len(train))
    order = torch.cat([torch.randperm(len(train), generator=g) for _ in range(epochs)])
    eval_steps = {round(args.steps * (i + 1) / args.evals) for i in range(args.evals)}
    curve, losses, h_trace, tokens = [], [], [], 0
    start, cpu_start = time.time(), time.process_time()
    for step in range(1, args.steps + 1):
        batch = train[order[(step - 1) * args.global_batch : step * args.global_batch]]
        tokens += batch.numel()
        shard_losses = []

        def loss_fn(m, x, shard_losses=shard_losses):
            loss = _loss(m, x)
            shard_losses.append(loss.item())
            return loss

        sim.step(shard_batch(batch, args.workers), loss_fn)
        losses.append(sum(shard_losses) / len(shard_losses))
        h_trace.append(sim.stats.round_length if config is not None else 1)
        if step in eval_steps and step != args.steps:
            curve.append({"step": step, "val_loss": val_loss(sim.averaged_model(), val)})
    final = val_loss(sim.averaged_model(), val)
    curve.append({"step": args.steps, "val_loss": final})
    tail = max(1, args.steps // 20)
    return {
        "method": method,
        "seed": seed,
        "lr": peak_lr,
        "config": job["config"],
        "val_loss": final,
        "train_loss_last5pct": sum(losses[-tail:]) / tail,
        "tokens": tokens,
        "curve": curve,
        **sim_stats(sim, h_trace, start, cpu_start),
    }


def describe(run: dict) -> str:
    return (
        f"{run['method']:>34} seed {run['seed']} lr {run['lr']:.2g}: val loss {run['val_loss']:.4f} "
        f"syncs {run['syncs']} ({run['seconds']:.0f} s)"
    )


def run_jobs(args: argparse.Namespace, jobs: list[dict], folder: str) -> list[dict]:
    """Run ``jobs`` in ``args.jobs`` spawned processes, or in this one with ``--jobs 1`` (the test)."""
    if args.jobs > 1:
        return run_pool(run_one, jobs, args.jobs, _init_worker, (folder,), describe)
    threads, runs = torch.get_num_threads(), []
    try:
        _init_worker(folder)
        for j in jobs:
            runs.append(run_one(j))
            print(describe(runs[-1]), flush=True)
    finally:
        torch.set_num_threads(threads)
    return runs


# ------------------------------------------------------------------------------------------------------- phases
def best(runs: list[dict], key: str = "val_loss") -> dict:
    return min(runs, key=lambda r: (r[key], r["method"]))


def tune(args: argparse.Namespace, folder: str) -> tuple[dict, list[dict], list[str]]:
    """Phase 1 on ``args.tune_seed``: each method's inner lr, then each rule's outer setting per budget. Returns the
    settings the confirmation runs ({method: {"lr", "config", "role"}}), every tuning run, and the skip notes."""
    seed, h0, notes = args.tune_seed, args.h[0], []
    lr_jobs = [job(args, "ddp", seed, lr, None) for lr in args.lr_grid]
    lr_jobs += [
        job(args, method_name(rule, h0, "plain"), seed, lr, rule_config(args, rule, h0, lr, "plain"))
        for lr in args.lr_grid
        for rule in RULES
    ]
    print(f"tuning phase 1/2: inner lr in {args.lr_grid} (seed {seed}, H = {h0}, plain averaging)", flush=True)
    lr_runs = run_jobs(args, lr_jobs, folder)
    chosen_lr = {}
    for key, prefix in (("ddp", "ddp"), *((rule, method_name(rule, h0, "plain")) for rule in RULES)):
        chosen_lr[key] = best([r for r in lr_runs if r["method"] == prefix])["lr"]
        if chosen_lr[key] in (min(args.lr_grid), max(args.lr_grid)) and len(args.lr_grid) > 1:
            notes.append(f"{key}: the best inner lr {chosen_lr[key]} is at the grid's edge")
    outers = []
    for outer, fields in OUTER_GRID.items():
        if supported(outer):
            outers.append(outer)
        else:
            missing = sorted(set(fields) - {f.name for f in dataclasses.fields(QSRConfig)})
            notes.append(f"skipped outer setting {outer}: QSRConfig has no {', '.join(missing)} (branch `outer`)")
    outer_jobs = [
        job(
            args,
            method_name(rule, h, outer),
            seed,
            chosen_lr[rule],
            rule_config(args, rule, h, chosen_lr[rule], outer),
        )
        for h in args.h
        for rule in RULES
        for outer in outers
        if not (h == h0 and outer == "plain")  # phase 1 ran it at the chosen lr already
    ]
    for note in notes:
        print(f"note: {note}", flush=True)
    print(f"tuning phase 2/2: outer settings {outers} for {RULES} at H = {args.h} (seed {seed})", flush=True)
    outer_runs = run_jobs(args, outer_jobs, folder)
    at_lr = [r for r in lr_runs if r["method"] != "ddp" and r["lr"] == chosen_lr[r["method"].split("_")[0]]]
    settings = {"ddp": {"lr": chosen_lr["ddp"], "config": None, "role": "ddp"}}
    for h in args.h:
        for rule in RULES:
            candidates = [r for r in [*at_lr, *outer_runs] if r["method"].startswith(f"{rule}_h{h}_")]
            plain = next(r for r in candidates if r["method"].endswith("_plain"))
            with_outer = [r for r in candidates if r is not plain]
            settings[plain["method"]] = {"lr": plain["lr"], "config": plain["config"], "role": f"{rule}_h{h}_plain"}
            if with_outer:
                b = best(with_outer)
                settings[b["method"]] = {"lr": b["lr"], "config": b["config"], "role": f"{rule}_h{h}_outer"}
    return settings, lr_runs + outer_runs, notes


def confirm(args: argparse.Namespace, settings: dict, folder: str) -> list[dict]:
    """Phase 2: every chosen method on every seed of ``args.seeds``."""
    jobs = [
        {"args": vars(args), "method": m, "seed": s, "lr": v["lr"], "config": v["config"]}
        for s in args.seeds
        for m, v in settings.items()
    ]
    print(f"confirmation: {list(settings)} on seeds {args.seeds}", flush=True)
    return run_jobs(args, jobs, folder)


def compressed_settings(args: argparse.Namespace, settings: dict, tuning_runs: list[dict]) -> dict:
    """Per budget, the best QSR method (``best_methods``) again with its deltas compressed in ``args.compress``:
    {twin: {"lr", "config", "role": "qsr_h<H>_compressed", "of": the uncompressed method}}."""
    fields = {
        "qsr_compress_delta": True,
        "qsr_compress_format": args.compress,
        "qsr_compress_error_feedback": args.error_feedback,
    }
    suffix = args.compress + ("_ef" if args.error_feedback else "")
    twins = {}
    for h in args.h:
        m = best_methods(settings, tuning_runs, h)["best_qsr"]
        config = QSRConfig(**{**settings[m]["config"], **fields}).to_dict()  # validated as the runs will build it
        twins[f"{m}_{suffix}"] = {"lr": settings[m]["lr"], "config": config, "role": f"qsr_h{h}_compressed", "of": m}
    return twins


# ---------------------------------------------------------------------------------------------------------- report
def per_seed(runs: list[dict], method: str) -> dict[int, float]:
    return {r["seed"]: r["val_loss"] for r in runs if r["method"] == method}


def best_methods(settings: dict, tuning_runs: list[dict], h: int) -> dict:
    """At budget ``h``, each rule's best method (plain or its best outer setting, chosen on the tuning seed, never on
    the seeds reported) and its best outer setting: {"best_<rule>": ..., "best_<rule>_outer": ...}."""
    tuned = {r["method"]: r["val_loss"] for r in tuning_runs if r["lr"] == settings.get(r["method"], {}).get("lr")}
    roles, entry = {v["role"]: m for m, v in settings.items()}, {}
    for rule in RULES:
        candidates = [roles[k] for k in (f"{rule}_h{h}_plain", f"{rule}_h{h}_outer") if k in roles]
        entry[f"best_{rule}"] = min(candidates, key=lambda m: tuned.get(m, math.inf))
        entry[f"best_{rule}_outer"] = roles.get(f"{rule}_h{h}_outer")
    return entry


def paired_report(
    args: argparse.Namespace, settings: dict, tuning_runs: list[dict], runs: list[dict], twins: dict | None = None
) -> dict:
    """Per budget: the best constant-H and QSR method (``best_methods``), and the paired per-seed differences; the
    pre-registered criterion on each rule's best outer setting; with ``twins`` (``compressed_settings``), the
    compressed twin minus the best QSR method. Comparisons whose methods did not run are left out."""
    ddp = per_seed(runs, "ddp")
    out = {}
    for h in args.h:
        entry: dict = {"h": h, **best_methods(settings, tuning_runs, h)}
        q, c = per_seed(runs, entry["best_qsr"]), per_seed(runs, entry["best_constant"])
        entry["qsr_vs_constant"] = {str(s): q[s] - c[s] for s in sorted(q) if s in c}
        entry["qsr_vs_ddp_pct"] = {str(s): 100 * (q[s] - ddp[s]) / ddp[s] for s in sorted(q) if s in ddp}
        entry["constant_vs_ddp_pct"] = {str(s): 100 * (c[s] - ddp[s]) / ddp[s] for s in sorted(c) if s in ddp}
        for twin, v in (twins or {}).items():
            if v["role"] == f"qsr_h{h}_compressed":
                z, cfg = per_seed(runs, twin), v["config"]
                diffs = {str(s): z[s] - q[s] for s in sorted(z) if s in q}
                mean, std = mean_std(list(diffs.values()))
                entry["compressed"] = {
                    "method": twin,
                    "of": v["of"],
                    "format": cfg["qsr_compress_format"],
                    "error_feedback": cfg["qsr_compress_error_feedback"],
                    "minus_uncompressed": diffs,
                    "mean": mean,
                    "std": std,
                    "vs_ddp_pct": {str(s): 100 * (z[s] - ddp[s]) / ddp[s] for s in sorted(z) if s in ddp},
                }
        if entry["best_qsr_outer"] and entry["best_constant_outer"] and c:
            qo, co = per_seed(runs, entry["best_qsr_outer"]), per_seed(runs, entry["best_constant_outer"])
            diffs = {str(s): qo[s] - co[s] for s in sorted(qo) if s in co}
            noise = mean_std(list(diffs.values()))[1]
            entry["qsr_vs_constant_outer"] = diffs
            entry["criterion"] = {
                "noise": noise,
                "met": len(diffs) >= 3 and all(d < -noise for d in diffs.values()),
                "rule": "QSR's best outer setting beats constant H's on every seed by more than the std over seeds "
                "of the paired difference (>= 3 seeds)",
            }
        out[f"h{h}"] = entry
    return out


def summarize(runs: list[dict], methods: list[str]) -> list[dict]:
    """One row per method: validation loss over seeds and the paired difference to data-parallel."""
    ddp, rows = per_seed(runs, "ddp"), []
    for m in methods:
        rs = sorted((r for r in runs if r["method"] == m), key=lambda r: r["seed"])
        loss, loss_std = mean_std([r["val_loss"] for r in rs])
        diff, diff_std = mean_std([r["val_loss"] - ddp[r["seed"]] for r in rs if r["seed"] in ddp])
        rows.append(
            {
                "method": m,
                "label": label(m),
                "lr": rs[0]["lr"],
                "val_loss_mean": loss,
                "val_loss_std": loss_std,
                "diff_vs_ddp_mean": diff,
                "diff_vs_ddp_std": diff_std,
                "rel_diff_vs_ddp_pct": 100 * diff / (loss - diff),
                "syncs": rs[0]["syncs"],
                "comm_vs_ddp": rs[0]["comm_vs_ddp"],
                "tokens": rs[0]["tokens"],
                "seeds": [r["seed"] for r in rs],
            }
        )
    return rows


def _seeds(values: dict) -> str:
    return ", ".join(f"{v:+.4f}" for v in values.values())


def markdown(record: dict) -> str:
    a, setup = record["args"], record["setup"]
    lines = [
        "# Language-model study: QSR timing with an outer optimizer (issue 26, pre-registered)",
        "",
        f"Command: `{record['command']}`  ",
        (
            f"Wall time {record['wall_seconds'] / 60:.1f} min with {a['jobs']} runs in parallel (1 thread each), load "
            f"average {record['load_at_start']:.1f} at the start; torch {record['machine']['torch']}, corpus "
            f"{setup['corpus']} ({setup['corpus_rule']}).  "
        ),
        (
            f"Setup: {setup['train_files']} training / {setup['validation_files']} validation files, byte-level BPE of "
            f"{setup['vocab_size']} tokens, blocks of {a['block_size']} tokens; Llama with {a['layers']} layers, hidden "
            f"{a['hidden']}, tied embeddings, {setup['parameters']:,} parameters; K={a['workers']} simulated workers, "
            f"global batch {a['global_batch']} blocks, {a['steps']} steps ({setup['warmup_steps']} warm-up) = "
            f"{setup['tokens']:,} tokens ({setup['tokens'] / setup['parameters']:.1f} per parameter) for every method. "
            f"Inner AdamW as LM pretraining runs it: beta2 {a['beta2']}, gradient clipping at {a['clip']} of each "
            f"worker's own gradient, weight decay {a['weight_decay']}, cosine to {a['min_lr_rate']} x peak. "
            f"Validation: mean token cross-entropy of the averaged model on {setup['val_blocks']} fixed held-out blocks."
        ),
        "",
        (
            f"Tuning on seed {a['tune_seed']} (no number below uses it): inner lr from {a['lr_grid']} per method (plain "
            f"averaging at H = {a['h'][0]}, reused at every budget and outer setting); then per rule and budget the best "
            f"outer setting of one shared grid: {', '.join(record['outer_grid'])}. Confirmation seeds: {a['seeds']}."
        ),
        "",
    ]
    lines += [f"- note: {n}" for n in record["notes"]]
    lines += [
        "",
        "| method | inner lr | val loss (mean ± std) | vs data-parallel (paired) | syncs | comm vs data-parallel |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in record["summary"]:
        diff = "—" if r["method"] == "ddp" else f"{r['diff_vs_ddp_mean']:+.4f} ± {r['diff_vs_ddp_std']:.4f}"
        diff += "" if r["method"] == "ddp" else f" ({r['rel_diff_vs_ddp_pct']:+.2f}%)"
        lines.append(
            f"| {r['label']} | {r['lr']:.3g} | {r['val_loss_mean']:.4f} ± {r['val_loss_std']:.4f} | {diff} "
            f"| {r['syncs']} | {100 * r['comm_vs_ddp']:.1f}% |"
        )
    lines += ["", "Paired, per seed (negative: QSR better); best methods chosen on the tuning seed:", ""]
    for key, p in record["paired"].items():
        versus = f" − best constant `{p['best_constant']}`: {_seeds(p['qsr_vs_constant'])} nats;" * bool(
            p["qsr_vs_constant"]
        )
        lines.append(
            f"- {key}: best QSR `{p['best_qsr']}`{versus or ';'} QSR vs data-parallel: "
            f"{', '.join(f'{v:+.2f}%' for v in p['qsr_vs_ddp_pct'].values())}"
        )
        if "compressed" in p:
            z = p["compressed"]
            fmt = z["format"] + (" with error feedback" if z["error_feedback"] else "")
            lines.append(
                f"  - compressed deltas ({fmt}): `{z['method']}` − `{z['of']}`: {_seeds(z['minus_uncompressed'])} nats"
                f" (mean {z['mean']:+.4f} ± {z['std']:.4f}); vs data-parallel: "
                f"{', '.join(f'{v:+.2f}%' for v in z['vs_ddp_pct'].values())}"
            )
        if "criterion" in p:
            c = p["criterion"]
            lines.append(
                f"  - pre-registered criterion (best outer settings `{p['best_qsr_outer']}` − "
                f"`{p['best_constant_outer']}`: {_seeds(p['qsr_vs_constant_outer'])}; noise {c['noise']:.4f}): "
                f"{'met' if c['met'] else 'not met'}"
            )
    lines += [
        "",
        "Tuning runs (seed " + str(a["tune_seed"]) + "):",
        "",
        "| method | inner lr | val loss |",
        "| --- | --- | --- |",
    ]
    for r in sorted(record["tuning_runs"], key=lambda r: (r["method"], r["lr"])):
        lines.append(f"| {r['method']} | {r['lr']:.3g} | {r['val_loss']:.4f} |")
    lines += ["", f"Seeds: {a['seeds']} (std over seeds, ddof=1). {record['scale_note']}"]
    return "\n".join(lines) + "\n"


SCALE_NOTE = (
    "Cut to fit about 40 minutes on 2 cores: a tiny model (tied embeddings, a small vocabulary, short blocks), one "
    "tuning seed, an inner-lr grid of three tuned with plain averaging at the 5% budget and reused elsewhere, 3 "
    "confirmation seeds. With more compute: a model of 10M+ parameters at 20 tokens per parameter, blocks of 512+, "
    "the inner lr tuned per outer setting, two tuning seeds, 5 confirmation seeds."
)


# ------------------------------------------------------------------------------------------------------------ main
def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke test of both phases on a tiny setting")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="confirmation seeds (fresh)")
    p.add_argument("--tune-seed", type=int, default=0, help="the tuning phase's seed (no reported number uses it)")
    p.add_argument(
        "--confirm", metavar="RESULTS.json", help="rerun only the confirmation with RESULTS.json's settings"
    )
    p.add_argument("--workers", type=int, default=4, help="K simulated workers")
    p.add_argument("--global-batch", type=int, default=20, help="blocks per step; each worker gets 1/K of them")
    p.add_argument(
        "--steps", type=int, default=2000, help="optimizer steps (the token budget: x global batch x block)"
    )
    p.add_argument("--block-size", type=int, default=32, help="tokens per block")
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--hidden", type=int, default=48, help="Llama hidden size (heads of 16; MLP 3 x hidden)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--lr-grid", type=float, nargs="+", default=[2e-3, 4e-3, 8e-3], help="peak inner lrs tuned")
    p.add_argument("--beta2", type=float, default=0.95, help="AdamW beta2 (LM pretraining practice)")
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping per worker (0: none)")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--warmup-fraction", type=float, default=0.05)
    p.add_argument("--min-lr-rate", type=float, default=0.1, help="final lr / peak lr")
    p.add_argument("--h", type=int, nargs="+", default=[20, 40], help="constant H per budget (5%%, 2.5%%)")
    p.add_argument("--h-base", type=int, default=4, help="QSR's H_base (the paper's)")
    p.add_argument("--max-files", type=int, default=None, help="first N files of each split (default: all)")
    p.add_argument("--val-blocks", type=int, default=1024, help="fixed validation blocks evaluated")
    p.add_argument("--evals", type=int, default=5, help="validation evaluations per run")
    p.add_argument(
        "--compress",
        choices=["bf16", "int8", "fp8"],
        help="also run each budget's best QSR method with its deltas compressed in this format (issue 28)",
    )
    p.add_argument("--error-feedback", action="store_true", help="with --compress: keep and resend the residuals")
    p.add_argument(
        "--only-compressed-pair",
        action="store_true",
        help="with --compress: run only data-parallel, the best QSR methods and their compressed twins",
    )
    p.add_argument(
        "--reuse-confirmed",
        action="store_true",
        help="with --confirm and --compress: take the uncompressed runs from RESULTS.json, run only the twins",
    )
    p.add_argument("--name", default="lm_study", help="<out-dir>/<name>.{json,md}")
    p.add_argument("--out-dir", default=None, help="default: benchmarks/results")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="runs in parallel (1 thread each)")
    return p


QUICK = {
    "steps": 40, "max_files": 60, "h": [4, 8], "h_base": 2, "val_blocks": 64, "evals": 2, "hidden": 16,
    "layers": 1, "vocab_size": 300, "lr_grid": [4e-3, 8e-3], "seeds": [1, 2], "global_batch": 8,
}  # fmt: skip
SETUP_ARGS = [
    "workers",
    "global_batch",
    "steps",
    "block_size",
    "vocab_size",
    "hidden",
    "layers",
    "lr_grid",
    "beta2",
    "clip",
    "weight_decay",
    "warmup_fraction",
    "min_lr_rate",
    "h",
    "h_base",
    "max_files",
    "val_blocks",
    "evals",
    "tune_seed",
]


def main(argv: list[str] | None = None) -> dict:
    args = make_parser().parse_args(argv)
    if args.quick:
        seeds = args.seeds
        vars(args).update(QUICK)
        args.seeds = QUICK["seeds"] if seeds == make_parser().get_default("seeds") else seeds
        args.name = f"{args.name}_quick"
    previous = json.loads(Path(args.confirm).read_text()) if args.confirm else None
    if previous:  # the setup and the tuned settings come from the tuning run
        vars(args).update({k: previous["args"][k] for k in SETUP_ARGS})
    if args.global_batch % args.workers:
        raise SystemExit(f"--global-batch {args.global_batch} must be divisible by --workers {args.workers}")
    if (args.error_feedback or args.only_compressed_pair) and not args.compress:
        raise SystemExit("--error-feedback and --only-compressed-pair need --compress")
    if args.reuse_confirmed and not (args.compress and args.confirm):
        raise SystemExit("--reuse-confirmed needs --confirm and --compress")
    if args.tune_seed in args.seeds:
        raise SystemExit(f"the confirmation seeds {args.seeds} must not include the tuning seed {args.tune_seed}")
    if args.out_dir:
        _common.RESULTS_DIR = Path(args.out_dir)
    load_at_start, start = os.getloadavg()[0], time.time()
    print(
        f"inner AdamW: beta2 {args.beta2}, gradient clipping {args.clip} per worker, weight decay {args.weight_decay}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="lm_study_") as folder:
        setup = prepare_data(args, Path(folder))
        _init_worker(folder)
        setup["parameters"] = sum(p.numel() for p in make_model(args).parameters())
        torch.set_num_threads(os.cpu_count() or 1)
        print(f"data ready in {time.time() - start:.0f} s: {setup}", flush=True)
        if previous:
            settings, tuning_runs, notes = previous["settings"], previous["tuning_runs"], previous["notes"]
            notes = [*notes, f"confirmation rerun with the settings of {args.confirm}"]
        else:
            settings, tuning_runs, notes = tune(args, folder)
        twins = compressed_settings(args, settings, tuning_runs) if args.compress else {}
        methods = {**settings, **twins}
        if args.only_compressed_pair:
            kept = {"ddp", *(v["of"] for v in twins.values()), *twins}
            methods = {m: v for m, v in methods.items() if m in kept}
        reused = []
        if args.reuse_confirmed:  # the uncompressed runs as RESULTS.json has them (the same code reproduces them)
            have = {(r["method"], r["seed"]): r for r in previous["runs"]}
            wanted = [(m, s) for s in args.seeds for m in methods if m not in twins]
            if missing := [w for w in wanted if w not in have]:
                raise SystemExit(f"--reuse-confirmed: {args.confirm} has no runs {missing}")
            reused = [have[w] for w in wanted]
            notes.append(f"runs of {sorted({m for m, _ in wanted})} taken from {args.confirm}, not rerun")
            methods_run = twins
        else:
            methods_run = methods
        new_runs = confirm(args, methods_run, folder)
        runs = new_runs + reused
    setup.update(warmup_steps=warmup_steps(args), tokens=runs[0]["tokens"])
    record = {
        "load_at_start": load_at_start,
        "wall_seconds": time.time() - start,
        "cpu_seconds": sum(r["cpu_seconds"] for r in new_runs),
        "args": vars(args),
        "setup": setup,
        "outer_grid": previous["outer_grid"] if previous else [o for o in OUTER_GRID if supported(o)],
        "notes": notes,
        "scale_note": SCALE_NOTE,
        "settings": settings,
        **({"compressed_settings": twins} if twins else {}),
        "tuning_runs": [{k: v for k, v in r.items() if k != "curve"} for r in tuning_runs],
        "summary": summarize(runs, list(methods)),
        "paired": paired_report(args, settings, tuning_runs, runs, twins),
        "runs": sorted(runs, key=lambda r: (r["method"], r["seed"])),
    }
    path = write_result(args.name, record)
    record = json.loads(path.read_text())  # with the command line and the machine write_result adds
    path.with_suffix(".md").write_text(markdown(record))
    print(markdown(record))
    print(f"wrote {path.with_suffix('')}.json/.md in {record['wall_seconds'] / 60:.1f} min", file=sys.stderr)
    return record


if __name__ == "__main__":
    main()
