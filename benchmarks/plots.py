"""The figures of the benchmarks: one function per ``results/<name>.json``, drawn next to it as ``results/<name>.png``.

Each benchmark script calls :func:`draw` when it has written its JSON (through ``_common.write_result``, or directly),
so a table on the documentation's benchmarks page and its figure come from the same command.
``python benchmarks/plots.py`` redraws every figure from the committed JSON without re-running anything.
"""

import json
import textwrap
from pathlib import Path

import numpy as np

from qsr_hf.core.plotting import import_pyplot


RESULTS_DIR = Path(__file__).resolve().parent / "results"
AVERAGING = {
    "floor": "floor: 1 flat all_reduce", "floor_div": "floor + divide", "qsr_hf": "qsr_hf (in place)",
    "qsr_hf_copy": "qsr_hf copy mode", "qsr_hf_async": "qsr_hf async", "qsr_hf_copy_async": "qsr_hf copy + async",
    "torch_periodic": "torch PeriodicModelAverager", "accelerate_localsgd": "accelerate LocalSGD",
    "per_param_inplace": "per-parameter all_reduce", "qsr_hf_checked": "qsr_hf + checks on the collective",
}  # fmt: skip
METHODS = {
    "ddp": "DDP", "qsr": "qsr_hf QSR", "constant_h4": "qsr_hf constant H = 4",
    "accelerate_localsgd": "accelerate LocalSGD", "torch_postlocal": "torch PostLocalSGD",
    "qsr_overlap": "QSR + overlap", "constant_h4_overlap": "H = 4 + overlap", "qsr_compress": "QSR + bf16 delta",
    "qsr_overlap3": "QSR + overlap, 3 steps", "constant_h4_overlap3": "H = 4 + overlap, 3 steps",
    "qsr_overlap_auto": "QSR + overlap, auto depth", "constant_h4_overlap_auto": "H = 4 + overlap, auto depth",
    "qsr_fragments4": "QSR, 4 fragments", "constant_h4_fragments4": "H = 4, 4 fragments",
    "qsr_process": "QSR, worker = process", "qsr_node_whole": "worker = node, whole model",
    "qsr_node_split": "worker = node, inter-node floor",
    "qsr_fragments4_overlap_auto": "QSR, 4 fragments in flight", "qsr_int8": "QSR + int8 delta",
    "qsr_int8ef": "QSR + int8 delta + error feedback", "qsr_overlap_auto_int8": "QSR + overlap auto + int8",
    "qsr_fragments4_overlap_auto_int8": "QSR, 4 fragments in flight + int8",
}  # fmt: skip


def _barh(ax, labels, values, xlabel, fmt="{:.2f}", highlight=()):  # one labelled horizontal bar per value
    y = np.arange(len(labels))
    colors = ["tab:green" if label in highlight else "tab:blue" for label in labels]
    ax.barh(y, values, color=colors)
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    for i, v in enumerate(values):
        ax.text(v, i, " " + fmt.format(v), va="center", fontsize=7)
    ax.grid(axis="x", alpha=0.3)


def averaging(d, fig):
    axes = fig.subplots(1, 2, width_ratios=[2, 1])
    width = 0.8 / len(d["results"])
    for j, r in enumerate(d["results"]):
        y = np.arange(len(AVERAGING)) + j * width  # a row missing from an older run's JSON is left empty
        ratios = [r["ratio_to_floor"].get(k, float("nan")) for k in AVERAGING]
        axes[0].barh(y, ratios, height=width, label=r["model"])
    axes[0].set_yticks(np.arange(len(AVERAGING)) + 0.4 - width / 2, list(AVERAGING.values()), fontsize=8)
    axes[0].invert_yaxis()
    axes[0].axvline(1, color="0.3", linestyle="--", linewidth=0.8)
    axes[0].set_xlabel("time of one average / one flat all_reduce (median)")
    axes[0].legend(fontsize=8)
    # results written before the checks rode on the collective have the separate checks only
    shares = [
        100 * r["folded_checks_vs_average"] if "folded_checks_vs_average" in r
        else 100 * r["median_s"]["sync_checks"] / r["median_s"]["qsr_hf"]
        for r in d["results"]
    ]  # fmt: skip
    _barh(axes[1], [r["model"] for r in d["results"]], shares, "checks a sync adds, % of the average", "{:.1f}%")
    axes[1].axvline(2, color="tab:red", linestyle=":", label="goal: 2%")
    axes[1].legend(fontsize=8)


