"""A toy transfer task: is there a person in a VOC 2007 image? A linear probe on frozen features, scored by AP."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from imnet_ablate import evaluate, voc
from imnet_ablate.tasks import Metrics, Task, TaskRun, training


class PersonPresence(Task):
    datasets = ("voc2007",)
    score_name = "AP"

    def run(self, run: TaskRun) -> Metrics:
        root, size = run.roots["voc2007"], int(run.backbone.input_size)
        splits = {s: voc.load_split(root, self.cfg[f"{s}_split"]) for s in ("train", "test")}
        feats = {s: training.extract_features(run.backbone, training.load_resized(
            [voc.image_path(root, img.id) for img in images], size, run.max_pixels), "fc7", run.device)
            for s, images in splits.items()}
        person = voc.CLASSES.index("person")
        target = torch.tensor([[float(person in img.labels)] for img in splits["train"]])
        scores = training.linear_probe(run, feats["train"], feats["test"], 1,
                                       lambda logits: F.binary_cross_entropy_with_logits(logits, target),
                                       self.cfg.linear)
        truth = torch.tensor([person in img.labels for img in splits["test"]])
        ranked = truth[torch.argsort(-scores[:, 0], stable=True)].numpy()
        ap = evaluate.ap_from_counts(ranked, ~ranked, int(truth.sum()), "area")
        return Metrics(self.name, "area", self.score_name, ap, {"person": ap}, {"n_images": len(truth)})
