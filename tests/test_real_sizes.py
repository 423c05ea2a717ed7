"""Smoke tests of the real recipes at real image sizes on the CPU, a step or two each (no shape or memory error):
224/227 px pre-training through ``pretrain.run`` for every backbone, and a Faster R-CNN at 600 x 800 assembled from
each backbone's ``detection_parts`` (one training step, one eval forward). Not timed: speed lives in benchmarks."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign

from conftest import write_subset, write_tree
from imnet_ablate import models, pretrain
from imnet_ablate.config import compose

pytestmark = pytest.mark.slow

RECIPES = {"alexnet": "caffe", "alexnet_caffe": "caffe", "alexnet_small": "caffe", "resnet18": "resnet",
           "resnet50": "resnet"}


@pytest.fixture(autouse=True)
def few_threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="module")
def large_subset(tmp_path_factory) -> Path:
    """4 classes x (1 train + 1 val) JPEGs of 256 x 256-264 px: larger than every crop, so resizing happens."""
    base = tmp_path_factory.mktemp("large")
    rows = write_tree(base / "imagenet", train_per_class=1, val_per_class=1, size=256)
    return write_subset(base / "subset" / "large-000000000000", base / "imagenet", rows)


@pytest.mark.parametrize("model", list(RECIPES))
def test_pretraining_steps_at_the_real_input_size(model: str, large_subset: Path, tmp_path: Path) -> None:
    """The recipe as shipped but batch 2 and a schedule of one unit: caffe's one iteration scaled to 4 images
    (1 step), resnet's one epoch of them (2 steps)."""
    cfg = compose("pretrain", [f"model={model}", f"train={RECIPES[model]}", f"subset_dir={large_subset}",
                               f"paths.runs={tmp_path}", "device=cpu", "loader.num_workers=0", "train.batch_size=2",
                               "train.schedule.length=1", "train.schedule.step_every=1", "train.log_every=1"])
    out = pretrain.run(cfg)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["iterations"] == {"caffe": 1, "resnet": 2}[RECIPES[model]] and math.isfinite(metrics["loss"])
    assert metrics["val_images"] == 4 and (out / "model.pt").is_file()
    assert cfg.model.input_size == {"alexnet_caffe": 227, "alexnet_small": 28}.get(model, 224)


def faster_rcnn(model: models.Backbone) -> GeneralizedRCNN:
    """A Faster R-CNN on the backbone's detection parts with torchvision's components, sampling few RoIs (8 in
    training, 10 proposals at test) so that a step of the res5 box head stays short on a CPU."""
    parts = model.detection_parts()
    anchors = AnchorGenerator(((64, 128, 256, 512),), ((0.5, 1.0, 2.0),))
    rpn = RegionProposalNetwork(
        anchors, RPNHead(parts.trunk.out_channels, anchors.num_anchors_per_location()[0]), fg_iou_thresh=0.7,
        bg_iou_thresh=0.3, batch_size_per_image=64, positive_fraction=0.5,
        pre_nms_top_n={"training": 200, "testing": 100}, post_nms_top_n={"training": 50, "testing": 10},
        nms_thresh=0.7)
    heads = RoIHeads(
        MultiScaleRoIAlign(["0"], parts.roi_size, sampling_ratio=2), parts.box_head,
        FastRCNNPredictor(parts.box_dim, 21), fg_iou_thresh=0.5, bg_iou_thresh=0.5, batch_size_per_image=8,
        positive_fraction=0.25, bbox_reg_weights=None, score_thresh=0.0, nms_thresh=0.3, detections_per_img=10)
    transform = GeneralizedRCNNTransform(600, 1000, list(model.pixel_mean), list(model.pixel_std))
    return GeneralizedRCNN(parts.trunk, rpn, heads, transform)


@pytest.mark.parametrize("name", ["alexnet", "alexnet_caffe", "resnet18", "resnet50"])
def test_detector_step_and_eval_at_600_px(name: str) -> None:
    torch.manual_seed(0)
    model = models.build(compose("pretrain", [f"model={name}"]).model, 20)
    model.freeze_batchnorm()
    model.freeze(2)
    detector = faster_rcnn(model)
    image = torch.rand(3, 600, 800)
    target = {"boxes": torch.tensor([[100.0, 120.0, 400.0, 500.0], [450.0, 50.0, 780.0, 300.0]]),
              "labels": torch.tensor([3, 15])}
    detector.train()
    losses = detector([image], [target])
    assert set(losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"}
    loss = sum(losses.values())
    assert math.isfinite(loss.item())
    loss.backward()
    trainable = [p for p in detector.parameters() if p.requires_grad]
    assert all(p.grad is not None for p in trainable)
    torch.optim.SGD(trainable, lr=1e-3).step()
    detector.eval()
    with torch.no_grad():
        (found,) = detector([image])
    assert found["boxes"].shape[1:] == (4,) and len(found["boxes"]) <= 10 == detector.roi_heads.detections_per_img
    assert found["boxes"][:, 2:].le(torch.tensor([800.0, 600.0])).all()
