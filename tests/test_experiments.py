"""`ablate run` and `ablate report` on the tiny demo: the whole chain, resumption, missing runs, sweeps."""
from __future__ import annotations

import os
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
        "train.schedule.step_every=1", "loader.num_workers=0"]
RUN = ["jobs=2", "transfer_seeds=1", "imagenet_probe=false"]  # one transfer per network, no 1000-way probe
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
