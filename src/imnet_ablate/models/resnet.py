"""ResNet-18 and ResNet-50 as ``Backbone``s: torchvision's architectures, module for module.

The modules are torchvision's own (``torchvision.models.resnet18/50(weights=None)``), regrouped only where the
protocol needs a handle: ``stem`` holds conv1, bn1, relu and maxpool; ``layer1``..``layer4`` keep their names;
torchvision's ``fc`` is ``head``; its ``avgpool`` + flatten is a mean over the spatial axes (the same numbers, and a
deterministic backward on CUDA). So a torchvision state dict loads after renaming ``conv1.``/``bn1.`` to
``stem.conv1.``/``stem.bn1.`` and ``fc.`` to ``head.`` (:func:`from_torchvision`).

Transfer uses:
- ``features``: ``pool`` (the global average of res5, what the classifier reads; ``fc7`` is its alias) or ``res4``
  (the global average of layer3);
- ``detection_parts``: Detectron's R50-C4 (the Faster R-CNN paper's ResNet detector): conv1..res4 as the stride-16
  trunk, res5 (layer4, stride 2 in its first block: 14x14 RoIs -> 7x7) + global average pooling as the box head;
- ``stages``: stem, res2..res5, so ``freeze(2)`` is Detectron's FREEZE_AT=2.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
import torchvision
from torch import nn
from torchvision.models import ResNet18_Weights, ResNet50_Weights

from ..errors import UserError
from .backbone import Backbone, DetectionParts



class Arch(NamedTuple):
    """A torchvision ResNet: its constructor and the ImageNet weights ``pretrain=torchvision`` reads
    (IMAGENET1K_V1: torchvision's reference recipe, train=resnet; 69.8% / 76.1% top-1, not ResNet-50's later V2)."""

    make: Callable[..., torchvision.models.ResNet]
    weights: torchvision.models.WeightsEnum


ARCHS = {"resnet18": Arch(torchvision.models.resnet18, ResNet18_Weights.IMAGENET1K_V1),
         "resnet50": Arch(torchvision.models.resnet50, ResNet50_Weights.IMAGENET1K_V1)}

# torchvision's state-dict key prefix -> ours (every other key is the same).
TORCHVISION_KEYS = {"conv1.": "stem.conv1.", "bn1.": "stem.bn1.", "fc.": "head."}


def _global_pool(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, C): torchvision's AdaptiveAvgPool2d(1) + flatten."""
    return x.mean((2, 3))


class Res5Head(nn.Module):
    """The R50-C4 box head: res5 on the RoI features, then global average pooling (the module is shared with the
    backbone, not copied)."""

    def __init__(self, layer4: nn.Sequential):
        super().__init__()
        self.layer4 = layer4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _global_pool(self.layer4(x))


class ResNet(Backbone):
    """``head(pool(layer4(layer3(layer2(layer1(stem(x)))))))`` with torchvision's modules."""

    feature_layers = ("pool", "res4")
    layer_aliases = {"fc7": "pool"}

    def __init__(self, net: torchvision.models.ResNet, input_size: int):
        super().__init__()
        self.stem = nn.Sequential()
        for name in ("conv1", "bn1", "relu", "maxpool"):
            self.stem.add_module(name, getattr(net, name))
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.head = net.fc
        self.feature_dim = net.fc.in_features
        self.input_size = input_size

    @property
    def res4_channels(self) -> int:
        """Width of layer3's output: the detection trunk's ``out_channels`` and the ``res4`` feature size."""
        return self.layer4[0].conv1.in_channels

    def features(self, x: torch.Tensor, layer: str | None = None) -> torch.Tensor:
        """``pool`` (default): res5 averaged over space, 512 / 2048 wide; ``res4``: layer3 averaged, 256 / 1024."""
        name = self.layer(layer)
        res4 = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return _global_pool(res4 if name == "res4" else self.layer4(res4))

    def detection_parts(self, stride: int = 16) -> DetectionParts:
        """R50-C4: trunk conv1..res4 (stride 16), box head res5 + pooling on RoIs pooled to the res4 grid of a whole
        pre-training image: 14 x 14 at 224 px (Detectron's), 2 x 2 for the demo's 28 px (as AlexNet's fc6 reads
        the conv5 grid of its own input size)."""
        if stride != 16:
            raise UserError(f"detection stride {stride}: a ResNet's C4 trunk (conv1..res4) has stride 16")
        trunk = nn.Sequential(self.stem, self.layer1, self.layer2, self.layer3)
        trunk.out_channels = self.res4_channels
        return DetectionParts(trunk, Res5Head(self.layer4), math.ceil(self.input_size / 16), self.feature_dim)

    def stages(self) -> list[nn.Module]:
        return [self.stem, self.layer1, self.layer2, self.layer3, self.layer4]


def _build(name: str, cfg: Mapping[str, Any], num_classes: int) -> ResNet:
    """torchvision's initialisation: He (fan_out) convs, BN weight 1 / bias 0, PyTorch's default for ``fc``; with
    ``zero_init_residual`` the last BN of each residual branch starts at 0 (each block starts as the identity)."""
    zero_init = bool(cfg.get("zero_init_residual", False))
    net = ARCHS[name].make(weights=None, num_classes=num_classes, zero_init_residual=zero_init)
    return ResNet(net, int(cfg["input_size"]))


def resnet18(cfg: Mapping[str, Any], num_classes: int) -> ResNet:
    """torchvision's ResNet-18 (``conf/model/resnet18.yaml``): basic blocks, 512-wide features."""
    return _build("resnet18", cfg, num_classes)


def resnet50(cfg: Mapping[str, Any], num_classes: int) -> ResNet:
    """torchvision's ResNet-50 (``conf/model/resnet50.yaml``): bottleneck blocks, 2048-wide features."""
    return _build("resnet50", cfg, num_classes)
