"""What conv1 receives, end to end from an image file: Caffe's convention for alexnet_caffe, torchvision's for alexnet.

The image is a PNG (lossless) of three vertical stripes, 768 x 256, so the squash is visible: Caffe stretched every
image to 256 x 256 (the three stripes stay in every crop), an aspect-kept resize leaves a 768 x 256 image whose
centre crop is the middle stripe only.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch import nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from conftest import REPO
from imnet_ablate import models, pretrain

STRIPES = [(200, 30, 60), (10, 220, 90), (120, 140, 250)]  # RGB, left to right
CAFFE_MEAN_BGR = (104.00698793, 116.66876762, 122.67891434)  # Caffe's ilsvrc_2012_mean.npy, averaged


def conf(group: str, name: str):
    return OmegaConf.load(REPO / "conf" / group / f"{name}.yaml")


@pytest.fixture(scope="module")
def subset(tmp_path_factory) -> Path:
    """A one-image subset folder in the real layout (train.tsv, val.tsv, manifest.json) over a real PNG file."""
    root = tmp_path_factory.mktemp("imagenet")
    pixels = np.concatenate([np.broadcast_to(np.array(c, np.uint8), (256, 256, 3)) for c in STRIPES], axis=1)
    (root / "train" / "n01440764").mkdir(parents=True)
    Image.fromarray(np.ascontiguousarray(pixels)).save(root / "train" / "n01440764" / "stripes.png")
    folder = tmp_path_factory.mktemp("subset")
    for split in ("train", "val"):
        (folder / f"{split}.tsv").write_text("path\tlabel\twnid\ntrain/n01440764/stripes.png\t0\tn01440764\n")
    (folder / "manifest.json").write_text(json.dumps({"data_root": str(root), "num_classes": 1}))
    return folder


def first_layer_input(model: models.Backbone, batch: torch.Tensor) -> torch.Tensor:
    """What the first convolution of ``model`` receives for a uint8 batch, through ``normalize`` and the trunk."""
    seen = []
    conv1 = next(m for m in model.trunk if isinstance(m, nn.Conv2d))
    handle = conv1.register_forward_hook(lambda module, args, out: seen.append(args[0].detach()))
    with torch.no_grad():
        model.eval()(model.normalize(batch))
    handle.remove()
    return seen[0]


def test_alexnet_caffe_gets_bgr_0_255_minus_the_mean_pixel_of_a_squashed_image(subset: Path) -> None:
    model_cfg = conf("model", "alexnet_caffe")
    train_ds, val_ds = pretrain.build_datasets(subset, model_cfg, conf("train", "caffe"), conf("loader", "files"))
    image = val_ds[(0, 0)][0]
    assert image.shape == (3, 227, 227)
    x = first_layer_input(models.build(model_cfg, 10), image[None])[0]
    # 256 x 256 squash: stripes of 85.3 px; the centre crop starts at 14, so crop columns 0-71 / 71-156 / 157-226
    for column, (r, g, b) in zip((30, 113, 200), STRIPES):
        by_hand = torch.tensor([b, g, r], dtype=torch.float32) - torch.tensor(CAFFE_MEAN_BGR)
        assert torch.allclose(x[:, 100, column], by_hand, atol=1e-3), (column, x[:, 100, column], by_hand)
    # a training crop (random offset 0-29, maybe mirrored) of the same squashed image also holds all three stripes
    crop = train_ds[(0, 12345)][0]
    ends = {tuple(crop[:, 100, c].tolist()) for c in (5, 221)}
    assert ends == {STRIPES[0], STRIPES[2]} and tuple(crop[:, 100, 113].tolist()) == STRIPES[1]


def test_the_detector_feeds_alexnet_caffe_the_same_input() -> None:
    """voc-det's transform normalises with the backbone's pixel_mean/std, and the trunk it takes reverses channels."""
    model = models.build(conf("model", "alexnet_caffe"), 10)
    image = torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8)
    transform = GeneralizedRCNNTransform(40, 40, list(model.pixel_mean), list(model.pixel_std))
    assert torch.allclose(transform.normalize(image.float() / 255), model.normalize(image[None])[0], atol=1e-3)
    trunk = model.detection_parts(16).trunk
    assert torch.equal(trunk[0](image[None].float()), image[None].float().flip(1))


def test_alexnet_stays_torchvision_rgb_normalised_with_the_aspect_kept(subset: Path) -> None:
    model_cfg = conf("model", "alexnet")
    _, val_ds = pretrain.build_datasets(subset, model_cfg, conf("train", "caffe"), conf("loader", "files"))
    image = val_ds[(0, 0)][0]
    assert image.shape == (3, 224, 224)
    x = first_layer_input(models.build(model_cfg, 10), image[None])[0]
    middle = [(c / 255 - m) / s for c, m, s in zip(STRIPES[1], models.MEAN, models.STD)]  # centre crop: stripe 2
    for column in (0, 112, 223):
        assert torch.allclose(x[:, 100, column], torch.tensor(middle), atol=1e-4)
