"""Demo-aware commands: on data=demo a task runs as its demo-sized variant and a subset preset keeps the same fraction
of each class as on ImageNet, saying so; demo_sized=false and real data keep the recipes as named; what the user
typed is kept. As a newcomer types them: ``ablate transfer task=voc-det`` and ``ablate pretrain subset=250pc``."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from conftest import run_ablate, run_dir_of, tiny_demo_overrides
from imnet_ablate import sizing, transfer
from imnet_ablate.config import conf_dir


def test_presets_keep_the_fraction_of_each_class_they_keep_on_imagenet():
    assert [sizing.demo_images(n, 24) for n in (1000, 500, 250, 125, 50, 25)] == [24, 12, 6, 3, 1, 1]
    assert [sizing.demo_images(n, 4) for n in (500, 250, 125)] == [2, 1, 1]


@pytest.mark.parametrize("typed, added, task", [
    (["task=voc-det", "subset=250pc"], ["task=voc-det-demo", "subset.images_per_class=12"], "voc-det-demo"),
    (["task=voc-det-demo"], [], "voc-det-demo"),
    (["subset=budget-1000x500"], ["task=voc-cls-demo", "subset.budget.images_per_class=24"], "voc-cls-demo"),
    (["subset=250pc", "subset.images_per_class=100"], ["task=voc-cls-demo"], "voc-cls-demo"),  # typed: kept
    (["subset=budget-1000x500", "subset.budget={classes:10,images_per_class:2}"], ["task=voc-cls-demo"],
     "voc-cls-demo"),
    (["task=voc-det", "subset=250pc", "demo_sized=false"], [], "voc-det"),
    (["task=voc-det", "subset=250pc", "data=imagenet", "data.root=/data/imagenet", "data.voc_root=/data/voc"], [],
     "voc-det"),
])
def test_what_the_demo_data_changes(typed, added, task):
    cfg, sized = sizing.compose("transfer", typed)
    assert list(sized.overrides) == added and sized.task == task
    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        assert cfg == compose("transfer", [*typed, *added])  # the same as typing the overrides by hand
    assert sized.note.endswith("(demo_sized=false: as named)") if added else sized.note == ""


def test_full_size_recipe_on_the_demo_keeps_its_0_1_folder_only_when_asked(tmp_path):
    """``task=voc-det`` on the demo now finds voc-det-demo's folder; its old full-size folder is one switch away."""
    common = [f"paths.runs={tmp_path}", "pretrain=scratch", "model=alexnet"]
    demo_sized, _ = sizing.compose("transfer", [*common, "task=voc-det"])
    as_named, _ = sizing.compose("transfer", [*common, "task=voc-det", "demo_sized=false"])
    typed, _ = sizing.compose("transfer", [*common, "task=voc-det-demo"])
    assert transfer.stage(as_named).name == "voc-det-scratch-0915b9e052ab"  # test_compat's (2a12cba2fa8c before demo 2)
    assert transfer.stage(demo_sized).path == transfer.stage(typed).path != transfer.stage(as_named).path


def test_a_sweep_over_presets_builds_one_subset_each(demo_cache, tmp_path):
    """Each job of ``-m subset=500pc,250pc`` is sized on its own: two subsets, not the whole demo twice."""
    proc = run_ablate("subset", "-m", "subset=500pc,250pc", *tiny_demo_overrides(demo_cache, tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "subset=500pc keeps 2 of 4 images per class" in proc.stderr
    assert "subset=250pc keeps 1 of 4 images per class" in proc.stderr
    built = {p.name.rsplit("-", 1)[0]: json.loads((p / "manifest.json").read_text())["num_train"]
             for p in (tmp_path / "subset").iterdir()}
    assert built == {"500pc-ipc2": 2000, "250pc-ipc1": 1000}


@pytest.mark.slow
def test_newcomer_commands_run_the_demo_variants_and_say_so(demo_cache, tmp_path):
    tiny = tiny_demo_overrides(demo_cache, tmp_path)
    det = run_ablate("transfer", "task=voc-det", "pretrain=scratch", "task.iterations=2", *tiny)
    assert det.returncode == 0, det.stderr[-3000:]
    assert "demo data: task=voc-det runs as voc-det-demo (demo_sized=false: as named)" in det.stderr
    folder = run_dir_of(det)
    assert folder == transfer.stage(sizing.compose("transfer", ["task=voc-det-demo", "pretrain=scratch",
                                                                "task.iterations=2", *tiny])[0]).path
    assert "min_size: 128" in (folder / "config.yaml").read_text()

    # train.reference_images sizes the schedule to the tiny demo (48 steps, not the full recipe's 9000)
    pre = run_ablate("pretrain", "subset=250pc", "train.batch_size=250", "train.reference_images=1000",
                     "loader.num_workers=0", *tiny)
    assert pre.returncode == 0, pre.stderr[-3000:]
    assert "demo data: subset=250pc keeps 1 of 4 images per class (demo_sized=false: as named)" in pre.stderr
    out = run_dir_of(pre)
    assert out.name.startswith("250pc-ipc1-alexnet_small-")
    assert json.loads((out / "metrics.json").read_text())["train_images"] == 1000
    assert Path(json.loads((out / "metrics.json").read_text())["subset_dir"]).name.startswith("250pc-ipc1-")
