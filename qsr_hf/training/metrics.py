"""Evaluation metrics as `evaluate` modules that ship inside the package, and the Trainer hooks built on them.

`evaluate.load("accuracy")` fetches the metric's script from the Hub and fails offline, so the modules here are
`evaluate.Metric` subclasses, instantiated directly (no download, no script cache) and kept in memory (no Arrow cache
files, which several ranks calling ``compute_metrics`` at once would contend for):

- [`TopKAccuracy`]: top-1/top-5 (any k) from ranked class ids, for image classification;
- [`TokenAccuracy`]: next-token accuracy over the positions that have a label, for causal language models;
- [`Perplexity`]: ``exp`` of the mean cross-entropy (nats), from per-token losses or from a Trainer's ``eval_loss``.

What stays outside `evaluate`, and why: the reduction of the logits before gathering (``preprocess_logits_for_metrics``:
top-k class ids, argmax tokens and per-token losses, in torch on the device), since `evaluate` sees only what the
Trainer has already gathered; inside the modules the counting is numpy, as in `evaluate`'s own metrics.
"""

import math
from collections.abc import Sequence
from typing import Any

import datasets
import evaluate
import numpy as np
import torch
import torch.nn.functional as F
from transformers import EvalPrediction


IGNORE_INDEX = -100  # transformers' label for positions without a target (padding, the prompt)
_CITATION = ""  # no paper: plain counting


