"""``ablate run experiment=<name>``: the stage graph of one of the paper's questions, run until nothing is left.

An experiment (``conf/experiment/<name>.yaml``) lists pre-training sets and transfer tasks. For every set x task x
seed this module composes the same configs that ``ablate pretrain`` and ``ablate transfer`` would, finds each
stage's content-hashed folder, and runs only the stages whose folder is not DONE: a rerun after Ctrl-C, kill -9 or
a lost node continues where it stopped, and a pre-training shared with another experiment is reused. Independent
stages run in parallel as single-threaded processes (``jobs``), which on a small CPU machine beats one process
using every core; each log line of a stage starts with its tag (``[voc-det-demo full seed 0]``), and its first line
says what runs and how long the plan estimates it, from finished stages of the same recipe.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import multiprocessing as mp
import os
import signal
import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from . import sizing
from .config import app_overrides
from .errors import UserError
from .progress import duration
from .store import Stage, read_only, spec_hash

log = logging.getLogger(__name__)

RUN_ONLY_KEYS = {"experiment", "seeds", "jobs", "plan", "tasks"}  # keys of conf/run.yaml that stages don't have
TRANSFER_ONLY_KEYS = {"task", "pretrain"}


@dataclass
class Job:
    kind: str  # "pretrain" | "transfer"
    label: str  # the pre-training set's label in the experiment
    seed: int
    cfg: DictConfig  # the composed config of the stage's own command
    stage: Stage
    task: str | None = None
    subset: Stage | None = None
    deps: list[Job] = field(default_factory=list)
    estimate: float | None = None  # seconds, from finished stages of the same recipe (None: no such stage yet)

    @property
    def key(self) -> str:
        return str(self.stage.path)

    @property
    def tag(self) -> str:
        """What starts each of its log lines: ``pretrain full seed 0``, ``voc-det-demo full seed 0``."""
        return f"{self.task or self.kind} {self.label} seed {self.seed}"

    def describe(self) -> str:
        if self.kind == "pretrain":
            subset = self.subset.path.name if self.subset is not None else self.cfg.get("subset_dir")
            return f"pre-train {self.cfg.model.name} (train={self.cfg.train.name}) on subset {subset}"
        return f"{self.task} from {self.cfg.pretrain if self.cfg.pretrain != 'subset' else self.deps[0].stage.name}"


def user_overrides() -> list[str]:
    """The command line's overrides, minus the keys that belong to ``ablate run`` itself, plus its
    ``hydra.searchpath`` (where a user's own tasks and backbones live)."""
    return [o for o in app_overrides() if o.startswith("hydra.searchpath=") or _override_key(o) not in RUN_ONLY_KEYS]


def _override_key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0].split(".", 1)[0].split("/", 1)[0]


def set_overrides(entry: DictConfig, data_name: str) -> list[str]:
    """Overrides that select one pre-training set; ``<data name>:`` entries scale it to that dataset."""
    overrides = [f"subset={entry.subset}"] if entry.get("subset") else []
    scaled = entry.get(data_name) or {}
    return overrides + [f"{k}={v}" for k, v in scaled.items()]


def stage_config(config_name: str, overrides: list[str]) -> tuple[DictConfig, sizing.Sizing]:
    """A stage's config as its command would compose it (demo-sized on the demo data) and checked as its command
    would check it: an experiment's own overrides (presets, scaled settings) fail before any stage runs."""
    from .validate import check

    cfg, sized = sizing.compose(config_name, overrides)
    check(cfg)
    return cfg, sized


