"""Recipe runner: ``python -m qsr_hf.training.train RECIPE.yaml [--key value ...]`` (also under ``accelerate launch ... -m``).

One YAML recipe fills four dataclasses (`ModelArguments`, `DataArguments`, `QSRConfig`, `TrainingArguments`): its
values become the parser's defaults, then ``--key value`` on the command line overrides them. The run trains with
`Trainer` + `QSRCallback`, evaluates (top-1/top-5), saves the (averaged) model, writes a model card, and pushes.

``qsr_rule: ddp`` means the paper's data-parallel baseline: plain DDP gradient averaging, NO callback. (It is not
"local training with H = 1", which would keep per-worker AdamW moments.)
"""

import dataclasses
import gc
import os
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from accelerate.logging import get_logger
from transformers import HfArgumentParser, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import logging as hf_logging

from qsr_hf.config import QSRConfig
from qsr_hf.training import data, hub, models
from qsr_hf.training.image_trainer import ImageClassificationTrainer, compute_metrics, top_k_indices


logger = get_logger(__name__)


@dataclass
class ModelArguments:
    """Which model to train. ``num_labels`` comes from the data."""

    model_type: str = field(
        default="demo_vit",
        metadata={"help": "Architecture trained from scratch.", "choices": sorted(models.MODEL_TYPES)},
    )
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Hub id or folder of a checkpoint; overrides model_type."}
    )
    config_overrides: str | None = field(
        default=None, metadata={"help": "Config fields to override, e.g. 'num_hidden_layers=2,hidden_size=64'."}
    )
    weight_decay_all_params: bool = field(
        default=False,
        metadata={"help": "Decay every parameter (official QSR code) instead of Trainer's no decay on biases/norms."},
    )


