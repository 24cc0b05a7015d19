"""Image classifiers for the recipes: the paper's SimpleViT-B/16, HF ViT-B/16, ResNet-152, any hub checkpoint, tiny
demo models.

The paper trains from scratch, so the recipe models are built from a config (random initialization), not loaded.

ViT-B/16. ``simple_vit_b16`` is the official code's model, vit-pytorch's ``SimpleViT`` (`qsr_hf.training.simple_vit`:
2-D sin-cos positions, global average pooling, no CLS token, no qkv bias, LayerNorm around the patch embedding,
PyTorch default init): 86,381,800 parameters with 1000 classes. The ViT recipes use it. ``vit_b16`` is
`transformers.ViTForImageClassification` with the same width (768), depth (12), heads (12), MLP (3072), patch (16)
and no dropout, but a CLS token, learned position embeddings, qkv biases, truncated-normal 0.02 init and LayerNorm
eps 1e-12: 86,567,656 parameters; hub ViT weights load into it.

ResNet-152 is `transformers.ResNetForImageClassification` in the torchvision layout (bottleneck blocks
[3, 8, 36, 3], stride in the 3x3 convolution, "v1.5"): 60,192,808 parameters with 1000 classes, as torchvision's.
"""

from typing import Any

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    BaseImageProcessor,
    ConvNextImageProcessorPil,
    PretrainedConfig,
    PreTrainedModel,
    ResNetConfig,
    ResNetForImageClassification,
    ViTConfig,
    ViTForImageClassification,
)

from qsr_hf.training.data import IMAGENET_MEAN, IMAGENET_STD
from qsr_hf.training.simple_vit import SimpleViTConfig, SimpleViTForImageClassification


# Architecture of each `model_type`; image size, channels and labels come from the data.
_VIT_B16: dict[str, Any] = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "patch_size": 16,
    "hidden_dropout_prob": 0.0,  # SimpleViT has no dropout
    "attention_probs_dropout_prob": 0.0,
}
_SIMPLE_VIT_B16: dict[str, Any] = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "head_dim": 64,
    "intermediate_size": 3072,
    "patch_size": 16,
}
_RESNET152: dict[str, Any] = {
    "embedding_size": 64,
    "hidden_sizes": [256, 512, 1024, 2048],
    "depths": [3, 8, 36, 3],
    "layer_type": "bottleneck",
}
# Tiny models for the CPU demo and tests (a few seconds per epoch of Fashion-MNIST on one core).
_DEMO_VIT: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "patch_size": 7,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}
_DEMO_SIMPLE_VIT: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "head_dim": 16,
    "intermediate_size": 128,
    "patch_size": 7,
}
_DEMO_RESNET: dict[str, Any] = {
    "embedding_size": 16,
    "hidden_sizes": [32, 64],
    "depths": [1, 1],
    "layer_type": "basic",
    "downsample_in_first_stage": False,
}
MODEL_TYPES: dict[str, tuple[type[PretrainedConfig], type[PreTrainedModel], dict[str, Any]]] = {
    "simple_vit_b16": (SimpleViTConfig, SimpleViTForImageClassification, _SIMPLE_VIT_B16),
    "vit_b16": (ViTConfig, ViTForImageClassification, _VIT_B16),
    "resnet152": (ResNetConfig, ResNetForImageClassification, _RESNET152),
    "demo_vit": (ViTConfig, ViTForImageClassification, _DEMO_VIT),
    "demo_simple_vit": (SimpleViTConfig, SimpleViTForImageClassification, _DEMO_SIMPLE_VIT),
    "demo_resnet": (ResNetConfig, ResNetForImageClassification, _DEMO_RESNET),
}


