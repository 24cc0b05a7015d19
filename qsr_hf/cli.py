"""`qsr-hf`: ``train`` a recipe, ``plan`` a run's sync schedule, ``report`` a finished run. The only module that prints.

Nothing heavy is imported before the subcommand is known: ``qsr-hf --help`` and ``qsr-hf plan`` start without
torch or transformers (a recipe or an lr replay loads transformers when it is needed).
"""

import argparse
import dataclasses
import json
import sys
import traceback
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qsr_hf.analysis.planner import (
    Plan,
    alpha_for_comm_budget,
    alpha_for_switch_fraction,
    plan,
    sync_bytes,
)
from qsr_hf.analysis.scaling import NodeLayout, predict_node_modes, predict_wall_clock
from qsr_hf.core.config import QSRConfig
from qsr_hf.core.memory import sync_memory


PLAN_HELP = "replay a sync rule over an lr schedule: round lengths, syncs, communication vs data-parallel"
REPORT_HELP = "draw a finished run's figure (loss, syncs, H per round, communication) and embed it in its model card"
TRAIN_HELP = "train a YAML recipe with Trainer + QSRCallback (run it under `accelerate launch` for several processes)"
# QSRConfig fields that `plan` accepts as flags; type, choices and help come from the dataclass
_PLAN_CONFIG_FIELDS = ("qsr_rule", "qsr_alpha", "qsr_h_base", "qsr_h_max", "qsr_switch_step", "qsr_compress_format")


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    types = {"qsr_alpha": float, "qsr_h_base": int, "qsr_h_max": int, "qsr_switch_step": int}
    for f in dataclasses.fields(QSRConfig):
        if f.name in _PLAN_CONFIG_FIELDS:
            flag = "--" + f.name.removeprefix("qsr_").replace("_", "-")
            p.add_argument(
                flag, dest=f.name, type=types.get(f.name, str), choices=typing.get_args(f.type) if typing.get_origin(f.type) is typing.Literal else None,
                help=f"{f.metadata['help']} Default: the recipe's, else {f.default}.",
            )  # fmt: skip


def _plan_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="qsr-hf plan", description=PLAN_HELP)
    p.add_argument("recipe", nargs="?", help="recipe YAML (takes lr schedule and QSR settings from it)")
    p.add_argument("--peak-lr", type=float, help="learning rate after warm-up")
    p.add_argument("--total-steps", type=int, help="optimizer steps")
    p.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up, optimizer steps")
    p.add_argument("--decay", default="cosine", help="cosine (to --min-lr), linear, constant, step, or a HF type")
    p.add_argument("--min-lr", type=float, default=0.0, help="final lr of the cosine decay")
    p.add_argument("--milestones", type=int, nargs="*", default=[], help="step decay: steps where lr *= --gamma")
    p.add_argument("--gamma", type=float, default=0.1, help="step decay factor")
    _add_config_flags(p)
    p.add_argument("--target-comm", type=float, help="pick the smallest α communicating at most this (e.g. 0.1)")
    p.add_argument("--target-switch", type=float, help="pick α so H first exceeds H_base at this fraction")
    p.add_argument("--plot", help="write lr and H against the step to this PNG (needs matplotlib)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    wall = p.add_argument_group(
        "wall-clock prediction, data-parallel vs this plan (qsr_hf.analysis.scaling; all four needed)"
    )
    wall.add_argument("--workers", type=int, help="N data-parallel workers")
    wall.add_argument("--bandwidth-gbps", type=float, help="per-worker link bandwidth, Gbit/s")
    wall.add_argument("--compute-s-per-step", type=float, help="seconds of one optimizer step without communication")
    wall.add_argument("--model-params", type=float, help="trainable parameters (e.g. 86.6e6 for ViT-B/16)")
    wall.add_argument("--bytes-per-param", type=int, default=4, help="bytes all-reduced per parameter (4: fp32)")
    wall.add_argument("--latency-ms", type=float, default=0.0, help="per-hop latency, ms")
    wall.add_argument("--ddp-overlap", type=float, default=0.0, help="share of DDP's all-reduce hidden by backward")
    nodes = p.add_argument_group(
        "nodes: with --nodes, --procs-per-node and --intra-node-gbps, --bandwidth-gbps is each node's network link "
        "and the prediction covers DDP, QSR per process, per node (qsr_worker=node) and FSDP2 inside nodes"
    )
    nodes.add_argument("--nodes", type=int, help="number of nodes")
    nodes.add_argument("--procs-per-node", type=int, help="processes (GPUs) per node")
    nodes.add_argument("--intra-node-gbps", type=float, help="per-process bandwidth inside a node, Gbit/s")
    return p


