"""AlexNet variants as ``Backbone``s: ``trunk`` (conv1..pool5), ``pool``, ``fc6``, ``fc7``, ``head``.

- ``alexnet``: torchvision's layout (64-192-384-256-256, no LRN, no groups), 224 px input.
- ``alexnet_caffe``: the BVLC/Caffe network the paper trained (96-256-384-384-256, LRN after conv1/conv2, conv2/4/5
  in two groups, 227 px input). From ``version: 2`` (imnet-ablate 0.2) it is also fed and shaped as Caffe trained it:
  BGR 0..255 pixels minus the ImageNet mean pixel (the trunk starts by reversing the channel order, so every user of
  ``normalize`` or of the trunk, the detector included, gives conv1 what Caffe gave it), dropout after the ReLUs of
  fc6/fc7 (BVLC's drop6/drop7), bvlc_alexnet's fillers (``init: bvlc``); its images are squashed to 256 x 256
  (``squash``, applied by the loaders). A folder written by 0.1 (no ``version`` in its config) is rebuilt as 0.1
  built it: torchvision's input statistics and dropout before fc6/fc7.
- ``alexnet_small``: the same shape of network scaled for the demo's 32 px images, trainable on a laptop CPU.

For detection the trunk loses its last max-pool (stride 16, as Fast R-CNN's RoI pooling on conv5) and fc6/fc7
become the box head on RoIs pooled to fc6's input grid.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from .backbone import CAFFE_MEAN, CAFFE_STD, Backbone, DetectionParts


# torchvision's AlexNet state-dict key prefix -> ours (``models.renamed_keys``; every other key is the same).
TORCHVISION_KEYS = {"features.": "trunk.", "classifier.1.": "fc6.1.", "classifier.4.": "fc7.1.",
                    "classifier.6.": "head."}



def _fc(in_features: int, out_features: int, dropout: float, dropout_after_relu: bool = False) -> nn.Sequential:
    """Linear + ReLU with dropout before (torchvision's order: it drops the layer's input) or after the ReLU
    (Caffe's drop6/drop7: it drops the layer's output)."""
    layers: list[nn.Module] = [nn.Linear(in_features, out_features), nn.ReLU(inplace=True)]
    return nn.Sequential(*(layers + [nn.Dropout(dropout)] if dropout_after_relu else [nn.Dropout(dropout)] + layers))


def linear_of(fc: nn.Sequential) -> nn.Linear:
    """The Linear layer of an fc6/fc7 block, wherever its dropout sits."""
    return next(m for m in fc if isinstance(m, nn.Linear))


class ReverseChannels(nn.Module):
    """RGB -> BGR: the first layer of a trunk whose weights read Caffe's (OpenCV's) channel order."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flip(1)


class GridPool(nn.Module):
    """Average-pool to the fc6 input grid; a no-op at the nominal input size, where the trunk already gives it
    (adaptive pooling's CUDA backward has no deterministic kernel, so it only runs for other input sizes)."""

    def __init__(self, grid: int):
        super().__init__()
        self.grid = grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] == (self.grid, self.grid):
            return x
        return nn.functional.adaptive_avg_pool2d(x, self.grid)


class BoxHead(nn.Module):
    """fc6 / fc7 on RoI features (dropout included, as in Fast R-CNN's training): torchvision's TwoMLPHead role."""

    def __init__(self, fc6: nn.Module, fc7: nn.Module):
        super().__init__()
        self.fc6, self.fc7 = fc6, fc7

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc7(self.fc6(torch.flatten(x, 1)))


class AlexNet(Backbone):
    """``head(fc7(fc6(flatten(pool(trunk(x))))))``; the parts are attributes so transfer can take them apart."""

    feature_layers = ("fc7", "fc6", "conv5")

    def __init__(self, trunk: nn.Sequential, trunk_channels: int, grid: int, hidden: int, num_classes: int,
                 dropout: float, input_size: int, dropout_after_relu: bool = False):
        super().__init__()
        self.trunk = trunk
        self.pool = GridPool(grid)
        self.fc6 = _fc(trunk_channels * grid * grid, hidden, dropout, dropout_after_relu)
        self.fc7 = _fc(hidden, hidden, dropout, dropout_after_relu)
        self.head = nn.Linear(hidden, num_classes)
        self.trunk_channels = trunk_channels
        self.feature_dim = hidden
        self.input_size = input_size

    def features(self, x: torch.Tensor, layer: str | None = None) -> torch.Tensor:
        """fc7 (after ReLU, the default), fc6, or conv5 (the pooled trunk output, flattened)."""
        name = self.layer(layer)
        t = torch.flatten(self.pool(self.trunk(x)), 1)
        if name == "conv5":
            return t
        t = self.fc6(t)
        return t if name == "fc6" else self.fc7(t)

    def detection_parts(self, stride: int = 16) -> DetectionParts:
        """stride 16: the trunk without its final max-pool (Fast R-CNN's choice); 32: the whole trunk."""
        layers = list(self.trunk)
        if stride == 16 and isinstance(layers[-1], nn.MaxPool2d):
            layers = layers[:-1]
        elif stride != 32:
            raise UserError(f"detection stride {stride}: AlexNet's trunk gives 16 (last max-pool dropped) or 32")
        trunk = nn.Sequential(*layers)
        trunk.out_channels = self.trunk_channels
        grid = math.isqrt(linear_of(self.fc6).in_features // self.trunk_channels)
        return DetectionParts(trunk, BoxHead(self.fc6, self.fc7), grid, self.feature_dim)

    def stages(self) -> list[nn.Module]:
        return [m for m in self.trunk if isinstance(m, nn.Conv2d)]


def _torchvision_trunk() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
    )