def plan(cfg: DictConfig) -> list[Job]:
    """Every stage of the experiment, in dependency order, with its folder (nothing is run here). Each stage's
    config is composed as its own command would compose it, demo-sized on the demo data (``sizing``)."""
    from . import pretrain, subsets, transfer

    exp = cfg.experiment
    if not exp.get("sets"):
        raise UserError(f"experiment {exp.get('name')!r} lists no sets (experiment.sets)")
    if int(cfg.seeds) < 1:
        raise UserError(f"seeds={cfg.seeds}: expected a whole number >= 1")
    common = user_overrides()
    pretrain_common = [o for o in common if _override_key(o) not in TRANSFER_ONLY_KEYS]
    data_name = str(cfg.data.name)
    jobs: list[Job] = []
    pretrains: dict[str, Job] = {}
    said: dict[str, None] = {}  # what the demo sizing changed, once each
    for seed in range(int(cfg.seeds)):
        for entry in exp.sets:
            chosen = set_overrides(entry, data_name)
            source = str(entry.get("pretrain", "subset"))
            pre_job = None
            if source == "subset":
                pcfg, sized = stage_config("pretrain", [*chosen, f"seed={seed}",
                                                        *exp.get("pretrain_overrides", []), *pretrain_common])
                said.update(dict.fromkeys(sized.said))
                pre_stage = pretrain.stage(pcfg)
                pre_job = pretrains.get(str(pre_stage.path))
                if pre_job is None:
                    pre_job = Job("pretrain", entry.label, seed, pcfg, pre_stage, subset=subsets.stage(pcfg))
                    pretrains[pre_job.key] = pre_job
                    jobs.append(pre_job)
            for task in cfg.tasks:
                tcfg, sized = stage_config("transfer", [*chosen, f"task={task}", f"seed={seed}",
                                                        f"pretrain={source}", *exp.get("pretrain_overrides", []),
                                                        *exp.get("transfer_overrides", []), *common])
                said.update(dict.fromkeys(sized.said))
                jobs.append(Job("transfer", entry.label, seed, tcfg, transfer.stage(tcfg), task=sized.task,
                                subset=pre_job.subset if pre_job else None, deps=[pre_job] if pre_job else []))
    if said:
        log.info(sizing.note(said))
    return jobs


# -- how long the stages take -------------------------------------------------------------------------------------
def recipe_key(kind: str, spec: Mapping[str, Any], model: Any) -> str:
    """What a stage's run time depends on: its spec without the seed and, for a transfer, without which network
    it starts from (but with that network's ``model`` config). A pre-training's spec holds its subset's hash."""
    kept = {k: v for k, v in spec.items() if k not in ("seed", "pretrain")}
    return spec_hash({"kind": kind, **kept, "timed_model": model})


def stage_seconds(folder: Path) -> float | None:
    """Wall time of a finished stage: from its stage.json to its DONE marker."""
    try:
        started = json.loads((folder / "stage.json").read_text())["provenance"]["created"]
        finished = json.loads((folder / "DONE").read_text())["finished"]
        fmt = "%Y-%m-%dT%H:%M:%S%z"
        return time.mktime(time.strptime(finished, fmt)) - time.mktime(time.strptime(started, fmt))
    except (OSError, ValueError, KeyError):
        return None


def finished_times(runs: Path, kind: str) -> dict[str, list[float]]:
    """Recipe key -> wall times of the finished stages of ``kind`` under ``runs`` (any experiment's)."""
    times: dict[str, list[float]] = {}
    for done in sorted((runs / kind).glob("*/DONE")):
        folder = done.parent
        try:
            spec = json.loads((folder / "stage.json").read_text())["spec"]
            model = OmegaConf.to_container(OmegaConf.load(folder / "config.yaml"), resolve=False).get("model")
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if (seconds := stage_seconds(folder)) is not None:
            times.setdefault(recipe_key(kind, spec, model), []).append(seconds)
    return times


def estimate(jobs: list[Job]) -> None:
    """Each job's ``estimate``: the median time of finished stages of its own recipe; None when there is none (a
    voc-det stage is never timed by a voc-cls one)."""
    times = {kind: finished_times(Path(jobs[0].cfg.paths.runs), kind) for kind in {j.kind for j in jobs}} \
        if jobs else {}
    for job in jobs:
        same = times[job.kind].get(recipe_key(job.kind, job.stage.spec,
                                              OmegaConf.to_container(job.cfg.model, resolve=True)))
        job.estimate = statistics.median(same) if same else None


def shown(seconds: float | None) -> str:
    return "unknown" if seconds is None else f"~{duration(seconds)}"


