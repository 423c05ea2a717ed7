"""voc-cls: PASCAL VOC 2007 image classification (20 labels, multi-label), per-class AP with the devkit's rule.

Not one of the paper's three tasks, but the cheapest view of a representation: ``protocol: linear`` trains 20
L2-regularised logistic regressions on frozen features of whole images squashed to the network's input size (cached
in the stage folder); ``protocol: finetune`` trains the whole network with a new 20-way head and a masked BCE
(images whose objects of a class are all difficult are left out of that class's loss, as the devkit leaves them out
of its AP) on random crops of images squashed to ``train_resize`` x the input size, and tests on crops of the same
scale (``test_crops``: the centre crop and its mirror, or the era's 10 crops). Batch norm keeps the pre-trained
network's statistics while fine-tuning (batches of 32 small scenes), as in detection and in the linear probe.
Scores go to devkit results files (``results/comp2_cls_<split>_<class>.txt``) so ``ablate evaluate`` rescores them.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from .. import evaluate, voc
from ..evaluate import METRICS
from . import LinearOrFinetune, Metrics, TaskRun, training

# 2 (imnet-ablate 0.2): tests on crops at the training scale (0.1: whole images squashed to the crop size) and keeps
# batch norm's pre-trained statistics (0.1: batch statistics). In the finetune spec, so 0.1's folders are not reused.
FINETUNE_VERSION = 2


def cls_targets(images: Sequence[voc.VocImage]) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets, weights) N x 20 from the evaluator's ground truth: an image whose objects of a class are all
    difficult gets weight 0 for that class, left out of the loss as the devkit leaves it out of AP."""
    gt = torch.from_numpy(evaluate.cls_ground_truth(images))
    return (gt == 1).float(), (gt != 0).float()


def masked_bce(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    loss = F.binary_cross_entropy_with_logits(logits, targets, weight=weights, reduction="sum")
    return loss / weights.sum().clamp(min=1.0)


class VocClassification(LinearOrFinetune):
    datasets = ("voc2007",)
    score_name = "mAP"
    choices = {"protocol": LinearOrFinetune.PROTOCOLS, "metric": METRICS}

    def spec(self) -> dict[str, Any]:
        """The protocol in use's settings, fine-tuning's with its version."""
        spec = super().spec()
        if "finetune" in spec:
            spec["finetune"]["version"] = FINETUNE_VERSION
        return spec

    def run(self, run: TaskRun) -> Metrics:
        task, root = self.cfg, run.roots["voc2007"]
        train_imgs, test_imgs = voc.load_split(root, task.train_split), voc.load_split(root, task.test_split)
        size = int(task.image_size or run.backbone.input_size)
        train_size = size if task.protocol == "linear" else round(size * task.finetune.train_resize)

        def pixels(images: Sequence[voc.VocImage], side: int) -> torch.Tensor:
            return training.load_resized([voc.image_path(root, img.id) for img in images], side, run.max_pixels)

        x_train, x_test = pixels(train_imgs, train_size), pixels(test_imgs, train_size)  # one scale for both
        targets, weights = cls_targets(train_imgs)
        if task.protocol == "linear":
            def feats(split: str, x: torch.Tensor) -> torch.Tensor:
                return training.cached_features(run, split, lambda: training.extract_features(
                    run.backbone, x, task.feature, run.device))

            scores = training.linear_probe(run, feats("trainval", x_train), feats("test", x_test), len(voc.CLASSES),
                                           lambda logits: masked_bce(logits, targets, weights), task.linear)
        else:
            scores = training.finetune(run, x_train, x_test, len(voc.CLASSES), lambda logits, idx: masked_bce(
                logits, targets[idx].to(logits.device), weights[idx].to(logits.device)), task.finetune, size)
        ids = np.array([img.id for img in test_imgs], dtype=str)
        results = {c: voc.ClassScores(ids, scores[:, k].double().numpy()) for k, c in enumerate(voc.CLASSES)}
        voc.write_cls_results(run.stage.path / self.results_dir, task.test_split, results)
        ap = evaluate.voc_cls_ap(test_imgs, scores.double().numpy(), task.metric)
        return Metrics(self.name, str(task.metric), self.score_name, evaluate.mean_ap(ap), ap,
                       {"protocol": task.protocol, "n_images": len(test_imgs)})

    def score_files(self, folder: Path, roots: dict[str, Path], split: str, metric: str, options: DictConfig
                    ) -> Metrics:
        images = voc.load_split(roots["voc2007"], split, check_images=False)
        results = voc.results_to_score(folder, split, "cls", str(options.detections))
        ap = evaluate.voc_cls_ap(images, evaluate.cls_score_matrix(images, results), metric)
        return Metrics(self.name, metric, self.score_name, evaluate.mean_ap(ap), ap,
                       {"split": split, "n_images": len(images),
                        "n_detections": int(sum(len(r.ids) for r in results.values()))})