def _caffe_trunk() -> nn.Sequential:
    def lrn() -> nn.LocalResponseNorm:  # Caffe's ACROSS_CHANNELS LRN: local_size 5, alpha 1e-4, beta 0.75, k 1
        return nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0)

    return nn.Sequential(
        nn.Conv2d(3, 96, 11, stride=4), nn.ReLU(inplace=True), lrn(), nn.MaxPool2d(3, 2),
        nn.Conv2d(96, 256, 5, padding=2, groups=2), nn.ReLU(inplace=True), lrn(), nn.MaxPool2d(3, 2),
        nn.Conv2d(256, 384, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(384, 384, 3, padding=1, groups=2), nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, 3, padding=1, groups=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
    )


def _small_trunk(batchnorm: bool = False) -> nn.Sequential:
    """conv1..conv4 with AlexNet's pattern (large conv1 kernel, pools after conv1/conv2/last) at 32 px. With
    ``batchnorm`` each conv is followed by BatchNorm: the only way found to leave the ln(1000) plateau of a
    1000-class problem within the demo's few hundred steps."""
    def conv(cin: int, cout: int, k: int) -> list[nn.Module]:
        layers = [nn.Conv2d(cin, cout, k, padding=k // 2)]
        return layers + ([nn.BatchNorm2d(cout)] if batchnorm else []) + [nn.ReLU(inplace=True)]

    return nn.Sequential(*conv(3, 32, 5), nn.MaxPool2d(2), *conv(32, 64, 3), nn.MaxPool2d(2),
                         *conv(64, 96, 3), *conv(96, 64, 3), nn.MaxPool2d(2))


def _caffe_fillers(model: AlexNet, bias: float) -> None:
    """Caffe's Gaussian fillers: N(0, 0.01) convs (fc6/fc7: 0.005, head: 0.01); ``bias`` on conv2/4/5, fc6, fc7,
    zero elsewhere. They were tuned for mean-subtracted 0..255 inputs (``alexnet_caffe`` version 2)."""
    for i, conv in enumerate(model.stages()):
        nn.init.normal_(conv.weight, std=0.01)
        nn.init.constant_(conv.bias, bias if i in (1, 3, 4) else 0.0)
    for fc in (linear_of(model.fc6), linear_of(model.fc7)):
        nn.init.normal_(fc.weight, std=0.005)
        nn.init.constant_(fc.bias, bias)
    nn.init.normal_(model.head.weight, std=0.01)
    nn.init.zeros_(model.head.bias)


def _init_caffe(model: AlexNet) -> None:
    """CaffeNet's (bvlc_reference_caffenet) fillers: bias 1, as Krizhevsky et al. (0.1's ``init: caffe``)."""
    _caffe_fillers(model, 1.0)


def _init_bvlc(model: AlexNet) -> None:
    """bvlc_alexnet's fillers: bias 0.1 ("initialization to 1 gave flat loss", its model card)."""
    _caffe_fillers(model, 0.1)


def _init_kaiming(model: AlexNet) -> None:
    """He-normal convs, N(0, 0.01) linears, zero biases (torchvision's VGG init): without normalisation layers this
    starts learning in far fewer steps than PyTorch's default, which matters for the minute-long demo recipe."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.01)
            nn.init.zeros_(m.bias)


INITS: dict[str, Callable[[AlexNet], None]] = {"default": lambda model: None, "caffe": _init_caffe,
                                               "bvlc": _init_bvlc, "kaiming": _init_kaiming}


def _build(cfg: Mapping[str, Any], num_classes: int, trunk: nn.Sequential, channels: int, grid: int, hidden: int,
           dropout_after_relu: bool = False) -> AlexNet:
    model = AlexNet(trunk, channels, grid, hidden, num_classes, float(cfg.get("dropout", 0.5)),
                    int(cfg["input_size"]), dropout_after_relu)
    init = cfg.get("init", "default")
    if init not in INITS:
        raise UserError(f"model.init={init}: expected one of {', '.join(INITS)}")
    INITS[init](model)
    return model


def alexnet(cfg: Mapping[str, Any], num_classes: int) -> AlexNet:
    """torchvision's AlexNet layout (``conf/model/alexnet.yaml``)."""
    return _build(cfg, num_classes, _torchvision_trunk(), 256, 6, 4096)


def alexnet_caffe(cfg: Mapping[str, Any], num_classes: int) -> AlexNet:
    """bvlc_alexnet (``conf/model/alexnet_caffe.yaml``): Caffe's input convention and dropout placement from
    ``version: 2``; 0.1's network (torchvision's statistics, dropout before the Linear layers) without it."""
    if int(cfg.get("version", 1)) < 2:
        return _build(cfg, num_classes, _caffe_trunk(), 256, 6, 4096)
    model = _build(cfg, num_classes, nn.Sequential(ReverseChannels(), *_caffe_trunk()), 256, 6, 4096,
                   dropout_after_relu=True)
    model.pixel_mean, model.pixel_std = CAFFE_MEAN, CAFFE_STD
    return model


def alexnet_small(cfg: Mapping[str, Any], num_classes: int) -> AlexNet:
    """The demo's AlexNet for 32 px images (``conf/model/alexnet_small.yaml``)."""
    return _build(cfg, num_classes, _small_trunk(bool(cfg.get("batchnorm", False))), 64, 3, 256)
