"""QSR in an existing `Trainer` script: one added line, `callbacks=[QSRCallback(alpha=..., h_base=...)]`.

A plain image-classification script (Fashion-MNIST shipped by the Debian package dataset-fashion-mnist, a tiny
ResNet); the line marked `# QSR` turns its data-parallel training into Local AdamW with the Quadratic
Synchronization Rule. Run it on 2 CPU processes:

    accelerate launch --config_file accelerate_configs/multi_cpu.yaml examples/trainer_one_line.py --steps 100
"""

import argparse
import gc

import numpy as np
import torch
from transformers import Trainer, TrainingArguments

from qsr_hf.frontends.callback import QSRCallback  # QSR
from qsr_hf.training.data import ImageDataset, class_names, load_image_dataset
from qsr_hf.training.models import build_model
from qsr_hf.training.transforms import EvalTransform, ImageCollator, TrainTransform


def accuracy(prediction) -> dict[str, float]:
    return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--output_dir", default="outputs/trainer_one_line")
    cli = parser.parse_args()

    train = load_image_dataset("fashion_mnist_local", "train", max_samples=cli.steps * 128)
    test = load_image_dataset("fashion_mnist_local", "test", max_samples=2000)
    labels = class_names(train)
    train = ImageDataset(train, TrainTransform(28, num_channels=1, crop_scale_min=1.0), seed=42)  # uint8 crops + flips
    test = ImageDataset(test, EvalTransform(28, num_channels=1, crop_pct=1.0))

    args = TrainingArguments(
        output_dir=cli.output_dir,
        max_steps=cli.steps,
        per_device_train_batch_size=64,
        learning_rate=0.01,
        weight_decay=0.05,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr": 1e-5},  # QSR reads the lr: keep it above 0
        warmup_steps=cli.steps // 10,
        use_cpu=not torch.cuda.is_available(),
        ddp_find_unused_parameters=False,  # every parameter is used
        remove_unused_columns=False,  # the transform needs the image column
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=build_model("demo_resnet", labels, image_size=28, num_channels=1),
        args=args,
        train_dataset=train,
        eval_dataset=test,
        data_collator=ImageCollator(mean=[0.2860], std=[0.3530]),  # uint8 -> normalized float, per batch
        compute_metrics=accuracy,
        callbacks=[QSRCallback(alpha=0.022, h_base=4)],  # QSR: H = max(4, floor((0.022 / lr)^2)) local steps per round
    )
    trainer.train()
    metrics = trainer.evaluate()
    if trainer.is_world_process_zero():
        qsr = next(c for c in trainer.callback_handler.callbacks if isinstance(c, QSRCallback))
        summary = qsr.summary()
        print(f"test accuracy {metrics['eval_accuracy']:.4f}; {summary}")
    trainer.accelerator.end_training()  # destroy the process group


if __name__ == "__main__":
    main()
    gc.collect()  # free the Trainer's process group now: left to interpreter shutdown, gloo can abort the process
