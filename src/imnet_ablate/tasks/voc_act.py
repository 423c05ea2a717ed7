"""voc-act (the paper's PASCAL-ACT-CLS): VOC 2012 action classification of given person boxes.

Each listed person is classified from two regions, the person's box and the whole image (the context idea of
R*CNN, whose code the paper's protocol followed), both seen through the pre-trained network:

- ``protocol: finetune``: the whole network fine-tuned end to end. The image goes through the stride-16 trunk once;
  RoIAlign pools the person box and the whole image from it to the box head's grid (``Backbone.detection_parts``:
  fc6/fc7 for AlexNet, res5 for ResNets); the two box-head outputs, concatenated, give the 10 action scores (a
  sigmoid per action, as the devkit scores each action on its own). As in detection, the first ``freeze_convs``
  stages stay fixed and batch norm keeps its pre-trained statistics.
- ``protocol: linear``: frozen features (``feature``) of the person's crop (``context`` x its box, squashed to the
  network's input size) and of the whole image, concatenated; one L2-regularised logistic regression per action.

Scored with the devkit's rule (AP per action over the split's persons, VOC2010+ area, mean over the 10 scored
actions); the scores go to ``results/comp10_action_<split>_<action>.txt``, which ``ablate evaluate`` rescores.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from omegaconf import DictConfig
from torch import nn
from torchvision.ops import roi_align

from .. import evaluate, voc_actions
from ..errors import UserError
from ..evaluate import METRICS
from ..models import Backbone
from ..voc_actions import SCORED, ActionImage, ActionPerson
from . import LinearOrFinetune, Metrics, TaskRun, training

log = logging.getLogger(__name__)



def targets(persons: Sequence[ActionPerson]) -> torch.Tensor:
    """(persons, 10) 0/1: does the person do each scored action."""
    return torch.tensor([[float(p.does(a)) for a in SCORED] for p in persons]).reshape(-1, len(SCORED))


# -- linear probe ---------------------------------------------------------------------------------------------------
def crop_window(box: tuple[float, float, float, float], context: float, height: int, width: int
                ) -> tuple[int, int, int, int]:
    """Pixel rows and columns ``(top, bottom, left, right)`` (0-based, end exclusive) of a 1-based inclusive box
    grown ``context`` times about its centre, clipped to the image, at least one pixel."""
    x1, y1, x2, y2 = box
    cx, cy, w, h = (x1 + x2) / 2 - 0.5, (y1 + y2) / 2 - 0.5, (x2 - x1 + 1) * context, (y2 - y1 + 1) * context
    left, top = min(width - 1, max(0, round(cx - w / 2))), min(height - 1, max(0, round(cy - h / 2)))
    right, bottom = min(width, max(left + 1, round(cx + w / 2))), min(height, max(top + 1, round(cy + h / 2)))
    return top, bottom, left, right


def crop(img: torch.Tensor, box: tuple[float, float, float, float], context: float, size: int) -> torch.Tensor:
    """The person's box grown ``context`` times about its centre (clipped to the image), squashed to ``size``."""
    top, bottom, left, right = crop_window(box, context, *img.shape[-2:])
    return TF.resize(img[:, top:bottom, left:right], [size, size], antialias=True)


