"""Model shapes and named parts (what transfer takes apart), Caffe's layout, normalisation, reloading."""
from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from conftest import REPO
from imnet_ablate import models
from imnet_ablate.errors import UserError
from imnet_ablate.models.alexnet import ReverseChannels

CONFIGS = {name: OmegaConf.load(REPO / "conf" / "model" / f"{name}.yaml")
           for name in ("alexnet", "alexnet_caffe", "alexnet_small")}
# alexnet_caffe as 0.1 built it (no version key: torchvision's statistics, dropout before fc6/fc7, CaffeNet's bias 1)
CAFFE_0_1 = OmegaConf.create({"name": "alexnet_caffe", "input_size": 227, "resize": 256, "dropout": 0.5,
                              "init": "caffe"})


@pytest.fixture(autouse=True)
def few_threads():
    torch.set_num_threads(2)


@pytest.mark.parametrize("name,size,params,grid", [
    ("alexnet", 224, 61_100_840, 6), ("alexnet_caffe", 227, 60_965_224, 6), ("alexnet_small", 28, None, 3)])
def test_named_parts_and_shapes(name: str, size: int, params: int | None, grid: int) -> None:
    cfg = CAFFE_0_1 if name == "alexnet_caffe" else CONFIGS[name]
    model = models.build(cfg, 1000)
    assert cfg.input_size == size == model.input_size
    if params:  # the published parameter counts (torchvision's alexnet; bvlc_alexnet's deploy.prototxt)
        assert sum(p.numel() for p in model.parameters()) == params
    x = torch.randn(2, 3, size, size)
    model.eval()
    fmap = model.trunk(x)
    assert fmap.shape == (2, model.trunk_channels, grid, grid)
    assert model.pool(fmap).shape == fmap.shape
    for fc in (model.fc6, model.fc7):
        assert [type(m) for m in fc] == [nn.Dropout, nn.Linear, nn.ReLU] and fc[1].out_features == model.feature_dim
    assert model.head.in_features == model.feature_dim and model.head.out_features == 1000
    manual = model.head(model.fc7(model.fc6(torch.flatten(model.pool(model.trunk(x)), 1))))
    assert torch.equal(model(x), manual) and torch.equal(model.features(x), model.fc7(model.fc6(fmap.flatten(1))))


def test_caffe_layout_has_lrn_groups_and_caffe_init() -> None:
    model = models.build(CAFFE_0_1, 10)
    convs = [m for m in model.trunk if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [96, 256, 384, 384, 256]
    assert [c.groups for c in convs] == [1, 2, 1, 2, 2]
    assert sum(isinstance(m, nn.LocalResponseNorm) for m in model.trunk) == 2
    assert [c.bias[0].item() for c in convs] == [0.0, 1.0, 0.0, 1.0, 1.0]
    assert model.fc6[1].weight.std().item() == pytest.approx(0.005, rel=0.05)


def test_small_model_is_cpu_sized_and_pools_other_input_sizes() -> None:
    model = models.build(CONFIGS["alexnet_small"], 1000)
    convs = [m for m in model.trunk if isinstance(m, nn.Conv2d)]
    assert sum(p.numel() for c in convs for p in c.parameters()) < 150_000
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.trunk) == len(convs) == 4  # conf: batchnorm: true
    plain = models.build({**CONFIGS["alexnet_small"], "batchnorm": False}, 10)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in plain.trunk)
    assert model(torch.randn(1, 3, 40, 40)).shape == (1, 1000)  # GridPool reaches the fc6 grid from any size


def test_normalize_is_float_channels_last_with_imagenet_statistics() -> None:
    x = torch.full((2, 3, 4, 4), 128, dtype=torch.uint8)
    y = models.normalize(x)
    assert y.dtype == torch.float32 and y.is_contiguous(memory_format=torch.channels_last)
    expected = [(128 / 255 - m) / s for m, s in zip(models.MEAN, models.STD)]
    assert y[0, :, 0, 0].tolist() == pytest.approx(expected, rel=1e-5)


def test_load_pretrained_rebuilds_from_the_folder(tmp_path) -> None:
    model = models.build(CONFIGS["alexnet_small"], 7)
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create({"model": CONFIGS["alexnet_small"]})))
    (tmp_path / "metrics.json").write_text(json.dumps({"num_classes": 7, "top1": 1.0}))
    torch.save(model.state_dict(), tmp_path / "model.pt")
    loaded, manifest = models.load_pretrained(tmp_path)
    assert manifest["top1"] == 1.0
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    with pytest.raises(UserError, match="not a finished pre-training folder"):
        models.load_pretrained(tmp_path / "missing")


def test_unknown_model_is_a_user_error() -> None:
    with pytest.raises(UserError, match="model.name=vgg"):
        models.build({"name": "vgg", "input_size": 224}, 10)


def test_alexnet_caffe_version_2_is_bvlc_alexnet_as_caffe_trained_it() -> None:
    """Dropout after the ReLUs of fc6/fc7 (drop6/drop7), bias 0.1, channel reversal first in the trunk (so the
    detector's trunk has it too), the same parameters as 0.1's network and as bvlc_alexnet's deploy.prototxt."""
    model = models.build(CONFIGS["alexnet_caffe"], 1000)
    for fc in (model.fc6, model.fc7):
        assert [type(m) for m in fc] == [nn.Linear, nn.ReLU, nn.Dropout] and fc[0].out_features == 4096
    convs = [m for m in model.trunk if isinstance(m, nn.Conv2d)]
    assert [c.bias[0].item() for c in convs] == pytest.approx([0.0, 0.1, 0.0, 0.1, 0.1])
    assert model.fc6[0].bias[0].item() == pytest.approx(0.1) and model.head.bias.abs().max().item() == 0.0
    assert sum(p.numel() for p in model.parameters()) == 60_965_224
    assert isinstance(model.trunk[0], ReverseChannels)
    assert isinstance(model.detection_parts(16).trunk[0], ReverseChannels)
    assert (model.pixel_mean, model.pixel_std) == (models.CAFFE_MEAN, models.CAFFE_STD)
    assert models.build(CONFIGS["alexnet"], 10).pixel_mean == models.MEAN  # torchvision's stays torchvision's
