"""The 1000-way probe as its own stage: keyed by the pre-training, which it never retrains or renames."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose as hydra_compose
from hydra import initialize_config_dir

from conftest import run_ablate, run_dir_of, tiny_demo_overrides
from imnet_ablate import models, pretrain, probe
from imnet_ablate.config import conf_dir
from imnet_ablate.errors import UserError

# wordnet-9 (9 merged classes) for 4 iterations; a 2-epoch probe with one lr step
PRETRAIN = ["subset=wordnet-9", "train.batch_size=64", "train.schedule.unit=iteration", "train.schedule.length=4",
            "train.schedule.step_every=4", "loader.num_workers=0", "device=cpu"]
PROBE = ["probe.epochs=2", "probe.steps=[1]", "probe.batch_size=256"]


def compose(command: str, *overrides: str):
    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        return hydra_compose(command, list(overrides))


def test_a_finished_pre_training_gains_the_probe_without_being_trained_again(demo_cache: Path, tmp_path: Path):
    common = [*tiny_demo_overrides(demo_cache, tmp_path / "runs"), *PRETRAIN]
    pre = pretrain.run(compose("pretrain", *common))
    done_before = (pre / "DONE").read_text()

    proc = run_ablate("probe", *common, *PROBE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = run_dir_of(proc)
    assert out.parent.name == "probe" and out.name.startswith(pre.name + "-")
    assert (pre / "DONE").read_text() == done_before  # reused, not retrained
    assert "a new 1000-way layer" in (out / "log.txt").read_text()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_classes"] == 1000 and metrics["pretrain_classes"] == 9 and metrics["pretrain"] in pre.name
    assert 0 <= metrics["top1"] <= metrics["top5"] <= 100 and metrics["train_rows"] == 2 * 4000  # centre + mirror
    assert metrics["schedule"]["epochs"] == 2 and metrics["schedule"]["steps"] == [1]
    assert [row.split(",")[0] for row in (out / "metrics.csv").read_text().splitlines()] == ["epoch", "1", "2"]
    assert not list(out.glob("features_*")) and not (out / "checkpoint.pt").exists()  # scratch files removed
    assert set(json.loads((out / "DONE").read_text())["outputs"]) == set(probe.OUTPUTS)
    assert "imagenet_1k_top1" not in json.loads((pre / "metrics.json").read_text())
    assert models.load_pretrained(pre)[0].head.out_features == 9  # the probe's layer is not saved over the network's

    probe_done = (out / "DONE").read_text()
    again = run_ablate("probe", *common, *PROBE)
    assert again.returncode == 0 and run_dir_of(again) == out and (out / "DONE").read_text() == probe_done
    other = probe.stage(compose("probe", *common, "probe.epochs=3", "probe.steps=[2]"))
    assert other.path != out and other.path.name.startswith(pre.name + "-")  # its own settings, same pre-training


def test_probe_settings_do_not_enter_the_pre_training_hash(demo_cache: Path, tmp_path: Path):
    runs = tiny_demo_overrides(demo_cache, tmp_path)
    a = compose("probe", *runs, "probe.epochs=3", "probe.steps=[2]")
    b = compose("probe", *runs, "probe.lr=0.01")
    assert pretrain.stage(a).path == pretrain.stage(b).path == pretrain.stage(compose("pretrain", *runs)).path
    assert probe.stage(a).path != probe.stage(b).path


def test_probe_steps_outside_the_schedule_are_a_user_error(tmp_path: Path):
    cfg = compose("probe", f"paths.runs={tmp_path}", "probe.epochs=4", "probe.steps=[4]")
    with pytest.raises(UserError, match="probe.steps"):
        probe.check(cfg.probe)
