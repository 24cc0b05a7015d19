"""Causal language models for the recipes: Llama-architecture models built from a `LlamaConfig` (random
initialization, as in pretraining), or any hub checkpoint by name.

``llama_150m`` (hidden 768, 12 layers, 12 heads, MLP 2048, untied embeddings) has 84,953,856 parameters outside the
embedding and output matrices, plus 2 x 768 per vocabulary entry: 134,259,456 with the C4 recipes' T5 tokenizer
(32,100 tokens), 134,105,856 with a 32,000-token one. ``demo_llama`` is the CPU demo's: 2 layers, hidden 128,
1,475,200 parameters with the demo's 4,096-token tokenizer.
"""

from typing import Any

from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)


LM_MODEL_TYPES: dict[str, dict[str, Any]] = {
    "llama_150m": {
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 2048,
        "max_position_embeddings": 1024,
        "tie_word_embeddings": False,
    },
    "demo_llama": {
        "hidden_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 384,
        "max_position_embeddings": 256,
        "tie_word_embeddings": False,
    },
}


def build_causal_lm(
    model_type: str | None,
    tokenizer: PreTrainedTokenizerBase,
    model_name_or_path: str | None = None,
    config_overrides: str | None = None,
) -> PreTrainedModel:
    """Build a causal LM sized to ``tokenizer``, from scratch (``model_type``) or from a checkpoint.

    ``use_cache`` is off in the config: training never reads the key/value cache, and building it every forward
    costs memory. (``generate`` turns it back on through the generation config.)

    Args:
        model_type (`str`, *optional*): ``llama_150m`` or ``demo_llama``; ignored when ``model_name_or_path`` is set.
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]): sets ``vocab_size`` and the EOS/pad token ids.
        model_name_or_path (`str`, *optional*): hub id or folder loaded with `AutoModelForCausalLM`.
        config_overrides (`str`, *optional*): e.g. ``"num_hidden_layers=4,hidden_size=256"``.

    Returns:
        [`~transformers.PreTrainedModel`]: the model, in training-ready config (``use_cache=False``).

    Example:

    ```python
    >>> from qsr_hf.training.tokenizer import train_bpe_tokenizer
    >>> model = build_causal_lm("demo_llama", train_bpe_tokenizer(["print('hello')"] * 4, vocab_size=300))
    >>> model.config.vocab_size, model.config.use_cache
    (300, False)
    ```
    """
    special = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id, "use_cache": False}
    if model_name_or_path:
        config = AutoConfig.from_pretrained(model_name_or_path, **special)
        if config_overrides:
            config.update_from_string(config_overrides)
        return AutoModelForCausalLM.from_pretrained(model_name_or_path, config=config)
    if model_type not in LM_MODEL_TYPES:
        raise ValueError(
            f"model_type for task causal-lm must be one of {sorted(LM_MODEL_TYPES)} (or set model_name_or_path), "
            f"got {model_type!r}"
        )
    config = LlamaConfig(
        **LM_MODEL_TYPES[model_type], vocab_size=len(tokenizer), bos_token_id=tokenizer.eos_token_id, **special
    )
    if config_overrides:
        config.update_from_string(config_overrides)
    return LlamaForCausalLM(config)
