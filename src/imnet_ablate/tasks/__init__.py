"""Transfer tasks as plug-ins: the ``Task`` protocol, the metrics record every task writes, and the registry.

A task is one class (``Task``: which datasets it reads, what else determines its result, ``run`` returning a
``Metrics`` record) and one ``conf/task/<name>.yaml``. The config picks its class by ``name`` from ``BUILTIN``, or
names any class with ``_target_`` (``mypkg.tasks.MyTask``), which is how a user's own package adds a task: the
stage folder, source loading, seeds, reports and ``ablate run`` work for it unchanged.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from omegaconf import DictConfig, OmegaConf

from ..config import locate
from ..errors import UserError
from ..inputs import DEFAULT_MAX_PIXELS

BUILTIN: dict[str, str] = {
    "voc-cls": "imnet_ablate.tasks.voc_cls:VocClassification",
    "voc-det": "imnet_ablate.tasks.voc_det:VocDetection",
    "voc-act": "imnet_ablate.tasks.voc_act:VocAction",
    "sun-cls": "imnet_ablate.tasks.sun_cls:SunClassification",
}


def json_number(v: float | None) -> float | None:
    """JSON has no NaN: an undefined score (a class without positives in the test split) is null."""
    return None if v is None or math.isnan(v) else float(v)


@dataclass
class Metrics:
    """What a task measured: one record for every task, read by the report whatever the task.

    ``score`` is the headline number on the 0..1 scale (``score_name`` says what it is: mAP, mean accuracy),
    ``per_class`` the values it averages (NaN: undefined, left out of the mean), ``metric`` the exact rule
    (e.g. ``voc07``), ``extras`` anything else worth keeping (COCO AP, counts, the protocol)."""

    task: str
    metric: str
    score_name: str
    score: float
    per_class: dict[str, float]
    extras: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        out = {"task": self.task, "metric": self.metric, "score_name": self.score_name,
               "score": json_number(self.score), "per_class": {k: json_number(v) for k, v in self.per_class.items()},
               **self.extras}
        if self.score_name == "mAP":  # the devkit's names, as metrics.json had them in 0.1
            out |= {"map": out["score"], "ap": out["per_class"]}
        return out


def read_metrics(record: Mapping[str, Any]) -> dict[str, Any]:
    """A metrics.json as written by any version: 0.1 files (``map``/``ap`` only) gain ``score``/``per_class``."""
    out = dict(record)
    if "score" not in out and "map" in out:
        out |= {"score": out["map"], "per_class": out.get("ap", {}), "score_name": "mAP"}
    return out


@dataclass
class TaskRun:
    """Everything ``Task.run`` works with: its stage folder, the network, the data and where to compute."""

    stage: Any  # store.Stage: the folder the run writes
    backbone: Any  # models.Backbone
    pretrained: bool  # False for pretrain=scratch (nothing learned to keep fixed)
    roots: dict[str, Path]  # dataset name -> folder
    seed: int
    device: Any  # torch.device
    max_pixels: int = DEFAULT_MAX_PIXELS  # data.max_pixels: larger images are refused from their header


class Task:
    """One transfer task. Subclasses set the class attributes and implement ``run`` (and ``score_files`` if
    ``ablate evaluate`` can score their results files)."""

    datasets: ClassVar[tuple[str, ...]] = ()  # names in datasets.DATASETS (or data.<name>_root for your own)
    score_name: ClassVar[str] = "score"  # the headline's name in tables
    paper_name: ClassVar[str | None] = None  # the paper's name for this task (PASCAL-DET, ...); None: not one of them
    results_dir: ClassVar[str] = "results"  # sub-folder of the stage holding the scored outputs
    choices: ClassVar[dict[str, tuple[str, ...]]] = {}  # task.<key> -> its allowed words (checked by ``check``)

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg  # the task config (cfg.task)

    @property
    def name(self) -> str:
        return str(self.cfg.name)

    def spec(self) -> dict[str, Any]:
        """What determines this task's result besides the network, the data and the seed: by default the whole
        task config; override to leave out settings that change nothing (e.g. an unused protocol's)."""
        return OmegaConf.to_container(self.cfg, resolve=True)

    def check(self) -> None:
        """Config errors that no rule in validate.py can see, raised before any folder is written: by default every
        key of ``choices`` present in the config must be one of its words."""
        for key, words in self.choices.items():
            value = self.cfg.get(key)
            if value is not None and value not in words:
                raise UserError(f"task.{key}={value!r}: expected {' or '.join(map(repr, words))}")

    def check_network(self, network: Any) -> None:
        """Settings that depend on the network (a feature layer it must have), checked on its ``models.skeleton``
        before any work (pre-training included) starts; by default nothing."""

    def run(self, run: TaskRun) -> Metrics:
        raise NotImplementedError

    def score_files(self, folder: Path, roots: dict[str, Path], split: str, metric: str, options: DictConfig
                    ) -> Metrics:
        """``ablate evaluate``: score results files written by this tool or any other in the task's format
        (``options``: the evaluate command's config, for task-specific switches such as ``coco``)."""
        raise UserError(f"task={self.name}: `ablate evaluate` does not score results files of this task")



class LinearOrFinetune(Task):
    """A task run by one of two protocols (``task.protocol``): ``linear``, a classifier on frozen features at
    ``task.feature``, or ``finetune``, the whole network with a new head; each protocol's settings under its name."""

    PROTOCOLS: ClassVar[tuple[str, ...]] = ("linear", "finetune")

    def spec(self) -> dict[str, Any]:
        """The task config without the settings of the protocol not in use (they change nothing)."""
        spec = super().spec()
        spec.pop("finetune" if self.cfg.protocol == "linear" else "linear", None)
        return spec

    def check_network(self, network: Any) -> None:
        if self.cfg.protocol == "linear":
            network.layer(self.cfg.feature)
        elif (freeze := OmegaConf.select(self.cfg, "finetune.freeze_convs")) is not None:
            network.check_freeze(freeze, "task.finetune.freeze_convs")

def task_for(cfg: DictConfig) -> Task:
    """The task object of a task config (``cfg.task``)."""
    name = cfg.get("name")
    target = cfg.get("_target_") or BUILTIN.get(str(name))
    if target is None:
        raise UserError(f"task.name={name}: unknown task; expected one of {', '.join(BUILTIN)}, or a task._target_ "
                        "naming your own Task class")
    cls = locate(str(target), "task._target_")
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise UserError(f"task._target_={target}: expected a subclass of imnet_ablate.tasks.Task")
    task = cls(cfg)
    task.check()
    return task
