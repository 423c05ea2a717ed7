"""``ablate run experiment=<name>``: the stage graph of one of the paper's questions, run until nothing is left.

An experiment (``conf/experiment/<name>.yaml``) lists pre-training sets and transfer tasks. For every budget rule
(``budget``), pre-training seed (``pretrain_seeds``) and set, this module composes the same configs that
``ablate pretrain``, ``ablate probe`` and ``ablate transfer`` would: the set's pre-training, its 1000-way probe
(``imagenet_probe``), and ``transfer_seeds`` transfers per task of that very pre-training (transfer k of
pre-training p: ``pretrain_seed=p seed=k``, the paper's repeated fine-tuning of one network). It finds each stage's
content-hashed folder and runs only the stages whose folder is not DONE: a rerun after Ctrl-C, kill -9 or a lost
node continues where it stopped, and a pre-training shared with another experiment is reused. Independent stages
run in parallel as single-threaded processes (``jobs``), which on a small CPU machine beats one process using every
core.
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
from .store import Stage
from .tasks import task_for

log = logging.getLogger(__name__)

# keys of conf/run.yaml that stages don't have
RUN_ONLY_KEYS = {"experiment", "seeds", "pretrain_seeds", "transfer_seeds", "budget", "imagenet_probe", "jobs", "plan",
                 "tasks"}
TRANSFER_ONLY_KEYS = {"task", "pretrain"}
PROBE_ONLY_KEYS = {"probe"}
SEED_KEYS = {"seed", "pretrain_seed"}  # set per stage from pretrain_seeds / transfer_seeds
BUDGETS = ("same_epochs", "same_iterations")


@dataclass
class Job:
    kind: str  # "pretrain" | "probe" | "transfer"
    label: str  # the pre-training set's label in the experiment
    seed: int  # the stage's own seed: a pre-training's (and its probe's) pretrain seed, a transfer's transfer seed
    cfg: DictConfig  # the composed config of the stage's own command
    stage: Stage
    task: str | None = None
    subset: Stage | None = None
    deps: list[Job] = field(default_factory=list)
    budget: str | None = None  # the budget rule of the table group the job is reported in
    pretrain_seed: int | None = None  # transfers of a pre-trained network: the seed of that pre-training
    probe: Job | None = None  # transfers: the 1000-way probe of their pre-training, if planned
    fine_classes: bool = False  # pre-trainings: on ImageNet's 1000 fine classes (their own top-1 is the 1000-way one)

    @property
    def key(self) -> str:
        return str(self.stage.path)


def user_overrides() -> list[str]:
    """The command line's overrides, minus the keys that belong to ``ablate run`` itself."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return [o for o in HydraConfig.get().overrides.task if _override_key(o) not in RUN_ONLY_KEYS]


def _override_key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0].split(".", 1)[0].split("/", 1)[0]


def _without(overrides: list[str], keys: set[str]) -> list[str]:
    return [o for o in overrides if _override_key(o) not in keys]


def set_overrides(entry: DictConfig, data_name: str) -> list[str]:
    """Overrides that select one pre-training set; ``<data name>:`` entries scale it to that dataset."""
    overrides = [f"subset={entry.subset}"] if entry.get("subset") else []
    scaled = entry.get(data_name) or {}
    return overrides + [f"{k}={v}" for k, v in scaled.items()]


def check_seed_keys(cfg: DictConfig, common: list[str]) -> tuple[int, int]:
    """(pre-trainings per set, transfers of each); 0.1's ``seeds`` and per-stage seeds are one-line errors."""
    if cfg.get("seeds") is not None:
        raise UserError(f"seeds={cfg.seeds}: replaced by pretrain_seeds=N (pre-trainings per set) and "
                        f"transfer_seeds=M (transfers of each); 0.1's seeds={cfg.seeds} was pretrain_seeds={cfg.seeds} "
                        "transfer_seeds=1")
    for override in common:
        if _override_key(override) in SEED_KEYS:
            raise UserError(f"{override}: `ablate run` sets each stage's seed itself (transfer k of pre-training p: "
                            "pretrain_seed=p, seed=k); choose how many with pretrain_seeds=N transfer_seeds=M")
    return int(cfg.pretrain_seeds), int(cfg.transfer_seeds)


