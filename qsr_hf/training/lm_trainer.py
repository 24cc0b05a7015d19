"""The causal-LM branch of the recipe runner: tokenizer, packed data and a Llama model in a plain `Trainer`.

Loss normalization: a Llama model takes ``num_items_in_batch``, so the Trainer divides the summed token loss of a
gradient-accumulation window by its token count. With ``average_tokens_across_devices`` (the Trainer's default)
that count is all-gathered across ranks every step and the loss multiplied by the world size: the data-parallel
recipe keeps that (the global token mean, as DDP). `QSRCallback` switches it off, so each rank optimizes its own
token mean over its window, with no collective (tested in ``tests/test_lm.py``).
"""

from typing import Any

from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

from qsr_hf.training.lm_data import build_lm_datasets
from qsr_hf.training.lm_models import build_causal_lm


def build_lm_trainer(
    model_args: Any, data_args: Any, args: TrainingArguments, callbacks: list[TrainerCallback]
) -> Trainer:
    """The recipe's tokenizer (saved with the model as its ``processing_class``), packed datasets and causal LM in a
    `Trainer`. Packed blocks all have ``block_size`` tokens, so the default collator stacks them."""
    train_ds, eval_ds, tokenizer = build_lm_datasets(
        data_args, model_args.tokenizer_name, model_args.tokenizer_vocab_size
    )
    model = build_causal_lm(
        model_args.model_type, tokenizer, model_args.model_name_or_path, model_args.config_overrides
    )
    return Trainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=default_data_collator,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