class TopKAccuracy(evaluate.Metric):
    """Top-k accuracy: a reference counts as a hit when it is among the first k predicted class ids.

    Inputs of ``compute``/``add_batch``: ``predictions`` (class ids ranked best first, one sequence per example) and
    ``references`` (the true class id). ``compute(..., ks=(1, 5))`` returns ``{"top1": float, "top5": float}``
    (fractions); a k larger than the ranked ids given is counted over all of them.

    Example:

    ```python
    >>> TopKAccuracy().compute(predictions=[[2, 0], [1, 2]], references=[2, 2], ks=(1, 2))
    {'top1': 0.5, 'top2': 1.0}
    ```
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(keep_in_memory=True, **kwargs)

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Fraction of examples whose label is among the first k ranked class ids.",
            citation=_CITATION,
            inputs_description="predictions: ranked class ids per example; references: class id; ks: the k values",
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("int64")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions: Sequence[Sequence[int]], references: Sequence[int], ks: Sequence[int] = (1, 5)) -> dict[str, float]:  # fmt: skip
        hits = np.asarray(predictions) == np.asarray(references)[:, None]
        return {f"top{k}": float(hits[:, :k].any(axis=1).mean()) for k in ks}


class TokenAccuracy(evaluate.Metric):
    """Token accuracy: the fraction of labelled positions whose predicted token id equals the label.

    Inputs: ``predictions`` and ``references``, token ids of the same (flat) length; positions whose reference is
    ``ignore_index`` (default -100, transformers' convention) are not counted. Returns ``{"token_accuracy": float}``.

    Example:

    ```python
    >>> TokenAccuracy().compute(predictions=[5, 6, 7], references=[5, 0, -100])
    {'token_accuracy': 0.5}
    ```
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(keep_in_memory=True, **kwargs)

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Fraction of labelled token positions predicted exactly.",
            citation=_CITATION,
            inputs_description="predictions, references: token ids; ignore_index: label of unscored positions",
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    # **other: `evaluate.combine` hands every module the other modules' inputs too (here Perplexity's `losses`)
    def _compute(self, predictions: Sequence[int], references: Sequence[int], ignore_index: int = IGNORE_INDEX, **other: Any) -> dict[str, float]:  # fmt: skip
        predictions, references = np.asarray(predictions), np.asarray(references)
        scored = references != ignore_index
        return {"token_accuracy": float((predictions[scored] == references[scored]).mean()) if scored.any() else 0.0}


class Perplexity(evaluate.Metric):
    """Perplexity, ``exp(mean loss)``, from cross-entropy losses in nats.

    Inputs: ``losses``, one per token (then it is the perplexity of those tokens) or one per evaluation (a Trainer's
    ``eval_loss``, the mean token loss: then it is ``exp(eval_loss)``). Returns ``{"perplexity": float}`` (``inf``
    when the mean loss overflows ``exp``).

    Example:

    ```python
    >>> round(Perplexity().compute(losses=[math.log(4.0)])["perplexity"], 6)
    4.0
    ```
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(keep_in_memory=True, **kwargs)

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="exp of the mean cross-entropy loss (nats).",
            citation=_CITATION,
            inputs_description="losses: per-token cross-entropy, or a mean evaluation loss",
            features=datasets.Features({"losses": datasets.Value("float64")}),
        )

    def _compute(self, losses: Sequence[float]) -> dict[str, float]:
        mean = float(np.mean(losses))
        return {"perplexity": math.exp(mean) if mean < 709 else math.inf}  # exp overflows a float64 above ~709.78


def top_k_indices(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Keep the 5 best class ids per example (``preprocess_logits_for_metrics``: no gathering of full logits)."""
    return logits.topk(min(5, logits.shape[-1]), dim=-1).indices


def compute_metrics(prediction: EvalPrediction) -> dict[str, float]:
    """Top-1 and top-5 accuracy (fractions) through [`TopKAccuracy`], from the ids of [`top_k_indices`]."""
    top = prediction.predictions
    top = np.asarray(top[0] if isinstance(top, tuple) else top)
    return TopKAccuracy().compute(predictions=top, references=np.asarray(prediction.label_ids), ks=(1, 5))


def lm_predictions_and_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``preprocess_logits_for_metrics`` of a causal LM: the argmax token and the token's loss at every position.

    Position t predicts token t + 1 (the shift ``AutoModelForCausalLM`` applies to its loss), so both outputs are
    aligned with ``labels[:, 1:]``, padded back to the labels' length with ``argmax -1, loss 0`` at the last position;
    positions labelled -100 get loss 0 and are dropped by [`compute_lm_metrics`].
    """
    shifted, targets = logits[:, :-1].float(), labels[:, 1:]
    losses = F.cross_entropy(shifted.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
    predictions = F.pad(shifted.argmax(dim=-1), (0, 1), value=-1)
    return predictions, F.pad(losses, (0, 1), value=0.0)


def compute_lm_metrics(prediction: EvalPrediction) -> dict[str, float]:
    """Token accuracy and perplexity of a causal LM (``evaluate.combine`` of [`TokenAccuracy`] and [`Perplexity`]).

    Use with ``preprocess_logits_for_metrics=lm_predictions_and_losses``; the Trainer then logs ``eval_token_accuracy``
    and ``eval_perplexity`` (the perplexity of the evaluation tokens: ``exp`` of their mean loss, which is
    ``exp(eval_loss)`` up to how the Trainer weights its per-batch means).

    Example:

    ```python
    >>> logits = torch.tensor([[[0.0, 9.0], [9.0, 0.0], [0.0, 0.0]]])  # 1 sequence, 3 positions, 2 tokens
    >>> labels = torch.tensor([[-100, 1, 1]])
    >>> ids, losses = lm_predictions_and_losses(logits, labels)
    >>> metrics = compute_lm_metrics(EvalPrediction(predictions=(ids.numpy(), losses.numpy()), label_ids=labels.numpy()))
    >>> metrics["token_accuracy"]
    0.5
    ```
    """
    ids, losses = (np.asarray(p) for p in prediction.predictions)
    targets = np.asarray(prediction.label_ids)[:, 1:]
    scored = targets != IGNORE_INDEX
    lm_metrics = evaluate.combine([TokenAccuracy(), Perplexity()])
    return lm_metrics.compute(
        predictions=ids[:, :-1][scored], references=targets[scored], losses=losses[:, :-1][scored]
    )


def add_perplexity(metrics: dict[str, float], prefix: str = "eval_") -> dict[str, float]:
    """Add ``{prefix}perplexity`` = ``exp({prefix}loss)`` through [`Perplexity`] to a Trainer's metrics (in place).

    For a causal-LM run evaluated without ``compute_metrics`` (``trainer.evaluate()`` gives only the loss), as
    ``run_clm.py`` does with ``math.exp``. Returns ``metrics``.
    """
    if f"{prefix}loss" in metrics:
        metrics[f"{prefix}perplexity"] = Perplexity().compute(losses=[metrics[f"{prefix}loss"]])["perplexity"]
    return metrics
