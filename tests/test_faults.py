"""Fault injection on the tiny demo (CPU): kill -9 at seeded random points, concurrent runs, a full disk, an
unwritable runs folder and out-of-range config values. Every interrupted command is rerun until it finishes; its
outputs must equal those of an uninterrupted run and no stage may finish twice (its DONE marker, once written,
never changes). ``FAULTS`` collects the counts that docs/reliability.md records.
"""
from __future__ import annotations

import csv
import fcntl
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from conftest import REPO, run_ablate, tiny_demo_overrides, tiny_recipe

pytestmark = pytest.mark.slow

KILLS_PER_COMMAND = 10
SEED = 20261126
# A pre-training of a few seconds: 16 random classes x 4 images, 2 epochs of 4 steps, a checkpoint every step.
SUBSET = ["subset.classes=16", "subset.name=fi16"]
TINY = [*SUBSET, *tiny_recipe(epochs=2), "train.deterministic=true", "train.checkpoint_every=1"]
# Fine-tuning (not the cheap linear probe) so that transfer's own checkpoints are resumed.
FINETUNE = ["task=voc-cls-demo", "task.protocol=finetune", "task.finetune.iterations=12",
            "task.finetune.batch_size=16", "task.finetune.checkpoint_every=2", "task.finetune.optimizer.steps=[8]"]
SETS = "experiment.sets=[{label:full,subset:full},{label:scratch,subset:full,pretrain:scratch}]"
# The paper's three tasks, detection at 100 iterations (tests/conf/task/voc-det-short.yaml) so each rerun takes seconds.
SHORT_DETECTION = [f"hydra.searchpath=[file://{Path(__file__).parent / 'conf'}]",
                   "tasks=[voc-det-short,voc-act,sun-cls]"]
FAULTS: dict[str, dict[str, int]] = {}


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def start(args: list[str], log: Path, preexec=None) -> subprocess.Popen:
    """``ablate <args>`` in its own session, so one killpg reaches its workers too."""
    out = open(log, "ab")
    return subprocess.Popen([sys.executable, "-m", "imnet_ablate.cli", *args], cwd=REPO, env=child_env(),
                            stdout=out, stderr=out, start_new_session=True, preexec_fn=preexec)


def kill_after(proc: subprocess.Popen, delay: float) -> bool:
    """SIGKILL the process group after ``delay`` s unless it exits first; True when the kill happened."""
    try:
        proc.wait(timeout=delay)
        return False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return True


@dataclass
class DoneWatch:
    """The first-seen content of every DONE marker under a runs folder; a changed one means a stage finished
    twice (or was rewritten), which no rerun may do."""

    runs: Path
    seen: dict[Path, str] = field(default_factory=dict)

    def check(self) -> None:
        for marker in self.runs.rglob("DONE"):
            text = marker.read_text()
            assert self.seen.setdefault(marker, text) == text, f"{marker.parent} finished twice"

    def forget(self, folder: Path) -> None:
        self.seen = {m: t for m, t in self.seen.items() if not m.is_relative_to(folder)}


# -- comparing outputs with the uninterrupted run -----------------------------------------------------------------
def stage_dir(runs: Path, kind: str) -> Path:
    found = sorted(p for p in (runs / kind).iterdir() if p.is_dir())
    assert len(found) == 1, found
    return found[0]


def done_sums(folder: Path, names: list[str]) -> dict[str, str]:
    outputs = json.loads((folder / "DONE").read_text())["outputs"]
    return {n: outputs[n]["sha256"] for n in names}


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def metrics_rows(path: Path) -> list[dict[str, str]]:
    """metrics.csv without its timing column."""
    with open(path) as f:
        return [{k: v for k, v in row.items() if k != "images_per_s"} for row in csv.DictReader(f)]


def json_without(path: Path, *keys: str) -> dict:
    return {k: v for k, v in json.loads(path.read_text()).items() if k not in keys}


def assert_same_subset(a: Path, b: Path) -> None:
    names = ["train.tsv", "val.tsv", "classes.tsv"]
    assert a.name == b.name and done_sums(a, names) == done_sums(b, names)