def budget_rules(cfg: DictConfig) -> list[str]:
    """The rules the sets are trained under: ``budget`` (default the recipe's ``train.budget``), or both (the
    recipe's first)."""
    chosen = str(cfg.budget)
    if chosen == "both":
        return sorted(BUDGETS, key=lambda rule: rule != str(cfg.train.budget))
    if chosen not in BUDGETS:
        raise UserError(f"budget={chosen}: expected same_epochs, same_iterations or both")
    return [chosen]


def keeps_every_image(subset: DictConfig) -> bool:
    """Every class, every image (labels may be merged): the reference set's size, so both budget rules give it the
    same schedule (up to images a copy lacks) and ``budget=both`` trains it once."""
    return all(subset.get(k) is None for k in ("images_per_class", "classes", "exclude", "budget", "half"))


def fine_classes(subset: DictConfig) -> bool:
    """ImageNet's 1000 fine classes, unmerged: the set's own top-1 is already the paper's 1000-way number."""
    budget = subset.get("budget")
    return (all(subset.get(k) is None for k in ("grouping", "exclude", "half"))
            and subset.get("classes") in (None, 1000) and (budget is None or budget.get("classes") == 1000))


def wants_probes(choice: Any, subsets: list[DictConfig]) -> bool:
    """``imagenet_probe``: true, false, or auto: probe every pre-trained set of an experiment when some of its sets
    are not the 1000 fine classes. All of them: a probe's new last layer, trained to convergence on frozen features,
    is not the same measure as a network's own last layer (on the demo the full set's probe beats its own top-1),
    so the column compares like with like. Experiments of fine classes only show each set's own top-1."""
    return any(not fine_classes(s) for s in subsets) if choice == "auto" else bool(choice)


class Planner:
    """Builds the job list: each pre-training and probe once (``add``); a transfer once per table row, so a stage
    shared by rows (scratch, a set trained once under both rules) has one job per row (``unique`` runs it once)."""

    def __init__(self, cfg: DictConfig):
        self.cfg, self.exp = cfg, cfg.experiment
        common = user_overrides()
        self.pretrain_seeds, self.transfer_seeds = check_seed_keys(cfg, common)
        self.rules = budget_rules(cfg)
        self.pretrain_common = _without(common, TRANSFER_ONLY_KEYS | PROBE_ONLY_KEYS)
        self.probe_common = _without(common, TRANSFER_ONLY_KEYS)
        self.transfer_common = _without(common, PROBE_ONLY_KEYS)
        self.jobs: list[Job] = []
        self.stages: dict[str, Job] = {}
        self.probes = wants_probes(cfg.imagenet_probe, [
            compose("pretrain", [*set_overrides(e, str(cfg.data.name)), *self.exp.get("pretrain_overrides", []),
                                 *self.pretrain_common]).subset
            for e in self.exp.sets if str(e.get("pretrain", "subset")) == "subset"])
        if self.probes:
            from . import probe

            probe.check(cfg.probe)  # before any stage runs

    def add(self, job: Job) -> Job:
        """The job of this stage: the first one planned for it (shared by later sets, rules and seeds)."""
        if job.key not in self.stages:
            self.stages[job.key] = job
            self.jobs.append(job)
        return self.stages[job.key]

    def pretraining(self, entry: DictConfig, chosen: list[str], rule: str, seed: int) -> tuple[Job, list[str]]:
        """The pre-training job of a set (and its probe, when wanted), and the budget override its transfers take."""
        from . import pretrain, probe, subsets

        base = [*chosen, f"seed={seed}", *self.exp.get("pretrain_overrides", [])]
        pcfg = compose("pretrain", [*base, *self.pretrain_common, f"train.budget={rule}"])
        if len(self.rules) > 1 and keeps_every_image(pcfg.subset):
            pcfg.train.budget = rule = self.rules[0]  # the same schedule under both rules: trained once
        budget = [f"train.budget={rule}"]
        job = self.add(Job("pretrain", entry.label, seed, pcfg, pretrain.stage(pcfg), subset=subsets.stage(pcfg),
                           fine_classes=fine_classes(pcfg.subset)))
        if self.probes and job.probe is None:
            qcfg = compose("probe", [*base, *self.probe_common, *budget])
            job.probe = self.add(Job("probe", entry.label, seed, qcfg, probe.stage(qcfg), subset=job.subset,
                                     deps=[job]))
        return job, budget

    def transfers(self, entry: DictConfig, chosen: list[str], rule: str, pre: Job | None, budget: list[str],
                  pretrain_seed: int) -> None:
        """``transfer_seeds`` transfers per task of one network (pre-trained, or scratch for every seed)."""
        from . import transfer

        source = str(entry.get("pretrain", "subset"))
        for seed in range(self.transfer_seeds):
            for task in self.cfg.tasks:
                tcfg = compose("transfer", [*chosen, f"task={task}", f"seed={seed}", f"pretrain_seed={pretrain_seed}",
                                            f"pretrain={source}", *self.exp.get("pretrain_overrides", []),
                                            *self.exp.get("transfer_overrides", []), *self.transfer_common, *budget])
                network = transfer.source_of(tcfg)
                if pre is not None and network.folder != pre.stage.path:
                    raise UserError(f"experiment set {entry.label}: its transfers would start from {network.folder}, "
                                    f"not from the pre-training planned for them ({pre.stage.path}); keys that change "
                                    "the pre-training belong in experiment.pretrain_overrides")
                self.jobs.append(Job("transfer", entry.label, seed, tcfg, transfer.stage_for(tcfg, network, task_for(
                    tcfg.task)), task=task, subset=pre.subset if pre else None, deps=[pre] if pre else [],
                    budget=rule, pretrain_seed=pretrain_seed if pre else None, probe=pre.probe if pre else None))


