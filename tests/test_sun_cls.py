"""``ablate transfer task=sun-cls`` on the tiny demo: the split is recorded, the predictions file rescores to the
metrics (mean per-class accuracy over the 397 categories), both protocols run, and the record is the paper's SUN-CLS."""
from __future__ import annotations

import csv
import json

import pytest
import torch
from hydra import compose, initialize_config_dir
from test_transfer import pretrained  # noqa: F401  (a finished pre-training folder of alexnet_small)

from conftest import TINY_SUN397, tiny_demo_overrides
from imnet_ablate import evaluate, sun397, transfer
from imnet_ablate.config import conf_dir
from imnet_ablate.tasks import task_for

torch.set_num_threads(1)


def config(cache, runs, *overrides: str):
    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        return compose("transfer", [*tiny_demo_overrides(cache, runs), "task=sun-cls-demo", *overrides])


def test_linear_protocol_predictions_rescore_to_the_metrics(demo_cache, tmp_path, pretrained):  # noqa: F811
    cfg = config(demo_cache, tmp_path, f"pretrain={pretrained}")
    out = transfer.run(cfg)
    m = json.loads((out / "metrics.json").read_text())
    assert (m["task"], m["metric"], m["score_name"], m["protocol"]) == ("sun-cls", "mean_class_accuracy", "mean acc",
                                                                        "linear")
    assert m["n_images"] == 397 * TINY_SUN397["test_per_class"] and len(m["per_class"]) == 397
    assert json.loads((out / "split.json").read_text()) == m["split"] and m["split"]["kind"] == "official"
    with open(out / "results" / "predictions.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    classes = sun397.categories()
    index = {c: k for k, c in enumerate(classes)}
    accuracy = evaluate.class_accuracy([index[r["label"]] for r in rows], [index[r["predicted"]] for r in rows], classes)
    assert evaluate.mean_class_accuracy(accuracy) == pytest.approx(m["score"], abs=1e-12)
    assert task_for(cfg.task).paper_name == "SUN-CLS"


def test_finetune_protocol_trains_a_new_397_way_head(demo_cache, tmp_path, pretrained):  # noqa: F811
    out = transfer.run(config(demo_cache, tmp_path, f"pretrain={pretrained}", "task.protocol=finetune",
                              "task.finetune.iterations=2", "task.finetune.batch_size=8"))
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["iteration"] == 2 and state["model"]["head.weight"].shape[0] == 397
    assert json.loads((out / "metrics.json").read_text())["protocol"] == "finetune"


def test_partition_and_split_seed_pick_the_folder(demo_cache, tmp_path, pretrained):  # noqa: F811
    def path(*o: str):
        return transfer.stage(config(demo_cache, tmp_path, f"pretrain={pretrained}", *o)).path

    assert len({path(), path("task.partition=2"), path("task.split_seed=1")}) == 3
    assert path("task.finetune.iterations=7") == path()  # the unused protocol's settings change nothing
