"""Sweeps on a real single-node SLURM through ``hydra/launcher=submitit_slurm``: same stage folders and outputs as the
basic launcher, a finished sweep's jobs are no-ops, and a job requeued mid-run (``scontrol requeue``, or SLURM's
time-limit warning SIGUSR2 handled by submitit) resumes from its checkpoint and ends with the weights of an
uninterrupted run.

The cluster (``slurm_cluster.SlurmCluster``: munged, slurmctld, slurmd) is started once per test session. These tests
skip only when the SLURM packages are not installed (``apt-get install -y slurmctld slurmd slurm-client munge``).
"""
from __future__ import annotations

import concurrent.futures as cf
import csv
import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, tiny_demo_overrides, run_ablate
from slurm_cluster import SlurmCluster, missing_reason

pytestmark = pytest.mark.slow

# One CPU, no GPU, a short time limit: what the test node has. Everything else is the shipped config.
SLURM = ["hydra/launcher=submitit_slurm", "hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=1",
         "hydra.launcher.timeout_min=10"]
# alexnet_small on 10 demo classes (40 images), batch 8: 5 iterations per epoch, 100 iterations in ~5 s on one core.
PRETRAIN = ["subset.classes=10", "train.budget=same_iterations", "train.schedule.unit=iteration",
            "train.schedule.length=100", "train.schedule.step_every=50", "train.batch_size=8",
            "train.checkpoint_every=10", "train.log_every=10", "loader.num_workers=0", "device=cpu",
            "train.deterministic=true"]
SWEEP_TIMEOUT = 240


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A running single-node SLURM cluster; SLURM_CONF in ``cluster.env`` points clients and jobs at it."""
    reason = missing_reason()
    if reason:
        pytest.skip(reason)
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install -e '.[slurm]'")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    cluster.start()
    yield cluster
    cluster.stop()


def ablate(cluster: SlurmCluster, *args: str, timeout: float = SWEEP_TIMEOUT) -> subprocess.CompletedProcess:
    """``ablate <args>`` with SLURM_CONF set; on a hang, the jobs' own logs say why."""
    try:
        return run_ablate(*args, env={"SLURM_CONF": str(cluster.conf)}, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"ablate {' '.join(args)} did not finish in {timeout} s; queue: {cluster.jobs()}\n"
                             f"{cluster.logs()}") from e


def job_logs(runs: Path) -> str:
    """Everything the SLURM jobs of this runs root wrote (submitit's per-job stdout/stderr)."""
    return "\n".join(f"--- {p}\n{p.read_text(errors='replace')}" for p in sorted(runs.glob(".submitit/*/*_log.*")))


def check(proc: subprocess.CompletedProcess, runs: Path) -> None:
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}\n{job_logs(runs)}"


def slurm_job_ids(runs: Path) -> set[str]:
    """SLURM ids of the jobs submitted for this runs root. submitit keeps one folder per job holding its pickle:
    ``.submitit/<array>_<task>`` for the jobs of a sweep (plus ``.submitit/<array>`` with the array's sbatch
    script), ``.submitit/<jobid>`` for a one-job sweep (not an array)."""
    return {p.parent.name for p in runs.glob(".submitit/*/*_submitted.pkl")}


def arrays(runs: Path) -> set[str]:
    return {p.parent.name for p in runs.glob(".submitit/*/*_submission.sh")}


def stages(runs: Path) -> list[str]:
    """Finished stage folders, as <kind>/<name>-<hash>."""
    return sorted(str(p.parent.relative_to(runs)) for p in runs.glob("*/*/DONE"))


def content(folder: Path) -> dict[str, object]:
    """A stage's outputs minus what legitimately differs between two runs: time, host, throughput, absolute
    paths of the runs root. Weights compared tensor by tensor."""
    import torch

    out: dict[str, object] = {}
    for name in json.loads((folder / "DONE").read_text())["outputs"]:
        path = folder / name
        if name.endswith(".tsv"):
            out[name] = path.read_text()
        elif name == "model.pt":
            out[name] = {k: v.numpy().tobytes() for k, v in torch.load(path, weights_only=True).items()}
        elif name == "metrics.csv":
            rows = list(csv.DictReader(io.StringIO(path.read_text())))
            out[name] = [{k: v for k, v in row.items() if k != "images_per_s"} for row in rows]
        elif name == "metrics.json":
            out[name] = {k: v for k, v in json.loads(path.read_text()).items() if k not in ("subset_dir",)}
    return out


