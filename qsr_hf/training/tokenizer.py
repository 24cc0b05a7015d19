"""A byte-level BPE tokenizer trained locally with `tokenizers` (seconds on the standard-library corpus), wrapped as a
`transformers.PreTrainedTokenizerFast` so it is saved with the model and loads with ``AutoTokenizer``.

Byte-level (GPT-2 style, no normalizer, no prefix space): every string round-trips exactly, code indentation
included.
"""

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast


EOS_TOKEN = "<|endoftext|>"


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int = 4096, model_max_length: int = 1024
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts``.

    Args:
        texts (`Iterable[str]`): training text, e.g. the corpus's ``text`` column.
        vocab_size (`int`, defaults to 4096): vocabulary size, the 256 byte tokens and ``<|endoftext|>`` included.
        model_max_length (`int`, defaults to 1024): longest sequence the model takes (tokens); saved with it.

    Returns:
        [`~transformers.PreTrainedTokenizerFast`]: ``<|endoftext|>`` is the EOS token (it separates packed
        documents) and the padding token.

    Example:

    ```python
    >>> tokenizer = train_bpe_tokenizer(["def f(x):\\n    return x\\n"] * 10, vocab_size=300)
    >>> tokenizer.decode(tokenizer("def f(x):")["input_ids"])
    'def f(x):'
    ```
    """
    if vocab_size <= 257:
        raise ValueError(f"vocab_size must be > 257 (256 bytes + <|endoftext|>), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
