"""The recipe's arguments: `ModelArguments`, `DataArguments`, `QSRConfig`, `RecipeTrainingArguments`, and the YAML parser.

One YAML recipe fills the four dataclasses: its values become the parser's defaults, then ``--key value`` on the
command line overrides them.
"""

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from transformers import HfArgumentParser, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from qsr_hf.core.config import QSRConfig
from qsr_hf.training import data, lm_data, lm_models, models


TASK_MODEL_TYPES: dict[str, list[str]] = {
    "image-classification": sorted(models.MODEL_TYPES),
    "causal-lm": sorted(lm_models.LM_MODEL_TYPES),
}


@dataclass
class ModelArguments:
    """Which model to train: an image classifier (``num_labels`` comes from the data) or a causal LM."""

    task: str = field(
        default="image-classification",
        metadata={"help": "What the recipe trains.", "choices": list(TASK_MODEL_TYPES)},
    )
    model_type: str = field(
        default="demo_vit",
        metadata={
            "help": "Architecture trained from scratch (one of the task's).",
            "choices": sorted(set().union(*TASK_MODEL_TYPES.values())),
        },
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
    tokenizer_name: str | None = field(
        default=None,
        metadata={
            "help": "causal-lm: hub id or folder of the tokenizer; default: train a byte-level BPE on the data."
        },
    )
    tokenizer_vocab_size: int = field(
        default=4096, metadata={"help": "causal-lm: vocabulary of the locally trained tokenizer (tokens)."}
    )

    def __post_init__(self) -> None:
        if not self.model_name_or_path and self.model_type not in TASK_MODEL_TYPES[self.task]:
            raise ValueError(
                f"model_type {self.model_type!r} is not a {self.task} model; use one of "
                f"{sorted(TASK_MODEL_TYPES[self.task])} (or set model_name_or_path)"
            )


@dataclass
class DataArguments:
    """Which data, and how it is augmented (on uint8, seeded by sample index and epoch: `qsr_hf.training.data`)."""

    dataset_name: str = field(
        default="fashion_mnist_local",
        metadata={
            "help": "Hub id, local folder/file for datasets.load_dataset, or one of "
            f"{data.LOCAL_DATASETS + lm_data.LOCAL_TEXT_DATASETS}."
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    data_dir: str | None = field(default=None, metadata={"help": "data_dir of load_dataset; idx folder for Fashion."})
    train_split: str = field(default="train", metadata={"help": "Training split."})
    eval_split: str | None = field(default="validation", metadata={"help": "Evaluation split; empty for none."})
    image_column: str = field(default="image", metadata={"help": "Column holding the images."})
    label_column: str = field(default="label", metadata={"help": "Column holding the class ids (ClassLabel)."})
    streaming: bool = field(default=False, metadata={"help": "Stream the dataset (needs max_steps)."})
    text_column: str = field(default="text", metadata={"help": "causal-lm: column holding the documents."})
    block_size: int = field(default=1024, metadata={"help": "causal-lm: tokens per packed training example."})
    num_channels: int = field(default=3, metadata={"help": "Image channels fed to the model (1 for grey)."})
    image_size: int = field(default=224, metadata={"help": "Side of the training/eval crop, in pixels."})
    image_mean: list[float] | None = field(default=None, metadata={"help": "Normalization mean; default: model's."})
    image_std: list[float] | None = field(default=None, metadata={"help": "Normalization std; default: model's."})
    crop_scale_min: float = field(default=0.08, metadata={"help": "RandomResizedCrop's smallest area fraction."})
    hflip: bool = field(default=True, metadata={"help": "Random horizontal flip."})
    randaugment_depth: int = field(default=0, metadata={"help": "RandAugment ops per image (0: off)."})
    randaugment_severity: float = field(
        default=10.0, metadata={"help": "RandAugment's largest op strength, 0-10 (composer's severity)."}
    )
    augment_on_device: bool = field(
        default=False,
        metadata={
            "help": "Apply RandAugment and normalization on the training device, to whole batches, instead of per "
            "image in the loader's workers (same op and strength draws; the loader ships uint8 crops)."
        },
    )
    mixup_alpha: float = field(default=0.0, metadata={"help": "Mixup Beta(α, α), one λ per batch (0: off)."})
    label_smoothing: float = field(default=0.0, metadata={"help": "Label smoothing of the cross-entropy."})
    eval_crop_pct: float = field(default=0.875, metadata={"help": "Eval: resize to image_size/eval_crop_pct, crop."})
    max_train_samples: int | None = field(
        default=None,
        metadata={"help": "Truncate the training split (examples; causal-lm: documents, before packing)."},
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Truncate the evaluation split (examples; causal-lm: documents)."}
    )

    def __post_init__(self) -> None:
        if not 0 <= self.randaugment_severity <= 10:
            raise ValueError(
                f"randaugment_severity must be in [0, 10] (composer's scale), got {self.randaugment_severity}"
            )
        if self.randaugment_depth < 0:
            raise ValueError(f"randaugment_depth must be >= 0 (0 turns RandAugment off), got {self.randaugment_depth}")
        if not 0 < self.crop_scale_min <= 1:
            raise ValueError(f"crop_scale_min must be in (0, 1], got {self.crop_scale_min}")


@dataclass
class RecipeTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus ``overwrite_output_dir`` (the field transformers 5 removed; same meaning as before)."""

    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Train into an output_dir that already holds a run (its files are replaced)."},
    )


ArgumentTuple = tuple[ModelArguments, DataArguments, QSRConfig, RecipeTrainingArguments]


def make_parser() -> HfArgumentParser:
    """The parser of a recipe: `ModelArguments`, `DataArguments`, `QSRConfig`, `RecipeTrainingArguments` (one namespace)."""
    return HfArgumentParser((ModelArguments, DataArguments, QSRConfig, RecipeTrainingArguments))


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
        check_recipe_path(path)
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


def recipe_path(argv: list[str]) -> str | None:
    """Pop the recipe path off ``argv``; a first argument that is not a flag must be an existing ``.yaml`` file."""
    if not argv or argv[0].startswith("-"):
        return None
    path = argv.pop(0)
    check_recipe_path(path)
    return path


def check_recipe_path(path: str | os.PathLike) -> None:
    """Refuse a recipe path that is not a ``.yaml`` file or does not exist, saying what to change."""
    path = Path(path)
    if path.suffix not in (".yaml", ".yml"):
        hint = f" (did you mean {path}.yaml?)" if path.with_name(f"{path.name}.yaml").is_file() else ""
        raise ValueError(f"recipe {path.name}: not a .yaml file, got {str(path)!r}{hint}")
    if not path.is_file():
        raise ValueError(
            f"recipe {path.name}: not found at {path} (run from the repository root, or give its full path)"
        )


def check_output_dir(args: "RecipeTrainingArguments") -> None:
    """Refuse to train into an ``output_dir`` that holds a finished or checkpointed run, unless told to.

    As transformers' example scripts did: ``--overwrite_output_dir true`` replaces it, ``--resume_from_checkpoint``
    continues it. The message says how many processes wrote the old run when its checkpoint tells.
    """
    out = Path(args.output_dir)
    if args.overwrite_output_dir or args.resume_from_checkpoint or not out.is_dir():
        return
    last = get_last_checkpoint(str(out))
    if last is None and not (out / "all_results.json").is_file():
        return
    ranks = len(list(Path(last).glob("qsr_state_rank*.pt"))) if last else 0
    what = f"a {ranks}-process run" if ranks > 1 else "a run"
    raise ValueError(
        f"output_dir {out} already holds {what} ({Path(last).name if last else 'all_results.json'}); this "
        f"{args.world_size}-process run would overwrite it. Pass --overwrite_output_dir true to replace it, "
        "--resume_from_checkpoint last to continue it, or another --output_dir"
    )
