"""ResNet-50 truncated after layer 3, with torchvision's state-dict keys (CLAM's ImageNet baseline).

CLAM (Lu et al. 2021) embeds patches with an ImageNet ResNet-50 cut after ``layer3`` and
globally average-pooled: 1024 features. The layers here are torchvision's ``resnet50`` (v1.5:
the stride sits on the 3x3 convolution of each bottleneck), with the same module names
(``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer1.0.downsample.0``, ...), so torchvision's
``IMAGENET1K_V1`` checkpoint loads strictly once its ``layer4.*`` and ``fc.*`` entries are
dropped (:mod:`wsiengine.models.training.build` does that).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ResNet50Trunc", "Bottleneck"]


class Bottleneck(nn.Module):
    """torchvision's ``Bottleneck``: 1x1 -> 3x3 (stride) -> 1x1 (x4), residual, ReLU."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet50Trunc(nn.Module):
    """ResNet-50 stem + layers 1-3 + global average pool: ``(B, 3, H, W)`` -> ``(B, 1024)``.

    Parameters
    ----------
    layers : tuple of int
        Bottlenecks per stage (ResNet-50: 3, 4, 6; stage 4 is left out).
    """

    def __init__(self, layers: tuple[int, int, int] = (3, 4, 6)) -> None:
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.num_features = 256 * Bottleneck.expansion
        self.init_weights()

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * Bottleneck.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * Bottleneck.expansion),
            )
        layers = [Bottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    @torch.no_grad()
    def init_weights(self) -> None:
        """torchvision's initialisation: Kaiming normal (fan-out) convolutions, unit BN scales."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images ``(B, 3, H, W)`` -> layer-3 features pooled to ``(B, 1024)``."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return torch.flatten(self.avgpool(x), 1)
