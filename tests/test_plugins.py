"""A user's own package (tests/plugin_example/toyplug, outside imnet_ablate) adds a backbone and a transfer task
through Hydra's search path, and both go through the CLI on the demo: pre-training the new backbone, the new task on
it, a built-in task on it, and `ablate run` with the new task."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import run_ablate, run_dir_of, tiny_demo_overrides, tiny_recipe

pytestmark = pytest.mark.slow

PLUGIN = Path(__file__).parent / "plugin_example"
TINY_PRETRAIN = ["subset.classes=16", "subset.name=x16", *tiny_recipe()]


def test_a_users_package_adds_a_backbone_and_a_task(demo_cache, tmp_path):
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(PLUGIN), os.environ.get("PYTHONPATH")]))}
    common = [*tiny_demo_overrides(demo_cache, tmp_path / "runs"), "hydra.searchpath=[pkg://toyplug.conf]"]

    pre = run_ablate("pretrain", "model=tiny", *TINY_PRETRAIN, *common, env=env)
    assert pre.returncode == 0, pre.stderr[-3000:]
    folder = run_dir_of(pre)
    assert folder.name.startswith("x16-tiny-")

    toy = run_ablate("transfer", "task=person", f"pretrain={folder}", *common, env=env)
    assert toy.returncode == 0, toy.stderr[-3000:]
    m = json.loads((run_dir_of(toy) / "metrics.json").read_text())
    assert (m["task"], m["score_name"], m["metric"]) == ("person", "AP", "area") and 0 < m["score"] <= 1

    builtin = run_ablate("transfer", "task=voc-cls", f"pretrain={folder}", *common, env=env)
    assert builtin.returncode == 0, builtin.stderr[-3000:]
    assert json.loads((run_dir_of(builtin) / "metrics.json").read_text())["score_name"] == "mAP"

    run = run_ablate("run", "model=tiny", "tasks=[person]", *TINY_PRETRAIN, *common,
                     "experiment.sets=[{label:full,subset:full},{label:scratch,subset:full,pretrain:scratch}]",
                     f"paths.results={tmp_path / 'results'}", "jobs=1", env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [ln for ln in run.stdout.splitlines() if ln.startswith("| person")]
    assert [r.split("|")[2].strip() for r in rows] == ["full", "scratch"] and "| AP |" in run.stdout


def test_a_task_target_that_is_not_a_task_is_one_line(demo_cache, tmp_path):
    proc = run_ablate("transfer", "task=voc-cls", "+task._target_=os.path.join",
                      *tiny_demo_overrides(demo_cache, tmp_path / "runs"))
    assert proc.returncode == 2 and "expected a subclass of imnet_ablate.tasks.Task" in proc.stderr
    assert "Traceback" not in proc.stderr
