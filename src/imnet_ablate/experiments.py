"""``ablate run experiment=<name>``: the stage graph of one of the paper's questions, run until nothing is left.

An experiment (``conf/experiment/<name>.yaml``) lists pre-training sets and transfer tasks. For every set x task x
seed this module composes the same configs that ``ablate pretrain`` and ``ablate transfer`` would, finds each
stage's content-hashed folder, and runs only the stages whose folder is not DONE: a rerun after Ctrl-C, kill -9 or
a lost node continues where it stopped, and a pre-training shared with another experiment is reused. Independent
stages run in parallel as single-threaded processes (``jobs``), which on a small CPU machine beats one process
using every core.
"""
from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing as mp
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from .config import compose
from .errors import UserError
from .store import Stage, read_only

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

    @property
    def key(self) -> str:
        return str(self.stage.path)


def user_overrides() -> list[str]:
    """The command line's overrides, minus the keys that belong to ``ablate run`` itself, plus its
    ``hydra.searchpath`` (where a user's own tasks and backbones live)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    overrides = HydraConfig.get().overrides
    return ([o for o in overrides.task if _override_key(o) not in RUN_ONLY_KEYS]
            + [o for o in overrides.hydra if o.startswith("hydra.searchpath=")])


def _override_key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0].split(".", 1)[0].split("/", 1)[0]


def set_overrides(entry: DictConfig, data_name: str) -> list[str]:
    """Overrides that select one pre-training set; ``<data name>:`` entries scale it to that dataset."""
    overrides = [f"subset={entry.subset}"] if entry.get("subset") else []
    scaled = entry.get(data_name) or {}
    return overrides + [f"{k}={v}" for k, v in scaled.items()]


def demo_variant(task: str, cfg: DictConfig) -> str:
    """On the demo data, a task's demo-sized variant ``<task>-demo`` where there is one (the full-size recipe of
    voc-det would take a day on the demo's CPU budget)."""
    from . import conftree, datasets

    variant = f"{task}-demo"
    return variant if datasets.is_demo(cfg) and variant in conftree.presets("task") else task


def stage_config(config_name: str, overrides: list[str]) -> DictConfig:
    """A stage's config as its command would compose it, checked as its command would check it: an experiment's
    own overrides (presets, scaled settings) fail before any stage runs."""
    from .validate import check

    cfg = compose(config_name, overrides)
    check(cfg)
    return cfg


def plan(cfg: DictConfig) -> list[Job]:
    """Every stage of the experiment, in dependency order, with its folder (nothing is run here)."""
    from . import pretrain, subsets, transfer

    exp = cfg.experiment
    if not exp.get("sets"):
        raise UserError(f"experiment {exp.get('name')!r} lists no sets (experiment.sets)")
    if int(cfg.seeds) < 1:
        raise UserError(f"seeds={cfg.seeds}: expected a whole number >= 1")
    common = user_overrides()
    pretrain_common = [o for o in common if _override_key(o) not in TRANSFER_ONLY_KEYS]
    data_name = str(cfg.data.name)
    tasks = [demo_variant(str(t), cfg) for t in cfg.tasks]
    jobs: list[Job] = []
    pretrains: dict[str, Job] = {}
    for seed in range(int(cfg.seeds)):
        for entry in exp.sets:
            chosen = set_overrides(entry, data_name)
            source = str(entry.get("pretrain", "subset"))
            pre_job = None
            if source == "subset":
                pcfg = stage_config("pretrain", [*chosen, f"seed={seed}", *exp.get("pretrain_overrides", []),
                                            *pretrain_common])
                pre_stage = pretrain.stage(pcfg)
                pre_job = pretrains.get(str(pre_stage.path))
                if pre_job is None:
                    pre_job = Job("pretrain", entry.label, seed, pcfg, pre_stage, subset=subsets.stage(pcfg))
                    pretrains[pre_job.key] = pre_job
                    jobs.append(pre_job)
            for task in tasks:
                tcfg = stage_config("transfer", [*chosen, f"task={task}", f"seed={seed}", f"pretrain={source}",
                                            *exp.get("pretrain_overrides", []), *exp.get("transfer_overrides", []),
                                            *common])
                jobs.append(Job("transfer", entry.label, seed, tcfg, transfer.stage(tcfg), task=task,
                                subset=pre_job.subset if pre_job else None, deps=[pre_job] if pre_job else []))
    return jobs


def estimate_seconds(jobs: list[Job]) -> dict[str, float]:
    """Median wall time of the finished stages of each kind (from their stage.json start and DONE time)."""
    durations: dict[str, list[float]] = {}
    for job in jobs:
        if job.stage.is_done() and (seconds := stage_seconds(job.stage)) is not None:
            durations.setdefault(job.kind, []).append(seconds)
    return {kind: statistics.median(values) for kind, values in durations.items()}


def stage_seconds(stage: Stage) -> float | None:
    import json

    try:
        started = json.loads((stage.path / "stage.json").read_text())["provenance"]["created"]
        finished = json.loads((stage.path / "DONE").read_text())["finished"]
        fmt = "%Y-%m-%dT%H:%M:%S%z"
        return time.mktime(time.strptime(finished, fmt)) - time.mktime(time.strptime(started, fmt))
    except (OSError, ValueError, KeyError):
        return None


def print_plan(jobs: list[Job]) -> None:
    estimates = estimate_seconds(jobs)
    print(f"{'status':<8} {'stage':<9} {'set':<18} {'task':<8} {'seed':>4}  folder")
    for job in jobs:
        status = "done" if job.stage.is_done() else "todo"
        print(f"{status:<8} {job.kind:<9} {job.label:<18} {job.task or '-':<8} {job.seed:>4}  {job.stage.path}")
    todo = [j for j in jobs if not j.stage.is_done()]
    guess = sum(estimates.get(j.kind, float("nan")) for j in todo)
    known = ", ".join(f"{k} ~{v:.0f}s" for k, v in sorted(estimates.items())) or "no finished stage to time yet"
    print(f"{len(jobs) - len(todo)} done, {len(todo)} to run; per stage: {known}"
          + (f"; about {guess / 60:.1f} min of stage time left" if todo and guess == guess else ""))


def _run_stage(kind: str, container: dict[str, Any]) -> str:
    """Worker entry: one stage in a single-threaded process."""
    import importlib

    import torch

    torch.set_num_threads(1)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=os.environ.get("ABLATE_LOG_LEVEL", "INFO"), datefmt="%H:%M:%S",
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    module = importlib.import_module(f"imnet_ablate.{kind}")
    return str(module.run(OmegaConf.create(container)))


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
    finished = {j.key for j in jobs if j.stage.is_done()}
    waiting = list(todo)
    running: dict[cf.Future, Job] = {}
    ran = 0
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
        while waiting or running:
            for job in [j for j in waiting if all(d.key in finished for d in j.deps)]:
                if len(running) >= workers:
                    break
                waiting.remove(job)
                log.info("start %s %s %s seed %d", job.kind, job.label, job.task or "", job.seed)
                running[pool.submit(_run_stage, job.kind, OmegaConf.to_container(job.cfg))] = job
            done, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
            for future in done:
                job = running.pop(future)
                future.result()  # a failed stage stops the experiment; finished stages stay DONE
                finished.add(job.key)
                ran += 1
                log.info("done  %s %s %s seed %d -> %s", job.kind, job.label, job.task or "", job.seed,
                         job.stage.path)
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
