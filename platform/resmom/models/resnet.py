"""ResNet backbones built from torchvision's blocks, with a CIFAR stem and a width option.

torchvision's `ResNet` fixes the first stage at 64 channels; a narrower
network (width 16 trains on two CPU cores) needs the stages built here.
The blocks themselves are torchvision's, so the layers are the standard ones.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1

# Block type and blocks per stage (He et al., arXiv 1512.03385).
STAGES: dict[str, tuple[type[BasicBlock] | type[Bottleneck], tuple[int, ...]]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
}


class ResNet(nn.Module):
    """ResNet trunk that returns pooled features of size `feature_dim`.

    Args:
        depth: a key of STAGES.
        width: channels of the first stage; later stages double it.
        stem: `cifar` (3x3 conv, stride 1, no max-pool: for 32x32 inputs) or
            `imagenet` (7x7 conv, stride 2, then max-pool).
    """

    def __init__(self, depth: str = "resnet18", width: int = 64, stem: str = "cifar") -> None:
        super().__init__()
        if depth not in STAGES:
            raise ValueError(f"unknown ResNet depth {depth!r}; accepted: {', '.join(STAGES)}")
        if stem == "cifar":
            self.stem = nn.Sequential(
                nn.Conv2d(3, width, 3, stride=1, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            )
        elif stem == "imagenet":
            self.stem = nn.Sequential(
                nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, stride=2, padding=1),
            )
        else:
            raise ValueError(f"unknown stem {stem!r}; accepted: cifar, imagenet")

        block, counts = STAGES[depth]
        stages = []
        in_channels = width
        for index, blocks in enumerate(counts):
            channels = width * 2**index
            stride = 1 if index == 0 else 2
            stages.append(self._stage(block, in_channels, channels, blocks, stride))
            in_channels = channels * block.expansion
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = in_channels

        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    @staticmethod
    def _stage(block, in_channels: int, channels: int, blocks: int, stride: int) -> nn.Sequential:
        out_channels = channels * block.expansion
        downsample = None
        if stride != 1 or in_channels != out_channels:
            downsample = nn.Sequential(
                conv1x1(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels)
            )
        # torchvision's Bottleneck derives its inner width from base_width / 64;
        # passing 64 keeps it at `channels` whatever the network's width.
        layers = [block(in_channels, channels, stride, downsample)]
        layers += [block(out_channels, channels) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, feature_dim)."""
        return self.pool(self.stages(self.stem(images))).flatten(1)