def launch_both(cluster: SlurmCluster, cache: Path, command: str, args: list[str], basic: Path, on_slurm: Path
                ) -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]:
    """The same sweep with the basic launcher and through SLURM, side by side."""
    with cf.ThreadPoolExecutor(2) as pool:
        a = pool.submit(ablate, cluster, command, "-m", *args, *tiny_demo_overrides(cache, basic))
        b = pool.submit(ablate, cluster, command, "-m", *args, *tiny_demo_overrides(cache, on_slurm), *SLURM)
        return a.result(), b.result()


@pytest.fixture(scope="module")
def pretrain_sweeps(slurm: SlurmCluster, demo_cache: Path, tmp_path_factory) -> tuple[Path, Path]:
    """``ablate pretrain -m subset=full,50pc`` (tiny, deterministic) with the basic launcher and through SLURM.
    Each pre-training builds its subset first, so the sweep makes two subset and two pretrain stages."""
    root = tmp_path_factory.mktemp("pretrain-sweep")
    basic, on_slurm = root / "basic", root / "slurm"
    p_basic, p_slurm = launch_both(slurm, demo_cache, "pretrain", ["subset=full,50pc", *PRETRAIN], basic,
                                   on_slurm)
    check(p_basic, basic)
    check(p_slurm, on_slurm)
    return basic, on_slurm


def test_pretrain_sweep_on_slurm_matches_basic_launcher(pretrain_sweeps: tuple[Path, Path]) -> None:
    basic, on_slurm = pretrain_sweeps
    assert stages(on_slurm) == stages(basic), (stages(basic), stages(on_slurm))
    assert [s.split("/")[0] for s in stages(basic)] == ["pretrain", "pretrain", "subset", "subset"]
    assert len(arrays(on_slurm)) == 1 and len(slurm_job_ids(on_slurm)) == 2, "one sbatch array of 2 jobs"
    for stage in stages(basic):
        assert content(on_slurm / stage) == content(basic / stage), stage
    assert "top1" in content(on_slurm / stages(basic)[0])["metrics.json"]


def test_sweep_of_finished_stages_runs_no_op_jobs(slurm: SlurmCluster, demo_cache: Path,
                                                  pretrain_sweeps: tuple[Path, Path]) -> None:
    """Plain ``ablate pretrain -m`` cannot know before submitting that a stage is done (Hydra composes each job in
    the job), so it submits; every job finds its DONE folder and returns at once, writing nothing."""
    _, on_slurm = pretrain_sweeps
    folders = [on_slurm / s for s in stages(on_slurm)]
    before = {p: p.stat().st_mtime_ns for f in folders for p in f.iterdir()}
    jobs_before = slurm_job_ids(on_slurm)
    started = time.monotonic()
    proc = ablate(slurm, "pretrain", "-m", "subset=full,50pc", *PRETRAIN, *tiny_demo_overrides(demo_cache, on_slurm),
                  *SLURM)
    elapsed = time.monotonic() - started
    check(proc, on_slurm)
    new_jobs = slurm_job_ids(on_slurm) - jobs_before
    assert len(new_jobs) == 2, new_jobs
    after = {p: p.stat().st_mtime_ns for f in folders for p in f.iterdir()}
    assert after == before, "a finished stage was touched"
    new_logs = "".join(p.read_text() for j in new_jobs for p in (on_slurm / ".submitit" / j).glob("*_log.*"))
    assert new_logs.count("already trained") == 2, new_logs
    assert "resuming" not in new_logs and "training " not in new_logs
    print(f"no-op sweep of 2 finished stages on SLURM: {elapsed:.1f} s")


