"""The `evaluate` metric modules of `qsr_hf.training.metrics`, offline: image top-k, and token accuracy and perplexity
through a real causal-LM `Trainer` (tiny GPT-2 from a config)."""

import math

import evaluate
import numpy as np
import pytest
import torch
from transformers import EvalPrediction, GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from qsr_hf.training import metrics


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def test_modules_are_evaluate_metrics_that_leave_no_cache_files(tmp_path):
    for cls in (metrics.TopKAccuracy, metrics.TokenAccuracy, metrics.Perplexity):
        module = cls(cache_dir=str(tmp_path))
        assert isinstance(module, evaluate.Metric) and module.keep_in_memory
    metrics.TopKAccuracy(cache_dir=str(tmp_path)).compute(predictions=[[0, 1]], references=[1])
    assert not list(tmp_path.rglob("*.arrow")), "several ranks compute at once: no shared Arrow cache files"


def test_top_k_accuracy_matches_counting_by_hand():
    rng = np.random.default_rng(0)
    logits = torch.tensor(rng.normal(size=(300, 10)), dtype=torch.float32)
    labels = torch.tensor(rng.integers(0, 10, size=300))
    ids = metrics.top_k_indices(logits, labels)
    result = metrics.compute_metrics(EvalPrediction(predictions=ids.numpy(), label_ids=labels.numpy()))
    ranks = (logits > logits.gather(1, labels[:, None])).sum(1)  # classes scored above the label
    assert result == pytest.approx(
        {"top1": (ranks < 1).float().mean().item(), "top5": (ranks < 5).float().mean().item()}
    )
    # the Trainer hands a tuple when the model returns several outputs
    assert metrics.compute_metrics(EvalPrediction(predictions=(ids.numpy(),), label_ids=labels.numpy())) == result


def test_token_accuracy_skips_unlabelled_positions_and_perplexity_is_exp_of_the_mean():
    acc = metrics.TokenAccuracy().compute(predictions=[1, 2, 3, 4], references=[1, 0, -100, -100])
    assert acc == {"token_accuracy": 0.5}
    assert metrics.Perplexity().compute(losses=[1.0, 3.0])["perplexity"] == pytest.approx(math.exp(2.0))
    assert metrics.Perplexity().compute(losses=[800.0])["perplexity"] == math.inf
    assert metrics.add_perplexity({"eval_loss": 2.5})["eval_perplexity"] == pytest.approx(math.exp(2.5))
    assert metrics.add_perplexity({"train_loss": 2.5}) == {"train_loss": 2.5}


class TokenRows(torch.utils.data.Dataset):
    def __init__(self, n, length, vocab):
        gen = torch.Generator().manual_seed(0)
        self.rows = torch.randint(0, vocab, (n, length), generator=gen)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        labels = self.rows[i].clone()
        labels[:3] = -100  # a prompt without targets
        return {"input_ids": self.rows[i], "labels": labels}


def test_causal_lm_trainer_logs_token_accuracy_and_perplexity_of_its_eval_loss(tmp_path):
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_eval_batch_size=4, report_to=[], use_cpu=True, disable_tqdm=True
    )
    trainer = Trainer(
        model=GPT2LMHeadModel(config),
        args=args,
        eval_dataset=TokenRows(8, 12, 50),  # equal batches: the Trainer's mean of batch means is the token mean
        compute_metrics=metrics.compute_lm_metrics,
        preprocess_logits_for_metrics=metrics.lm_predictions_and_losses,
    )
    result = trainer.evaluate()
    assert 0 <= result["eval_token_accuracy"] <= 1
    assert result["eval_perplexity"] == pytest.approx(math.exp(result["eval_loss"]), rel=1e-4)
    # token accuracy counted by hand from the model's own argmax at the labelled positions
    batch = TokenRows(8, 12, 50)[:]
    with torch.no_grad():
        logits = trainer.model(input_ids=batch["input_ids"]).logits
    hits = logits[:, 2:-1].argmax(-1) == batch["input_ids"][:, 3:]
    assert result["eval_token_accuracy"] == pytest.approx(hits.float().mean().item())