def assert_same_pretrain(a: Path, b: Path) -> None:
    assert a.name == b.name
    assert_same_weights(a / "model.pt", b / "model.pt")
    assert metrics_rows(a / "metrics.csv") == metrics_rows(b / "metrics.csv")
    assert json_without(a / "metrics.json", "subset_dir") == json_without(b / "metrics.json", "subset_dir")


def assert_same_transfer(a: Path, b: Path) -> None:
    assert a.name == b.name
    assert json_without(a / "metrics.json", "seconds") == json_without(b / "metrics.json", "seconds")
    # the task's scored outputs (devkit results files: voc-cls's results/, voc-det's detections/, ...)
    outputs = [n for n in json.loads((a / "DONE").read_text())["outputs"] if "/" in n]
    assert outputs and done_sums(a, outputs) == done_sums(b, outputs)


def assert_same_runs(a: Path, b: Path) -> None:
    for kind, same in (("subset", assert_same_subset), ("pretrain", assert_same_pretrain),
                       ("transfer", assert_same_transfer)):
        fa, fb = sorted((a / kind).iterdir()), sorted((b / kind).iterdir())
        assert [p.name for p in fa] == [p.name for p in fb], kind
        for x, y in zip(fa, fb):
            same(x, y)


# -- the campaign -------------------------------------------------------------------------------------------------
@dataclass
class Campaign:
    """Kill ``args`` at ``kills`` seeded random points in [0, typical] s, rerunning after each; every time a run
    completes, its outputs are compared with the uninterrupted run and the stage is removed to be faulted again."""

    name: str
    args: list[str]
    runs: Path
    typical: float
    compare: Callable[[Path], None]
    restart: Callable[[Path], Path]  # removes what a completed run wrote, so the next kills hit real work again

    def run(self, kills: int, log: Path) -> dict[str, int]:
        rng, watch = random.Random(f"{SEED}:{self.name}"), DoneWatch(self.runs)
        counts = {"injected": 0, "completed": 0, "survived": 0, "data_lost": 0}
        typical, fresh = self.typical, True  # fresh: this run starts from nothing (not resuming a killed one)
        while counts["injected"] < kills:
            t0 = time.perf_counter()
            proc = start(self.args, log)
            if kill_after(proc, rng.uniform(0, typical)):
                counts["injected"] += 1
                fresh = False
                watch.check()
                continue
            assert proc.returncode == 0, log.read_text()[-3000:]
            if fresh:  # the machine got faster than when `typical` was measured: kill within this run's time
                typical = min(typical, time.perf_counter() - t0)
            watch.check()
            self.compare(self.runs)
            counts["completed"] += 1
            watch.forget(self.restart(self.runs))
            fresh = True
        final = start(self.args, log)  # the rerun after the last kill finishes the work
        assert final.wait() == 0, log.read_text()[-3000:]
        watch.check()
        self.compare(self.runs)
        again = start(self.args, log)  # and one more finds it finished: nothing runs twice
        assert again.wait() == 0
        watch.check()
        counts["survived"] = counts["injected"]
        counts["stale_locks_taken_over"] = log.read_text().count("taking over stale lock")
        return counts


@pytest.fixture(scope="module")
def tiny(demo_cache: Path, tmp_path_factory) -> dict:
    """Uninterrupted reference runs of each command, and how long each took here."""
    base = tmp_path_factory.mktemp("reference")
    over = tiny_demo_overrides(demo_cache, base / "runs")
    times = {}
    for name, args in (("subset", ["subset", *over, *SUBSET]), ("pretrain", ["pretrain", *over, *TINY]),
                       ("transfer", ["transfer", *over, *TINY, *FINETUNE])):
        t0 = time.perf_counter()
        proc = run_ablate(*args)
        assert proc.returncode == 0, proc.stderr
        times[name] = time.perf_counter() - t0
    return {"cache": demo_cache, "runs": base / "runs", "times": times}


def overrides(tiny: dict, runs: Path, extra: list[str] = TINY) -> list[str]:
    return tiny_demo_overrides(tiny["cache"], runs) + extra


def copy_stages(src: Path, dst: Path, *kinds: str) -> None:
    for kind in kinds:
        shutil.copytree(src / kind, dst / kind)


def redo(kind: str) -> Callable[[Path], Path]:
    """A campaign's restart: remove the finished stage of ``kind`` so the next kill hits real work again."""
    def restart(runs: Path) -> Path:
        shutil.rmtree(runs / kind)
        return runs / kind
    return restart