def _node_modes(result: Plan, ns: argparse.Namespace) -> dict[str, float] | None:
    inputs = (ns.nodes, ns.procs_per_node, ns.intra_node_gbps)
    if all(v is None for v in inputs):
        return None
    if any(v is None for v in (*inputs, ns.bandwidth_gbps, ns.compute_s_per_step, ns.model_params)):
        raise SystemExit(
            "a prediction over nodes needs --nodes, --procs-per-node, --intra-node-gbps, --bandwidth-gbps (between "
            "nodes), --compute-s-per-step and --model-params"
        )
    layout = NodeLayout(
        ns.nodes, ns.procs_per_node, ns.intra_node_gbps * 1e9, ns.bandwidth_gbps * 1e9, ns.latency_ms / 1e3
    )
    modes = predict_node_modes(
        result, ns.compute_s_per_step, ns.model_params * ns.bytes_per_param, layout, ns.ddp_overlap
    )
    return {**modes, **{k[:-2] + "_h": v / 3600 for k, v in modes.items() if k != "sync_floor_s"}}


def _wall_clock(result: Plan, ns: argparse.Namespace) -> dict[str, float] | None:
    inputs = (ns.workers, ns.bandwidth_gbps, ns.compute_s_per_step, ns.model_params)
    if ns.workers is None and ns.nodes is not None:
        return None  # the prediction over nodes replaces the flat one
    if all(v is None for v in inputs):
        return None
    if any(v is None for v in inputs):
        raise SystemExit(
            "a wall-clock prediction needs --workers, --bandwidth-gbps, --compute-s-per-step, --model-params"
        )
    prediction = predict_wall_clock(
        result, ns.compute_s_per_step, ns.model_params * ns.bytes_per_param, ns.bandwidth_gbps * 1e9, ns.workers,
        latency_s=ns.latency_ms / 1e3, ddp_overlap=ns.ddp_overlap,
    )  # fmt: skip
    return prediction.to_dict()


def _from_recipe(path: str) -> tuple[QSRConfig, list[float], int]:
    from qsr_hf.analysis.lr_schedule import lr_sequence
    from qsr_hf.training.train import parse_recipe

    _, _, qsr_config, args = parse_recipe(path, [])
    if args.max_steps <= 0:
        raise SystemExit(f"{path}: set max_steps in the recipe so the schedule can be planned without the data")
    warmup = args.get_warmup_steps(args.max_steps)
    lrs = lr_sequence(
        args.learning_rate, args.max_steps, warmup, str(args.lr_scheduler_type.value), args.lr_scheduler_kwargs
    )
    return qsr_config, lrs, warmup


def _from_flags(ns: argparse.Namespace) -> tuple[QSRConfig, list[float], int]:
    if ns.peak_lr is None or ns.total_steps is None:
        raise SystemExit("give a recipe YAML, or --peak-lr and --total-steps")
    from qsr_hf.analysis.lr_schedule import lr_sequence

    kinds = {"cosine": ("cosine_with_min_lr", {"min_lr": ns.min_lr}), "constant": ("constant_with_warmup", {})}
    kind, kwargs = kinds.get(ns.decay, (ns.decay, {}))
    if ns.decay == "step":
        kwargs = {"milestones": ns.milestones, "gamma": ns.gamma}
    lrs = lr_sequence(ns.peak_lr, ns.total_steps, ns.warmup_steps, kind, kwargs)
    return QSRConfig(qsr_alpha=1.0), lrs, ns.warmup_steps