def region_pixels(root: Path, images: Sequence[ActionImage], context: float, size: int, max_pixels: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per listed person (list order): its crop, and the whole image it is in, both ``size`` x ``size`` uint8."""
    crops, scenes = [], []
    for image in images:
        pixels = training.read_image(voc_actions.year_dir(root) / "JPEGImages" / f"{image.id}.jpg", max_pixels)
        scene = TF.resize(pixels, [size, size], antialias=True)
        for person in image.persons:
            crops.append(crop(pixels, person.box, context, size))
            scenes.append(scene)
    return torch.stack(crops), torch.stack(scenes)


def linear_scores(run: TaskRun, task: DictConfig, splits: dict[str, list[ActionImage]]) -> torch.Tensor:
    """Test logits of the linear protocol: a probe on [person features, scene features]."""
    size = int(task.image_size or run.backbone.input_size)

    def feats(split: str) -> torch.Tensor:
        def compute() -> torch.Tensor:
            crops, scenes = region_pixels(run.roots["voc2012"], splits[split], float(task.context), size,
                                          run.max_pixels)
            return torch.cat([training.extract_features(run.backbone, x, task.feature, run.device)
                              for x in (crops, scenes)], 1)
        return training.cached_features(run, split, compute)

    y = targets(voc_actions.listed_persons(splits["train"]))
    return training.linear_probe(run, feats("train"), feats("test"), len(SCORED),
                                 lambda logits: F.binary_cross_entropy_with_logits(logits, y), task.linear)


# -- fine-tuning (two regions through the shared trunk) --------------------------------------------------------------
class TwoRegionClassifier(nn.Module):
    """Action scores of persons from their box and the whole image, pooled from one trunk pass per image."""

    def __init__(self, backbone: Backbone, outputs: int):
        super().__init__()
        parts = backbone.detection_parts(16)
        self.trunk, self.box_head, self.roi_size = parts.trunk, parts.box_head, parts.roi_size
        self.classifier = nn.Linear(2 * parts.box_dim, outputs)

    def forward(self, x: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """``x``: one normalised image (1, 3, H, W); ``boxes``: its persons (P, 4), 0-based continuous pixels."""
        fmap = self.trunk(x)
        scale = 2.0 ** round(float(np.log2(fmap.shape[-1] / x.shape[-1])))  # torchvision's infer_scale
        h, w = x.shape[-2:]
        rois = torch.cat([boxes, boxes.new_tensor([[0.0, 0.0, w, h]])])
        pooled = roi_align(fmap, [rois], self.roi_size, spatial_scale=scale, sampling_ratio=2, aligned=False)
        regions = self.box_head(pooled)
        person, scene = regions[:-1], regions[-1:].expand(len(boxes), -1)
        return self.classifier(torch.cat([person, scene], 1))


def scaled_sample(run: TaskRun, image: ActionImage, task: DictConfig, flip: bool
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The image (uint8) resized to shorter side ``min_size`` (longer at most ``max_size``) and its person boxes in
    the same 0-based continuous coordinates; mirrored when ``flip``."""
    path = voc_actions.year_dir(run.roots["voc2012"]) / "JPEGImages" / f"{image.id}.jpg"
    pixels = training.read_image(path, run.max_pixels)
    height, width = pixels.shape[-2:]
    scale = min(task.min_size / min(height, width), task.max_size / max(height, width))
    size = [max(1, round(height * scale)), max(1, round(width * scale))]
    pixels = TF.resize(pixels, size, antialias=True)
    boxes = (torch.tensor([p.box for p in image.persons], dtype=torch.float32)
             - torch.tensor([1.0, 1.0, 0.0, 0.0])) * torch.tensor([size[1] / width, size[0] / height] * 2)
    if flip:
        pixels = pixels.flip(-1)
        boxes = torch.stack([size[1] - boxes[:, 2], boxes[:, 1], size[1] - boxes[:, 0], boxes[:, 3]], 1)
    return pixels, boxes


def finetune_scores(run: TaskRun, task: DictConfig, splits: dict[str, list[ActionImage]]) -> torch.Tensor:
    """Test logits of the fine-tuning protocol (``TwoRegionClassifier``, BCE per action, flips)."""
    ft, device, backbone = task.finetune, run.device, run.backbone
    if run.pretrained:
        backbone.freeze(ft.freeze_convs)
        backbone.freeze_batchnorm()
    model = TwoRegionClassifier(backbone, len(SCORED)).to(device)
    opt, sched = training.sgd([{"params": [p for p in model.parameters() if p.requires_grad]}], ft.optimizer)
    train = splits["train"]

    def step(it: int) -> dict[str, torch.Tensor]:
        g = training.iteration_generator(run.seed, it)
        logits, labels = [], []
        for i in training.batch_indices(len(train), ft.images_per_batch, run.seed, it).tolist():
            pixels, boxes = scaled_sample(run, train[i], ft, bool(torch.rand((), generator=g) < 0.5))
            logits.append(model(backbone.normalize(pixels[None].to(device)), boxes.to(device)))
            labels.append(targets(train[i].persons))
        return {"bce": F.binary_cross_entropy_with_logits(torch.cat(logits), torch.cat(labels).to(device))}

    model.train()
    training.train_steps(run, model, opt, sched, ft.iterations, step, ft)
    model.eval()
    with torch.no_grad():
        out = []
        for image in splits["test"]:
            pixels, boxes = scaled_sample(run, image, ft, False)
            out.append(model(backbone.normalize(pixels[None].to(device)), boxes.to(device)).cpu())
        return torch.cat(out)


class VocAction(LinearOrFinetune):
    datasets = ("voc2012",)
    score_name = "mAP"
    choices = {"protocol": LinearOrFinetune.PROTOCOLS, "metric": METRICS}
    paper_name = "PASCAL-ACT-CLS"

    def run(self, run: TaskRun) -> Metrics:
        task, root = self.cfg, run.roots["voc2012"]
        splits = {"train": voc_actions.load_split(root, task.train_split),
                  "test": voc_actions.load_split(root, task.test_split)}
        if not voc_actions.listed_persons(splits["train"]):
            raise UserError(f"{root}: the {task.train_split!r} action split lists no person; expected persons to "
                            "train on")
        logits = (linear_scores if task.protocol == "linear" else finetune_scores)(run, task, splits)
        persons = voc_actions.listed_persons(splits["test"])
        scores = {a: logits[:, k].double().numpy() for k, a in enumerate(SCORED)}
        voc_actions.write_results(run.stage.path / self.results_dir, task.test_split, persons, scores)
        return self.score(splits["test"], persons, scores, str(task.metric), {"protocol": task.protocol})

    def score(self, images: Sequence[ActionImage], persons: Sequence[ActionPerson], scores: dict[str, np.ndarray],
              metric: str, extras: dict[str, Any]) -> Metrics:
        ap = evaluate.voc_action_ap(persons, scores, metric)
        n_scored = int(sum(np.isfinite(s).sum() for s in scores.values()))
        return Metrics(self.name, metric, self.score_name, evaluate.mean_ap(ap), ap,
                       {**extras, "n_images": len(images), "n_persons": len(persons), "n_scores": n_scored})

    def score_files(self, folder: Path, roots: dict[str, Path], split: str, metric: str, options: DictConfig
                    ) -> Metrics:
        images = voc_actions.load_split(roots["voc2012"], split, check_images=False)
        persons = voc_actions.listed_persons(images)
        scores = voc_actions.read_results(folder, split, persons)
        if not scores:
            raise UserError(f"detections={options.detections}: no comp10_action_{split}_<action>.txt files; "
                            "expected the devkit's action results files for this split (docs/evaluate.md)")
        missing = [a for a in SCORED if a not in scores]
        if missing:
            log.warning("%s: no results file for %d action(s), every person unscored (ranked in list order): %s",
                        options.detections, len(missing), ", ".join(missing))
        return self.score(images, persons, scores, metric, {"split": split})
