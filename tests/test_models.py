"""The recipe models: every model type builds and runs; the paper's SimpleViT (size, layout, Auto classes, round trip)."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForImageClassification

from qsr_hf.training.models import MODEL_TYPES, build_model
from qsr_hf.training.simple_vit import SimpleViTConfig, SimpleViTForImageClassification, sincos_position_embedding


TINY = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}
TINY |= {"head_dim": 16, "intermediate_size": 64}


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("model_type", sorted(set(MODEL_TYPES) - {"vit_b16", "simple_vit_b16", "resnet152"}))
def test_demo_models_build_from_config(model_type):
    model = build_model(model_type, ["a", "b", "c"], image_size=28, num_channels=1)
    assert model.config.num_labels == 3 and model.config.id2label[2] == "c"
    with torch.no_grad():
        assert model.eval()(pixel_values=torch.zeros(2, 1, 28, 28)).logits.shape == (2, 3)


def test_paper_model_sizes_on_the_meta_device():
    labels = [str(i) for i in range(1000)]
    with torch.device("meta"):
        assert n_params(build_model("simple_vit_b16", labels)) == 86_381_800  # the official code's SimpleViT
        assert n_params(build_model("vit_b16", labels)) == 86_567_656  # HF ViT: CLS token, learned positions
        assert n_params(build_model("resnet152", labels)) == 60_192_808  # torchvision's ResNet-152
        hf_vit = build_model("vit_b16", labels, config_overrides="num_hidden_layers=1")  # config_overrides path
    assert hf_vit.config.num_hidden_layers == 1 and hf_vit.config.hidden_dropout_prob == 0.0


def test_simple_vit_layout_matches_vit_pytorch():
    model = SimpleViTForImageClassification(SimpleViTConfig(**TINY, num_labels=5))
    names = dict(model.named_parameters())
    assert "blocks.0.attention.to_qkv.bias" not in names and "blocks.0.attention.to_out.bias" not in names  # no bias
    assert not any("cls" in n or "position" in n for n in names)  # no CLS token, no learned positions
    embed = model.patch_embedding  # LayerNorm -> Linear -> LayerNorm on the flattened patches
    assert [type(m).__name__ for m in embed] == ["LayerNorm", "Linear", "LayerNorm"] and embed[0].weight.numel() == 192
    assert [type(m).__name__ for m in model.head] == ["LayerNorm", "Linear"]
    # PyTorch's default init (kaiming-uniform bound 1/sqrt(fan_in)), not a truncated normal 0.02
    assert model.blocks[0].mlp[1].weight.abs().max() <= 32**-0.5 and model.blocks[0].mlp[1].weight.std() > 0.1
    pe = sincos_position_embedding(2, 3, 8)  # [sin x, cos x, sin y, cos y] at frequencies 1, 1e-4; row-major
    assert pe.shape == (6, 8)
    assert torch.isclose(pe[1, 0], torch.tensor(1.0).sin()) and torch.isclose(pe[3, 4], torch.tensor(1.0).sin())
    assert pe[1, 4] == 0 and pe[3, 0] == 0
    x = torch.randn(3, 3, 32, 32)
    out = model(pixel_values=x, labels=torch.tensor([0, 1, 4]))
    assert out.logits.shape == (3, 5) and out.loss.ndim == 0


def test_simple_vit_round_trip_through_the_auto_classes(tmp_path):
    torch.manual_seed(0)
    model = build_model("demo_simple_vit", ["a", "b"], image_size=28, num_channels=1)
    model.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).model_type == "qsr_simple_vit"
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path)
    assert isinstance(loaded, SimpleViTForImageClassification) and loaded.config.id2label == {0: "a", 1: "b"}
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model.eval()(pixel_values=x).logits, loaded.eval()(pixel_values=x).logits)
    again = build_model(None, ["a", "b", "c"], model_name_or_path=str(tmp_path))  # the recipe's hub-checkpoint path
    assert again.config.num_labels == 3


def test_simple_vit_config_checks_its_shapes():
    with pytest.raises(ValueError, match="multiple of 4"):
        SimpleViTConfig(hidden_size=30)
    with pytest.raises(ValueError, match="patch_size"):
        SimpleViTConfig(image_size=30, patch_size=16)


def test_unknown_model_type_is_named():
    with pytest.raises(ValueError, match="model_type"):
        build_model("vit_huge", ["a"])
