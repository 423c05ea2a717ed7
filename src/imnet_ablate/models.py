"""AlexNet variants with the named parts the transfer stages reuse: ``trunk``, ``pool``, ``fc6``, ``fc7``, ``head``.

- ``alexnet``: torchvision's layout (64-192-384-256-256, no LRN, no groups), 224 px input.
- ``alexnet_caffe``: the BVLC/Caffe network the paper trained (96-256-384-384-256, LRN after conv1/conv2, conv2/4/5
  in two groups, 227 px input, Caffe's Gaussian init with bias 1 on conv2/4/5 and fc6/fc7).
- ``alexnet_small``: the same shape of network scaled for the demo's 32 px images, trainable on a laptop CPU.

Inputs are float images normalised on the device with :func:`normalize` (batches travel as uint8).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from torch import nn

from .errors import UserError
from .store import load_torch, restoring

# ImageNet channel statistics (RGB, on the 0..1 scale), as used by torchvision's reference recipe.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW (already on the device) -> float32 channels_last, normalised with MEAN/STD.

    Done on the accelerator so that loader workers only move a quarter of the bytes a float batch would take.
    """
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1) * 255
    return ((x.float() - mean) / std).contiguous(memory_format=torch.channels_last)


def _fc(in_features: int, out_features: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, out_features), nn.ReLU(inplace=True))


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


class AlexNetLike(nn.Module):
    """``head(fc7(fc6(flatten(pool(trunk(x))))))``; the parts are attributes so transfer can take them apart."""

    def __init__(self, trunk: nn.Sequential, trunk_channels: int, grid: int, hidden: int, num_classes: int,
                 dropout: float, input_size: int):
        super().__init__()
        self.trunk = trunk
        self.pool = GridPool(grid)
        self.fc6 = _fc(trunk_channels * grid * grid, hidden, dropout)
        self.fc7 = _fc(hidden, hidden, dropout)
        self.head = nn.Linear(hidden, num_classes)
        self.trunk_channels = trunk_channels
        self.feature_dim = hidden
        self.input_size = input_size

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """fc7 activations: the representation a linear probe or a new head is trained on."""
        return self.fc7(self.fc6(torch.flatten(self.pool(self.trunk(x)), 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


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


# name -> (trunk factory, trunk channels, fc6 input grid, fc6/fc7 width)
ARCHS: dict[str, tuple[Any, int, int, int]] = {
    "alexnet": (_torchvision_trunk, 256, 6, 4096),
    "alexnet_caffe": (_caffe_trunk, 256, 6, 4096),
    "alexnet_small": (_small_trunk, 64, 3, 256),
}


def _init_caffe(model: AlexNetLike) -> None:
    """bvlc_alexnet's fillers: N(0, 0.01) convs (fc6/fc7: 0.005, head: 0.01); bias 1 on conv2/4/5, fc6, fc7."""
    convs = [m for m in model.trunk if isinstance(m, nn.Conv2d)]
    for i, conv in enumerate(convs):
        nn.init.normal_(conv.weight, std=0.01)
        nn.init.constant_(conv.bias, 1.0 if i in (1, 3, 4) else 0.0)
    for fc in (model.fc6[1], model.fc7[1]):
        nn.init.normal_(fc.weight, std=0.005)
        nn.init.constant_(fc.bias, 1.0)
    nn.init.normal_(model.head.weight, std=0.01)
    nn.init.zeros_(model.head.bias)


def _init_kaiming(model: AlexNetLike) -> None:
    """He-normal convs, N(0, 0.01) linears, zero biases (torchvision's VGG init): without normalisation layers this
    starts learning in far fewer steps than PyTorch's default, which matters for the minute-long demo recipe."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.01)
            nn.init.zeros_(m.bias)


INITS = {"default": lambda model: None, "caffe": _init_caffe, "kaiming": _init_kaiming}


def build(model_cfg: DictConfig | dict, num_classes: int) -> AlexNetLike:
    """A freshly initialised network for ``model_cfg`` (``conf/model/<name>.yaml``) with ``num_classes`` outputs."""
    name = model_cfg["name"]
    if name not in ARCHS:
        raise UserError(f"model.name={name}: unknown model; expected one of {', '.join(ARCHS)}")
    trunk_fn, channels, grid, hidden = ARCHS[name]
    trunk = trunk_fn(bool(model_cfg.get("batchnorm", False))) if name == "alexnet_small" else trunk_fn()
    model = AlexNetLike(trunk, channels, grid, hidden, num_classes, float(model_cfg.get("dropout", 0.5)),
                        int(model_cfg["input_size"]))
    init = model_cfg.get("init", "default")
    if init not in INITS:
        raise UserError(f"model.init={init}: expected one of {', '.join(INITS)}")
    INITS[init](model)
    return model


def load_pretrained(pretrain_dir: Path | str) -> tuple[AlexNetLike, dict[str, Any]]:
    """The final network of a pre-training folder, rebuilt from its ``config.yaml``, and its ``metrics.json``.

    ``model.pt`` holds tensors only and is read with ``weights_only=True``: a shared checkpoint cannot run code.
    """
    folder = Path(pretrain_dir)
    try:
        model_cfg = OmegaConf.load(folder / "config.yaml").model
        manifest = json.loads((folder / "metrics.json").read_text())
        num_classes = int(manifest["num_classes"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError, yaml.YAMLError) as e:
        raise UserError(f"{folder}: not a finished pre-training folder ({type(e).__name__} in its config.yaml or "
                        "metrics.json); run `ablate pretrain` first") from e
    state = load_torch(folder / "model.pt", "a pre-trained model's weights", valid=lambda s: isinstance(s, dict))
    model = build(model_cfg, num_classes)
    with restoring(folder / "model.pt", "the weights of the model its config.yaml describes"):
        model.load_state_dict(state)
    return model, manifest
