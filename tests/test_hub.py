"""Model card content and the Hub upload path, offline (the upload endpoint is a stand-in)."""

import json
from typing import ClassVar

import pytest
from huggingface_hub import ModelCard

from qsr_hf.training import hub


QSR = {"qsr_rule": "qsr", "qsr_alpha": 0.0175, "qsr_h_base": 4, "qsr_h_max": None, "qsr_switch_step": None}
SUMMARY = {"qsr/H": 8142, "qsr/syncs": 9711, "qsr/extra_syncs": 3, "qsr/comm_volume_vs_ddp": 0.10375}
FACTS = {"optimizer": "adamw_torch", "peak learning rate": 0.008, "warm-up steps": 10000, "processes": 16}
EVAL = {"eval_top1": 0.8098, "eval_top5": 0.953, "eval_loss": 0.9, "eval_runtime": 12.0}


class FakeApi:
    """Records the calls `hub.push_to_hub` makes; stands in for `huggingface_hub.HfApi` (no network)."""

    calls: ClassVar[list] = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs["repo_id"], kwargs))
        return type("Commit", (), {"commit_url": f"https://huggingface.co/{kwargs['repo_id']}/commit/abc"})()


@pytest.fixture
def fake_api(monkeypatch):
    FakeApi.calls = []
    monkeypatch.setattr(hub, "HfApi", FakeApi)
    return FakeApi


def test_model_card_records_qsr_settings_schedule_comm_and_accuracy(tmp_path):
    card = hub.build_model_card(
        "vit-b16-qsr",
        "ILSVRC/imagenet-1k",
        QSR,
        FACTS,
        SUMMARY,
        EVAL,
        command="accelerate launch -m qsr_hf.training.train x",
    )
    text = card.content
    assert "QSR: H = max(H_base, ⌊(α/η)²⌋)" in text
    assert "| qsr_alpha | 0.0175 |" in text and "| qsr_h_base | 4 |" in text
    assert "| qsr/syncs | 9711 |" in text and "10.38%" in text  # communication vs data-parallel
    assert "| peak learning rate | 0.008 |" in text and "| warm-up steps | 10000 |" in text
    assert "| top1 | 0.8098 |" in text and "runtime" not in text
    assert "accelerate launch -m qsr_hf.training.train x" in text and "gu2024quadratic" in text
    assert "Training curves" not in text  # no figure given
    with_figure = hub.build_model_card("m", "d", QSR, FACTS, SUMMARY, EVAL, figure="qsr_run.png").content
    assert "## Training curves" in with_figure and "](qsr_run.png)" in with_figure
    path = hub.save_model_card(card, tmp_path / "out")
    loaded = ModelCard.load(path)
    assert loaded.data.library_name == "transformers" and "qsr_hf" in loaded.data.tags
    assert loaded.data.datasets == ["ILSVRC/imagenet-1k"]
    assert loaded.data.eval_results[0].metric_value == pytest.approx(0.8098)


def test_model_card_for_a_local_dataset_and_plain_ddp():
    card = hub.build_model_card(
        "demo", "fashion_mnist_local", {"qsr_rule": "ddp"}, {}, {"qsr/comm_volume_vs_ddp": 1.0}, {}, base_model=None
    )
    assert "gradients all-reduced every step" in card.content and "100.00%" in card.content
    assert card.data.datasets is None and card.data.eval_results is None
    assert "from scratch" in card.content


def test_push_uploads_the_run_folder_without_checkpoints(tmp_path, fake_api):
    (tmp_path / "README.md").write_text("card")
    url = hub.push_to_hub(tmp_path, "me/vit-qsr", token="hf_x", private=True)
    (name, repo, kwargs), (name2, repo2, upload) = fake_api.calls
    assert (name, repo, kwargs["private"], kwargs["exist_ok"]) == ("create_repo", "me/vit-qsr", True, True)
    assert (name2, repo2, upload["folder_path"]) == ("upload_folder", "me/vit-qsr", str(tmp_path))
    assert "checkpoint-*" in upload["ignore_patterns"] and "qsr_state_rank*" in upload["ignore_patterns"]
    assert url.endswith("/commit/abc")


def test_train_pushes_once_at_the_end_with_the_qsr_card(tmp_path, fake_api, monkeypatch):
    # The whole train.main path, one process, a few steps: card written, then pushed through the stand-in API.
    monkeypatch.setenv("WORLD_SIZE", "1")
    from qsr_hf.training.train import main

    out = tmp_path / "run"
    argv = ["recipes/demo/qsr.yaml", "--output_dir", str(out), "--max_steps", "3", "--save_strategy", "no"]
    argv += ["--dataset_name", "sklearn_digits_local", "--max_train_samples", "256", "--max_eval_samples", "64"]
    argv += ["--push_to_hub", "true", "--hub_model_id", "me/demo-qsr", "--disable_tqdm", "true"]
    metrics = main(argv)
    assert 0 <= metrics["eval_top1"] <= metrics["eval_top5"] <= 1
    card = (out / "README.md").read_text()
    assert "sync-rule-qsr" in card and "| qsr_alpha | 0.022 |" in card and "| optimizer steps | 3 |" in card
    assert "](qsr_run.png)" in card and (out / "qsr_run.png").is_file()  # the run's figure, pushed with the card
    results = json.loads((out / "all_results.json").read_text())
    assert {"eval_top1", "eval_top5", "qsr/syncs", "train_loss"} <= set(results)
    assert [c[0] for c in fake_api.calls] == ["create_repo", "upload_folder"], "one push, at the end"
    assert fake_api.calls[1][2]["folder_path"] == str(out)
    assert (out / "preprocessor_config.json").is_file() and (out / "config.json").is_file()
    # round trip of what would be pushed: the folder loads back through the Auto classes, with its card
    import torch
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(out)
    processor = AutoImageProcessor.from_pretrained(out)
    assert model.config.num_labels == 10 and sorted(model.config.id2label) == list(range(10))
    with torch.no_grad():
        logits = model(pixel_values=torch.zeros(2, 1, 28, 28)).logits
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    assert processor.image_mean and processor.image_std
    card_data = ModelCard.load(out / "README.md").data
    assert card_data.eval_results[0].metric_value == pytest.approx(metrics["eval_top1"])


def test_model_card_shows_the_sync_format_and_bytes():
    qsr = {**QSR, "qsr_compress_delta": True, "qsr_compress_format": "int8"}
    card = hub.build_model_card("m", "d", qsr, FACTS, SUMMARY, EVAL).content
    assert "int8 deltas, 1.016 B/param per sync (fp32: 4)" in card
    assert "sync format" not in hub.build_model_card("m", "d", QSR, FACTS, SUMMARY, EVAL).content
    qsr.update(qsr_compress_error_feedback=True, qsr_overlap_sync=True, qsr_overlap_steps=2)
    card = hub.build_model_card("m", "d", qsr, FACTS, SUMMARY, EVAL).content
    assert "int8 deltas, 1.016 B/param per sync (fp32: 4), error feedback, in flight" in card
