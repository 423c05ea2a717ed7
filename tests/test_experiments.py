"""`ablate run` and `ablate report` on the tiny demo: the whole chain, resumption, missing runs, sweeps."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from conftest import REPO, run_ablate, run_dir_of, tiny_demo_overrides, tiny_recipe
from imnet_ablate import cpus, report

pytestmark = pytest.mark.slow

# Pre-trainings of a few seconds: 16 random classes of the tiny demo, 1 epoch.
TINY = ["subset.classes=16", "subset.name=x16", *tiny_recipe()]
RUN = ["jobs=2", "transfer_seeds=1", "imagenet_probe=false", "tasks=[voc-cls]"]  # one cheap transfer per network
SETS = "experiment.sets=[{label:full,subset:full},{label:scratch,subset:full,pretrain:scratch}]"


def args(cache: Path, tmp: Path, *extra: str) -> list[str]:
    return [*tiny_demo_overrides(cache, tmp / "runs"), *TINY, *RUN, SETS, f"paths.results={tmp / 'results'}", *extra]


def stages_line(stdout: str) -> tuple[int, int]:
    line = next(ln for ln in stdout.splitlines() if ln.startswith("stages: "))
    ran, reused = line.removeprefix("stages: ").split(" ran, ")
    return int(ran), int(reused.split()[0])


def test_tiny_experiment_end_to_end_then_rerun_is_a_no_op(demo_cache, tmp_path):
    proc = run_ablate("run", *args(demo_cache, tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert stages_line(proc.stdout) == (3, 0)  # one pre-training, two transfers (pre-trained and scratch)
    # each stage's first line says what runs and the plan's estimate; its own lines carry its tag
    assert re.search(r"\[pretrain full seed 0\] start: pre-train alexnet_small \(train=demo\) on subset x16-\w{12} "
                     r"-> .*; the plan estimates no time \(none of its recipe has finished yet\)", proc.stderr)
    assert re.search(r"INFO \[pretrain full seed 0\] imnet_ablate.pretrain: training ", proc.stderr)
    assert re.search(r"INFO \[voc-cls-demo scratch seed 0\] imnet_ablate.transfer: transfer voc-cls from scratch",
                     proc.stderr)
    out = run_dir_of(proc)
    assert out == tmp_path / "results" / "demo"
    table = [ln for ln in proc.stdout.splitlines() if ln.startswith("| voc-cls")]
    assert [row.split("|")[2].strip() for row in table] == ["full", "scratch"]
    for name in ("README.md", "table.csv", "per_class.csv", "runs.csv", "plot.png"):
        assert (out / name).stat().st_size > 0, name
    assert "dog" in (out / "per_class.csv").read_text()
    # where the numbers were computed: each stage ran in a worker of one thread, on this processor
    setup = report.machine(next((tmp_path / "runs" / "pretrain").iterdir()))
    assert setup.startswith(f"{cpus.model()} (") and ", 1 thread, torch " in setup
    assert f"- {setup}: 3 stages" in (out / "README.md").read_text()

    again = run_ablate("run", *args(demo_cache, tmp_path))
    assert again.returncode == 0 and stages_line(again.stdout) == (0, 3)

    plan = run_ablate("run", *args(demo_cache, tmp_path, "plan=true"))
    assert plan.returncode == 0 and "3 done, 0 to run" in plan.stdout

    # estimates come from finished stages of the same recipe: pre-training seed 1 of the same stages is timed,
    # voc-det is not; scratch draws one random initialisation per pre-training seed (transfer seed 1 for seed 1)
    more = run_ablate("run", *args(demo_cache, tmp_path, "plan=true", "pretrain_seeds=2", "tasks=[voc-cls,voc-det]"))
    assert more.returncode == 0, more.stderr[-3000:]
    rows = [row.split() for row in more.stdout.splitlines() if row.startswith("todo ")]
    todo = {(r[1], r[2], r[4], r[5]): r[7] for r in rows}  # (stage, set, task, pre-training seed) -> estimate
    assert len(rows) == 7 and all(todo[("transfer", s, "voc-det-demo", p)] == "unknown"
                                  for s, p in (("full", "0"), ("full", "1"), ("scratch", "-"))), todo
    timed = [("pretrain", "full", "-", "1"), ("transfer", "full", "voc-cls-demo", "1"),
             ("transfer", "scratch", "voc-cls-demo", "-")]
    assert all(re.fullmatch(r"~\d+:\d\d", todo[k]) for k in timed), todo
    assert sorted(r[6] for r in rows if r[2] == "scratch") == ["0", "1", "1"], rows  # voc-det 0; both tasks' 1
    assert "3 done, 7 to run; about " in more.stdout and "for 3 of them" in more.stdout and "; 4 unknown" in more.stdout


def test_report_lists_missing_runs_instead_of_failing(demo_cache, tmp_path):
    assert run_ablate("run", *args(demo_cache, tmp_path)).returncode == 0
    report = run_ablate("report", *args(demo_cache, tmp_path, "transfer_seeds=2"))  # seed 1 was never run
    assert report.returncode == 0, report.stderr[-3000:]
    assert "missing runs (2):" in report.stdout  # seed 1's two transfers (pre-trained and scratch)
    assert "seed 1" in report.stdout and "seed 0" not in report.stdout.split("missing runs")[1]
    readme = (tmp_path / "results" / "demo" / "README.md").read_text()
    assert "## Missing runs" in readme and "| voc-cls | full |" in readme


def test_killed_run_resumes_without_redoing_finished_stages(demo_cache, tmp_path):
    log = open(tmp_path / "log.txt", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "imnet_ablate.cli", "run", *args(demo_cache, tmp_path)],
                            cwd=REPO, stdout=log, stderr=log, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 600
    done_markers: list[Path] = []
    while not done_markers and proc.poll() is None and time.time() < deadline:
        done_markers = list((tmp_path / "runs").glob("pretrain/*/DONE")) if (tmp_path / "runs").exists() else []
        time.sleep(0.05)
    assert done_markers, (tmp_path / "log.txt").read_text()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)  # Ctrl-C, kill -9 or a lost node: the whole process group
    proc.wait()
    first = done_markers[0].read_text()

    rerun = run_ablate("run", *args(demo_cache, tmp_path))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    ran, reused = stages_line(rerun.stdout)
    assert ran + reused == 3 and reused >= 1 and ran <= 2
    assert done_markers[0].read_text() == first  # the finished pre-training was not run again
    assert len(list((tmp_path / "runs").glob("*/*/DONE"))) == 4  # subset, pre-training, two transfers


def test_multirun_over_two_presets_gives_two_folders_and_one_table(demo_cache, tmp_path):
    common = [*tiny_demo_overrides(demo_cache, tmp_path / "runs"), *TINY]
    sweep = run_ablate("transfer", "-m", "subset=full,250pc", *common)
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    assert len(list((tmp_path / "runs" / "pretrain").iterdir())) == 2
    assert len([p for p in (tmp_path / "runs" / "transfer").iterdir() if (p / "DONE").exists()]) == 2
    sets = "experiment.sets=[{label:full,subset:full},{label:250pc,subset:250pc}]"
    report = run_ablate("report", *common, *RUN[1:], sets, f"paths.results={tmp_path / 'results'}")
    assert report.returncode == 0, report.stderr[-3000:]
    rows = [ln for ln in report.stdout.splitlines() if ln.startswith("| voc-cls")]
    assert len(rows) == 2 and "missing runs" not in report.stdout
    assert len((tmp_path / "results" / "demo" / "table.csv").read_text().splitlines()) == 1 + 2


def files_under(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")} if folder.exists() else {}


def test_plan_writes_nothing(demo_cache, tmp_path):
    before = files_under(demo_cache)
    plan = run_ablate("run", *args(demo_cache, tmp_path, "plan=true"))
    assert plan.returncode == 0, plan.stderr[-3000:]
    assert "0 done, 3 to run" in plan.stdout
    assert not (tmp_path / "runs").exists() and not (tmp_path / "results").exists()
    assert files_under(demo_cache) == before  # no listing cache, no demo data, nothing
    fresh = run_ablate("run", *args(tmp_path / "empty-cache", tmp_path, "plan=true"))
    assert fresh.returncode == 2 and "not generated yet" in fresh.stderr and "Traceback" not in fresh.stderr
    assert not (tmp_path / "empty-cache").exists()
def plan_rows(stdout: str) -> list[dict[str, str]]:
    """The rows `ablate run plan=true` prints: status, stage, set, budget, task, pre-training seed, seed, estimate,
    folder."""
    keys = ["status", "kind", "set", "budget", "task", "pre", "seed", "estimate", "folder"]
    return [dict(zip(keys, line.split())) for line in stdout.splitlines() if line.startswith(("todo ", "done "))]


def test_plan_has_one_pre_training_per_set_and_three_transfers_of_it(demo_cache, tmp_path):
    proc = run_ablate("run", "experiment=demo", "pretrain_seeds=1", "transfer_seeds=3", "plan=true",
                      *tiny_demo_overrides(demo_cache, tmp_path / "runs"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = plan_rows(proc.stdout)
    pretrainings = {r["set"]: Path(r["folder"]).name for r in rows if r["kind"] == "pretrain"}
    assert sorted(pretrainings) == ["250pc", "full", "nopascal-771", "wordnet-127"]  # one each
    for label, folder in pretrainings.items():
        for task in ("voc-det-demo", "voc-act-demo", "sun-cls-demo"):  # the paper's three, demo-sized
            transfers = [r for r in rows if r["kind"] == "transfer" and r["set"] == label and r["task"] == task]
            assert sorted(r["seed"] for r in transfers) == ["0", "1", "2"] and {r["pre"] for r in transfers} == {"0"}
            name = task.removesuffix("-demo")
            assert all(Path(r["folder"]).name.startswith(f"{name}-{folder}-") for r in transfers)  # that very network
    assert sorted(r["seed"] for r in rows if r["set"] == "scratch") == ["0", "0", "0", "1", "1", "1", "2", "2", "2"]
    assert sorted(r["set"] for r in rows if r["kind"] == "probe") == sorted(pretrainings)  # some sets are not fine


@pytest.mark.parametrize("reference_images, full_rules", [
    (4000, ["same_iterations"]),  # the tiny demo's 4 x 1000 images: one schedule, trained under train=demo's rule
    (48000, ["same_epochs", "same_iterations"]),  # a demo smaller than the recipe's reference: fewer steps
])
def test_budget_both_plans_smaller_sets_under_each_rule_and_full_once_at_the_recipes_size(
        demo_cache, tmp_path, reference_images, full_rules):
    sets = "experiment.sets=[{label:full,subset:full},{label:250pc,subset:250pc,demo:{subset.images_per_class:2}}]"
    proc = run_ablate("run", sets, "budget=both", "transfer_seeds=1", "plan=true",
                      f"train.reference_images={reference_images}", *tiny_demo_overrides(demo_cache, tmp_path / "runs"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    pre = [(r["set"], r["budget"]) for r in plan_rows(proc.stdout) if r["kind"] == "pretrain"]
    assert sorted(pre) == sorted([("250pc", "same_epochs"), ("250pc", "same_iterations"),
                                  *[("full", rule) for rule in full_rules]])


def test_images_per_class_runs_on_a_demo_of_12_images_per_class_unless_the_command_line_says():
    """The experiment's ``demo:`` settings reach every stage of every set on the demo, before the command line's
    (which win), and nothing on ImageNet."""
    from imnet_ablate import config, experiments, sizing

    exp = config.compose("run", ["experiment=images-per-class"]).experiment
    entry = next(e for e in exp.sets if e.label == "50pc")

    def sized(*command_line: str) -> tuple[int, int]:
        cfg, _ = sizing.compose("pretrain", [*experiments.set_overrides(exp, entry, "demo"), *command_line])
        return cfg.data.demo.train_per_class, cfg.subset.images_per_class

    assert sized() == (12, 1)
    assert sized("data.demo.train_per_class=48") == (48, 2)
    assert experiments.set_overrides(exp, entry, "imagenet") == ["subset=50pc"]


def test_seeds_axes_tie_each_row_to_its_own_pre_training(demo_cache, tmp_path):
    """2 pre-trainings x 2 transfers, with the 1000-way probe: every run's top-1 is its own pre-training's."""
    proc = run_ablate("run", *args(demo_cache, tmp_path, "pretrain_seeds=2", "transfer_seeds=2", "imagenet_probe=true",
                                   "probe.epochs=2", "probe.steps=[1]"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    # pre-trainings, probes, transfers, scratch transfers (a random initialisation per pre-training seed)
    assert stages_line(proc.stdout) == (2 + 2 + 4 + 4, 0)
    runs = pd.read_csv(run_dir_of(proc) / "runs.csv")
    full = runs[runs["set"] == "full"]
    assert sorted(zip(full["pretrain_seed"], full["seed"])) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    tops = {}
    for folder in (tmp_path / "runs" / "pretrain").iterdir():
        seed = int(OmegaConf.load(folder / "config.yaml").seed)
        tops[seed] = json.loads((folder / "metrics.json").read_text())["top1"]
    assert len(tops) == 2 and all(r.pretrain_top1 == tops[int(r.pretrain_seed)] for r in full.itertuples())
    table = [ln for ln in proc.stdout.splitlines() if ln.startswith("| voc-cls | full")][0].split(" | ")
    assert "± std over 2 pre-trainings x 2 transfers" in proc.stdout and table[11] == "2 x 2"
    assert float(table[7].split()[0]) == pytest.approx(sum(tops.values()) / 2, abs=0.05)
    assert table[8] != "-"  # the probe's ImageNet top-1 / top-5


def test_a_task_key_goes_to_every_task_and_task_preset_is_refused(demo_cache, tmp_path):
    """`task.linear.iterations=5` reaches the transfers of both probes (new folders, same pre-trainings); a task
    without the key, a sweep of it, and `task=<preset>` (which would turn every task into one) are one-line errors."""
    common = ["experiment=demo", "transfer_seeds=1", "plan=true", "tasks=[voc-act,sun-cls]",
              *tiny_demo_overrides(demo_cache, tmp_path / "runs")]
    plain, changed = (plan_rows(run_ablate("run", *common, *extra).stdout) for extra in ([], ["task.linear.iterations=5"]))
    assert len(plain) == len(changed) > 0
    for before, after in zip(plain, changed):
        assert (before["folder"] == after["folder"]) == (before["kind"] != "transfer"), (before, after)
    refused = {"tasks=[voc-det,voc-act]": "task.linear.iterations=5: no such key in task voc-det (a task.<key> "
                                          "argument goes to every task of tasks=[voc-det,voc-act])",
               "task=voc-act": "task=voc-act: `ablate run` runs each task of tasks=[...]; choose them with "
                               "tasks=[voc-act]"}
    for extra, message in refused.items():
        proc = run_ablate("run", *common, extra, "task.linear.iterations=5")
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    sweep = run_ablate("run", *common, "-m", "task.linear.iterations=5,6")
    assert sweep.returncode == 2 and "does not sweep a task's keys" in sweep.stderr


@pytest.mark.parametrize("task, settings, message", [
    ("voc-det", ["task.freeze_convs=5"], "task.freeze_convs=5: AlexNet has 4 stages; expected at most 4"),
    ("voc-act", ["task.protocol=finetune", "task.finetune.freeze_convs=5"],
     "task.finetune.freeze_convs=5: AlexNet has 4 stages; expected at most 4"),
    ("voc-cls", ["task.feature=fc9"], "task.feature=fc9: AlexNet has no such layer"),
])
def test_a_task_setting_the_network_cannot_take_fails_before_any_stage(demo_cache, tmp_path, task, settings,
                                                                        message):
    """Checked against each transfer's network while planning: not after the pre-training it waits for, and not
    after its own folder is written (alexnet_small has four convolutions)."""
    proc = run_ablate("run", *tiny_demo_overrides(demo_cache, tmp_path / "runs"), *TINY, "transfer_seeds=1",
                      "imagenet_probe=false", SETS, f"tasks=[{task}]", *settings)
    assert proc.returncode == 2 and message in proc.stderr.strip().splitlines()[-1], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "runs").exists()


def test_experiment_data_settings_are_logged_lose_to_the_command_line_and_a_bad_one_names_its_source(
        demo_cache, tmp_path):
    common = ["experiment=images-per-class", "transfer_seeds=1", "tasks=[voc-act]", "plan=true",
              *tiny_demo_overrides(demo_cache, tmp_path / "runs")]  # data.demo.train_per_class=4
    proc = run_ablate("run", *common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "experiment images-per-class on data=demo: data.demo.train_per_class=12 for every stage" in proc.stderr
    pre = {r["set"]: Path(r["folder"]).name for r in plan_rows(proc.stdout) if r["kind"] == "pretrain"}
    assert pre["500pc"].startswith("500pc-ipc2-") and pre["50pc"].startswith("50pc-ipc1-")  # 4 per class, not 12
    bad = run_ablate("run", *common, "+experiment.demo.nope=1")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1] == \
        "ablate run: error: experiment.demo of experiment images-per-class: Could not override 'nope'."
