"""`ablate run` and `ablate report` on the tiny demo: the whole chain, resumption, missing runs, sweeps."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, run_ablate, run_dir_of, tiny_demo_overrides

pytestmark = pytest.mark.slow

# Pre-trainings of a few seconds: 16 random classes of the tiny demo, 1 epoch.
TINY = ["subset.classes=16", "subset.name=x16", "train.batch_size=16", "train.schedule.length=1",
        "train.schedule.step_every=1", "loader.num_workers=0", "jobs=2"]
SETS = "experiment.sets=[{label:full,subset:full},{label:scratch,subset:full,pretrain:scratch}]"


def args(cache: Path, tmp: Path, *extra: str) -> list[str]:
    return [*tiny_demo_overrides(cache, tmp / "runs"), *TINY, SETS, f"paths.results={tmp / 'results'}", *extra]


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

    again = run_ablate("run", *args(demo_cache, tmp_path))
    assert again.returncode == 0 and stages_line(again.stdout) == (0, 3)

    plan = run_ablate("run", *args(demo_cache, tmp_path, "plan=true"))
    assert plan.returncode == 0 and "3 done, 0 to run" in plan.stdout

    # estimates come from finished stages of the same recipe: seed 1 of the same stages is timed, voc-det is not
    more = run_ablate("run", *args(demo_cache, tmp_path, "plan=true", "seeds=2", "tasks=[voc-cls,voc-det]"))
    assert more.returncode == 0, more.stderr[-3000:]
    todo = {tuple(row.split()[1:5]): row.split()[5] for row in more.stdout.splitlines() if row.startswith("todo ")}
    assert len(todo) == 7 and all(todo[("transfer", s, "voc-det-demo", d)] == "unknown"
                                  for s in ("full", "scratch") for d in "01"), todo
    timed = [("pretrain", "full", "-", "1"), ("transfer", "full", "voc-cls-demo", "1"),
             ("transfer", "scratch", "voc-cls-demo", "1")]
    assert all(re.fullmatch(r"~\d+:\d\d", todo[k]) for k in timed), todo
    assert "3 done, 7 to run; about " in more.stdout and "for 3 of them" in more.stdout and "; 4 unknown" in more.stdout


def test_report_lists_missing_runs_instead_of_failing(demo_cache, tmp_path):
    assert run_ablate("run", *args(demo_cache, tmp_path)).returncode == 0
    report = run_ablate("report", *args(demo_cache, tmp_path, "seeds=2"))  # seed 1 was never run
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
    common = [*tiny_demo_overrides(demo_cache, tmp_path / "runs"), *TINY[:-1]]
    sweep = run_ablate("transfer", "-m", "subset=full,250pc", *common)
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    assert len(list((tmp_path / "runs" / "pretrain").iterdir())) == 2
    assert len([p for p in (tmp_path / "runs" / "transfer").iterdir() if (p / "DONE").exists()]) == 2
    sets = "experiment.sets=[{label:full,subset:full},{label:250pc,subset:250pc}]"
    report = run_ablate("report", *common, sets, f"paths.results={tmp_path / 'results'}")
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
