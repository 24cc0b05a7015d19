"""Pictures of a run: ``qsr-hf report RUN_DIR``, also drawn at the end of ``qsr-hf train``.

One figure from the run folder's ``trainer_state.json`` (the Trainer's log history) and ``qsr_results.json`` (the
communication summary and the steps at which the workers synchronized, recorded by [`SyncRecorder`]): training and
evaluation loss against the step with the syncs marked, H per round, and the cumulative communication against
data-parallel training's. It is written next to the model (``qsr_run.png``) and embedded in the model card, so
``push_to_hub`` uploads it with the model.
"""

import json
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from qsr_hf.core.plotting import import_pyplot


FIGURE_NAME = "qsr_run.png"
SYNC_STEPS_KEY = "qsr/sync_steps"


class SyncRecorder(TrainerCallback):
    """Record the optimizer steps at which a scheduled sync happened (``steps``), for the run's figure.

    Args:
        qsr_callback ([`~qsr_hf.QSRCallback`], *optional*): the run's callback, whose counters are read after each
            step; `None` for plain data-parallel training, where every step all-reduces (H = 1).

    After a resume, ``steps`` holds the syncs of the resumed part only.
    """

    def __init__(self, qsr_callback: Any = None) -> None:
        self.qsr_callback = qsr_callback
        self.steps: list[int] = []
        self._syncs = 0

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Note ``state.global_step`` when the scheduled-sync counter went up during this step."""
        synchronizer = getattr(self.qsr_callback, "synchronizer", None)
        syncs = synchronizer.stats.syncs if synchronizer is not None else self._syncs + 1
        if self.qsr_callback is None or syncs > self._syncs:
            self.steps.append(state.global_step)
        self._syncs = syncs


def _rounds(sync_steps: list[int]) -> tuple[list[int], list[int]]:
    """Round starts and lengths (H) from the steps that ended each round."""
    starts = [0, *sync_steps[:-1]]
    return starts, [end - start for start, end in zip(starts, sync_steps, strict=True)]


def draw_run(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Draw a finished run's figure: loss with the syncs marked, H per round, communication vs data-parallel.

    Args:
        run_dir (`str` or `Path`): the run's ``output_dir`` (holds ``trainer_state.json`` and ``qsr_results.json``).
        output (`str` or `Path`, *optional*): where to write the PNG; default ``run_dir/qsr_run.png``.

    Returns:
        `Path`: the PNG written.
    """
    run_dir = Path(run_dir)
    state = json.loads((run_dir / "trainer_state.json").read_text())
    summary = json.loads((run_dir / "qsr_results.json").read_text())
    history, steps = state["log_history"], int(state["global_step"])
    sync_steps = [int(s) for s in summary.get(SYNC_STEPS_KEY, [])]
    ratio = float(summary.get("qsr/comm_volume_vs_ddp", 1.0))
    plt = import_pyplot()
    fig, (loss_ax, h_ax, comm_ax) = plt.subplots(3, 1, figsize=(8, 8.5), sharex=True, height_ratios=[3, 2, 2])

    train = [(e["step"], e["loss"]) for e in history if "loss" in e]
    evals = [(e["step"], e["eval_loss"]) for e in history if "eval_loss" in e]
    if train:
        loss_ax.plot(*zip(*train, strict=True), color="tab:blue", marker=".", label="training loss (logged)")
    if evals:
        loss_ax.plot(
            *zip(*evals, strict=True), color="tab:orange", marker="o", linestyle="--", label="evaluation loss"
        )
    if not train and not evals:
        loss_ax.text(0.5, 0.5, "no loss logged (lower logging_steps)", ha="center", transform=loss_ax.transAxes)
    for i, step in enumerate(sync_steps if len(sync_steps) <= 400 else []):  # one line per sync, up to 400
        loss_ax.axvline(step, color="0.6", linewidth=0.6, alpha=0.5, zorder=0, label="sync" if i == 0 else None)
    loss_ax.set_ylabel("loss")
    loss_ax.legend(loc="upper right", fontsize=8)

    starts, lengths = _rounds(sync_steps)
    if lengths:
        h_ax.step([*starts, sync_steps[-1]], [*lengths, lengths[-1]], where="post", color="tab:red")
        if max(lengths) >= 8 * min(lengths):
            from matplotlib.ticker import ScalarFormatter  # matplotlib is there: import_pyplot succeeded

            h_ax.set_yscale("log")
            h_ax.yaxis.set_major_formatter(ScalarFormatter())
    h_ax.set_ylabel("H (steps per round)")

    comm_ax.plot([0, steps], [0, steps], color="0.3", linestyle="--", label="data-parallel (1 all-reduce per step)")
    if sync_steps:  # each sync's share of the measured total (syncs outside the schedule are spread over them)
        per_sync = ratio * steps / len(sync_steps)
        comm_ax.step(
            [0, *sync_steps, steps], [0, *(per_sync * (i + 1) for i in range(len(sync_steps))), ratio * steps],
            where="post", color="tab:green", label=f"this run: {len(sync_steps)} syncs, {100 * ratio:.2f}%",
        )  # fmt: skip
    comm_ax.set_ylabel("communication\n(data-parallel steps' worth)")
    comm_ax.set_xlabel("optimizer step")
    comm_ax.legend(loc="upper left", fontsize=8)
    for ax in (loss_ax, h_ax, comm_ax):
        ax.grid(alpha=0.3)
    fig.suptitle(f"{run_dir.resolve().name}: {steps} steps, {100 * ratio:.2f}% of data-parallel communication")
    fig.tight_layout()
    path = Path(output) if output is not None else run_dir / FIGURE_NAME
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
