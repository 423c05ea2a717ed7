"""sun-cls (the paper's SUN-CLS): SUN397 scene classification, 397 categories, mean per-class accuracy.

On the official partitions (``task.partition``, 50 training and 50 test images per category; a seeded 50/50 split
of each category when the copy has no ``Partitions/``, recorded in the stage's ``split.json``). The protocol the
paper followed, as far as known: a new 397-way last layer, the network fine-tuned (``protocol: finetune``: about
50k iterations at lr 0.001, /10 every 20k); ``protocol: linear`` is a softmax regression on frozen features, for
cheap sweeps. The test images' predictions go to ``results/predictions.tsv`` (SUN397 has no devkit results format).
"""
from __future__ import annotations


import torch
import torch.nn.functional as F

from .. import evaluate, sun397
from ..store import atomic_write_json, atomic_write_text
from . import LinearOrFinetune, Metrics, TaskRun, training



class SunClassification(LinearOrFinetune):
    datasets = ("sun397",)
    score_name = "mean acc"
    paper_name = "SUN-CLS"
    choices = {"protocol": LinearOrFinetune.PROTOCOLS, "metric": ("mean_class_accuracy",)}

    def run(self, run: TaskRun) -> Metrics:
        task = self.cfg
        split = sun397.load_partition(run.roots["sun397"], int(task.partition), int(task.split_seed))
        atomic_write_json(run.stage.path / "split.json", split.source)
        folder = sun397.sun_dir(run.roots["sun397"])
        size = int(task.image_size or run.backbone.input_size)
        train_size = size if task.protocol == "linear" else round(size * task.finetune.train_resize)
        x_train = training.load_resized([folder / s.path for s in split.train], train_size, run.max_pixels)
        x_test = training.load_resized([folder / s.path for s in split.test], train_size, run.max_pixels)
        y_train = torch.tensor([s.label for s in split.train])
        classes = sun397.categories()
        if task.protocol == "linear":
            def feats(name: str, x: torch.Tensor) -> torch.Tensor:
                return training.cached_features(run, name, lambda: training.extract_features(
                    run.backbone, x, task.feature, run.device))

            logits = training.linear_probe(run, feats("train", x_train), feats("test", x_test), len(classes),
                                           lambda out: F.cross_entropy(out, y_train), task.linear)
        else:
            logits = training.finetune(run, x_train, x_test, len(classes),
                                       lambda out, idx: F.cross_entropy(out, y_train[idx].to(out.device)),
                                       task.finetune, size)
        predicted = logits.argmax(1).tolist()
        atomic_write_text(run.stage.path / self.results_dir / "predictions.tsv", "path\tlabel\tpredicted\n" + "".join(
            f"{s.path}\t{classes[s.label]}\t{classes[p]}\n" for s, p in zip(split.test, predicted)))
        accuracy = evaluate.class_accuracy([s.label for s in split.test], predicted, classes)
        return Metrics(self.name, "mean_class_accuracy", self.score_name, evaluate.mean_class_accuracy(accuracy),
                       accuracy, {"protocol": task.protocol, "n_images": len(split.test), "split": split.source})
