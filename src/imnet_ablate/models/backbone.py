"""``Backbone``: what pre-training and every transfer task need of a network, whatever its architecture.

Pre-training uses ``forward`` (logits over the subset's classes) and ``normalize`` (a uint8 batch on the device ->
the network's input convention). Transfer tasks use, without knowing the architecture: pooled ``features`` at a
named layer, a new classification head (``replace_head``), the two parts of a two-stage detector
(``detection_parts``: a stride-16 trunk and a box head on RoI features), freezing the first k stages, and batch norm
with frozen statistics for the small batches of detection and fine-tuning (``freeze_batchnorm``).

Layer names are the architecture's own (``fc7``, ``conv5`` for AlexNet; ``pool``, ``res4`` for ResNets). ``fc7``,
the name the transfer literature of the paper's era uses, also names every other backbone's equivalent: the pooled
representation its pre-training classifier reads. So ``task.feature=fc7`` (voc-cls's default) means the same thing
for any backbone.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar, NamedTuple

import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from ..errors import UserError

# ImageNet channel statistics (RGB, on the 0..1 scale), as used by torchvision's reference recipes.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
# Caffe's convention (bvlc_alexnet, CaffeNet): 0..255 pixels minus the ImageNet mean pixel, no scaling. The mean
# pixel is Caffe's ilsvrc_2012_mean.npy averaged over its 256 x 256 image (BGR 104.007, 116.669, 122.679), written
# here in RGB order on the 0..1 scale, with a std of 1/255, so ``normalize`` gives ``x - mean`` on 0..255.
CAFFE_MEAN = (122.67891434 / 255, 116.66876762 / 255, 104.00698793 / 255)
CAFFE_STD = (1 / 255, 1 / 255, 1 / 255)


def normalize(x: torch.Tensor, mean: Sequence[float] = MEAN, std: Sequence[float] = STD) -> torch.Tensor:
    """uint8 NCHW (already on the device) -> float32 channels_last, ``(x / 255 - mean) / std`` per channel.

    Done on the accelerator so that loader workers only move a quarter of the bytes a float batch would take.
    """
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1) * 255
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1) * 255
    return ((x.float() - m) / s).contiguous(memory_format=torch.channels_last)


class DetectionParts(NamedTuple):
    """What a two-stage detector (Fast/Faster R-CNN) takes from a pre-trained network."""

    trunk: nn.Module  # images -> one feature map at stride 16; has ``out_channels``, as torchvision's detectors need
    box_head: nn.Module  # RoI features (R, out_channels, roi_size, roi_size) -> (R, box_dim)
    roi_size: int  # the grid RoIAlign pools each proposal to
    box_dim: int  # width of the box head's output, read by the box classifier and regressor


class Backbone(nn.Module):
    """A network the stages can pre-train and take apart; ``forward(x) = head(features(x))``.

    Subclasses set ``input_size`` (training crop and test size), ``feature_dim`` (width of the default features,
    which ``head`` reads), ``head`` and ``feature_layers`` (names ``features`` accepts, the default first), and
    implement ``features``, ``detection_parts`` and ``stages``.
    """

    feature_layers: ClassVar[tuple[str, ...]] = ()
    layer_aliases: ClassVar[dict[str, str]] = {}
    # RGB on 0..1: what ``normalize`` subtracts and divides by (a builder may set other values per network, e.g.
    # CAFFE_MEAN/CAFFE_STD); the detector's transform uses the same two.
    pixel_mean: tuple[float, float, float] = MEAN
    pixel_std: tuple[float, float, float] = STD
    input_size: int
    feature_dim: int
    head: nn.Linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """A uint8 NCHW batch on the device -> this network's float input (channels_last)."""
        return normalize(x, self.pixel_mean, self.pixel_std)

    def layer(self, name: str | None) -> str:
        """The canonical name of a feature layer (``None``: the default); unknown names are a one-line error."""
        if name is None:
            return self.feature_layers[0]
        name = self.layer_aliases.get(name, name)
        if name not in self.feature_layers:
            raise UserError(f"task.feature={name}: {type(self).__name__} has no such layer; expected one of "
                            f"{', '.join([*self.feature_layers, *self.layer_aliases])}")
        return name

    def features(self, x: torch.Tensor, layer: str | None = None) -> torch.Tensor:
        """(N, D) features of a normalised batch at ``layer`` (pooled and flattened)."""
        raise NotImplementedError

    def replace_head(self, num_classes: int) -> nn.Linear:
        """A new classification layer on the default features (PyTorch's default init), e.g. 20 VOC labels."""
        self.head = nn.Linear(self.feature_dim, num_classes)
        return self.head

    def detection_parts(self, stride: int = 16) -> DetectionParts:
        """Trunk and box head for a Faster R-CNN sharing this network's weights (the modules are shared, not
        copied: training the detector trains them)."""
        raise NotImplementedError

    def stages(self) -> list[nn.Module]:
        """The network's stages from the input on, as ``freeze`` counts them (a conv layer for AlexNet, the stem and
        each residual stage for ResNets)."""
        raise NotImplementedError

    def check_freeze(self, n: int, key: str = "freeze") -> None:
        """A number of stages to keep fixed that this network has: tasks call it from ``check_network``, so the
        config key ``key`` is named before any work starts, not when the transfer reaches ``freeze``."""
        count = len(self.stages())
        if n > count:
            raise UserError(f"{key}={n}: {type(self).__name__} has {count} stages; expected at most {count}")

    def freeze(self, n: int) -> None:
        """Keep the first ``n`` stages fixed while transferring (Fast R-CNN kept the early, generic layers)."""
        self.check_freeze(n)
        for stage in self.stages()[:n]:
            stage.requires_grad_(False)

    def freeze_batchnorm(self) -> None:
        """Replace every BatchNorm2d by a FrozenBatchNorm2d holding its statistics and affine parameters.

        With the 1-2 images per batch of detection, batch statistics are noise; frozen ones stay what pre-training
        learned whatever ``train()``/``eval()`` does (Detectron's choice for ResNets)."""
        _freeze_batchnorm(self)


def renamed_keys(state: Mapping[str, torch.Tensor], prefixes: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """A state dict with each key's leading ``prefixes`` entry replaced (``{"fc.": "head."}``): how another
    library's weights of the same architecture (torchvision's) load into a Backbone."""
    def renamed(key: str) -> str:
        old = next((p for p in prefixes if key.startswith(p)), None)
        return key if old is None else prefixes[old] + key[len(old):]

    return {renamed(k): v for k, v in state.items()}


def _freeze_batchnorm(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            with torch.no_grad():
                frozen.weight.copy_(child.weight if child.affine else torch.ones_like(frozen.weight))
                frozen.bias.copy_(child.bias if child.affine else torch.zeros_like(frozen.bias))
                frozen.running_mean.copy_(child.running_mean)
                frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen.to(child.running_mean.device))
        else:
            _freeze_batchnorm(child)