def step_overhead(d, fig):
    names = {"bare": "bare model, no DDP", "ddp": "DDP", "local_optimizer": "LocalOptimizer local step",
             "trainer_ddp": "Trainer + DDP", "trainer_qsr": "Trainer + QSRCallback local step"}  # fmt: skip
    ms = [1e3 * d["results"][k]["median_step_s"] for k in names]
    _barh(fig.subplots(), list(names.values()), ms, "median step time of the slower rank, ms", "{:.1f} ms",
          highlight=(names["local_optimizer"], names["trainer_qsr"]))  # fmt: skip


def slow_link(d, fig):
    links = d["links"]
    per_sync = all("exposed_comm_s_per_sync" in r for data in links.values() for r in data["methods"].values())
    axes = fig.subplots(len(links), 3 if per_sync else 2, squeeze=False)
    for row, (link, data) in zip(axes, links.items(), strict=True):
        methods = data["methods"]
        labels = [METHODS.get(m, m) for m in methods]
        highlight = [METHODS.get(m, m) for m in methods if m.startswith("qsr")]
        _barh(row[0], labels, [r["normalized_ratio_to_ddp"] for r in methods.values()], "", highlight=highlight)
        row[0].set_title(f"{link}: wall time / DDP (one common compute step)", fontsize=9)
        if per_sync:  # what one sync puts on the wire, and what of its time the run still waits for
            mb = [r["wire_mb_per_sync"] for r in methods.values()]
            _barh(row[1], labels, mb, "", "{:.1f} MB", highlight=highlight)
            row[1].set_title(f"{link}: MB on the wire per sync and rank", fontsize=9)
            exposed = [r["exposed_comm_s_per_sync"] for r in methods.values()]
            _barh(row[2], labels, exposed, "", "{:.2f} s", highlight=highlight)
            row[2].set_title(f"{link}: exposed communication per sync", fontsize=9)
            continue
        mb = [r["accounted_mb_per_rank"] for r in methods.values()]
        _barh(row[1], labels, mb, "", "{:.0f} MB", highlight=highlight)
        row[1].set_title(f"{link}: MB all-reduced per rank", fontsize=9)


def slow_link_nodes(d, fig):
    methods = d["methods"]
    labels = [METHODS.get(m, m) for m in methods]
    axes = fig.subplots(1, 2)
    _barh(axes[0], labels, [r["ratio_to_ddp"] for r in methods.values()], "wall time / DDP (under load)")
    per_sync = {METHODS.get(m, m): r["veth_mb_per_sync_per_node"] for m, r in methods.items() if r["syncs"] < 100}
    _barh(axes[1], list(per_sync), list(per_sync.values()), "MB on the inter-node link per sync and node", "{:.1f}")
    axes[1].axvline(d["floor_mb_per_sync_per_node"], color="tab:red", linestyle=":", label="floor: one model")
    axes[1].legend(fontsize=8)


