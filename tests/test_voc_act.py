"""``ablate transfer task=voc-act`` on the tiny demo: both protocols write devkit results files that rescore to the
metrics, the record is the paper's PASCAL-ACT-CLS, and the two-region fine-tuning resumes from its checkpoint."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from test_transfer import pretrained  # noqa: F401  (a finished pre-training folder of alexnet_small)

from conftest import tiny_demo_overrides
from imnet_ablate import datasets, evaluate, transfer, voc_actions
from imnet_ablate.config import conf_dir
from imnet_ablate.models import build
from imnet_ablate.tasks import task_for
from imnet_ablate.tasks.voc_act import TwoRegionClassifier, crop, crop_window

torch.set_num_threads(1)


def config(cache, runs, *overrides: str):
    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        return compose("transfer", [*tiny_demo_overrides(cache, runs), "task=voc-act-demo", *overrides])


def rescored(cfg, out) -> dict[str, float]:
    root = datasets.root(cfg, "voc2012")
    persons = voc_actions.listed_persons(voc_actions.load_split(root, "val"))
    return evaluate.voc_action_ap(persons, voc_actions.read_results(out / "results", "val", persons))


def test_linear_protocol_scores_every_listed_person(demo_cache, tmp_path, pretrained):  # noqa: F811
    cfg = config(demo_cache, tmp_path, f"pretrain={pretrained}")
    out = transfer.run(cfg)
    m = json.loads((out / "metrics.json").read_text())
    assert (m["task"], m["score_name"], m["metric"], m["protocol"]) == ("voc-act", "mAP", "area", "linear")
    assert list(m["per_class"]) == list(voc_actions.SCORED) and 0 < m["score"] <= 1
    assert len(list((out / "results").glob("comp10_action_val_*.txt"))) == 10
    ap = rescored(cfg, out)
    assert {a: v for a, v in ap.items() if not np.isnan(v)} == {a: v for a, v in m["per_class"].items() if v is not None}
    assert task_for(cfg.task).paper_name == "PASCAL-ACT-CLS"


def test_finetune_protocol_trains_both_regions_and_resumes(demo_cache, tmp_path, pretrained):  # noqa: F811
    overrides = [f"pretrain={pretrained}", "task.protocol=finetune", "task.finetune.iterations=3",
                 "task.finetune.checkpoint_every=2", "task.finetune.min_size=64", "task.finetune.max_size=64"]
    out = transfer.run(config(demo_cache, tmp_path, *overrides))
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["iteration"] == 3 and any(k.startswith("classifier.") for k in state["model"])
    m = json.loads((out / "metrics.json").read_text())
    assert m["protocol"] == "finetune" and m["n_scores"] == 10 * m["n_persons"]
    # the linear protocol's settings do not enter the fine-tuning's folder, and vice versa
    assert transfer.stage(config(demo_cache, tmp_path, *overrides, "task.linear.iterations=7")).path == out


def test_two_region_classifier_pools_person_and_scene_from_one_trunk_pass():
    cfg = OmegaConf.load(conf_dir() / "model" / "alexnet_small.yaml")
    model = TwoRegionClassifier(build(cfg, 10), 10).eval()
    x = torch.randn(1, 3, 64, 96)
    boxes = torch.tensor([[0.0, 0.0, 30.0, 60.0], [40.0, 10.0, 90.0, 50.0]])
    assert model(x, boxes).shape == (2, 10)
    assert not torch.equal(model(x, boxes)[0], model(x, boxes)[1])


@pytest.mark.parametrize("box, context, window", [
    ((41.0, 31.0, 50.0, 50.0), 1.0, (30, 50, 40, 50)),   # the box itself: 1-based 41..50 are columns 40..49
    ((41.0, 31.0, 50.0, 50.0), 2.0, (20, 60, 35, 55)),   # twice as wide and tall about the same centre
    ((1.0, 1.0, 10.0, 10.0), 3.0, (0, 20, 0, 20)),       # clipped at the image's corner
    ((100.0, 100.0, 100.0, 100.0), 1.0, (99, 100, 99, 100)),  # a one-pixel box in the last pixel
])
def test_crop_window_grows_the_box_about_its_centre_within_the_image(box, context, window):
    assert crop_window(box, context, 100, 100) == window


def test_crop_squashes_the_window():
    img = torch.zeros(3, 100, 100, dtype=torch.uint8)
    img[:, 30:50, 40:50] = 255  # exactly the window of the box above
    patch = crop(img, (41.0, 31.0, 50.0, 50.0), 1.0, 8)
    assert patch.shape == (3, 8, 8) and bool((patch == 255).all())
