"""The paper's ViT: vit-pytorch's ``SimpleViT`` (Beyer et al., 2022) as a `transformers` model.

The official QSR code trains ``vit_pytorch.SimpleViT`` (1.2.x): the patch embedding is LayerNorm -> Linear ->
LayerNorm on the flattened patches, a fixed 2-D sin-cos position embedding is added, pre-norm blocks with no bias in
the attention projections, global average pooling of the tokens (no CLS token), then LayerNorm -> Linear. No dropout;
PyTorch's default initialization. ViT-B/16 at 224 px with 1000 classes has 86,381,800 parameters.

`SimpleViTConfig` / `SimpleViTForImageClassification` are registered with `AutoConfig` and
`AutoModelForImageClassification` (``model_type: "qsr_simple_vit"``), so ``save_pretrained``, ``from_pretrained``
and ``push_to_hub`` work; loading a pushed model needs ``import qsr_hf.training.simple_vit`` first (the code is not
on the Hub).
"""

from typing import ClassVar

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForImageClassification, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import ImageClassifierOutput


class SimpleViTConfig(PretrainedConfig):
    """Configuration of [`SimpleViTForImageClassification`]; defaults are ViT-B/16 at 224 px.

    Args:
        image_size (`int`, defaults to 224): input side in pixels (any multiple of ``patch_size`` works at run time).
        patch_size (`int`, defaults to 16): patch side in pixels.
        num_channels (`int`, defaults to 3): input channels.
        hidden_size (`int`, defaults to 768): token width (``dim``; a multiple of 4 for the sin-cos embedding).
        num_hidden_layers (`int`, defaults to 12): transformer blocks (``depth``).
        num_attention_heads (`int`, defaults to 12): attention heads.
        head_dim (`int`, defaults to 64): width of one head (``dim_head``).
        intermediate_size (`int`, defaults to 3072): MLP width (``mlp_dim``).
        layer_norm_eps (`float`, defaults to 1e-5): LayerNorm epsilon (PyTorch's default).
        **kwargs: `PretrainedConfig` fields (``id2label``, ``label2id``, ...).
    """

    model_type = "qsr_simple_vit"

    def __init__(
        self, image_size: int = 224, patch_size: int = 16, num_channels: int = 3, hidden_size: int = 768,
        num_hidden_layers: int = 12, num_attention_heads: int = 12, head_dim: int = 64, intermediate_size: int = 3072,
        layer_norm_eps: float = 1e-5, **kwargs: object,
    ) -> None:  # fmt: skip
        if hidden_size % 4:
            raise ValueError(f"hidden_size must be a multiple of 4 for the 2-D sin-cos embedding, got {hidden_size}")
        if image_size % patch_size:
            raise ValueError(f"image_size ({image_size}) must be a multiple of patch_size ({patch_size})")
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.head_dim = head_dim
        self.intermediate_size = intermediate_size
        self.layer_norm_eps = layer_norm_eps
        super().__init__(**kwargs)


def sincos_position_embedding(rows: int, cols: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """The fixed 2-D sin-cos embedding of SimpleViT, ``(rows * cols, dim)``: [sin x, cos x, sin y, cos y]."""
    y, x = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    omega = 1.0 / temperature ** (torch.arange(dim // 4) / (dim // 4 - 1))
    y = y.flatten()[:, None] * omega[None, :]
    x = x.flatten()[:, None] * omega[None, :]
    return torch.cat((x.sin(), x.cos(), y.sin(), y.cos()), dim=1)


class SimpleViTAttention(nn.Module):
    """Pre-norm multi-head self-attention without biases in the projections."""

    def __init__(self, config: SimpleViTConfig) -> None:
        super().__init__()
        self.heads, inner = config.num_attention_heads, config.num_attention_heads * config.head_dim
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.to_qkv = nn.Linear(config.hidden_size, 3 * inner, bias=False)
        self.to_out = nn.Linear(inner, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, N, D) -> (B, N, D)``."""
        b, n, _ = x.shape
        q, k, v = self.to_qkv(self.norm(x)).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        out = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class SimpleViTBlock(nn.Module):
    """``x + attention(x)``, then ``x + MLP(x)`` with a pre-norm GELU MLP."""

    def __init__(self, config: SimpleViTConfig) -> None:
        super().__init__()
        self.attention = SimpleViTAttention(config)
        self.mlp = nn.Sequential(
            nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps),
            nn.Linear(config.hidden_size, config.intermediate_size),
            nn.GELU(),
            nn.Linear(config.intermediate_size, config.hidden_size),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, N, D) -> (B, N, D)``."""
        x = x + self.attention(x)
        return x + self.mlp(x)


class SimpleViTForImageClassification(PreTrainedModel):
    """vit-pytorch's SimpleViT with a `transformers` interface: ``model(pixel_values, labels=None)``.

    Args:
        config ([`SimpleViTConfig`]): the architecture and labels.

    Example:

    ```python
    >>> config = SimpleViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2,
    ...                          num_attention_heads=2, head_dim=32, intermediate_size=128, num_labels=10)
    >>> model = SimpleViTForImageClassification(config)
    >>> model(pixel_values=torch.zeros(2, 3, 32, 32)).logits.shape
    torch.Size([2, 10])
    ```
    """

    config_class = SimpleViTConfig
    base_model_prefix = "simple_vit"
    main_input_name = "pixel_values"
    _no_split_modules: ClassVar[list[str]] = ["SimpleViTBlock"]
    _supports_sdpa = True

    def __init__(self, config: SimpleViTConfig) -> None:
        super().__init__(config)
        patch_dim = config.num_channels * config.patch_size**2
        eps = config.layer_norm_eps
        self.patch_embedding = nn.Sequential(
            nn.LayerNorm(patch_dim, eps=eps),
            nn.Linear(patch_dim, config.hidden_size),
            nn.LayerNorm(config.hidden_size, eps=eps),
        )
        self.blocks = nn.ModuleList(SimpleViTBlock(config) for _ in range(config.num_hidden_layers))
        self.head = nn.Sequential(
            nn.LayerNorm(config.hidden_size, eps=eps), nn.Linear(config.hidden_size, config.num_labels)
        )
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # PyTorch's default initialization, as vit-pytorch (also for weights missing from a checkpoint)
        if isinstance(module, (nn.Linear, nn.LayerNorm)):
            module.reset_parameters()

    def patchify(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W) -> (B, H/p * W/p, p * p * C)``, patches in row-major order, pixels as ``(p1 p2 c)``."""
        b, c, h, w = pixel_values.shape
        p = self.config.patch_size
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} must be a multiple of patch_size {p}")
        x = pixel_values.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(b, (h // p) * (w // p), p * p * c)

    def forward(
        self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, **kwargs: object
    ) -> ImageClassifierOutput:
        """Logits ``(B, num_labels)``; with ``labels``, also the cross-entropy loss."""
        p = self.config.patch_size
        x = self.patch_embedding(self.patchify(pixel_values))
        rows, cols = pixel_values.shape[-2] // p, pixel_values.shape[-1] // p
        x = x + sincos_position_embedding(rows, cols, x.shape[-1]).to(device=x.device, dtype=x.dtype)
        for block in self.blocks:
            x = block(x)
        logits = self.head(x.mean(dim=1))
        loss = None if labels is None else nn.functional.cross_entropy(logits.float(), labels)
        return ImageClassifierOutput(loss=loss, logits=logits)


AutoConfig.register(SimpleViTConfig.model_type, SimpleViTConfig, exist_ok=True)
AutoModelForImageClassification.register(SimpleViTConfig, SimpleViTForImageClassification, exist_ok=True)
