"""Recipe runner: ``python -m qsr_hf.training.train RECIPE.yaml [--key value ...]`` (also under ``accelerate launch ... -m``).

One YAML recipe fills four dataclasses (`qsr_hf.training.arguments`); ``--key value`` on the command line overrides
its values. The run trains with
`Trainer` + `QSRCallback`, evaluates (top-1/top-5 through the `evaluate` modules of `qsr_hf.training.metrics`), saves the (averaged) model, writes a model card, and pushes.

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

from qsr_hf.config import QSRConfig
from qsr_hf.logging_utils import get_logger
from qsr_hf.training import data, hub, models, report, transforms
from qsr_hf.training.arguments import (
    DataArguments,
    ModelArguments,
    RecipeTrainingArguments,
    check_output_dir,
    make_parser,
    parse_recipe,
    recipe_path,
)
from qsr_hf.training.batched_randaugment import DeviceAugmentation
from qsr_hf.training.image_trainer import ImageClassificationTrainer
from qsr_hf.training.metrics import compute_metrics, top_k_indices


logger = get_logger(__name__)
__all__ = [
    "DataArguments", "ModelArguments", "RecipeTrainingArguments", "build_datasets", "main", "make_callbacks",
    "make_parser", "parse_recipe", "qsr_summary", "reproduce_command", "run",
]  # fmt: skip


def make_callbacks(qsr_config: QSRConfig) -> list[TrainerCallback]:
    """``[QSRCallback(qsr_config)]``, or ``[]`` for ``qsr_rule: ddp`` (the plain data-parallel baseline)."""
    if qsr_config.qsr_rule == "ddp":
        return []
    from qsr_hf.callback import QSRCallback

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


def build_datasets(data_args: DataArguments, seed: int) -> tuple[Any, Any, list[str]]:
    """Training and evaluation datasets (uint8 ``pixel_values``, augmentation seeded by ``seed``) and class names."""
    load = {"config": data_args.dataset_config, "data_dir": data_args.data_dir, "streaming": data_args.streaming}
    name = data_args.dataset_name
    columns = {"image_column": data_args.image_column, "label_column": data_args.label_column}
    size, channels = data_args.image_size, data_args.num_channels
    train_ds = data.load_image_dataset(name, data_args.train_split, max_samples=data_args.max_train_samples, **load)
    labels = data.class_names(train_ds, data_args.label_column)
    train_tf = transforms.TrainTransform(
        size, channels, data_args.crop_scale_min, data_args.hflip, data_args.randaugment_depth,
        data_args.randaugment_severity, randaugment_on_device=data_args.augment_on_device,
    )  # fmt: skip
    eval_tf = transforms.EvalTransform(size, channels, data_args.eval_crop_pct)

    def wrap(ds: Any, transform: data.ImageTransformFn) -> Any:
        if data_args.streaming:
            return data.streaming_image_dataset(ds, transform, **columns)
        return data.ImageDataset(ds, transform, seed, **columns)

    if not data_args.eval_split:
        return wrap(train_ds, train_tf), None, labels
    eval_ds = data.load_image_dataset(name, data_args.eval_split, max_samples=data_args.max_eval_samples, **load)
    return wrap(train_ds, train_tf), wrap(eval_ds, eval_tf), labels


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
    args.remove_unused_columns = False  # the transform needs the raw image/label columns
    if args.ddp_find_unused_parameters is None:  # every parameter is used; True adds a per-step flag all-reduce
        args.ddp_find_unused_parameters = False
    set_seed(args.seed)

    processor = models.build_image_processor(
        model_args.model_name_or_path, data_args.image_size, data_args.image_mean, data_args.image_std,
        data_args.eval_crop_pct,
    )  # fmt: skip
    train_ds, eval_ds, labels = build_datasets(data_args, args.seed)
    model = models.build_model(
        model_args.model_type, labels, data_args.image_size, data_args.num_channels,
        model_args.model_name_or_path, model_args.config_overrides,
    )  # fmt: skip
    callbacks = make_callbacks(qsr_config)
    recorder = report.SyncRecorder(callbacks[0] if callbacks else None)  # the sync steps, for the run's figure
    trainer = ImageClassificationTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=transforms.ImageCollator(
            processor.image_mean, processor.image_std, normalize=not data_args.augment_on_device
        ),
        processing_class=processor,
        compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=top_k_indices,
        callbacks=[*callbacks, recorder],
        mixup_alpha=data_args.mixup_alpha,
        label_smoothing=data_args.label_smoothing,
        weight_decay_all_params=model_args.weight_decay_all_params,
        device_augmentation=(
            DeviceAugmentation(processor.image_mean, processor.image_std) if data_args.augment_on_device else None
        ),
    )
    resume = args.resume_from_checkpoint
    if resume in ("true", "True", "last"):
        resume = get_last_checkpoint(args.output_dir)
    train_result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_metrics("train", train_result.metrics)
    eval_metrics = trainer.evaluate() if eval_ds is not None else {}
    trainer.save_metrics("eval", eval_metrics)
    summary = qsr_summary(callbacks, trainer.state.global_step)
    trainer.save_metrics("qsr", {**summary, report.SYNC_STEPS_KEY: recorder.steps})
    trainer.save_model()
    trainer.save_state()

    if trainer.is_world_process_zero():
        command = reproduce_command(recipe, argv, args)
        facts = hub.training_facts(args, trainer.state.global_step, trainer.state.max_steps)
        figure = _draw_figure(args.output_dir)
        card = hub.build_model_card(
            Path(args.output_dir).name, data_args.dataset_name, qsr_config.to_dict(), facts, summary, eval_metrics,
            command=command, base_model=model_args.model_name_or_path, figure=figure,
        )  # fmt: skip
        hub.save_model_card(card, args.output_dir)
        if push:
            repo_id = args.hub_model_id or Path(args.output_dir).name
            hub.push_to_hub(args.output_dir, repo_id, token=args.hub_token, private=args.hub_private_repo)
        top1 = eval_metrics.get("eval_top1")
        result = f"top-1 {100 * top1:.2f}% on {data_args.eval_split}" if top1 is not None else "no evaluation"
        comm = summary.get("qsr/comm_volume_vs_ddp")
        comm_text = f", {100 * comm:.2f}% of data-parallel communication" if comm is not None else ""
        logger.info(
            f"{result}{comm_text} ({int(summary.get('qsr/syncs', 0))} syncs); model, image processor, model card "
            f"and metrics in {Path(args.output_dir).resolve()}"
        )
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
