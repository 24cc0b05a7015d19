"""Packing for causal-LM pretraining: tokenize, join the documents with EOS, cut into fixed-length blocks.

Each block is a training example with ``labels = input_ids`` (the model shifts them) and an all-ones
``attention_mask``. There is no cross-document masking: a block may hold the end of one document and the start of
the next, separated by EOS, and attention crosses that boundary, as in common pretraining setups (GPT-2, run_clm,
nanoGPT). The tail of each tokenized batch shorter than a block is dropped. No padding, so every token counts in
the loss.
"""

from collections.abc import Sequence
from itertools import chain
from typing import Any

import datasets
import numpy as np
import torch
from transformers import PreTrainedTokenizerBase


def pack_ids(token_lists: Sequence[Sequence[int]], eos_token_id: int, block_size: int) -> np.ndarray:
    """Concatenate ``token_lists`` with ``eos_token_id`` after each one and cut into a ``(num_blocks, block_size)``
    int64 array (the remainder shorter than a block is dropped)."""
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2 tokens, got {block_size}")
    flat = np.fromiter(chain.from_iterable([*ids, eos_token_id] for ids in token_lists), dtype=np.int64)
    return flat[: len(flat) // block_size * block_size].reshape(-1, block_size)


def token_blocks(texts: Sequence[str], tokenizer: PreTrainedTokenizerBase, block_size: int) -> torch.Tensor:
    """``texts`` tokenized and packed into a ``(num_blocks, block_size)`` int64 tensor (for loops without a Trainer)."""
    ids = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
    return torch.from_numpy(pack_ids(ids, tokenizer.eos_token_id, block_size))


def pack_dataset(
    ds: datasets.Dataset | datasets.IterableDataset,
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    text_column: str = "text",
    batch_size: int = 1000,
) -> datasets.Dataset | datasets.IterableDataset:
    """Tokenize and pack a text dataset (map-style or streamed) with ``.map(batched=True)``.

    Args:
        ds ([`datasets.Dataset`] or [`datasets.IterableDataset`]): documents in ``text_column``.
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]): needs an ``eos_token_id``.
        block_size (`int`): tokens per example.
        text_column (`str`, defaults to ``"text"``): the column holding the documents (others are dropped).
        batch_size (`int`, defaults to 1000): documents joined per map call; a tail under a block is dropped per call.

    Returns:
        The same kind of dataset with ``input_ids``, ``attention_mask`` (all ones) and ``labels`` (= ``input_ids``),
        each ``block_size`` ints (lists; numpy arrays when read from a streamed dataset); lazy when ``ds`` is streamed.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer needs an eos_token to separate packed documents")
    eos = tokenizer.eos_token_id

    def tokenize_and_pack(batch: dict[str, list[Any]]) -> dict[str, np.ndarray]:
        ids = tokenizer(batch[text_column], add_special_tokens=False, verbose=False)["input_ids"]
        blocks = pack_ids(ids, eos, block_size)
        return {"input_ids": blocks, "attention_mask": np.ones_like(blocks), "labels": blocks}

    ds = ds.select_columns([text_column])  # a streamed dataset may not know its other columns before reading
    return ds.map(tokenize_and_pack, batched=True, batch_size=batch_size, remove_columns=[text_column])
