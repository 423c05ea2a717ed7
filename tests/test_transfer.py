"""``ablate transfer`` on the tiny demo: every output of voc-cls (linear probe, fine-tuning) and voc-det, rescoring
the written results files, no-op reruns, folders per seed/source, Fast R-CNN's target rules, resume after kill -9.
"""
from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import REPO, TINY_DEMO, run_ablate, run_dir_of, tiny_demo_overrides
from imnet_ablate import datasets, evaluate, models, sizing, source, transfer, voc
from imnet_ablate.tasks import training, voc_det
from imnet_ablate.config import conf_dir
from imnet_ablate.errors import UserError
from imnet_ablate.store import Stage

torch.set_num_threads(1)


def config(cache: Path, runs: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        return compose("transfer", [*tiny_demo_overrides(cache, runs), *overrides])


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A finished pre-training folder in the contract format (config.yaml, metrics.json, model.pt, DONE), holding
    an untrained alexnet_small: transfer's plumbing does not depend on what the weights learned."""
    torch.manual_seed(0)
    stage = Stage(tmp_path_factory.mktemp("runs"), "pretrain", "tiny-alexnet_small", {"test": 1})
    stage.path.mkdir(parents=True)
    model_cfg = {"name": "alexnet_small", "input_size": 28, "resize": 32, "dropout": 0.5, "init": "default"}
    (stage.path / "config.yaml").write_text(OmegaConf.to_yaml({"model": model_cfg}))
    (stage.path / "metrics.json").write_text(json.dumps({"num_classes": 10}))
    torch.save(models.build(model_cfg, 10).state_dict(), stage.path / "model.pt")
    stage.finish(["config.yaml", "metrics.json", "model.pt"])
    return stage.path


def read_metrics(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


def assert_stage_files(folder: Path) -> None:
    for name in ("config.yaml", "metrics.json", "checkpoint.pt", "log.txt", "stage.json", "DONE"):
        assert (folder / name).is_file(), name
    assert not (folder / "LOCK").exists()


def test_linear_probe_outputs_rescoring_and_noop_rerun(demo_cache, tmp_path, pretrained):
    cfg = config(demo_cache, tmp_path, f"pretrain={pretrained}", "task.feature=conv5")
    out = transfer.run(cfg)
    assert out == transfer.stage(cfg).path and out.name.startswith(f"voc-cls-{pretrained.name}-")
    assert_stage_files(out)
    assert (out / "features_trainval.pt").is_file() and (out / "features_test.pt").is_file()
    m = read_metrics(out)
    assert (m["task"], m["metric"], m["protocol"], m["n_images"]) == ("voc-cls", "voc07", "linear",
                                                                       TINY_DEMO["voc_test"])
    assert list(m["ap"]) == list(voc.CLASSES) and 0 < m["map"] <= 1
    test_imgs = voc.load_split(datasets.root(cfg, "voc2007"), "test")
    scores = evaluate.cls_score_matrix(test_imgs, voc.read_cls_results(out / "results", "test"))
    assert evaluate.mean_ap(evaluate.voc_cls_ap(test_imgs, scores)) == pytest.approx(m["map"], abs=1e-12)
    done = (out / "DONE").stat().st_mtime_ns
    assert transfer.run(cfg) == out and (out / "DONE").stat().st_mtime_ns == done


def test_finetune_writes_a_resumable_checkpoint(demo_cache, tmp_path, pretrained):
    cfg = config(demo_cache, tmp_path, f"pretrain={pretrained}", "task=voc-cls-demo", "task.protocol=finetune",
                 "task.finetune.iterations=4", "task.finetune.batch_size=8", "task.finetune.checkpoint_every=2")
    out = transfer.run(cfg)
    assert_stage_files(out)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["iteration"] == 4 and {"model", "optimizer", "scheduler", "rng"} <= set(state)
    assert read_metrics(out)["protocol"] == "finetune" and len(list((out / "results").iterdir())) == 20


def test_finetuning_keeps_the_pre_trained_batch_norm_statistics(demo_cache, tmp_path):
    """alexnet_small has batch norm: fine-tuning a pre-trained one (batch 8 here, 32 by default) keeps the
    statistics pre-training learned."""
    torch.manual_seed(0)
    model_cfg = {"name": "alexnet_small", "input_size": 28, "resize": 32, "dropout": 0.0, "init": "default",
                 "batchnorm": True}
    model = models.build(model_cfg, 10)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    stage = Stage(tmp_path / "runs", "pretrain", "bn-alexnet_small", {"test": 2})
    stage.path.mkdir(parents=True)
    (stage.path / "config.yaml").write_text(OmegaConf.to_yaml({"model": model_cfg}))
    (stage.path / "metrics.json").write_text(json.dumps({"num_classes": 10}))
    torch.save(model.state_dict(), stage.path / "model.pt")
    stage.finish(["config.yaml", "metrics.json", "model.pt"])
    out = transfer.run(config(demo_cache, tmp_path, f"pretrain={stage.path}", "task=voc-cls-demo",
                              "task.protocol=finetune", "task.finetune.iterations=4", "task.finetune.batch_size=8"))
    tuned = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    stats = [k for k in model.state_dict() if k.endswith(("running_mean", "running_var"))]
    assert len(stats) == 8 and all(torch.equal(tuned[k], model.state_dict()[k]) for k in stats)


def test_test_views_are_crops_of_the_training_scale():
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).view(2, 3, 32, 32)
    two = training.test_views(x, 28, 2)
    centre = x[..., 2:30, 2:30]
    assert len(two) == 2 and torch.equal(two[0], centre) and torch.equal(two[1], centre.flip(-1))
    ten = training.test_views(x, 28, 10)
    assert len(ten) == 10 and all(v.shape == (2, 3, 28, 28) for v in ten)
    assert torch.equal(ten[1], x[..., :28, :28]) and torch.equal(ten[4], x[..., 4:, 4:])  # corners: Caffe's oversample


def test_detection_results_files_rescore_to_metrics(demo_cache, tmp_path, pretrained):
    cfg = config(demo_cache, tmp_path, f"pretrain={pretrained}", "task=voc-det-demo", "task.iterations=4",
                 "task.box_score_thresh=0.0")  # few iterations: keep low scores so there is something to score
    out = transfer.run(cfg)
    assert_stage_files(out)
    m = read_metrics(out)
    assert m["task"] == "voc-det" and m["n_detections"] > 0 and set(m["coco"]) >= {"AP", "AP50", "AP75"}
    dets = voc.read_det_results(out / "detections", "test")
    assert sum(len(d.ids) for d in dets.values()) == m["n_detections"]
    boxes = np.concatenate([d.boxes for d in dets.values()])
    assert boxes[:, :2].min() >= 1 and boxes[:, 2].max() <= 64 and (boxes[:, 2:] >= boxes[:, :2]).all()
    test_imgs = voc.load_split(datasets.root(cfg, "voc2007"), "test")
    ap = evaluate.voc_det_ap(test_imgs, dets)
    assert {c: v for c, v in ap.items() if not np.isnan(v)} == {c: v for c, v in m["ap"].items() if v is not None}


def test_folders_per_seed_source_and_task(demo_cache, tmp_path, pretrained):
    def path(*o: str) -> Path:
        return transfer.stage(config(demo_cache, tmp_path, *o)).path

    base = path(f"pretrain={pretrained}")
    assert len({base, path(f"pretrain={pretrained}", "seed=1"), path("pretrain=scratch"),
                path(f"pretrain={pretrained}", "task=voc-det-demo"), path(f"pretrain={pretrained}", "task.feature=conv5")}) == 5
    # settings of the protocol not in use do not change the folder
    assert path(f"pretrain={pretrained}", "task.finetune.iterations=7") == base
    assert path("pretrain=scratch").name.startswith("voc-cls-scratch-")


def test_bad_sources_are_one_line_errors(demo_cache, tmp_path, monkeypatch):
    with pytest.raises(UserError, match="not a finished pre-training folder"):
        transfer.stage(config(demo_cache, tmp_path, f"pretrain={tmp_path}"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(UserError, match="pretrain=torchvision: .* not found"):
        source.torchvision_network(config(demo_cache, tmp_path))


@pytest.mark.parametrize("settings, message", [
    (["task.feature=fc9"], "task.feature=fc9: AlexNet has no such layer"),
    (["task=voc-det", "task.freeze_convs=5"], "task.freeze_convs=5: AlexNet has 4 stages; expected at most 4"),
])
def test_a_bad_task_key_fails_before_the_pre_training_data_is_read(tmp_path, settings, message):
    """pretrain=subset and scratch train cfg.model: the task is checked against it before the source lookup lists
    the subset, so the error is the task key's, in a second, even when the ImageNet root does not exist."""
    for pretrain in ("subset", "scratch"):
        with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
            cfg = compose("transfer", [f"paths.runs={tmp_path / 'runs'}", f"pretrain={pretrain}", *settings,
                                       "data=imagenet", f"data.root={tmp_path / 'absent'}",
                                       f"data.voc_root={tmp_path / 'absent'}"])
        with pytest.raises(UserError, match=message):
            transfer.run(cfg)
    assert not (tmp_path / "absent").exists() and not any((tmp_path / "runs").glob("**/stage.json"))


def test_det_targets_drop_difficult_and_flip_in_continuous_coordinates(demo_cache, tmp_path):
    root = datasets.root(config(demo_cache, tmp_path), "voc2007")
    img = next(i for i in voc.load_split(root, "trainval") if i.difficult.any() and (~i.difficult).any())
    x, t = voc_det.det_sample(root, img, flip=False)
    keep = ~img.difficult
    assert x.shape == (3, img.height, img.width) and len(t["boxes"]) == keep.sum()
    np.testing.assert_array_equal(t["boxes"].numpy(), img.boxes[keep] - [1, 1, 0, 0])
    assert (t["labels"].numpy() == img.labels[keep] + 1).all()
    xf, tf = voc_det.det_sample(root, img, flip=True)
    assert torch.equal(xf, x.flip(-1))
    np.testing.assert_allclose(tf["boxes"][:, [2, 0]].numpy(), img.width - t["boxes"][:, [0, 2]].numpy())


def test_background_lower_bound_ignores_proposals_that_overlap_nothing():
    cfg = OmegaConf.load(conf_dir() / "task" / "voc-det.yaml")
    heads = voc_det.build_detector(models.build({"name": "alexnet_small", "input_size": 28}, 10), cfg).roi_heads
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    props = torch.tensor([[0.0, 0.0, 10.0, 9.0],      # IoU 0.9: foreground
                          [0.0, 0.0, 10.0, 3.0],      # IoU 0.3: background
                          [0.0, 0.0, 10.0, 0.5],      # IoU 0.05: ignored (Fast R-CNN's [0.1, 0.5) range)
                          [50.0, 50.0, 60.0, 60.0]])  # no overlap: ignored
    _, labels = heads.assign_targets_to_proposals([props], [gt], [torch.tensor([7])])
    assert labels[0].tolist() == [7, 0, -1, -1]


@pytest.mark.slow
def test_kill_9_then_resume_matches_an_uninterrupted_run(demo_cache, tmp_path, pretrained):
    args = ["transfer", f"pretrain={pretrained}", "task=voc-cls-demo", "task.protocol=finetune",
            "task.finetune.iterations=40", "task.finetune.batch_size=8", "task.finetune.checkpoint_every=5"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "imnet_ablate.cli", *args,
                             *tiny_demo_overrides(demo_cache, killed)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 90
    while not list(killed.glob("transfer/*/checkpoint.pt")) and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpt = next(killed.glob("transfer/*/checkpoint.pt"))
    assert torch.load(ckpt, weights_only=True)["iteration"] < 40 and not (ckpt.parent / "DONE").exists()
    resumed = run_dir_of(run_ablate(*args, *tiny_demo_overrides(demo_cache, killed)))
    assert "resuming from" in (resumed / "log.txt").read_text()
    straight = run_dir_of(run_ablate(*args, *tiny_demo_overrides(demo_cache, tmp_path / "straight")))
    a = torch.load(resumed / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(straight / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert read_metrics(resumed)["ap"] == read_metrics(straight)["ap"]


@pytest.mark.parametrize("generator, task",
                         [("demo", "voc-det"), ("demo_actions", "voc-act"), ("demo_sun397", "sun-cls"),
                          ("demo", "voc-act"), ("demo", "sun-cls")])
def test_a_new_demo_generator_gets_new_transfer_folders(monkeypatch, generator, task):
    """A demo transfer's folder names the generated data's folder, generator version included: a transfer measured on
    an older generator's images is never reused for the new ones (0.2's generator 2 reused scratch act/sun probes).
    The action and scene devkits draw their objects with the ImageNet pair's ``demo.instance_latent``, so its
    version names their folders too: a new pair generator changes their images without changing their own."""
    cfg, _ = sizing.compose("transfer", [f"task={task}", "pretrain=scratch"])
    before = transfer.stage(cfg).name
    monkeypatch.setattr(importlib.import_module(f"imnet_ablate.{generator}"), "GENERATOR_VERSION", 99)
    assert transfer.stage(cfg).name != before


def test_a_cuda_device_that_is_not_there_fails_before_the_transfer_folder_is_written(demo_cache, tmp_path):
    """The device is picked before ``stage.json`` is written (which records it): a bad ``device`` leaves no
    half-made transfer folder behind. No GPU is visible to the command, on a GPU machine too."""
    runs = tmp_path / "runs"
    proc = run_ablate("transfer", "task=voc-cls", "pretrain=scratch", "device=cuda",
                      *tiny_demo_overrides(demo_cache, runs), env={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2, proc.stderr
    assert "device=cuda: no CUDA device visible; use device=auto or device=cpu" in proc.stderr
    assert not list(runs.glob("transfer/*"))