def plan(cfg: DictConfig) -> list[Job]:
    """Every stage of the experiment, in dependency order, with its folder (nothing is run here): per budget rule,
    pre-training seed p and set, the pre-training (and its 1000-way probe) and ``transfer_seeds`` transfers per task.
    A stage shared by several rows (scratch, a set trained once under both rules) is listed once per table group
    and run once."""
    exp = cfg.experiment
    if not exp.get("sets"):
        raise UserError(f"experiment {exp.get('name')!r} lists no sets (experiment.sets)")
    planner = Planner(cfg)
    data_name = str(cfg.data.name)
    for rule in planner.rules:
        for pretrain_seed in range(planner.pretrain_seeds):
            for entry in exp.sets:
                chosen = set_overrides(entry, data_name)
                pre, budget = None, [f"train.budget={rule}"]
                if str(entry.get("pretrain", "subset")) == "subset":
                    pre, budget = planner.pretraining(entry, chosen, rule, pretrain_seed)
                planner.transfers(entry, chosen, rule, pre, budget, pretrain_seed)
    return planner.jobs


def unique(jobs: list[Job]) -> list[Job]:
    """One job per stage folder, the first planned for it (what to run, time and list)."""
    first: dict[str, Job] = {}
    for job in jobs:
        first.setdefault(job.key, job)
    return list(first.values())


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
    """Each stage once: status, kind, set, budget rule, task, pre-training seed, the stage's seed, folder."""
    jobs = unique(jobs)
    estimates = estimate_seconds(jobs)
    print(f"{'status':<8} {'stage':<9} {'set':<18} {'budget':<16} {'task':<8} {'pre':>3} {'seed':>4}  folder")
    for job in jobs:
        status = "done" if job.stage.is_done() else "todo"
        budget = job.cfg.train.budget if job.kind != "transfer" or job.deps else "-"
        pre = job.seed if job.kind != "transfer" else job.pretrain_seed if job.pretrain_seed is not None else "-"
        print(f"{status:<8} {job.kind:<9} {job.label:<18} {budget:<16} {job.task or '-':<8} {pre:>3} {job.seed:>4}  "
              f"{job.stage.path}")
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
    """Run every stage not DONE, each as soon as its dependencies are; returns (ran, reused)."""
    jobs = unique(jobs)
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

    jobs = plan(cfg)
    if cfg.plan:
        print_plan(jobs)
        return Path(cfg.paths.runs)
    started = time.time()
    ran, reused = execute(jobs, worker_count(cfg))
    print(f"stages: {ran} ran, {reused} reused ({time.time() - started:.0f} s)")
    return tables.write(cfg, jobs)
