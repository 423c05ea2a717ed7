"""On the demo data, commands run demo-sized recipes and subsets unless told otherwise (``demo_sized=false``).

The paper's recipes and presets are written for ImageNet and full-size VOC: ``task=voc-det`` trains 70k iterations
at 600 px (about a day and a half of the demo's CPU budget), and ``subset=250pc`` keeps 250 images of classes that
have 48 on the demo, i.e. all of them. With ``data=demo`` a task resolves to its demo-sized variant ``<task>-demo``
where ``conf/task/<task>-demo.yaml`` exists, and a subset preset keeps the same fraction of each class as on
ImageNet: N of ImageNet's ~1000 images per class become N/1000 of ``data.demo.train_per_class`` (250pc keeps 12 of
48), for ``subset.images_per_class`` and ``subset.budget.images_per_class`` alike.

The rule lives here only. The CLI applies it to every job of a stage command (``in_app``), ``ablate run`` and
``--help`` to every config they compose (``compose``), so a command, its plan and its help agree. What it changes
becomes ordinary overrides (``task=voc-det-demo``, ``subset.images_per_class=12``), so a stage's folder is the one the
same settings typed by hand give; a value the user typed for a sized key is kept as typed.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf, open_dict

from . import config, conftree, datasets
from .overrides import choices, picked

log = logging.getLogger(__name__)

IMAGENET_PER_CLASS = 1000  # the paper's "N images per class" are out of ImageNet's ~1000 (732 to 1300)
SIZED = ("images_per_class", "budget.images_per_class")  # subset keys in ImageNet's units


@dataclass(frozen=True)
class Sizing:
    """What the demo data changed in one config: the overrides added, the task preset that runs, a line for the log."""

    overrides: tuple[str, ...] = ()
    task: str | None = None  # the task preset that runs: the demo variant, or the one named
    said: tuple[str, ...] = ()  # one phrase per change: "task=voc-det runs as voc-det-demo", ...

    @property
    def note(self) -> str:
        return note(self.said)


def note(said: Iterable[str]) -> str:
    """The log line for what the demo data changed (of one config, or of an experiment's); "" for nothing."""
    said = list(said)
    return f"demo data: {'; '.join(said)} (demo_sized=false: as named)" if said else ""


def demo_images(n: int, demo_per_class: int) -> int:
    """N of ImageNet's ~1000 images per class as the same fraction of the demo's (at least one image)."""
    return max(1, math.floor(n * demo_per_class / IMAGENET_PER_CLASS + 0.5))


def demo_train_images(cfg: DictConfig) -> int | None:
    """The demo's training set size (every class, ``data.demo.train_per_class`` images each); None on real data."""
    if not datasets.is_demo(cfg):
        return None
    from . import wordnet

    return int(cfg.data.demo.train_per_class) * len(wordnet.load().classes)


def _typed(overrides: Sequence[str], key: str) -> bool:
    """Whether the command line sets ``key`` itself, or a section holding it below the group (``subset.budget``)."""
    parts = key.split(".")
    sections = {".".join(parts[:i]) for i in range(2, len(parts) + 1)}
    return any(o.lstrip("+~").split("=", 1)[0] in sections for o in overrides)


def decide(cfg: DictConfig, chosen: Mapping[str, str], overrides: Sequence[str]) -> Sizing:
    """The demo-sized form of a config composed from ``overrides`` (``chosen``: its group -> preset)."""
    task = chosen.get("task")
    if not (datasets.is_demo(cfg) and cfg.get("demo_sized", True)):
        return Sizing(task=task)
    added: list[str] = []
    said: list[str] = []
    if task and not task.endswith("-demo") and \
            f"{task}-demo" in conftree.presets("task", conftree.search_roots(overrides)):
        added.append(f"task={task}-demo")
        said.append(f"task={task} runs as {task}-demo")
        task = f"{task}-demo"
    subset = chosen.get("subset")
    if subset and "subset" in cfg and not cfg.get("subset_dir"):
        per_class = int(cfg.data.demo.train_per_class)
        for key in SIZED:
            n = OmegaConf.select(cfg.subset, key)
            if isinstance(n, int) and not _typed(overrides, f"subset.{key}") and \
                    (m := demo_images(n, per_class)) != n:
                added.append(f"subset.{key}={m}")
                said.append(f"subset={subset} keeps {m} of {per_class} images per class")
    return Sizing(tuple(added), task, tuple(said))


def compose(config_name: str, overrides: Sequence[str], hydra: bool = False) -> tuple[DictConfig, Sizing]:
    """A command's config as that command runs it: composed from ``overrides``, then demo-sized."""
    cfg = config.compose(config_name, list(overrides), hydra=True)
    sizing = decide(cfg, choices(cfg), overrides)
    if sizing.overrides:
        cfg = config.compose(config_name, [*overrides, *sizing.overrides], hydra=True)
    if not hydra:
        with open_dict(cfg):
            del cfg["hydra"]
    return cfg, sizing


def in_app(config_name: str, cfg: DictConfig) -> DictConfig:
    """Inside a running command (one job of a sweep): its config demo-sized, and a log line saying what changed."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    typed = config.app_overrides()
    sizing = decide(cfg, picked(hc.runtime.choices), typed)
    if not sizing.overrides:
        return cfg
    log.info(sizing.note)
    return config.compose(config_name, [*typed, *sizing.overrides])
