"""A tiny backbone: two convolutions and a global average pool."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from imnet_ablate.models import Backbone


class TinyNet(Backbone):
    feature_layers = ("pool",)
    layer_aliases = {"fc7": "pool"}  # what the built-in tasks ask for by default: the classifier's input

    def __init__(self, width: int, num_classes: int, input_size: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                  nn.MaxPool2d(2), nn.Conv2d(width, width, 3, padding=1), nn.ReLU())
        self.feature_dim, self.input_size = width, input_size
        self.head = nn.Linear(width, num_classes)

    def features(self, x: torch.Tensor, layer: str | None = None) -> torch.Tensor:
        self.layer(layer)  # one layer; unknown names are a one-line error
        return self.body(x).mean((2, 3))

    def stages(self) -> list[nn.Module]:
        return [self.body[0], self.body[4]]


def tiny(cfg: Mapping[str, Any], num_classes: int) -> TinyNet:
    return TinyNet(int(cfg["width"]), num_classes, int(cfg["input_size"]))