def build_model(
    model_type: str | None,
    labels: list[str],
    image_size: int = 224,
    num_channels: int = 3,
    model_name_or_path: str | None = None,
    config_overrides: str | None = None,
) -> PreTrainedModel:
    """Build an image classifier, from scratch (``model_type``) or from a hub checkpoint (``model_name_or_path``).

    Args:
        model_type (`str`, *optional*):
            One of ``simple_vit_b16`` (the paper's), ``vit_b16`` (HF ViT), ``resnet152``, ``demo_vit``,
            ``demo_simple_vit``, ``demo_resnet`` (random initialization, as the paper).
            Ignored when ``model_name_or_path`` is given.
        labels (`list[str]`):
            Class names in label-id order; sets ``num_labels``, ``id2label`` and ``label2id``.
        image_size (`int`, defaults to 224):
            Side of the square training crop, in pixels (ViT's position embeddings depend on it).
        num_channels (`int`, defaults to 3):
            Input channels (1 for grey images such as Fashion-MNIST).
        model_name_or_path (`str`, *optional*):
            A hub id or local folder, loaded with `AutoModelForImageClassification`; the classifier head is
            re-initialized when its number of classes differs.
        config_overrides (`str`, *optional*):
            Config fields to change, as ``"num_hidden_layers=2,hidden_size=64"`` (`PretrainedConfig.update_from_string`).

    Returns:
        [`~transformers.PreTrainedModel`]: the model.

    Example:

    ```python
    >>> model = build_model("demo_vit", labels=[str(i) for i in range(10)], image_size=28, num_channels=1)
    >>> model.config.num_labels
    10
    ```
    """
    id2label = dict(enumerate(labels))
    label2id = {name: i for i, name in id2label.items()}
    if model_name_or_path:
        config = AutoConfig.from_pretrained(
            model_name_or_path, num_labels=len(labels), id2label=id2label, label2id=label2id
        )
        if config_overrides:
            config.update_from_string(config_overrides)
        return AutoModelForImageClassification.from_pretrained(
            model_name_or_path, config=config, ignore_mismatched_sizes=True
        )
    if model_type not in MODEL_TYPES:
        raise ValueError(
            f"model_type must be one of {sorted(MODEL_TYPES)} (or set model_name_or_path), got {model_type!r}"
        )
    config_cls, model_cls, architecture = MODEL_TYPES[model_type]
    kwargs = {**architecture, "num_channels": num_channels, "id2label": id2label, "label2id": label2id}
    if config_cls in (ViTConfig, SimpleViTConfig):
        kwargs["image_size"] = image_size
    config = config_cls(**kwargs)
    if config_overrides:
        config.update_from_string(config_overrides)
    return model_cls(config)


def build_image_processor(
    model_name_or_path: str | None,
    image_size: int,
    image_mean: list[float] | None = None,
    image_std: list[float] | None = None,
    crop_pct: float = 0.875,
) -> BaseImageProcessor:
    """The image processor saved with the model, matching the evaluation transform of `qsr_hf.training.data`.

    Args:
        model_name_or_path (`str`, *optional*): checkpoint whose processor to start from; `None`: a new one that
            resizes the short side to ``image_size / crop_pct`` and center-crops ``image_size``.
        image_size (`int`): side of the crop in pixels.
        image_mean (`list[float]`, *optional*), image_std (`list[float]`, *optional*): normalization; default: the
            checkpoint's, else ImageNet's.
        crop_pct (`float`, defaults to 0.875): 224 / 256, the paper's evaluation crop.

    Returns:
        [`~transformers.BaseImageProcessor`]: ``image_mean`` / ``image_std`` are the normalization to train with.
    """
    if model_name_or_path:
        processor = AutoImageProcessor.from_pretrained(model_name_or_path)
    else:  # ImageNet statistics unless given (the processor class's own default is 0.5)
        processor = ConvNextImageProcessorPil(
            size={"shortest_edge": image_size}, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD
        )
    processor.image_mean = list(image_mean or processor.image_mean)
    processor.image_std = list(image_std or processor.image_std)
    processor.crop_pct = crop_pct
    return processor
