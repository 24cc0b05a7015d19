"""Recipe runner: ``python -m qsr_hf.training.train RECIPE.yaml [--key value ...]`` (also under ``accelerate launch ... -m``).

One YAML recipe fills four dataclasses (`qsr_hf.training.arguments`); ``--key value`` on the command line overrides
its values. The run trains an image classifier or, with ``task: causal-lm``, a causal LM
(`qsr_hf.training.lm_trainer`) with `Trainer` + `QSRCallback`, evaluates (top-1/top-5, or perplexity, through the
`evaluate` modules of `qsr_hf.training.metrics`), saves the (averaged) model, writes a model card, and pushes.

``qsr_rule: ddp`` means the paper's data-parallel baseline: plain DDP gradient averaging, NO callback. (It is not
"local training with H = 1", which would keep per-worker AdamW moments.)
"""

import gc
import logging
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import logging as hf_logging

from qsr_hf.core.config import QSRConfig
from qsr_hf.core.logging_utils import get_logger
from qsr_hf.training import hub, report
from qsr_hf.training.arguments import (
    DataArguments,
    ModelArguments,
    RecipeTrainingArguments,
    check_output_dir,
    make_parser,
    parse_recipe,
    recipe_path,
)
from qsr_hf.training.corpus import corpus_version
from qsr_hf.training.image_trainer import build_datasets, build_image_trainer
from qsr_hf.training.lm_trainer import build_lm_trainer
from qsr_hf.training.metrics import add_perplexity


logger = get_logger(__name__)
__all__ = [
    "DataArguments", "ModelArguments", "RecipeTrainingArguments", "build_datasets", "main", "make_callbacks",
    "make_parser", "parse_recipe", "prepare_training_args", "qsr_summary", "reproduce_command", "result_line", "run",
]  # fmt: skip


def make_callbacks(qsr_config: QSRConfig) -> list[TrainerCallback]:
    """``[QSRCallback(qsr_config)]``, or ``[]`` for ``qsr_rule: ddp`` (the plain data-parallel baseline)."""
    if qsr_config.qsr_rule == "ddp":
        return []
    from qsr_hf.frontends.callback import QSRCallback

    return [QSRCallback(qsr_config)]


def qsr_summary(callbacks: Sequence[TrainerCallback], steps: int) -> dict[str, float | int]:
    """The callback's communication summary; for plain DDP, one gradient all-reduce per optimizer step."""
    for callback in callbacks:
        if hasattr(callback, "summary"):
            return dict(callback.summary())
    return {"qsr/H": 1, "qsr/syncs": steps, "qsr/comm_volume_vs_ddp": 1.0}


def _check_world_size(args: TrainingArguments) -> None:
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and args.world_size != launched:
        raise RuntimeError(
            f"{launched} processes were launched but Trainer sees world size {args.world_size}: every process would "
            "train alone on the same data. On a machine without CUDA set `use_cpu: true` (or --use_cpu true)."
        )


def prepare_training_args(args: TrainingArguments) -> TrainingArguments:
    """The runner's settings on top of the recipe's: nothing that adds a collective to every step.

    - ``remove_unused_columns=False``: the image transform needs the raw columns (packed LM rows hold only model
      inputs);
    - ``ddp_find_unused_parameters=False`` unless set: every parameter is used, and True all-reduces a flag per step;
    - ``accelerator_config.dispatch_batches=False`` unless set: for an iterable (streamed) dataset accelerate's
      default is True, which has rank 0 read every batch and broadcast it every step; with False each rank reads its
      own share of the stream.
    """
    args.remove_unused_columns = False
    if args.ddp_find_unused_parameters is None:
        args.ddp_find_unused_parameters = False
    if args.accelerator_config.dispatch_batches is None:
        args.accelerator_config.dispatch_batches = False
    return args


def result_line(
    task: str, eval_metrics: dict[str, float], eval_split: str | None, summary: dict[str, Any], output_dir: str
) -> str:
    """The run's last line: the evaluation (top-1, or validation perplexity and the corpus), the communication
    relative to data-parallel training, and where the model went."""
    comm = summary.get("qsr/comm_volume_vs_ddp")
    comm_text = f", {100 * comm:.2f}% of data-parallel communication" if comm is not None else ""
    top1, ppl = eval_metrics.get("eval_top1"), eval_metrics.get("eval_perplexity")
    if top1 is not None:
        result = f"top-1 {100 * top1:.2f}% on {eval_split}"
    elif ppl is not None:
        result = f"perplexity {ppl:.2f} on {eval_split}"
    else:
        result = "no evaluation"
    saved = "tokenizer" if task == "causal-lm" else "image processor"
    return (
        f"{result}{comm_text} ({int(summary.get('qsr/syncs', 0))} syncs); model, {saved}, model card and metrics "
        f"in {Path(output_dir).resolve()}"
    )