@dataclass
class DataArguments:
    """Which data, and how it is augmented (kornia; see `qsr_hf.training.data`)."""

    dataset_name: str = field(
        default="fashion_mnist_local",
        metadata={"help": f"Hub id, local folder/file for datasets.load_dataset, or one of {data.LOCAL_DATASETS}."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    data_dir: str | None = field(default=None, metadata={"help": "data_dir of load_dataset; idx folder for Fashion."})
    train_split: str = field(default="train", metadata={"help": "Training split."})
    eval_split: str | None = field(default="validation", metadata={"help": "Evaluation split; empty for none."})
    image_column: str = field(default="image", metadata={"help": "Column holding the images."})
    label_column: str = field(default="label", metadata={"help": "Column holding the class ids (ClassLabel)."})
    streaming: bool = field(default=False, metadata={"help": "Stream the dataset (needs max_steps)."})
    num_channels: int = field(default=3, metadata={"help": "Image channels fed to the model (1 for grey)."})
    image_size: int = field(default=224, metadata={"help": "Side of the training/eval crop, in pixels."})
    image_mean: list[float] | None = field(default=None, metadata={"help": "Normalization mean; default: model's."})
    image_std: list[float] | None = field(default=None, metadata={"help": "Normalization std; default: model's."})
    crop_scale_min: float = field(default=0.08, metadata={"help": "RandomResizedCrop's smallest area fraction."})
    hflip: bool = field(default=True, metadata={"help": "Random horizontal flip."})
    randaugment_n: int = field(default=0, metadata={"help": "RandAugment ops per image (0: off)."})
    randaugment_m: int = field(default=15, metadata={"help": "RandAugment magnitude, kornia scale (0, 30)."})
    mixup_alpha: float = field(default=0.0, metadata={"help": "Mixup Beta(α, α), one λ per batch (0: off)."})
    label_smoothing: float = field(default=0.0, metadata={"help": "Label smoothing of the cross-entropy."})
    eval_crop_pct: float = field(default=0.875, metadata={"help": "Eval: resize to image_size/eval_crop_pct, crop."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training split."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the evaluation split."})


ArgumentTuple = tuple[ModelArguments, DataArguments, QSRConfig, TrainingArguments]


def make_parser() -> HfArgumentParser:
    """The parser of a recipe: `ModelArguments`, `DataArguments`, `QSRConfig`, `TrainingArguments` (one namespace)."""
    return HfArgumentParser((ModelArguments, DataArguments, QSRConfig, TrainingArguments))


def parse_recipe(path: str | os.PathLike | None, argv: Sequence[str] = ()) -> ArgumentTuple:
    """Parse a YAML recipe plus command-line overrides into the four argument dataclasses.

    Args:
        path (`str`, *optional*): the recipe; `None` for defaults + ``argv`` only.
        argv (`Sequence[str]`, defaults to ``()``): ``--key value`` overrides, applied after the YAML.

    Returns:
        `tuple`: ``(ModelArguments, DataArguments, QSRConfig, TrainingArguments)``.

    Raises:
        `ValueError`: a YAML key that no dataclass has (the message names it), or an invalid value.

    Example:

    ```python
    >>> model_args, data_args, qsr_config, args = parse_recipe("recipes/demo/qsr.yaml", ["--max_steps", "8"])
    >>> args.max_steps
    8
    ```
    """
    parser = make_parser()
    if path is not None:
        if Path(path).suffix not in (".yaml", ".yml") or not Path(path).is_file():
            raise ValueError(
                f"recipe {path}: " + ("not found" if Path(path).suffix in (".yaml", ".yml") else "not a .yaml file")
            )
        values = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(values, dict):
            raise ValueError(f"recipe {path} must be a YAML mapping of key: value, got {type(values).__name__}")
        known = {f.name for cls in parser.dataclass_types for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"recipe {path}: unknown key(s) {unknown}; see `python -m qsr_hf.training.train --help`")
        parser.set_defaults(**values)
        for action in parser._actions:  # a value from the YAML satisfies a required flag
            if action.dest in values:
                action.required = False
    return tuple(parser.parse_args_into_dataclasses(args=list(argv)))


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


def build_datasets(data_args: DataArguments, mean: list[float], std: list[float]) -> tuple[Any, Any, list[str]]:
    """Training and evaluation datasets with their transforms attached, and the class names."""
    load = {"config": data_args.dataset_config, "data_dir": data_args.data_dir, "streaming": data_args.streaming}
    name = data_args.dataset_name
    columns = {"image_column": data_args.image_column, "label_column": data_args.label_column}
    common = {"num_channels": data_args.num_channels, "mean": mean, "std": std}
    train_ds = data.load_image_dataset(name, data_args.train_split, max_samples=data_args.max_train_samples, **load)
    labels = data.class_names(train_ds, data_args.label_column)
    aug = {k: getattr(data_args, k) for k in ("crop_scale_min", "hflip", "randaugment_n", "randaugment_m")}
    pipeline = data.build_transform(data_args.image_size, train=True, **common, **aug)
    train_ds = data.apply_transform(
        train_ds, data.ImageTransform(pipeline, **columns, num_channels=data_args.num_channels)
    )
    if not data_args.eval_split:
        return train_ds, None, labels
    eval_ds = data.load_image_dataset(name, data_args.eval_split, max_samples=data_args.max_eval_samples, **load)
    pipeline = data.build_transform(data_args.image_size, train=False, eval_crop_pct=data_args.eval_crop_pct, **common)
    eval_ds = data.apply_transform(
        eval_ds, data.ImageTransform(pipeline, **columns, num_channels=data_args.num_channels)
    )
    return train_ds, eval_ds, labels


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Run a recipe: ``main(["recipes/demo/qsr.yaml", "--max_steps", "8"])``; returns the final eval metrics."""
    argv = list(sys.argv[1:] if argv is None else argv)
    recipe = argv.pop(0) if argv and argv[0].endswith((".yaml", ".yml")) else None
    model_args, data_args, qsr_config, args = parse_recipe(recipe, argv)
    hf_logging.set_verbosity(args.get_process_log_level())
    _check_world_size(args)
    push, args.push_to_hub = args.push_to_hub, False  # pushed once at the end, with our card (Trainer's replaces it)
    args.remove_unused_columns = False  # the transform needs the raw image/label columns
    args.average_tokens_across_devices = False  # a per-step all-gather; meaningless for fixed-size image batches
    set_seed(args.seed)

    processor = models.build_image_processor(
        model_args.model_name_or_path, data_args.image_size, data_args.image_mean, data_args.image_std,
        data_args.eval_crop_pct,
    )  # fmt: skip
    train_ds, eval_ds, labels = build_datasets(data_args, processor.image_mean, processor.image_std)
    model = models.build_model(
        model_args.model_type, labels, data_args.image_size, data_args.num_channels,
        model_args.model_name_or_path, model_args.config_overrides,
    )  # fmt: skip
    callbacks = make_callbacks(qsr_config)
    trainer = ImageClassificationTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=data.collate_images,
        processing_class=processor,
        compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=top_k_indices,
        callbacks=callbacks,
        mixup_alpha=data_args.mixup_alpha,
        label_smoothing=data_args.label_smoothing,
        weight_decay_all_params=model_args.weight_decay_all_params,
    )
    resume = args.resume_from_checkpoint
    if resume in ("true", "True", "last"):
        resume = get_last_checkpoint(args.output_dir)
    train_result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_metrics("train", train_result.metrics)
    eval_metrics = trainer.evaluate() if eval_ds is not None else {}
    trainer.save_metrics("eval", eval_metrics)
    summary = qsr_summary(callbacks, trainer.state.global_step)
    trainer.save_metrics("qsr", summary)
    trainer.save_model()
    trainer.save_state()

    if trainer.is_world_process_zero():
        command = shlex.join(
            ["accelerate", "launch", "-m", "qsr_hf.training.train", *([recipe] if recipe else []), *argv]
        )
        facts = hub.training_facts(args, trainer.state.global_step, trainer.state.max_steps)
        card = hub.build_model_card(
            Path(args.output_dir).name, data_args.dataset_name, qsr_config.to_dict(), facts, summary, eval_metrics,
            command=command, base_model=model_args.model_name_or_path,
        )  # fmt: skip
        hub.save_model_card(card, args.output_dir)
        if push:
            repo_id = args.hub_model_id or Path(args.output_dir).name
            hub.push_to_hub(args.output_dir, repo_id, token=args.hub_token, private=args.hub_private_repo)
    trainer.accelerator.end_training()  # destroy the process group
    return eval_metrics


def run(argv: Sequence[str] | None = None) -> None:
    """``python -m qsr_hf.training.train`` / ``qsr-hf train``: :func:`main`, then free the process group before shutdown."""
    main(argv)
    # the Trainer, DDP wrapper and process group sit in reference cycles; collected during interpreter shutdown,
    # gloo's worker threads can abort the process ("terminate called without an active exception")
    gc.collect()


if __name__ == "__main__":
    run()
