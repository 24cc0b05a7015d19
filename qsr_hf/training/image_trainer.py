"""`ImageClassificationTrainer`: soft-target cross-entropy for mixup and label smoothing (metrics: `qsr_hf.training.metrics`),
and the image-classification branch of the recipe runner ([`build_image_trainer`]).

Used by the recipe runner (`qsr_hf.training.train`); nothing here knows about QSR.
"""

from typing import Any

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from qsr_hf.training import data, models, transforms
from qsr_hf.training.batched_randaugment import DeviceAugmentation
from qsr_hf.training.metrics import compute_metrics, top_k_indices


class DatasetEpochCallback(TrainerCallback):
    """Tell the training dataset the epoch at each epoch's start (``dataset.set_epoch``), before its loader starts.

    accelerate's loader forwards ``set_epoch`` to the sampler only, not to the dataset, when the sampler has one.
    """

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def on_epoch_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """``dataset.set_epoch(floor(state.epoch))``: the epoch the loop is in, also right after a resume."""
        self.dataset.set_epoch(int(state.epoch or 0))


class ImageClassificationTrainer(Trainer):
    """`Trainer` with a soft-target cross-entropy (mixup, label smoothing) and optional decay on all parameters.

    A training dataset with ``set_epoch`` ([`~qsr_hf.training.data.ImageDataset`]) is told each epoch, so its
    augmentation is seeded by epoch and sample index. The loss is a per-micro-batch mean (``loss_is_scaled_for_ga = False``) and no label count is gathered across
    processes: `Trainer`'s ``num_items_in_batch`` machinery would add a collective to every step.

    Args:
        mixup_alpha (`float`, defaults to 0): mixup α for training batches (0: off).
        label_smoothing (`float`, defaults to 0): label smoothing of the cross-entropy.
        weight_decay_all_params (`bool`, defaults to `False`): decay biases and norm weights too.
        device_augmentation ([`~qsr_hf.training.batched_randaugment.DeviceAugmentation`], *optional*): applied to
            every batch on the device before the forward (and before mixup): RandAugment when the batch carries
            ops, then normalization of the uint8 ``pixel_values`` (the collator then runs with ``normalize=False``).
        *args, **kwargs: passed to `Trainer`.
    """

    loss_is_scaled_for_ga = False

    def __init__(
        self, *args: Any, mixup_alpha: float = 0.0, label_smoothing: float = 0.0, weight_decay_all_params: bool = False,
        device_augmentation: DeviceAugmentation | None = None, **kwargs: Any,
    ) -> None:  # fmt: skip
        super().__init__(*args, **kwargs)
        self.device_augmentation = device_augmentation
        self.mixup_alpha = mixup_alpha
        self.label_smoothing = label_smoothing
        self.weight_decay_all_params = weight_decay_all_params
        self.model_accepts_loss_kwargs = False
        if hasattr(self.train_dataset, "set_epoch"):
            self.add_callback(DatasetEpochCallback(self.train_dataset))

    def compute_loss(
        self, model: torch.nn.Module, inputs: dict[str, torch.Tensor], return_outputs: bool = False, **kwargs: Any
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """Cross-entropy against hard labels, or mixed soft labels in training when ``mixup_alpha > 0`` (after the
        device augmentation, when there is one)."""
        labels, pixel_values = inputs.pop("labels"), inputs.pop("pixel_values")
        ops = inputs.pop("randaugment", None)
        if self.device_augmentation is not None:  # then the Trainer's input cast (DeepSpeed: to the engine's dtype)
            pixel_values = self._prepare_input(self.device_augmentation(pixel_values, ops))
        if model.training and self.mixup_alpha > 0:
            num_labels = self.accelerator.unwrap_model(model).config.num_labels
            pixel_values, labels = data.mixup_batch(pixel_values, labels, self.mixup_alpha, num_labels)
        outputs = model(pixel_values=pixel_values, **inputs)
        loss = F.cross_entropy(outputs.logits.float(), labels, label_smoothing=self.label_smoothing)
        return (loss, outputs) if return_outputs else loss

    def _prepare_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        # the RandAugment ops stay on the CPU, where the batched augmentation groups images by op (no device sync)
        ops = inputs.pop("randaugment", None)
        inputs = super()._prepare_inputs(inputs)
        if ops is not None:
            inputs["randaugment"] = ops
        return inputs

    def _set_signature_columns_if_needed(self) -> None:
        # keep the rows' RandAugment ops: `remove_unused_columns` drops every key the model's forward does not take
        super()._set_signature_columns_if_needed()
        if "randaugment" not in self._signature_columns:
            self._signature_columns.append("randaugment")

    def get_decay_parameter_names(self, model: torch.nn.Module) -> list[str]:
        """All parameter names when ``weight_decay_all_params``, else `Trainer`'s choice."""
        if self.weight_decay_all_params:
            return [name for name, _ in model.named_parameters()]
        return super().get_decay_parameter_names(model)


def build_datasets(data_args: Any, seed: int) -> tuple[Any, Any, list[str]]:
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


def build_image_trainer(
    model_args: Any, data_args: Any, args: TrainingArguments, callbacks: list[TrainerCallback]
) -> ImageClassificationTrainer:
    """The recipe's image classifier, image processor, datasets and collator in an [`ImageClassificationTrainer`]."""
    processor = models.build_image_processor(
        model_args.model_name_or_path, data_args.image_size, data_args.image_mean, data_args.image_std,
        data_args.eval_crop_pct,
    )  # fmt: skip
    train_ds, eval_ds, labels = build_datasets(data_args, args.seed)
    model = models.build_model(
        model_args.model_type, labels, data_args.image_size, data_args.num_channels,
        model_args.model_name_or_path, model_args.config_overrides,
    )  # fmt: skip
    return ImageClassificationTrainer(
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
        callbacks=callbacks,
        mixup_alpha=data_args.mixup_alpha,
        label_smoothing=data_args.label_smoothing,
        weight_decay_all_params=model_args.weight_decay_all_params,
        device_augmentation=(
            DeviceAugmentation(processor.image_mean, processor.image_std) if data_args.augment_on_device else None
        ),
    )