def test_kill_subset(tiny: dict, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    ref = stage_dir(tiny["runs"], "subset")

    c = Campaign("subset", ["subset", *overrides(tiny, runs, SUBSET)], runs, tiny["times"]["subset"],
                 lambda r: assert_same_subset(ref, stage_dir(r, "subset")), redo("subset"))
    FAULTS["subset"] = c.run(KILLS_PER_COMMAND, tmp_path / "log.txt")


def test_kill_pretrain(tiny: dict, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    ref = stage_dir(tiny["runs"], "pretrain")

    c = Campaign("pretrain", ["pretrain", *overrides(tiny, runs)], runs, tiny["times"]["pretrain"],
                 lambda r: assert_same_pretrain(ref, stage_dir(r, "pretrain")), redo("pretrain"))
    FAULTS["pretrain"] = c.run(KILLS_PER_COMMAND, tmp_path / "log.txt")
    assert_same_subset(stage_dir(tiny["runs"], "subset"), stage_dir(runs, "subset"))


def test_kill_transfer(tiny: dict, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    copy_stages(tiny["runs"], runs, "subset", "pretrain")  # a shared, finished pre-training
    ref = stage_dir(tiny["runs"], "transfer")

    c = Campaign("transfer", ["transfer", *overrides(tiny, runs), *FINETUNE], runs, tiny["times"]["transfer"],
                 lambda r: assert_same_transfer(ref, stage_dir(r, "transfer")), redo("transfer"))
    FAULTS["transfer"] = c.run(KILLS_PER_COMMAND, tmp_path / "log.txt")


def test_kill_run(tiny: dict, tmp_path: Path) -> None:
    def args(runs: Path, results: Path) -> list[str]:
        return ["run", *overrides(tiny, runs, TINY), SETS, "jobs=2", "transfer_seeds=1", "imagenet_probe=false",
                f"paths.results={results}", *SHORT_DETECTION]

    reference = tmp_path / "reference"
    t0 = time.perf_counter()
    proc = run_ablate(*args(reference, tmp_path / "ref-results"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    typical = time.perf_counter() - t0

    def restart(r: Path) -> Path:
        shutil.rmtree(r)
        return r

    runs = tmp_path / "runs"
    c = Campaign("run", args(runs, tmp_path / "results"), runs, typical,
                 lambda r: assert_same_runs(reference, r), restart)
    FAULTS["run"] = c.run(KILLS_PER_COMMAND, tmp_path / "log.txt")


def test_two_concurrent_runs_do_the_work_once(tiny: dict, tmp_path: Path) -> None:
    """Both processes reach the pre-training while its lock is held (here by the test, so that they meet even when a
    loaded machine starts the second after the first would have finished); once it is free, one trains, the other
    waits for it and reuses its result."""
    runs = tmp_path / "runs"
    folder = runs / "pretrain" / stage_dir(tiny["runs"], "pretrain").name  # the same config: the same folder
    folder.mkdir(parents=True)
    logs = [tmp_path / "a.txt", tmp_path / "b.txt"]
    held = os.open(folder / "LOCK", os.O_CREAT | os.O_RDWR, 0o644)
    fcntl.flock(held, fcntl.LOCK_EX)
    procs = [start(["pretrain", *overrides(tiny, runs)], log) for log in logs]
    deadline = time.time() + 600
    while not all("waiting for" in log.read_text() for log in logs) and time.time() < deadline:
        assert all(p.poll() is None for p in procs), [log.read_text()[-2000:] for log in logs]
        time.sleep(0.2)
    os.close(held)  # releases the flock
    assert [p.wait(timeout=600) for p in procs] == [0, 0], [log.read_text()[-2000:] for log in logs]
    outs = [log.read_text() for log in logs]
    assert all("waiting for" in o for o in outs)
    assert len({o.strip().splitlines()[-1] for o in outs}) == 1 and str(folder) in outs[0]  # the same run_dir
    assert (folder / "log.txt").read_text().count("training ") == 1  # one process trained, from the start
    assert not (folder / "LOCK").exists()
    assert_same_pretrain(stage_dir(tiny["runs"], "pretrain"), folder)
    FAULTS["concurrent"] = {"injected": 1, "survived": 1, "data_lost": 0}


def file_limit(n_bytes: int):
    """preexec_fn: writes past ``n_bytes`` fail with EFBIG (a full disk, as seen by one process; works as root)."""
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, n_bytes))
    return apply


def test_disk_full_keeps_the_last_good_checkpoint(tiny: dict, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    copy_stages(tiny["runs"], runs, "subset")
    args = ["pretrain", *overrides(tiny, runs)]
    proc = start(args, tmp_path / "first.txt")
    ckpt = runs / "pretrain"
    deadline = time.time() + 600
    while not list(ckpt.glob("*/checkpoint.pt")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    ckpt = stage_dir(runs, "pretrain") / "checkpoint.pt"
    good = ckpt.read_bytes()
    limit = len(good) // 2  # room for every small file, not for a checkpoint

    full = start(args, tmp_path / "full.txt", preexec=file_limit(limit))
    assert full.wait(timeout=600) == 2, (tmp_path / "full.txt").read_text()[-3000:]
    last = (tmp_path / "full.txt").read_text().strip().splitlines()[-1]
    assert "checkpoint.pt" in last and "File too large" in last and "Traceback" not in last
    assert ckpt.read_bytes() == good and torch.load(ckpt, weights_only=True)["stage_hash"]
    assert not list(ckpt.parent.glob(".*.tmp")) and not (ckpt.parent / "DONE").exists()

    assert start(args, tmp_path / "after.txt").wait(timeout=600) == 0
    assert_same_pretrain(stage_dir(tiny["runs"], "pretrain"), ckpt.parent)
    FAULTS["disk_full"] = {"injected": 1, "survived": 1, "data_lost": 0}


def test_unwritable_runs_folder_is_one_line_exit_2(tiny: dict, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder\n")
    proc = run_ablate("subset", *overrides(tiny, blocker / "runs", SUBSET))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert str(blocker) in proc.stderr.strip().splitlines()[-1]


# (command, override, the words the one-line error must contain); out-of-range values must fail before any work
RANGE_CASES = [
    ("subset", "subset.images_per_class=0", ["subset.images_per_class=0", "expected null or an integer >= 1"]),
    ("subset", "subset.classes=-4", ["subset.classes=-4", "expected"]),
    ("run", "transfer_seeds=0", ["seeds=0", "expected an integer >= 1"]),
    ("data check", "check.workers=0", ["check.workers=0", "expected 'auto' or an integer >= 1"]),
    ("pretrain", "train.batch_size=0", ["train.batch_size=0", "expected an integer >= 1"]),
    ("pretrain", "train.optimizer.lr=-1", ["train.optimizer.lr=-1", "expected a number in (0, inf)"]),
    ("pretrain", "loader.num_workers=-2", ["loader.num_workers=-2", "expected 'auto' or an integer >= 0"]),
    ("transfer", "task.linear.iterations=-5", ["task.linear.iterations=-5", "expected an integer >= 1"]),
]


@pytest.mark.parametrize("command, override, words", RANGE_CASES)
def test_out_of_range_config_exit_2(tiny: dict, tmp_path: Path, command: str, override: str,
                                    words: list[str]) -> None:
    extra = {"subset": SUBSET, "run": [], "data check": [], "pretrain": [], "transfer": []}[command]
    proc = run_ablate(*command.split(), *overrides(tiny, tmp_path / "runs", extra), override)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert all(w in last for w in words), last
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("DONE"))


@pytest.fixture(scope="module", autouse=True)
def record_counts() -> Iterator[None]:
    """After the module's tests, whichever of them ran: the counts docs/reliability.md quotes (printed with -s, and
    written to $ABLATE_FAULT_COUNTS when set); no fault may lose data or go unsurvived."""
    yield
    if not FAULTS:  # none of the campaigns was selected: nothing to record
        return
    total = {k: sum(c.get(k, 0) for c in FAULTS.values()) for k in ("injected", "survived", "data_lost")}
    text = json.dumps({"per_command": FAULTS, "total": total}, indent=2)
    print(text)
    out = os.environ.get("ABLATE_FAULT_COUNTS")
    if out:
        Path(out).write_text(text + "\n")
    assert total["data_lost"] == 0 and total["survived"] == total["injected"]
