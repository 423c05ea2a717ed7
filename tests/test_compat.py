"""Stage folder names are a contract with users: a finished pre-training (GPU-days) or transfer must be found again
after an upgrade. These names were computed by imnet-ablate 0.1.0 (commit 7fca60b) and must never change silently;
a deliberate change needs a version field in the stage spec and a line in README's changelog (the changed ones say
so, with their 0.1 names).

The subset stage's hash includes the ImageNet root's absolute path, so the tree lives at a fixed path.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from imnet_ablate import pretrain, subsets, transfer, wordnet
from imnet_ablate.config import conf_dir
from test_subsets import make_tree

TREE = Path("/tmp/imnet-ablate-compat-v1/imagenet")
PINNED = {
    'subset full': 'full-2ebfffe16cff',
    'subset 250pc': '250pc-e664e8aed19e',
    'subset wordnet-127': 'wordnet-127-c318abd0439e',
    'subset nopascal-771': 'nopascal-771-b7bc94fcf541',
    # 0.2: train=demo version 4 (12 epochs of the demo's 48 images per class, 9000 steps, same_iterations; v3 had
    # 4500 and left the full set far from trained; v2 had 24 images and 2250 steps; 0.1's recipe left small sets
    # untrained). 0.2 v3: 23f4d84e9cf8, 21a2c325f300; v2: 5b4cf88c09aa, 87abb4f32c14; 0.1: 6ee860438a5d, e0197eb95506
    'pretrain full alexnet_small demo': 'full-alexnet_small-b7d576dcf8b3',
    'pretrain 250pc alexnet_small demo': '250pc-alexnet_small-22fd126ba717',
    'pretrain full alexnet caffe': 'full-alexnet-13da4c189eb5',
    'pretrain 250pc alexnet caffe': '250pc-alexnet-4858f01af784',
    # 0.2: model.version 2 (Caffe's input convention, squash, dropout after ReLU, bias 0.1); 0.1: 6f1c19371f88,
    # 0d09025475f5
    'pretrain full alexnet_caffe caffe': 'full-alexnet_caffe-e1f1df35a8f1',
    'pretrain 250pc alexnet_caffe caffe': '250pc-alexnet_caffe-b59ba02f7562',
    'pretrain full alexnet same_iterations seed1': 'full-alexnet-f601e239a4c3',
    # data=demo transfers: 0.2's demo generator 2 (instances of a class differ; 48 train images per class) is a new
    # demo folder, so every demo stage is new (0.1 and 0.2 generator 1: f0d3f613cb53, 003127adaf96, 20e143be8d43,
    # f0d3f613cb53, 1269e4471ab4, 23f22c52d094, 70e1bef1d0c6, bf6d3c82ebd8, 2a12cba2fa8c, 1a0aeec62d5f); their
    # specs name the generated folder (generator version included) instead of its settings. Real data's are
    # unchanged (below).
    'transfer data=demo task=voc-cls': 'voc-cls-full-alexnet_small-0123456789ab-9184b7c35a8d',
    'transfer data=demo task=voc-cls task.feature=conv5': 'voc-cls-full-alexnet_small-0123456789ab-be4a9db54951',
    # 0.2: finetune version 2 (test crops at the training scale, frozen batch norm); 0.1: 84b11ec5aca7, 46900c7c2e9d
    'transfer data=demo task=voc-cls task.protocol=finetune': 'voc-cls-full-alexnet_small-0123456789ab-7e462f0860ab',
    'transfer data=demo task=voc-cls-demo': 'voc-cls-full-alexnet_small-0123456789ab-9184b7c35a8d',
    'transfer data=demo task=voc-det': 'voc-det-full-alexnet_small-0123456789ab-9268191320ea',
    # 0.2: voc-det-demo trains 9600 iterations, not 400 (0.1: 3e6ccb9ac4ef, data=imagenet 88a7574010c6; 0.2 at 4800:
    # d940428843b3, 0ca84288077d)
    'transfer data=demo task=voc-det-demo': 'voc-det-full-alexnet_small-0123456789ab-c3fd663ac94c',
    'transfer data=demo task=voc-cls seed=2': 'voc-cls-full-alexnet_small-0123456789ab-72279c67e97f',
    'transfer data=demo scratch voc-cls': 'voc-cls-scratch-6294d2659b5a',
    'transfer data=demo scratch voc-det alexnet': 'voc-det-scratch-0915b9e052ab',
    'transfer data=demo torchvision voc-det': 'voc-det-torchvision-b777c508e880',
    # 0.2: the action / scene devkits' names hold the pair's generator version (their objects are its instances),
    # and voc-act-demo probes 64 px crops; before: voc-act e1fffe171da4, sun-cls 1ce6f58878ad
    'transfer data=demo scratch voc-act-demo': 'voc-act-scratch-481af0b3dd18',
    'transfer data=demo scratch sun-cls-demo': 'sun-cls-scratch-329f8e78b9c8',
    'transfer data=imagenet task=voc-cls': 'voc-cls-full-alexnet_small-0123456789ab-a3802c88e318',
    'transfer data=imagenet task=voc-cls task.feature=conv5': 'voc-cls-full-alexnet_small-0123456789ab-d4f84399a567',
    'transfer data=imagenet task=voc-cls task.protocol=finetune': 'voc-cls-full-alexnet_small-0123456789ab-e12e7ceb6d4a',
    'transfer data=imagenet task=voc-cls-demo': 'voc-cls-full-alexnet_small-0123456789ab-a3802c88e318',
    'transfer data=imagenet task=voc-det': 'voc-det-full-alexnet_small-0123456789ab-3751b83aea91',
    'transfer data=imagenet task=voc-det-demo': 'voc-det-full-alexnet_small-0123456789ab-a48e7b884a65',
    'transfer data=imagenet task=voc-cls seed=2': 'voc-cls-full-alexnet_small-0123456789ab-de78db373a57',
    'transfer data=imagenet scratch voc-cls': 'voc-cls-scratch-e12690550dc3',
    'transfer data=imagenet scratch voc-det alexnet': 'voc-det-scratch-f561ff8bf8af',
    'transfer data=imagenet torchvision voc-det': 'voc-det-torchvision-3c4cd3c7d758',
    'transfer real subset full voc-det': 'voc-det-full-alexnet-13da4c189eb5-f57753bbc8ac',
}


@pytest.fixture(scope="module")
def tree() -> Path:
    """1000 classes x (3 train + 1 val) empty files: the builder lists names, it never opens an image."""
    return make_tree(TREE, wordnet.load().classes, per_class=3)


@pytest.fixture(scope="module")
def finished_pretrain(tmp_path_factory) -> Path:
    """A pre-training folder as transfer sees it: its name and the hash in its DONE marker."""
    folder = tmp_path_factory.mktemp("runs") / "pretrain" / "full-alexnet_small-0123456789ab"
    folder.mkdir(parents=True)
    (folder / "DONE").write_text(json.dumps({"hash": "0123456789ab", "outputs": {}}))
    return folder


def names(tree: Path, pre: Path, tmp: Path) -> dict[str, str]:
    def cfg(command: str, *overrides: str):
        with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
            return compose(command, [f"paths.runs={tmp}/runs", f"paths.cache={tmp}/cache", *overrides])

    real = ["data=imagenet", f"data.root={tree}", "data.voc_root=/data/VOCdevkit"]
    out = {}
    for s in ["full", "250pc", "wordnet-127", "nopascal-771"]:
        out[f"subset {s}"] = subsets.stage(cfg("subset", *real, f"subset={s}")).name
    for model, recipe in [("alexnet_small", "demo"), ("alexnet", "caffe"), ("alexnet_caffe", "caffe")]:
        for s in ["full", "250pc"]:
            out[f"pretrain {s} {model} {recipe}"] = pretrain.stage(
                cfg("pretrain", *real, f"subset={s}", f"model={model}", f"train={recipe}")).name
    out["pretrain full alexnet same_iterations seed1"] = pretrain.stage(cfg(
        "pretrain", *real, "model=alexnet", "train=caffe", "train.budget=same_iterations", "seed=1")).name
    for data in (["data=demo"], real):
        d = data[0]
        for task in [["task=voc-cls"], ["task=voc-cls", "task.feature=conv5"], ["task=voc-cls", "task.protocol=finetune"],
                     ["task=voc-cls-demo"], ["task=voc-det"], ["task=voc-det-demo"], ["task=voc-cls", "seed=2"]]:
            out[f"transfer {d} {' '.join(task)}"] = transfer.stage(cfg("transfer", *data, *task, f"pretrain={pre}")).name
        out[f"transfer {d} scratch voc-cls"] = transfer.stage(cfg("transfer", *data, "pretrain=scratch")).name
        out[f"transfer {d} scratch voc-det alexnet"] = transfer.stage(
            cfg("transfer", *data, "pretrain=scratch", "task=voc-det", "model=alexnet")).name
        out[f"transfer {d} torchvision voc-det"] = transfer.stage(
            cfg("transfer", *data, "pretrain=torchvision", "task=voc-det")).name
    for task in ["voc-act-demo", "sun-cls-demo"]:  # their real copies' names hold the folder given on the command line
        out[f"transfer data=demo scratch {task}"] = transfer.stage(
            cfg("transfer", "data=demo", "pretrain=scratch", f"task={task}")).name
    out["transfer real subset full voc-det"] = transfer.stage(
        cfg("transfer", *real, "pretrain=subset", "task=voc-det", "model=alexnet", "train=caffe")).name
    return out


def test_stage_folder_names_of_0_1_configs_are_unchanged(tree, finished_pretrain, tmp_path):
    assert names(tree, finished_pretrain, tmp_path) == PINNED
