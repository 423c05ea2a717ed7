"""``ablate evaluate task=<name> detections=<dir> [split=...] [metric=...]``: score results files from any detector
or classifier in the task's devkit format, with the same evaluator the transfer stages use (the task plug-in's
``score_files``), print the per-class table and write the task's metrics record as JSON."""
from __future__ import annotations

import logging
import math
from pathlib import Path

from omegaconf import DictConfig

from . import datasets
from .errors import UserError
from .evaluate import METRICS
from .inputs import name_problem
from .store import atomic_write_json, spec_hash
from .tasks import Metrics, task_for

log = logging.getLogger(__name__)


def format_table(metrics: Metrics, title: str) -> str:
    """Per-class values and the headline, in percent (n/a where undefined)."""
    def pct(v: float) -> str:
        return f"{100 * v:6.2f}" if not math.isnan(v) else "   n/a"

    width = max([12, *map(len, metrics.per_class)])
    rows = [f"{name:<{width}} {pct(v)}" for name, v in metrics.per_class.items()]
    return "\n".join([title, *rows, f"{metrics.score_name:<{width}} {pct(metrics.score)}"])


def default_output(cfg: DictConfig, detections: Path, task: str) -> Path:
    """``<paths.runs>/evaluate/<detections folder>-<hash of its path>/eval_<task>_<split>_<metric>.json``: under
    the runs folder like every other output (a detections folder may be read-only, or someone else's), one folder
    per detections folder, rescoring it replaces its file."""
    where = detections.resolve()
    name = where.name if where.name and not name_problem(where.name) else "detections"
    return (Path(cfg.paths.runs) / "evaluate" / f"{name}-{spec_hash({'detections': str(where)})}"
            / f"eval_{task}_{cfg.split}_{cfg.metric}.json")


def run(cfg: DictConfig) -> Path:
    """Score the results files, print the table, write the JSON; returns the JSON's folder."""
    task, split, metric = task_for(cfg.task), str(cfg.split), str(cfg.metric)
    if metric not in METRICS:
        raise UserError(f"metric={metric}: unknown; expected one of {', '.join(METRICS)}")
    if cfg.get("detections") in (None, ""):  # None also when left at ???
        raise UserError("detections is not set: pass detections=<folder holding the devkit results files>")
    folder = Path(str(cfg.detections)).expanduser()
    if not folder.is_dir():
        raise UserError(f"detections={cfg.detections}: no such folder")
    roots = {name: datasets.root(cfg, name) for name in task.datasets}
    metrics = task.score_files(folder, roots, split, metric, cfg)
    counts = ", ".join(f"{v} {k.removeprefix('n_')}" for k, v in metrics.extras.items() if k.startswith("n_"))
    print(format_table(metrics, f"{task.name} {split} {metrics.score_name} ({metric}), {counts}"))
    record = metrics.record()
    if record.get("coco"):
        print("COCO " + " ".join(f"{k} {100 * v:.2f}" if v is not None else f"{k} n/a"
                                 for k, v in record["coco"].items()))
    output = Path(str(cfg.output)).expanduser() if cfg.get("output") else default_output(cfg, folder, task.name)
    atomic_write_json(output, record)
    return output.parent