def print_plan(jobs: list[Job]) -> None:
    estimate(jobs)
    print(f"{'status':<8} {'stage':<9} {'set':<18} {'task':<14} {'seed':>4}  {'estimate':>9}  folder")
    for job in jobs:
        status = "done" if job.stage.is_done() else "todo"
        print(f"{status:<8} {job.kind:<9} {job.label:<18} {job.task or '-':<14} {job.seed:>4}  "
              f"{shown(job.estimate) if status == 'todo' else '-':>9}  {job.stage.path}")
    todo = [j for j in jobs if not j.stage.is_done()]
    timed = [j.estimate for j in todo if j.estimate is not None]
    line = f"{len(jobs) - len(todo)} done, {len(todo)} to run"
    if timed:
        line += f"; about {duration(sum(timed))} of stage time for {len(timed)} of them (h:mm:ss)"
    if len(timed) < len(todo):
        line += f"; {len(todo) - len(timed)} unknown (no finished stage of their recipe yet)"
    print(line)


# -- running ------------------------------------------------------------------------------------------------------
def _idle_worker() -> None:
    """A Ctrl-C reaches every process of the terminal: an idle worker leaves it to the parent and the stages."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _run_stage(kind: str, container: dict[str, Any], tag: str, bars: bool) -> str:
    """Worker entry: one stage (Ctrl-C reaches it from the first line on) in a single-threaded process."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        import importlib

        return str(importlib.import_module(f"imnet_ablate.{kind}").run(_worker_config(container, tag, bars)))
    finally:
        _idle_worker()


def _worker_config(container: dict[str, Any], tag: str, bars: bool) -> DictConfig:
    """One thread, log lines tagged with the stage, progress bars only when it is the only worker (bars of
    parallel processes would overwrite each other)."""
    import torch

    from . import progress

    torch.set_num_threads(1)
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=os.environ.get("ABLATE_LOG_LEVEL", "INFO"))
    for handler in root.handlers:
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s [{tag.replace('%', '%%')}] %(name)s: "
                                               "%(message)s", "%H:%M:%S"))
    progress.configure(container.get("progress", "auto") if bars else False, tag)
    return OmegaConf.create(container)


def worker_count(cfg: DictConfig) -> int:
    if str(cfg.jobs) != "auto":
        return max(1, int(cfg.jobs))
    import torch

    return 1 if torch.cuda.is_available() else max(1, os.cpu_count() or 1)


def execute(jobs: list[Job], workers: int) -> tuple[int, int]:
    """Run every job not DONE, each as soon as its dependencies are; returns (ran, reused)."""
    todo = [j for j in jobs if not j.stage.is_done()]
    reused = len(jobs) - len(todo)
    if not todo:
        return 0, reused
    estimate(jobs)
    finished = {j.key for j in jobs if j.stage.is_done()}
    waiting = list(todo)
    running: dict[cf.Future, Job] = {}
    ran = 0
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                                initializer=_idle_worker) as pool:
        while waiting or running:
            for job in [j for j in waiting if all(d.key in finished for d in j.deps)]:
                if len(running) >= workers:
                    break
                waiting.remove(job)
                log.info("[%s] start: %s -> %s; the plan estimates %s", job.tag, job.describe(), job.stage.path,
                         "it " + shown(job.estimate) if job.estimate is not None else "no time (none of its recipe "
                         "has finished yet)")
                running[pool.submit(_run_stage, job.kind, OmegaConf.to_container(job.cfg), job.tag,
                                    workers == 1)] = job
            done, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
            for future in done:
                job = running.pop(future)
                future.result()  # a failed stage stops the experiment; finished stages stay DONE
                finished.add(job.key)
                ran += 1
                log.info("[%s] done -> %s", job.tag, job.stage.path)
    return ran, reused


def report(cfg: DictConfig) -> Path:
    """``ablate report experiment=<name>``: tables and plots from whatever has finished (planned as ``run`` does,
    so the two never disagree on where a result lives)."""
    from . import report as tables

    return tables.write(cfg, plan(cfg))


def run(cfg: DictConfig) -> Path:
    from . import report as tables

    if cfg.plan:  # the same lookups as a run, and nothing written
        with read_only():
            print_plan(plan(cfg))
        return Path(cfg.paths.runs)
    jobs = plan(cfg)
    started = time.time()
    ran, reused = execute(jobs, worker_count(cfg))
    print(f"stages: {ran} ran, {reused} reused ({time.time() - started:.0f} s)")
    return tables.write(cfg, jobs)