def reproduce_command(recipe: str | None, argv: Sequence[str], args: TrainingArguments) -> str:
    """The launch line for the model card: the accelerate config and process count of this run, then the recipe."""
    if args.world_size > 1:
        config = "multi_cpu" if args.use_cpu else "multi_gpu"
        launch = ["accelerate", "launch", "--config_file", f"accelerate_configs/{config}.yaml"]
        launch += ["--num_processes", str(args.world_size)]
    else:
        launch = ["accelerate", "launch", "--num_processes", "1"]
    return shlex.join([*launch, "-m", "qsr_hf.training.train", *([recipe] if recipe else []), *argv])


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Run a recipe: ``main(["recipes/demo/qsr.yaml", "--max_steps", "8"])``; returns the final eval metrics."""
    argv = list(sys.argv[1:] if argv is None else argv)
    recipe = recipe_path(argv)
    model_args, data_args, qsr_config, args = parse_recipe(recipe, argv)
    hf_logging.set_verbosity(args.get_process_log_level())
    _check_world_size(args)
    check_output_dir(args)
    push, args.push_to_hub = args.push_to_hub, False  # pushed once at the end, with our card (Trainer's replaces it)
    prepare_training_args(args)
    set_seed(args.seed)
    callbacks = make_callbacks(qsr_config)
    recorder = report.SyncRecorder(callbacks[0] if callbacks else None)  # the sync steps, for the run's figure
    build = build_lm_trainer if model_args.task == "causal-lm" else build_image_trainer
    trainer = build(model_args, data_args, args, [*callbacks, recorder])
    resume = args.resume_from_checkpoint
    if resume in ("true", "True", "last"):
        resume = get_last_checkpoint(args.output_dir)
    train_result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_metrics("train", train_result.metrics)
    eval_metrics = trainer.evaluate() if trainer.eval_dataset is not None else {}
    if model_args.task == "causal-lm":
        add_perplexity(eval_metrics)  # exp(eval_loss), through the evaluate module
    trainer.save_metrics("eval", eval_metrics)
    summary = qsr_summary(callbacks, trainer.state.global_step)
    trainer.save_metrics("qsr", {**summary, report.SYNC_STEPS_KEY: recorder.steps})
    trainer.save_model()
    trainer.save_state()

    if trainer.is_world_process_zero():
        command = reproduce_command(recipe, argv, args)
        facts = hub.training_facts(args, trainer.state.global_step, trainer.state.max_steps)
        figure = _draw_figure(args.output_dir)
        dataset = data_args.dataset_name
        if dataset == "python_stdlib_local":
            dataset = f"{dataset} ({corpus_version()})"
        card = hub.build_model_card(
            Path(args.output_dir).name, dataset, qsr_config.to_dict(), facts, summary, eval_metrics,
            command=command, base_model=model_args.model_name_or_path, figure=figure, task=model_args.task,
        )  # fmt: skip
        hub.save_model_card(card, args.output_dir)
        if push:
            repo_id = args.hub_model_id or Path(args.output_dir).name
            hub.push_to_hub(args.output_dir, repo_id, token=args.hub_token, private=args.hub_private_repo)
        logger.info(result_line(model_args.task, eval_metrics, data_args.eval_split, summary, args.output_dir))
    trainer.accelerator.end_training()  # destroy the process group
    return eval_metrics


def _draw_figure(output_dir: str) -> str | None:
    """The run's figure (`qsr_hf.training.report`) next to the model; `None`, with a warning, without matplotlib."""
    try:
        return report.draw_run(output_dir).name
    except ImportError as e:
        logger.warning(f"no figure of the run: {e}")
        return None


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def run(argv: Sequence[str] | None = None) -> None:
    """``python -m qsr_hf.training.train`` / ``qsr-hf train``: :func:`main`, then free the process group before shutdown.

    The final line (accuracy, communication, where the model went) goes to stdout through this module's logger.
    """
    if not logging.getLogger(__name__).handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("[qsr_hf] %(message)s"))
        logging.getLogger(__name__).addHandler(handler)
        logging.getLogger(__name__).setLevel(logging.INFO)
    if "DS_ACCELERATOR" not in os.environ and not _cuda_available():
        os.environ["DS_ACCELERATOR"] = "cpu"  # else DeepSpeed warns on every rank that it fell back to the CPU
    main(argv)
    # the Trainer, DDP wrapper and process group sit in reference cycles; collected during interpreter shutdown,
    # gloo's worker threads can abort the process ("terminate called without an active exception")
    gc.collect()


if __name__ == "__main__":
    run()
