"""Vision Transformer backbones (torchvision's implementation) and the backbone factory."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer as TorchvisionViT

from resmom.models.resnet import ResNet
from resmom.specs import ModelSpec

# (layers, heads, hidden size): ViT-Tiny and ViT-Small as in DeiT (arXiv 2012.12877);
# the MLP is 4x the hidden size.
VIT_SIZES = {"vit_tiny": (12, 3, 192), "vit_small": (12, 6, 384)}


class VisionTransformer(nn.Module):
    """A ViT whose output is the class token after the final norm, (B, feature_dim)."""

    def __init__(self, size: str, image_size: int, patch_size: int) -> None:
        super().__init__()
        layers, heads, hidden = VIT_SIZES[size]
        self.vit = TorchvisionViT(
            image_size=image_size,
            patch_size=patch_size,
            num_layers=layers,
            num_heads=heads,
            hidden_dim=hidden,
            mlp_dim=4 * hidden,
        )
        self.vit.heads = nn.Identity()
        self.feature_dim = hidden

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.vit(images)


def build_backbone(model: ModelSpec, image_size: int) -> ResNet | VisionTransformer:
    """Build the backbone that `model` names for square inputs of side `image_size`."""
    if model.backbone in VIT_SIZES:
        return VisionTransformer(model.backbone, image_size, model.patch_size)
    return ResNet(model.backbone, width=model.width, stem=model.stem)
