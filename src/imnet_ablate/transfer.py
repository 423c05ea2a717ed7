"""``ablate transfer task=<name> pretrain=<run_dir | subset | scratch | torchvision>``: one transfer stage.

One folder per (pre-trained network, task config, data, seed): ``<runs>/transfer/<task>-<pretrain folder>-<hash>``
holding ``config.yaml``, ``metrics.json`` (the task's ``Metrics`` record), the task's scored outputs (devkit results
files, so ``ablate evaluate`` rescores them), ``checkpoint.pt``, ``log.txt`` and ``DONE``. What the task does is the
task plug-in's (``tasks``); where the network comes from is ``source``'s; this module only ties them to a stage.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from . import datasets, runtime
from .models import skeleton
from .source import Source, load_network, model_config, source_of
from .store import Stage, atomic_write_json, atomic_write_text
from .tasks import Task, TaskRun, task_for

log = logging.getLogger(__name__)


def stage(cfg: DictConfig) -> Stage:
    """The folder ``run(cfg)`` writes, found without training anything (``ablate run`` plans with it)."""
    return stage_for(cfg, source_of(cfg), task_for(cfg.task))


def stage_for(cfg: DictConfig, source: Source, task: Task) -> Stage:
    spec: dict[str, Any] = {"pretrain": source.key, "task": task.spec(), "seed": int(cfg.seed)}
    for name in task.datasets:
        spec[datasets.dataset(name).spec_key] = datasets.identity(cfg, name)
    spec["model"] = OmegaConf.to_container(cfg.model, resolve=True) if source.key == "scratch" else None
    return Stage(cfg.paths.runs, "transfer", f"{task.name}-{source.name}", spec)


def check_network(cfg: DictConfig, source: Source, task: Task) -> None:
    """The task's network-dependent settings (a feature layer, a number of stages to freeze) against the network
    ``source`` names, built on the meta device: before any work, pre-training included."""
    task.check_network(skeleton(model_config(cfg, source)))


def run(cfg: DictConfig) -> Path:
    """``ablate transfer``: train and score one (pre-trained network, task, seed); reuse a finished folder."""
    import torch

    task, seed = task_for(cfg.task), int(cfg.seed)
    if str(cfg.pretrain) in ("subset", "scratch"):  # the network is cfg.model: a bad task key fails before the
        task.check_network(skeleton(cfg.model))     # source lookup lists the subset (and generates the demo)
    source = source_of(cfg)
    st = stage_for(cfg, source, task)
    if st.is_done():
        return st.path
    check_network(cfg, source, task)
    backbone = load_network(cfg, source)
    roots = {name: datasets.root(cfg, name) for name in task.datasets}
    device = runtime.pick_device(cfg.device)
    with st.lock():
        if st.is_done():
            return st.path
        st.write_spec(device=device)
        atomic_write_text(st.path / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        with runtime.log_to(st.path / "log.txt"):
            log.info("transfer %s from %s (seed %d) on %s -> %s", task.name, source.name, seed, device, st.path)
            started = time.perf_counter()
            torch.manual_seed(seed)  # new layers, dropout, proposal sampling: the seed picks them all
            metrics = task.run(TaskRun(st, backbone, source.key != "scratch", roots, seed, device,
                                       int(cfg.data.max_pixels)))
            record = {**metrics.record(), "pretrain": source.key, "seed": seed,
                      "seconds": round(time.perf_counter() - started, 1)}
            log.info("%s %s %.4f (%s) in %.0f s", task.name, metrics.score_name, metrics.score, metrics.metric,
                     record["seconds"])
        atomic_write_json(st.path / "metrics.json", record)
        results = st.path / task.results_dir
        outputs = ["config.yaml", "metrics.json", "checkpoint.pt", "log.txt"]
        outputs += [str(p.relative_to(st.path)) for p in sorted(results.iterdir())] if results.is_dir() else []
        st.finish([o for o in outputs if (st.path / o).is_file()])
    return st.path