def memory_hsdp(d, fig):
    ax = fig.subplots()
    kinds = ["parameters", "gradients", "optimizer_state", "qsr_sync_buffers"]
    left = np.zeros(len(d["bytes_per_rank"]))
    for kind in kinds:
        mib = np.array([max(r[kind] for r in ranks) / 2**20 for ranks in d["bytes_per_rank"].values()])
        ax.barh(list(d["bytes_per_rank"]), mib, left=left, label=kind.replace("_", " "))
        left += mib
    for i, total in enumerate(left):
        ax.text(total, i, f" {total:.0f} MiB", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("tensor MiB per rank (max over ranks)")
    ax.legend(fontsize=8, loc="lower right")


def scaling_check(d, fig):
    ax = fig.subplots()
    checks = d["checks"]
    bars = {
        "16 GPUs, DDP": (checks["16_gpus"]["paper_h"]["ddp"], None),
        "16 GPUs, QSR": (checks["16_gpus"]["paper_h"]["qsr"], checks["16_gpus"]["A_line_rate"]["pred_qsr_h"]),
        "64 GPUs, DDP": (checks["64_gpus"]["paper_h"]["ddp"], checks["C_16_to_64"]["pred_ddp_h"]),
        "64 GPUs, QSR": (checks["64_gpus"]["paper_h"]["qsr"], checks["C_16_to_64"]["pred_qsr_h"]),
    }
    y = np.arange(len(bars))
    ax.barh(y - 0.2, [p for p, _ in bars.values()], height=0.4, label="paper")
    ax.barh(y + 0.2, [m or 0 for _, m in bars.values()], height=0.4, label="model (16: A, line rate; 64: C, fit)")
    ax.set_yticks(y, list(bars))
    ax.invert_yaxis()
    ax.set_xlabel("training time of ViT-B, hours")
    ax.legend(fontsize=8)


def input_pipeline(d, fig):
    stages = dict(d["img_per_s_per_core"])
    stages["batched RandAugment + normalize, torch CPU"] = d["batched_randaugment_normalize"]["img_per_s"]
    ax = fig.subplots()
    _barh(ax, list(stages), list(stages.values()), "images/s per core (log scale)", "{:.0f}",
          highlight=[s for s in stages if s.startswith("loader")])  # fmt: skip
    ax.set_xscale("log")
    ax.axvline(d["goal_per_core"], color="tab:red", linestyle=":", label=f"goal: {d['goal_per_core']} per core")
    ax.legend(fontsize=8)


def _schedules(ax, lrs, runs, key, names, colors, labels):  # round length H of one run per name, over the lr
    from matplotlib.ticker import ScalarFormatter

    lr_ax = ax.twinx()
    lr_ax.plot(lrs, color="grey", alpha=0.5)
    lr_ax.set_ylabel("learning rate", color="grey")
    for name in names:
        run = next((x for x in runs if x[key] == name), None)
        if run is not None:
            changes = [*run["h_changes"], [run["steps"], run["h_changes"][-1][1]]]
            ax.step(*zip(*changes, strict=True), where="post", color=colors[name], label=labels[name])
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.set(xlabel="optimizer step", ylabel="round length H (log scale; last round clipped to the end)")
    ax.set_title("sync schedules", fontsize=10)


def generalization(d, fig):
    from matplotlib import colormaps
    from matplotlib.ticker import ScalarFormatter

    rows, runs, meta = d["summary"], d["runs"], d["meta"]
    variants = [r for r in rows if r["rule"].startswith("qsr_")]
    axes = fig.subplots(1, 4 if variants else 3, width_ratios=[1, 1, 1, 0.8] if variants else None)
    palette = colormaps["tab20"].colors  # more rules than tab10's 10 colours (the variants run has 11)
    colors = {r["rule"]: palette[i % len(palette)] for i, r in enumerate(rows)}
    labels = {r["rule"]: r["label"] for r in rows}
    for r in rows:
        axes[0].errorbar(100 * r["comm_vs_ddp"], r["test_acc_mean"], yerr=r["test_acc_std"], fmt="o", capsize=3,
                         color=colors[r["rule"]], label=r["label"])  # fmt: skip
        seeds = [x for x in runs if x["rule"] == r["rule"]]
        acc = np.mean([[100 * p["test_acc"] for p in x["curve"]] for x in seeds], axis=0)
        axes[1].plot(
            [p["step"] for p in seeds[0]["curve"]], acc, marker=".", color=colors[r["rule"]], label=r["label"]
        )
    axes[0].set_xscale("log")
    axes[0].xaxis.set_major_formatter(ScalarFormatter())
    axes[0].set_xticks([5, 10, 25, 50, 100])
    axes[0].set(xlabel="communication vs data-parallel (%, log scale)", ylabel="final test accuracy (%)")
    axes[0].set_title("accuracy vs communication (mean ± std over seeds)", fontsize=10)
    axes[1].set_ylim(bottom=max(0, axes[1].get_ylim()[1] - 6))
    axes[1].set(xlabel="optimizer step", ylabel="test accuracy (%) of the averaged model")
    axes[1].set_title("test accuracy over training (mean over seeds)", fontsize=10)
    _schedules(axes[2], meta["lrs"], runs, "rule", ("constant4", "post_local", "linear", "qsr", "cubic", "qsr_overlap",
               "qsr_compress"), colors, labels)  # fmt: skip
    for ax in axes[:3:2]:
        ax.legend(fontsize=8)
    if variants:
        _paired_with_qsr(axes[3], variants, runs)


def _paired_with_qsr(ax, variants, runs):  # per variant of QSR: test accuracy minus QSR's, same seed
    qsr = {x["seed"]: 100 * x["test_acc"] for x in runs if x["rule"] == "qsr"}
    y, notes = np.arange(len(variants)), []
    for i, r in enumerate(variants):
        diffs = [100 * x["test_acc"] - qsr[x["seed"]] for x in runs if x["rule"] == r["rule"] and x["seed"] in qsr]
        std = float(np.std(diffs, ddof=1)) if len(diffs) > 1 else 0.0
        ax.barh(i, np.mean(diffs), xerr=std, capsize=3, color="tab:blue", alpha=0.6)
        ax.plot(diffs, [i] * len(diffs), "k.", markersize=4)
        notes.append(f"{np.mean(diffs):+.2f} ± {std:.2f}")
    ax.axvline(0, color="0.3", linewidth=0.8)
    ax.set_yticks(
        y, [f"{textwrap.fill(r['label'], 22)}\n{n}" for r, n in zip(variants, notes, strict=True)], fontsize=8
    )
    ax.invert_yaxis()
    ax.set_xlabel("test accuracy minus QSR's, same seed (points)")
    ax.set_title("paired with QSR (mean ± std; dots: seeds)", fontsize=10)


def lm_study(d, fig):
    from matplotlib import colormaps

    rows, runs = d["summary"], d["runs"]
    axes = fig.subplots(1, 3)
    colors = {r["method"]: c for r, c in zip(rows, colormaps["tab10"].colors, strict=False)}
    for r in rows:
        marker = "o" if r["method"] == "ddp" or r["method"].endswith("_plain") else "s"
        axes[0].errorbar(r["label"], r["val_loss_mean"], yerr=r["val_loss_std"], fmt=marker, capsize=3,
                         color=colors[r["method"]])  # fmt: skip
        seeds = [x for x in runs if x["method"] == r["method"]]
        loss = np.mean([[p["val_loss"] for p in x["curve"]] for x in seeds], axis=0)
        axes[1].plot([p["step"] for p in seeds[0]["curve"]], loss, marker=".", color=colors[r["method"]],
                     label=r["label"])  # fmt: skip
    axes[0].tick_params(axis="x", labelrotation=80, labelsize=6)
    axes[0].set(ylabel="final validation loss (nats/token)")
    axes[0].set_title("confirmation: mean ± std over seeds", fontsize=10)
    axes[1].set(xlabel="optimizer step", ylabel="validation loss of the averaged model")
    axes[1].set_title("validation loss over training (mean over seeds)", fontsize=10)
    axes[1].legend(fontsize=6)
    for h in d["args"]["h"]:
        for rule, marker in (("constant", "o"), ("qsr", "s")):
            tuned = [t for t in d["tuning_runs"] if t["method"].startswith(f"{rule}_h{h}_")]
            tuned = [t for t in tuned if t["lr"] == d["settings"].get(f"{rule}_h{h}_plain", {}).get("lr", t["lr"])]
            names = [t["method"].split("_", 2)[2] for t in tuned]
            axes[2].plot(names, [t["val_loss"] for t in tuned], marker, label=f"{rule} H={h}")
    axes[2].tick_params(axis="x", labelrotation=60, labelsize=7)
    axes[2].set(ylabel="validation loss, tuning seed")
    axes[2].set_title("the outer grid (tuning seed)", fontsize=10)
    axes[2].legend(fontsize=7)


# name -> (drawing function, figure size); slow_link_variants / _overlap_depth / _100mbit are slow_link.py --name ...
def soak(d, fig):  # benchmarks/soak.py: replicas alive, failures by class, the run's step with its syncs
    import soak_check

    soak_check.figure(d, fig)


FIGURES = {
    "averaging": (averaging, (12, 4.5)),
    "averaging_checks": (averaging, (12, 4.5)),
    "step_overhead": (step_overhead, (8, 3)),
    "slow_link": (slow_link, (12, 6.5)),
    "slow_link_variants": (slow_link, (12, 3.5)),
    "slow_link_overlap_depth": (slow_link, (12, 3.5)),
    "slow_link_auto_fragments": (slow_link, (12, 3.5)),
    "slow_link_100mbit": (slow_link, (12, 3.8)),
    "slow_link_streaming": (slow_link, (17, 9)),
    "slow_link_nodes": (slow_link_nodes, (12, 3)),
    "memory_hsdp": (memory_hsdp, (9, 2.5)),
    "scaling_check": (scaling_check, (8, 3)),
    "input_pipeline": (input_pipeline, (10, 4.5)),
    "generalization": (generalization, (17, 4.8)),
    "generalization_variants": (generalization, (22, 5)),
    "lm_study": (lm_study, (17, 4.8)),
    "lm_study_quick": (lm_study, (17, 4.8)),
    "lm_study_h40": (lm_study, (17, 4.8)),
    "soak": (soak, (12, 6.5)),
}


def draw(name: str, json_path: str | Path | None = None) -> Path | None:
    """Draw ``results/<name>.png`` (or next to ``json_path``) from the JSON; `None` for a name without a figure."""
    if name not in FIGURES:
        return None
    json_path = Path(json_path) if json_path is not None else RESULTS_DIR / f"{name}.json"
    function, size = FIGURES[name]
    plt = import_pyplot()
    fig = plt.figure(figsize=size)
    data = json.loads(json_path.read_text())
    function(data, fig)
    title = f"{data.get('command') or data['meta']['command']}  ({json_path.name})"
    width = int(size[0] * 72 / 5.9)  # characters of 9-pt monospace that fit the figure's width
    fig.suptitle(textwrap.fill(title, width), fontsize=9, family="monospace")
    fig.tight_layout()
    path = json_path.with_suffix(".png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


if __name__ == "__main__":
    for figure_name in FIGURES:
        print(draw(figure_name))
