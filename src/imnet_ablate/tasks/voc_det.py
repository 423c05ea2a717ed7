"""voc-det (the paper's PASCAL-DET): VOC 2007 detection with a Faster R-CNN on the pre-trained network.

The detector is assembled from torchvision's parts around ``Backbone.detection_parts()``: the stride-16 trunk
(AlexNet without its last max-pool, as Fast R-CNN's RoI pooling on conv5; ResNet's conv1..res4, as the Faster R-CNN
paper's ResNet design) -> RPN -> RoIAlign to the box head's grid -> the pre-trained box head (fc6/fc7; res5) ->
21-way classifier + class-specific box regressor. Training follows Fast R-CNN: difficult objects left out of the
targets, background proposals in [bg_iou_lo, 0.5), flips; with a pre-trained network the first ``freeze_convs``
stages stay fixed and batch norm keeps its pre-trained statistics (2 images per batch). Test: AP at IoU 0.5 with
the devkit's rule (difficult ignored), COCO AP beside it; devkit results files in ``detections/``.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign, box_iou

from .. import evaluate, voc
from ..evaluate import METRICS
from ..inputs import DEFAULT_MAX_PIXELS
from ..models import Backbone
from ..progress import Progress
from . import Metrics, Task, TaskRun, json_number, training


class FastRCNNRoIHeads(RoIHeads):
    """torchvision's RoIHeads with Fast R-CNN's background range [bg_lo, bg_iou_thresh): a proposal that overlaps
    no object by ``bg_lo`` is ignored rather than sampled as background (torchvision has no lower bound)."""

    bg_lo: float = 0.0

    def assign_targets_to_proposals(self, proposals, gt_boxes, gt_labels):  # type: ignore[override]
        matched, labels = super().assign_targets_to_proposals(proposals, gt_boxes, gt_labels)
        for props, gts, lab in zip(proposals, gt_boxes, labels):
            if gts.numel():
                lab[box_iou(gts, props).max(0).values < self.bg_lo] = -1
        return matched, labels


def build_detector(backbone: Backbone, det: DictConfig) -> GeneralizedRCNN:
    """Faster R-CNN on ``backbone``: its trunk (stride 16 with ``drop_last_pool``) -> RPN -> RoIAlign to the box
    head's grid -> its box head -> 21-way classifier + class-specific box regressor."""
    parts = backbone.detection_parts(16 if det.drop_last_pool else 32)
    channels = parts.trunk.out_channels
    anchors = AnchorGenerator((tuple(det.anchor_sizes),), (tuple(det.aspect_ratios),))
    rpn = RegionProposalNetwork(
        anchors, RPNHead(channels, anchors.num_anchors_per_location()[0]),
        fg_iou_thresh=0.7, bg_iou_thresh=0.3, batch_size_per_image=det.rpn_batch_size_per_image,
        positive_fraction=0.5, pre_nms_top_n=dict(training=det.rpn_pre_nms_top_n_train,
                                                  testing=det.rpn_pre_nms_top_n_test),
        post_nms_top_n=dict(training=det.rpn_post_nms_top_n_train, testing=det.rpn_post_nms_top_n_test),
        nms_thresh=det.rpn_nms_thresh)
    heads = FastRCNNRoIHeads(
        MultiScaleRoIAlign(["0"], parts.roi_size, sampling_ratio=2), parts.box_head,
        FastRCNNPredictor(parts.box_dim, len(voc.CLASSES) + 1),
        fg_iou_thresh=det.fg_iou_thresh, bg_iou_thresh=det.bg_iou_thresh,
        batch_size_per_image=det.box_batch_size_per_image, positive_fraction=det.box_positive_fraction,
        bbox_reg_weights=None, score_thresh=det.box_score_thresh, nms_thresh=det.box_nms_thresh,
        detections_per_img=det.detections_per_img)
    heads.bg_lo = det.bg_iou_lo
    transform = GeneralizedRCNNTransform(det.min_size, det.max_size, list(backbone.pixel_mean),
                                         list(backbone.pixel_std))
    return GeneralizedRCNN(parts.trunk, rpn, heads, transform)