def _override(config: QSRConfig, ns: argparse.Namespace) -> dict[str, Any]:
    flags = {name: getattr(ns, name) for name in _PLAN_CONFIG_FIELDS}
    flags["qsr_compress_delta"] = True if ns.qsr_compress_format is not None else None  # a format: compressed
    return {**config.to_dict(), **{k: v for k, v in flags.items() if v is not None}}


def _summary(config: QSRConfig, result: Plan, lrs: Sequence[float]) -> dict[str, Any]:
    marks = sorted({int(result.total_steps * f / 10) for f in range(10)})
    profile = []
    for mark in marks:
        i = max(i for i, s in enumerate(result.round_starts) if s <= mark)
        profile.append({"step": mark, "lr": lrs[mark], "H": result.round_lengths[i]})
    return {
        "rule": config.qsr_rule,
        "alpha": config.qsr_alpha,
        "h_base": config.qsr_h_base,
        "total_steps": result.total_steps,
        "syncs": result.syncs,
        "comm_volume_vs_ddp": result.comm_volume_vs_ddp,
        "first_round_longer_than_h_base": result.first_step_above(config.qsr_h_base),
        "last_rounds": result.round_lengths[-5:],
        "profile": profile,
    }


def _plot(path: str, result: Plan, lrs: Sequence[float]) -> str:
    from qsr_hf.core.plotting import import_pyplot

    try:
        plt = import_pyplot()
    except ImportError as e:
        raise SystemExit(f"--plot: {e}") from e
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(range(len(lrs)), lrs, color="tab:blue")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate", color="tab:blue")
    ax2 = ax.twinx()
    # each round is a flat segment from its first step to the next round's (the last one to the end of training)
    starts = [*result.round_starts, result.total_steps]
    ax2.step(starts, [*result.round_lengths, result.round_lengths[-1]], where="post", color="tab:red")
    ax2.set_yscale("log")
    ax2.set_ylabel("round length H", color="tab:red")
    ax.set_title(f"{result.syncs} syncs, {100 * result.comm_volume_vs_ddp:.2f}% of data-parallel communication")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(Path(path).resolve())


def plan_main(argv: Sequence[str]) -> dict[str, Any]:
    """Run ``qsr-hf plan``; returns the printed summary."""
    ns = _plan_parser().parse_args(argv)
    base, lrs, warmup = _from_recipe(ns.recipe) if ns.recipe else _from_flags(ns)
    fields = _override(base, ns)
    if ns.target_comm is not None or ns.target_switch is not None:
        probe = QSRConfig(**{**fields, "qsr_alpha": fields.get("qsr_alpha") or 1.0})
        if ns.target_comm is not None:
            fields["qsr_alpha"] = alpha_for_comm_budget(probe, lrs, ns.target_comm, warmup)
        else:
            fields["qsr_alpha"] = alpha_for_switch_fraction(probe, lrs, ns.target_switch, warmup)
    config = QSRConfig(**fields)
    result = plan(config, lrs, warmup)
    summary = {**_summary(config, result, lrs), **sync_bytes(config, ns.model_params, ns.workers)}
    memory = sync_memory(config, ns.workers or 2)
    summary["sync_memory"] = memory.to_dict(ns.model_params)
    modes = _node_modes(result, ns)
    wall = _wall_clock(result, ns)
    if wall is not None:
        summary["wall_clock"] = wall
    if ns.plot:
        summary["plot"] = _plot(ns.plot, result, lrs)
    if modes is not None:
        summary["node_modes"] = modes
    if ns.json:
        print(json.dumps(summary, indent=2))
    else:
        alpha = "-" if config.qsr_alpha is None else f"{config.qsr_alpha:.6g}"
        print(f"rule={config.qsr_rule} alpha={alpha} H_base={config.qsr_h_base} steps={len(lrs)}")
        print(f"{'step':>10} {'lr':>12} {'H':>8}")
        for row in summary["profile"]:
            print(f"{row['step']:>10} {row['lr']:>12.4g} {row['H']:>8}")
        print(f"last rounds: {summary['last_rounds']}")
        print(f"syncs: {result.syncs}  communication vs data-parallel: {100 * result.comm_volume_vs_ddp:.3f}%")
        size = f", {summary['sync_bytes']} B per sync" if "sync_bytes" in summary else ""
        note = f" ({summary['sync_note']})" if summary["sync_note"] else ""
        print(f"sync format: {summary['sync_format']}, {summary['sync_bytes_per_param']:.4g} B/param{size}{note}")
        if memory.peak_per_param:
            print(f"extra memory per averaged value: {memory.describe(ns.model_params)}")
        if wall is not None:
            print(
                f"predicted wall clock: data-parallel {wall['ddp_h']:.2f} h, this plan {wall['local_h']:.2f} h "
                f"(x{wall['speedup']:.2f}); one all-reduce {wall['allreduce_s']:.3f} s"
            )
        if modes is not None:
            print(
                f"on {ns.nodes} nodes x {ns.procs_per_node}: data-parallel {modes['ddp_h']:.2f} h, QSR per process "
                f"{modes['qsr_process_h']:.2f} h, per node {modes['qsr_node_h']:.2f} h (whole model per process "
                f"{modes['qsr_node_whole_h']:.2f} h), FSDP2 in nodes {modes['qsr_fsdp2_h']:.2f} h; one sync at the "
                f"inter-node floor {modes['sync_floor_s']:.3f} s"
            )
        if ns.plot:
            print(f"plot: {summary['plot']}")
    return summary


