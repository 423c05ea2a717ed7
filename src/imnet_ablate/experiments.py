"""``ablate run experiment=<name>``: the stage graph of one of the paper's questions, run until nothing is left.

An experiment (``conf/experiment/<name>.yaml``) lists pre-training sets and transfer tasks. For every budget rule
(``budget``), pre-training seed (``pretrain_seeds``) and set, this module composes the same configs that
``ablate pretrain``, ``ablate probe`` and ``ablate transfer`` would (demo-sized on the demo data): the set's
pre-training, its 1000-way probe (``imagenet_probe``), and ``transfer_seeds`` transfers per task of that very
pre-training (transfer k of pre-training p: ``pretrain_seed=p seed=k``, the paper's repeated fine-tuning of one
network). It finds each stage's content-hashed folder and runs only the stages whose folder is not DONE: a rerun
after Ctrl-C, kill -9 or a lost node continues where it stopped, and a pre-training shared with another experiment
is reused. Independent stages run in parallel as single-threaded processes (``jobs``), which on a small CPU machine
beats one process using every core; each log line of a stage starts with its tag (``[voc-det-demo full seed 0]``),
and its first line says what runs and how long the plan estimates it, from finished stages of the same recipe.
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

from . import cpus, sizing
from .config import app_overrides
from .errors import UserError
from .progress import duration
from .store import Stage, read_only, spec_hash
from .tasks import task_for

log = logging.getLogger(__name__)

# keys of conf/run.yaml that stages don't have
RUN_ONLY_KEYS = {"experiment", "seeds", "pretrain_seeds", "transfer_seeds", "budget", "imagenet_probe", "jobs", "plan",
                 "tasks", "task_overrides"}
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
    task: str | None = None  # transfers: the task preset that runs (voc-det-demo on the demo)
    subset: Stage | None = None
    deps: list[Job] = field(default_factory=list)
    budget: str | None = None  # the budget rule of the table group the job is reported in
    pretrain_seed: int | None = None  # transfers of a pre-trained network: the seed of that pre-training
    probe: Job | None = None  # transfers: the 1000-way probe of their pre-training, if planned
    fine_classes: bool = False  # pre-trainings: on ImageNet's 1000 fine classes (their own top-1 is the 1000-way one)
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
        if self.kind == "probe":
            return f"1000-way probe of {self.deps[0].stage.name}"
        return f"{self.task} from {self.cfg.pretrain if self.cfg.pretrain != 'subset' else self.deps[0].stage.name}"


def user_overrides() -> list[str]:
    """The command line's overrides, minus the keys that belong to ``ablate run`` itself, plus its
    ``hydra.searchpath`` (where a user's own tasks and backbones live)."""
    return [o for o in app_overrides() if o.startswith("hydra.searchpath=") or _override_key(o) not in RUN_ONLY_KEYS]


def _override_key_path(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def _override_key(override: str) -> str:
    return _override_key_path(override).split(".", 1)[0].split("/", 1)[0]


def _without(overrides: list[str], keys: set[str]) -> list[str]:
    return [o for o in overrides if _override_key(o) not in keys]


def as_overrides(settings: Mapping[str, Any] | None) -> list[str]:
    """``{key: value}`` settings of an experiment file as ``key=value`` overrides."""
    return [f"{k}={v}" for k, v in (settings or {}).items()]


def data_overrides(exp: DictConfig, data_name: str) -> list[str]:
    """The experiment's ``<data name>:`` settings: what it changes on that dataset for every stage of every set
    (images-per-class on the demo: a demo generated with 12 images per class)."""
    return as_overrides(exp.get(data_name))


def set_overrides(exp: DictConfig, entry: DictConfig, data_name: str) -> list[str]:
    """Overrides that select one pre-training set: the experiment's ``<data name>:`` settings, then the set's
    subset and its own ``<data name>:`` entries (which scale it to that dataset, and win)."""
    overrides = [f"subset={entry.subset}"] if entry.get("subset") else []
    return [*data_overrides(exp, data_name), *overrides, *as_overrides(entry.get(data_name))]


def stage_config(config_name: str, overrides: list[str]) -> tuple[DictConfig, sizing.Sizing]:
    """A stage's config as its command would compose it (demo-sized on the demo data) and checked as its command
    would check it: an experiment's own overrides (presets, scaled settings) fail before any stage runs."""
    from .validate import check

    cfg, sized = sizing.compose(config_name, overrides)
    check(cfg)
    return cfg, sized


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
    """Every class, every image (labels may be merged)."""
    return all(subset.get(k) is None for k in ("images_per_class", "classes", "exclude", "budget", "half"))


def one_schedule(pcfg: DictConfig) -> bool:
    """Whether both budget rules give this pre-training the same schedule, so ``budget=both`` trains it once: a set
    that keeps every image of a training set the recipe's size (``train.reference_images``). A real copy is taken
    to be ImageNet's (up to images it lacks); the demo's size follows from its settings, and a demo generated with
    fewer images than the recipe's reference (images-per-class's 12 per class under train=demo's 48,000) gets fewer
    iterations under same_epochs."""
    return keeps_every_image(pcfg.subset) and \
        sizing.demo_train_images(pcfg) in (None, int(pcfg.train.reference_images))


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
        self.said: dict[str, None] = {}  # what the demo sizing changed, once each
        self.check_task_keys()
        self.check_data_overrides()
        self.probes = wants_probes(cfg.imagenet_probe, [
            self.compose("pretrain", [*set_overrides(self.exp, e, str(cfg.data.name)),
                                      *self.exp.get("pretrain_overrides", []),
                                      *self.pretrain_common])[0].subset
            for e in self.exp.sets if str(e.get("pretrain", "subset")) == "subset"])
        if self.probes:
            from . import probe

            probe.check(cfg.probe)  # before any stage runs

    def check_data_overrides(self) -> None:
        """The experiment's ``<data name>:`` settings compose into a pre-training (a bad one is an error naming
        where it came from, before any stage runs), and the log says what they change."""
        data_name = str(self.cfg.data.name)
        if not (shared := data_overrides(self.exp, data_name)):
            return
        try:
            self.compose("pretrain", [*shared, *self.pretrain_common])
        except UserError as e:
            raise UserError(f"experiment.{data_name} of experiment {self.exp.get('name')}: {e}") from e
        log.info(f"experiment {self.exp.get('name')} on data={data_name}: {' '.join(shared)} for every stage "
                 f"(experiment.{data_name}; the command line's own settings win)")

    def check_task_keys(self) -> None:
        """Each ``task.<key>=`` argument names a key of every task it goes to (one line naming the task that lacks it,
        before any stage runs), instead of Hydra's "Could not override" from the first transfer that cannot take it."""
        from .overrides import has_key, key_hint

        for task in self.cfg.tasks if self.cfg.task_overrides else []:
            tcfg, _ = self.compose("transfer", [*self.transfer_common, f"task={task}"])
            for text in self.cfg.task_overrides:
                key = _override_key_path(text)
                if not has_key(tcfg, key):
                    raise UserError(f"{text}: no such key in task {task} (a task.<key> argument goes to every task "
                                    f"of tasks=[{','.join(self.cfg.tasks)}]){key_hint(key, tcfg, [])}")

    def compose(self, config_name: str, overrides: list[str]) -> tuple[DictConfig, sizing.Sizing]:
        cfg, sized = stage_config(config_name, overrides)
        self.said.update(dict.fromkeys(sized.said))
        return cfg, sized

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
        pcfg, _ = self.compose("pretrain", [*base, *self.pretrain_common, f"train.budget={rule}"])
        if len(self.rules) > 1 and one_schedule(pcfg):
            pcfg.train.budget = rule = self.rules[0]  # the same schedule under both rules: trained once
        budget = [f"train.budget={rule}"]
        job = self.add(Job("pretrain", entry.label, seed, pcfg, pretrain.stage(pcfg), subset=subsets.stage(pcfg),
                           fine_classes=fine_classes(pcfg.subset)))
        if self.probes and job.probe is None:
            qcfg, _ = self.compose("probe", [*base, *self.probe_common, *budget])
            job.probe = self.add(Job("probe", entry.label, seed, qcfg, probe.stage(qcfg), subset=job.subset,
                                     deps=[job]))
        return job, budget

    def transfers(self, entry: DictConfig, chosen: list[str], rule: str, pre: Job | None, budget: list[str],
                  pretrain_seed: int) -> None:
        """``transfer_seeds`` transfers per task of one network. A scratch set's random initialisation is its
        pre-training, so pre-training seed p draws its own: transfer seeds p*T .. p*T+T-1 (T = transfer_seeds)."""
        from . import transfer

        source = str(entry.get("pretrain", "subset"))
        first = pretrain_seed * self.transfer_seeds if source == "scratch" else 0
        for seed in range(first, first + self.transfer_seeds):
            for task in self.cfg.tasks:
                tcfg, sized = self.compose("transfer", [
                    *chosen, f"task={task}", f"seed={seed}", f"pretrain_seed={pretrain_seed}", f"pretrain={source}",
                    *self.exp.get("pretrain_overrides", []), *self.exp.get("transfer_overrides", []),
                    *self.transfer_common, *budget, *self.cfg.task_overrides])
                network = transfer.source_of(tcfg)
                if pre is not None and network.folder != pre.stage.path:
                    raise UserError(f"experiment set {entry.label}: its transfers would start from {network.folder}, "
                                    f"not from the pre-training planned for them ({pre.stage.path}); keys that change "
                                    "the pre-training belong in experiment.pretrain_overrides")
                task_of = task_for(tcfg.task)
                transfer.check_network(tcfg, network, task_of)  # fails here, not after the pre-training it waits for
                self.jobs.append(Job("transfer", entry.label, seed, tcfg, transfer.stage_for(tcfg, network, task_of),
                                     task=sized.task, subset=pre.subset if pre else None, deps=[pre] if pre else [],
                                     budget=rule, pretrain_seed=pretrain_seed if pre else None,
                                     probe=pre.probe if pre else None))


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
                chosen = set_overrides(exp, entry, data_name)
                pre, budget = None, [f"train.budget={rule}"]
                if str(entry.get("pretrain", "subset")) == "subset":
                    pre, budget = planner.pretraining(entry, chosen, rule, pretrain_seed)
                planner.transfers(entry, chosen, rule, pre, budget, pretrain_seed)
    if planner.said:
        log.info(sizing.note(planner.said))
    return planner.jobs


def unique(jobs: list[Job]) -> list[Job]:
    """One job per stage folder, the first planned for it (what to run, time and list)."""
    first: dict[str, Job] = {}
    for job in jobs:
        first.setdefault(job.key, job)
    return list(first.values())


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
    """Each stage once: status, kind, set, budget rule, task, pre-training seed, the stage's seed, the estimate,
    folder."""
    jobs = unique(jobs)
    estimate(jobs)
    print(f"{'status':<8} {'stage':<9} {'set':<18} {'budget':<16} {'task':<14} {'pre':>3} {'seed':>4}  "
          f"{'estimate':>9}  folder")
    for job in jobs:
        status = "done" if job.stage.is_done() else "todo"
        budget = job.cfg.train.budget if job.kind != "transfer" or job.deps else "-"
        pre = job.seed if job.kind != "transfer" else job.pretrain_seed if job.pretrain_seed is not None else "-"
        print(f"{status:<8} {job.kind:<9} {job.label:<18} {budget:<16} {job.task or '-':<14} {pre:>3} {job.seed:>4}  "
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

    return 1 if torch.cuda.is_available() else cpus.available()


def execute(jobs: list[Job], workers: int) -> tuple[int, int]:
    """Run every stage not DONE, each as soon as its dependencies are; returns (ran, reused)."""
    jobs = unique(jobs)
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