def det_sample(voc_root: Path, img: voc.VocImage, flip: bool, max_pixels: int = DEFAULT_MAX_PIXELS
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Image as float 0..1 and its non-difficult objects in torchvision's 0-based continuous coordinates."""
    x = training.read_image(voc.image_path(voc_root, img.id), max_pixels).float() / 255
    keep = ~img.difficult
    boxes = torch.from_numpy(img.boxes[keep]).float() - torch.tensor([1.0, 1.0, 0.0, 0.0])
    if flip:
        x = x.flip(-1)
        boxes = torch.stack([x.shape[-1] - boxes[:, 2], boxes[:, 1], x.shape[-1] - boxes[:, 0], boxes[:, 3]], 1)
    return x, {"boxes": boxes, "labels": torch.from_numpy(img.labels[keep]) + 1}


def train_detector(run: TaskRun, detector: GeneralizedRCNN, images: Sequence[voc.VocImage], det: DictConfig
                   ) -> None:
    """SGD over batches of ``images_per_batch`` images, each flipped with probability 1/2."""
    images = [img for img in images if (~img.difficult).any()]  # nothing to learn from the rest
    root, device = run.roots["voc2007"], run.device
    detector.to(device).train()
    opt, sched = training.sgd([{"params": [p for p in detector.parameters() if p.requires_grad]}], det.optimizer)

    def step(it: int) -> dict[str, torch.Tensor]:
        g = training.iteration_generator(run.seed, it)
        batch = [det_sample(root, images[i], bool(torch.rand((), generator=g) < 0.5), run.max_pixels)
                 for i in training.batch_indices(len(images), det.images_per_batch, run.seed, it).tolist()]
        losses = detector([x.to(device) for x, _ in batch], [{k: v.to(device) for k, v in t.items()} for _, t in batch])
        return {k.removeprefix("loss_"): v for k, v in losses.items()}

    training.train_steps(run, detector, opt, sched, det.iterations, step, det)


@torch.no_grad()
def detect(detector: GeneralizedRCNN, voc_root: Path, images: Sequence[voc.VocImage], device: torch.device,
           max_pixels: int = DEFAULT_MAX_PIXELS, batch: int = 8) -> dict[str, voc.ClassDets]:
    """Detections per class in VOC's 1-based pixel coordinates, images in split order."""
    detector.to(device).eval()
    rows: list[tuple[str, int, float, list[float]]] = []
    with Progress(len(images), "test", "img") as bar:
        for start in range(0, len(images), batch):
            chunk = images[start:start + batch]
            outs = detector([(training.read_image(voc.image_path(voc_root, img.id), max_pixels).float() / 255)
                             .to(device) for img in chunk])
            for img, out in zip(chunk, outs):
                boxes = (out["boxes"].cpu().double() + torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64))
                rows += [(img.id, lab - 1, s, b) for lab, s, b in
                         zip(out["labels"].tolist(), out["scores"].double().tolist(), boxes.tolist())]
            bar.update(len(chunk))
    return {c: voc.ClassDets(np.array([r[0] for r in rows if r[1] == k], dtype=str),
                             np.array([r[2] for r in rows if r[1] == k], np.float64),
                             np.array([r[3] for r in rows if r[1] == k], np.float64).reshape(-1, 4))
            for k, c in enumerate(voc.CLASSES)}


class VocDetection(Task):
    datasets = ("voc2007",)
    score_name = "mAP"
    paper_name = "PASCAL-DET"
    choices = {"metric": METRICS}
    results_dir = "detections"

    def check_network(self, network: Any) -> None:
        network.check_freeze(self.cfg.freeze_convs, "task.freeze_convs")

    def run(self, run: TaskRun) -> Metrics:
        task, root = self.cfg, run.roots["voc2007"]
        if run.pretrained:
            run.backbone.freeze(task.freeze_convs)
            run.backbone.freeze_batchnorm()
        detector = build_detector(run.backbone, task)
        train_detector(run, detector, voc.load_split(root, task.train_split), task)
        test_imgs = voc.load_split(root, task.test_split)
        dets = detect(detector, root, test_imgs, run.device, run.max_pixels)
        voc.write_det_results(run.stage.path / self.results_dir, task.test_split, dets)
        return self.score(test_imgs, dets, str(task.metric), {"n_images": len(test_imgs)}, coco=True)

    def score(self, images: Sequence[voc.VocImage], dets: dict[str, voc.ClassDets], metric: str,
              extras: dict[str, Any], coco: bool) -> Metrics:
        """Devkit AP per class (and COCO AP when ``coco``) of detections on ``images``."""
        ap = evaluate.voc_det_ap(images, dets, metric)
        extras = {**extras, "n_detections": int(sum(len(d.ids) for d in dets.values()))}
        if coco:
            extras["coco"] = {k: json_number(v) for k, v in evaluate.coco_det_ap(images, dets).items()}
        return Metrics(self.name, metric, self.score_name, evaluate.mean_ap(ap), ap, extras)

    def score_files(self, folder: Path, roots: dict[str, Path], split: str, metric: str, options: DictConfig
                    ) -> Metrics:
        """``options.coco``: also COCO AP (pycocotools: about a minute per million detections)."""
        images = voc.load_split(roots["voc2007"], split, check_images=False)
        dets = voc.results_to_score(folder, split, "det", str(options.detections))
        return self.score(images, dets, metric, {"split": split, "n_images": len(images)},
                          bool(options.get("coco", True)))