def _parser() -> argparse.ArgumentParser:
    from qsr_hf import __version__

    p = argparse.ArgumentParser(
        prog="qsr-hf", description="QSR local training for Hugging Face Trainer, Accelerate and DeepSpeed."
    )
    p.add_argument("--version", action="version", version=f"qsr-hf {__version__}")
    p.add_argument("--debug", action="store_true", help="on an error, print the full traceback")
    sub = p.add_subparsers(dest="command", metavar="{train,plan,report}", required=True)
    train = sub.add_parser("train", help=TRAIN_HELP, description=TRAIN_HELP, add_help=False)
    train.add_argument("args", nargs=argparse.REMAINDER, help="RECIPE.yaml [--key value ...] (`train --help`)")
    _plan_parser(sub.add_parser("plan", help=PLAN_HELP, description=PLAN_HELP))
    rep = sub.add_parser("report", help=REPORT_HELP, description=REPORT_HELP)
    rep.add_argument("run_dir", help="the run's output_dir (trainer_state.json, qsr_results.json)")
    rep.add_argument("--output", help="write the PNG here instead (the model card is then left as it is)")
    return p


def report_main(run_dir: str, output: str | None = None) -> str:
    """Run ``qsr-hf report``: draw the figure; without ``output``, embed it in the run's model card. Returns its path."""
    from qsr_hf.training import hub, report

    path = report.draw_run(run_dir, output)
    if output is None and hub.embed_figure(run_dir, path.name):
        print(f"embedded in {Path(run_dir) / 'README.md'}")
    print(f"figure: {path.resolve()}")
    return str(path)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``qsr-hf`` command: ``qsr-hf {train,plan,report} ...``; errors are one line unless ``--debug``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ns = _parser().parse_args(argv)
    try:
        if ns.command == "plan":
            plan_main(argv[argv.index("plan") + 1 :])
        elif ns.command == "report":
            report_main(ns.run_dir, ns.output)
        else:
            from qsr_hf.training.train import run

            run(ns.args)
    except (ValueError, TypeError, FileNotFoundError, ImportError, NotImplementedError, RuntimeError) as e:
        if ns.debug:
            traceback.print_exc()
        raise SystemExit(f"qsr-hf {ns.command}: error: {e}") from None


if __name__ == "__main__":
    main()