def start_sweep(cluster: SlurmCluster, cache: Path, runs: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "SLURM_CONF": str(cluster.conf)}
    return subprocess.Popen([sys.executable, "-m", "imnet_ablate.cli", "pretrain", "-m", *args,
                             *tiny_demo_overrides(cache, runs), *SLURM], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_requeued_jobs_resume_from_checkpoint(slurm: SlurmCluster, demo_cache: Path,
                                              pretrain_sweeps: tuple[Path, Path], tmp_path: Path) -> None:
    """Two single-job sweeps interrupted mid-run once a checkpoint exists:

    - ``scontrol requeue`` (what preemption does): SLURM sends SIGTERM; pretrain checkpoints at the next step and
      exits; SLURM starts the job again, which resumes from that step.
    - ``scancel --signal=USR2`` (what SLURM sends ``signal_delay_s`` before the time limit): submitit's handler
      requeues the job (``scontrol requeue``) and exits; the job resumes from the last periodic checkpoint.

    Both end with weights bitwise equal to the uninterrupted run of the same config (``pretrain_sweeps``' basic
    launcher, subset=50pc), and neither restarts from iteration 0."""
    basic, _ = pretrain_sweeps
    reference = next(basic / s for s in stages(basic) if s.startswith("pretrain/50pc-"))
    runs = {"requeue": tmp_path / "requeue", "usr2": tmp_path / "usr2"}
    procs = {k: start_sweep(slurm, demo_cache, r, "subset=50pc", *PRETRAIN) for k, r in runs.items()}
    try:
        job_ids: dict[str, str] = {}
        deadline = time.monotonic() + 120
        while len(job_ids) < len(runs):  # interrupt each job as soon as its first checkpoint exists
            assert time.monotonic() < deadline, f"no checkpoint after 120 s; queue {slurm.jobs()}\n" + "\n".join(
                job_logs(r) for r in runs.values())
            for kind, r in runs.items():
                ids = slurm_job_ids(r)
                if kind in job_ids or not ids or not list(r.glob("pretrain/*/checkpoint.pt")):
                    continue
                job_ids[kind] = ids.pop()
                if kind == "requeue":
                    slurm.run("scontrol", "requeue", job_ids[kind])
                else:
                    slurm.run("scancel", "--signal=USR2", job_ids[kind])
            time.sleep(0.1)
        outputs = {k: p.communicate(timeout=SWEEP_TIMEOUT) for k, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    for kind, r in runs.items():
        assert procs[kind].returncode == 0, f"{kind}: {outputs[kind]}\n{job_logs(r)}"
        assert stages(r) == [s for s in stages(basic) if "50pc" in s], stages(r)
        folder = r / next(s for s in stages(r) if s.startswith("pretrain/"))
        log = (folder / "log.txt").read_text()
        resumed = [int(m) for m in re.findall(r"resuming .* with iteration (\d+) of", log)]
        assert resumed and all(it > 0 for it in resumed), f"{kind}: did not resume from a checkpoint\n{log}"
        assert len(re.findall(r"\btraining \S+: \d+ images", log)) == 1, f"{kind}: started over\n{log}"
        assert slurm.job_field(job_ids[kind], "Restarts") == "1", job_ids[kind]
        assert content(folder) == content(reference), f"{kind}: differs from the uninterrupted run"
        if kind == "requeue":  # SIGTERM reached pretrain's handler through srun and submitit
            assert "SIGTERM: checkpointed" in log, log
        else:
            assert "Requeued job" in job_logs(r), job_logs(r)


def test_ddp_job_on_slurm_runs_torchrun_inside_the_job(slurm: SlurmCluster, demo_cache: Path,
                                                       pretrain_sweeps: tuple[Path, Path], tmp_path: Path) -> None:
    """``train.devices=2`` in a SLURM job with 2 CPUs: pretrain relaunches itself under torchrun (2 gloo processes)
    inside the job's step; only rank 0 writes, and the folder has the single-process layout."""
    basic, _ = pretrain_sweeps
    single = next(basic / s for s in stages(basic) if s.startswith("pretrain/50pc-"))
    runs = tmp_path / "ddp"
    proc = ablate(slurm, "pretrain", "-m", "subset=50pc", *PRETRAIN, "train.schedule.length=20", "train.devices=2",
                  *tiny_demo_overrides(demo_cache, runs), *SLURM, "hydra.launcher.cpus_per_task=2")
    check(proc, runs)
    folder = runs / next(s for s in stages(runs) if s.startswith("pretrain/"))
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in single.iterdir())
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["world"] == 2 and metrics["iterations"] == 20
    assert metrics.keys() == json.loads((single / "metrics.json").read_text()).keys()
    header = (folder / "metrics.csv").read_text().splitlines()[0]
    assert header == (single / "metrics.csv").read_text().splitlines()[0]
    log = (folder / "log.txt").read_text()
    assert len(re.findall(r"\btraining \S+: \d+ images", log)) == 1, log  # rank 1 logs nowhere in the folder
    assert "launching 2 processes" in job_logs(runs)
