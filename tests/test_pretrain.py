"""``ablate pretrain`` end to end on a tiny tree of real JPEGs: convergence, outputs, no-op rerun, kill -9 + resume
giving bitwise-identical weights, refusal of a foreign checkpoint, bad images, and DDP with 2 gloo processes."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import REPO, run_ablate, run_dir_of, write_subset, write_tree
from imnet_ablate import cli, models, pretrain
from imnet_ablate.errors import UserError

@pytest.fixture(scope="module")
def tiny_subset(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("tiny")
    return write_subset(base / "subset" / "tiny-000000000000", base / "imagenet", write_tree(base / "imagenet"))


def overrides(subset: Path, runs: Path, *extra: str) -> list[str]:
    """A few-second recipe: alexnet_small on 64 images of 4 classes, batch 16, 6 epochs of 4 iterations."""
    return [f"subset_dir={subset}", f"paths.runs={runs}", "train.batch_size=16", "train.schedule.length=6",
            "train.schedule.step_every=5", "train.optimizer.lr=0.05", "model.dropout=0", "train.reference_images=64",
            "train.budget=same_epochs", "train.checkpoint_every=2", "train.log_every=4", "loader.num_workers=0",
            "device=cpu", *extra]


def compose(*args: str):
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(cli.conf_dir()), version_base=None):
        return hydra_compose("pretrain", list(args))


def weights(folder: Path, name: str = "model.pt") -> dict[str, torch.Tensor]:
    return torch.load(folder / name, map_location="cpu", weights_only=True)


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Same thread count in this process and in the CLI subprocesses (OMP_NUM_THREADS=1): same float sums."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def reference_run(tiny_subset: Path, tmp_path_factory) -> Path:
    """One uninterrupted deterministic run, in this process, that the other tests compare against."""
    return pretrain.run(compose(*overrides(tiny_subset, tmp_path_factory.mktemp("runs"), "train.deterministic=true")))


def test_short_run_learns_and_writes_every_output(reference_run: Path) -> None:
    out = reference_run
    assert out.parent.name == "pretrain" and out.name.startswith("tiny-alexnet_small-")
    assert {p.name for p in out.iterdir()} >= set(pretrain.OUTPUTS) | {"DONE", "stage.json"}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_classes"] == 4 and metrics["iterations"] == 24 and metrics["budget"] == "same_epochs"
    assert metrics["top1"] > 50 and metrics["val_loss"] < 1.2, metrics  # chance: 25%, loss ln 4 = 1.39
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0].split(",") == pretrain.METRICS and len(rows) == 1 + 6
    assert "epoch 6/6" in (out / "log.txt").read_text()
    model, manifest = models.load_pretrained(out)
    assert manifest["top1"] == metrics["top1"] and model.head.out_features == 4
    ckpt = weights(out, "checkpoint.pt")
    assert {"model", "optimizer", "scheduler", "scaler", "rng", "epoch", "pos"} <= ckpt.keys()
    assert_same_weights(ckpt["model"], weights(out))


def test_rerun_of_a_finished_run_is_a_noop(reference_run: Path, tiny_subset: Path) -> None:
    log_size, mtime = (reference_run / "log.txt").stat().st_size, (reference_run / "model.pt").stat().st_mtime_ns
    cfg = compose(*overrides(tiny_subset, reference_run.parents[1], "train.deterministic=true"))
    assert pretrain.stage(cfg).path == reference_run and pretrain.stage(cfg).is_done()  # what `ablate run` plans with
    assert pretrain.run(cfg) == reference_run
    assert (reference_run / "model.pt").stat().st_mtime_ns == mtime
    assert (reference_run / "log.txt").stat().st_size == log_size


def test_sigterm_checkpoints_and_the_rerun_resumes_to_identical_weights(reference_run: Path, tiny_subset: Path,
                                                                         tmp_path: Path) -> None:
    cfg = compose(*overrides(tiny_subset, tmp_path, "train.deterministic=true"))
    stage, _ = pretrain.make_stage(cfg, tiny_subset)

    def preempt() -> None:  # what SLURM does before preempting: SIGUSR1/SIGTERM to the job
        while not (stage.path / "checkpoint.pt").exists():
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=preempt, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        pretrain.run(cfg)
    interrupted = weights(stage.path, "checkpoint.pt")
    assert not stage.is_done() and 0 < interrupted["iteration"] < 24
    assert pretrain.run(cfg) == stage.path
    assert "resuming" in (stage.path / "log.txt").read_text()
    assert_same_weights(weights(stage.path), weights(reference_run))
    assert (stage.path / "metrics.csv").read_text().count("\n") == 7


@pytest.mark.slow
def test_kill_9_then_rerun_gives_the_weights_of_an_uninterrupted_run(reference_run: Path, tiny_subset: Path,
                                                                      tmp_path: Path) -> None:
    args = overrides(tiny_subset, tmp_path, "train.deterministic=true")
    stage, _ = pretrain.make_stage(compose(*args), tiny_subset)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "imnet_ablate.cli", "pretrain", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not (stage.path / "checkpoint.pt").exists() and proc.poll() is None:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL and not stage.is_done()
    again = run_ablate("pretrain", *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert run_dir_of(again) == stage.path and "resuming" in again.stderr
    assert_same_weights(weights(stage.path), weights(reference_run))


def test_fewer_validations_keep_the_folder_and_the_weights(reference_run: Path, tiny_subset: Path,
                                                            tmp_path: Path) -> None:
    """train.max_evaluations thins validation (a small set runs many epochs under same_iterations) without touching
    the network: same folder name, bitwise the same weights, top-1 at epochs 3 and 6 only."""
    out = pretrain.run(compose(*overrides(tiny_subset, tmp_path, "train.deterministic=true",
                                          "train.max_evaluations=2")))
    assert out.name == reference_run.name
    assert_same_weights(weights(out), weights(reference_run))
    rows = [r.split(",") for r in (out / "metrics.csv").read_text().splitlines()[1:]]
    assert [r[0] for r in rows if r[3]] == ["3", "6"] and len(rows) == 6
    final = json.loads((reference_run / "metrics.json").read_text())["top1"]
    assert json.loads((out / "metrics.json").read_text())["top1"] == final


def test_eval_interval_widens_eval_every_to_at_most_max_evaluations() -> None:
    t = OmegaConf.create({"eval_every": 1, "max_evaluations": 100})
    assert [pretrain.eval_interval(t, e) for e in (90, 100, 101, 600, 2300)] == [1, 1, 2, 6, 23]
    assert pretrain.eval_interval(OmegaConf.create({"eval_every": 5, "max_evaluations": 100}), 90) == 5
    assert pretrain.eval_interval(OmegaConf.create({"eval_every": 1, "max_evaluations": None}), 600) == 1


def test_checkpoint_of_another_config_is_refused(reference_run: Path, tiny_subset: Path, tmp_path: Path) -> None:
    cfg = compose(*overrides(tiny_subset, tmp_path, "train.optimizer.lr=0.03"))
    stage, _ = pretrain.make_stage(cfg, tiny_subset)
    stage.path.mkdir(parents=True)
    shutil.copy(reference_run / "checkpoint.pt", stage.path / "checkpoint.pt")
    with pytest.raises(UserError, match="different config"):
        pretrain.run(cfg)


def test_unreadable_images_are_skipped_up_to_the_configured_fraction(tiny_subset: Path, tmp_path: Path) -> None:
    root = json.loads((tiny_subset / "manifest.json").read_text())["data_root"]
    broken = shutil.copytree(tiny_subset, tmp_path / "subset" / "broken-000000000000")
    (broken / "manifest.json").write_text(json.dumps({"data_root": str(tmp_path / "data"), "num_classes": 4}))
    shutil.copytree(root, tmp_path / "data")
    train = (broken / "train.tsv").read_text().splitlines()
    (tmp_path / "data" / train[1].split("\t")[0]).write_bytes(b"\xff\xd8\xff not really a jpeg")
    (tmp_path / "data" / train[2].split("\t")[0]).unlink()
    args = overrides(broken, tmp_path / "runs", "train.schedule.length=1")
    with pytest.raises(UserError, match=r"unreadable images in .*broken.*max_bad_fraction=0.001"):
        pretrain.run(compose(*args))
    out = pretrain.run(compose(*args, "loader.max_bad_fraction=0.05"))
    assert "skipped 2 unreadable images" in (out / "log.txt").read_text()


@pytest.mark.slow
def test_ddp_with_two_gloo_processes_writes_the_same_layout(reference_run: Path, tiny_subset: Path,
                                                            tmp_path: Path) -> None:
    proc = run_ablate("pretrain", *overrides(tiny_subset, tmp_path, "train.devices=2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = run_dir_of(proc)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference_run.iterdir())
    metrics = json.loads((out / "metrics.json").read_text())
    single = json.loads((reference_run / "metrics.json").read_text())
    assert metrics.keys() == single.keys() and metrics["world"] == 2 and metrics["iterations"] == 24
    csv = (out / "metrics.csv").read_text().splitlines()
    single_csv = (reference_run / "metrics.csv").read_text().splitlines()
    assert csv[0] == single_csv[0] and len(csv) == len(single_csv)
    assert [r.split(",")[:2] for r in csv] == [r.split(",")[:2] for r in single_csv]
    assert weights(out).keys() == weights(reference_run).keys()


def test_plan_scales_the_reference_schedule_by_budget() -> None:
    t = OmegaConf.create({"batch_size": 256, "reference_images": 1_281_167, "budget": "same_epochs",
                          "schedule": {"unit": "iteration", "length": 450_000, "step_every": 100_000}})
    full = pretrain.make_plan(t, 1_281_167, 1)
    assert (full.total_iters, full.step_iters, full.epochs) == (450_000, 100_000, 90)
    half = pretrain.make_plan(t, 640_583, 1)
    assert half.iters_per_epoch == 2502 and (half.total_iters, half.epochs) == (225_000, 90)
    t.budget = "same_iterations"
    same = pretrain.make_plan(t, 640_583, 4)
    assert (same.total_iters, same.step_iters, same.epochs) == (450_000, 100_000, 180)
    t.schedule = {"unit": "epoch", "length": 3, "step_every": 2}
    t.budget, t.reference_images, t.batch_size = "same_epochs", 64, 16
    assert pretrain.make_plan(t, 64, 1) == pretrain.Plan(4, 12, 8, 3)
    with pytest.raises(UserError, match="train.budget"):
        pretrain.make_plan(OmegaConf.merge(t, {"budget": "both"}), 64, 1)
