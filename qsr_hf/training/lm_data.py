"""Causal-LM data for the recipe app: text from the hub (streamed) or the offline standard-library corpus, a
tokenizer (from the hub, or trained here), packed blocks.

Hub and local files take one path, [`~qsr_hf.training.data.load_split`] (``datasets.load_dataset``, with
``streaming=True`` for a corpus like ``allenai/c4``); a folder of parquet/json files written by a test goes through
the same call. A streamed training set is NOT split across ranks here: under the Trainer, accelerate's dataloader
(with ``dispatch_batches=False``, set by the runner) gives each rank its own share, by file shard when there are at
least as many shards as ranks (as ``datasets.distributed.split_dataset_by_node`` does), else by slices of each
global batch. Splitting here as well would split twice and drop data. Loops that do not pass their loader through
``accelerator.prepare`` call ``split_dataset_by_node(ds, rank, world_size)`` themselves. Evaluation text is
materialized (a map-style dataset), so every rank evaluates the same number of batches.
"""

from typing import Any

import datasets
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from qsr_hf.training import corpus, data
from qsr_hf.training.packing import pack_dataset
from qsr_hf.training.tokenizer import train_bpe_tokenizer


# Names that load text shipped on the machine instead of the hub.
LOCAL_TEXT_DATASETS: list[str] = ["python_stdlib_local"]


def load_text_dataset(
    name: str, split: str, max_samples: int | None = None, **load: Any
) -> datasets.Dataset | datasets.IterableDataset:
    """One split of a text dataset: ``python_stdlib_local`` (one row per file, never streamed), or anything
    `datasets.load_dataset` loads (hub id, local folder of parquet/json/text files) through
    [`~qsr_hf.training.data.load_split`], which takes ``load`` (``config``, ``data_dir``, ``streaming``).
    ``max_samples`` counts documents, before packing."""
    if name == "python_stdlib_local":
        return corpus.load_stdlib_corpus(split, max_samples=max_samples)
    return data.load_split(name, split, max_samples=max_samples, **load)


def load_or_train_tokenizer(
    name_or_path: str | None, texts: Any, vocab_size: int, block_size: int
) -> PreTrainedTokenizerBase:
    """A hub/folder tokenizer (``AutoTokenizer``; its EOS doubles as padding if it has none), or, when
    ``name_or_path`` is `None`, a byte-level BPE trained on ``texts``. Training is deterministic (the same merges in
    every process, checked across processes), so every rank trains its own instead of waiting for a file."""
    if name_or_path is None:
        return train_bpe_tokenizer(texts, vocab_size, model_max_length=block_size)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {name_or_path} has no eos_token, which packing needs between documents")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_lm_datasets(
    data_args: Any, tokenizer_name: str | None = None, vocab_size: int = 4096
) -> tuple[datasets.Dataset | datasets.IterableDataset, datasets.Dataset | None, PreTrainedTokenizerBase]:
    """Packed training and evaluation sets and the tokenizer, from the recipe's `DataArguments`.

    Args:
        data_args (`DataArguments`): dataset, splits, ``text_column``, ``block_size``, ``streaming``, sample caps.
        tokenizer_name (`str`, *optional*): hub id or folder; `None`: a byte-level BPE of ``vocab_size`` tokens is
            trained on the training split's documents (after ``max_train_samples``; not possible when streamed).
        vocab_size (`int`, defaults to 4096): size of the trained tokenizer's vocabulary.

    Returns:
        `tuple`: ``(train, eval or None, tokenizer)``; rows hold ``input_ids``, ``attention_mask``, ``labels``.
    """
    load = {"config": data_args.dataset_config, "data_dir": data_args.data_dir, "streaming": data_args.streaming}
    name = data_args.dataset_name
    train = load_text_dataset(name, data_args.train_split, max_samples=data_args.max_train_samples, **load)
    if tokenizer_name is None and isinstance(train, datasets.IterableDataset):
        raise ValueError("a streamed dataset needs tokenizer_name (a hub tokenizer): no local tokenizer is trained")
    texts = None if tokenizer_name else train[data_args.text_column]
    tokenizer = load_or_train_tokenizer(tokenizer_name, texts, vocab_size, data_args.block_size)

    def pack(ds: Any) -> Any:
        return pack_dataset(ds, tokenizer, data_args.block_size, data_args.text_column)

    if not data_args.eval_split:
        return pack(train), None, tokenizer
    if data_args.streaming and data_args.max_eval_samples is None:
        raise ValueError("a streamed evaluation split needs max_eval_samples (documents), to be materialized")
    evaluation = load_text_dataset(name, data_args.eval_split, max_samples=data_args.max_eval_samples, **load)
    evaluation = pack(evaluation)
    if isinstance(evaluation, datasets.IterableDataset):
        evaluation = datasets.Dataset.from_list(list(evaluation))
    return pack(train), evaluation, tokenizer
