"""Finished stages -> one pandas frame -> per-task tables (Markdown, CSV) and the paper's figure (PNG).

``ablate report experiment=<name>`` plans the experiment exactly as ``ablate run`` does, reads the metrics record of
every transfer stage that is DONE and lists the ones that are not, instead of failing. Each task gets its own table
and figure panel with its own metric (mAP, mean accuracy, ...), read from the records. A setting's change is shown
against this tool's own baseline (``experiment.baseline``) beside the change the paper reports for the same task
and set, where it gives one (``experiment.paper``, keyed by the paper's name for the task), since absolute numbers
depend on the detector code and the data.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from .inputs import inside
from .store import atomic_path, atomic_write_text
from .tasks import read_metrics, task_for

DERIVED = "†"  # marks a paper change computed from the paper's text rather than quoted from a table


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def collect(jobs: list) -> tuple[pd.DataFrame, list[str]]:
    """One row per pre-training set x task x seed with its per-class values; and a line per missing run."""
    rows, missing = [], []
    for job in jobs:
        if job.kind != "transfer":
            continue
        if not job.stage.is_done():
            missing.append(f"{job.label} / {job.task} / seed {job.seed}: {job.stage.path}")
            continue
        metrics = read_metrics(_read_json(job.stage.path / "metrics.json"))
        # the task's name (voc-det for voc-det-demo too): tables are per task measured, whatever the recipe size
        row: dict[str, Any] = {"set": job.label, "task": metrics["task"], "seed": job.seed, "score": metrics["score"],
                               "score_name": metrics["score_name"], "paper_task": task_for(job.cfg.task).paper_name}
        row.update({f"pc_{name}": value for name, value in metrics["per_class"].items()})
        pre = job.deps[0] if job.deps else None
        if pre is not None and pre.stage.is_done():
            row["pretrain_top1"] = _read_json(pre.stage.path / "metrics.json").get("top1")  # percent
        if job.subset is not None and job.subset.is_done():
            manifest = _read_json(job.subset.path / "manifest.json")
            row["classes"] = manifest["num_classes"]
            row["images"] = manifest["num_train"]
        rows.append(row)
    return pd.DataFrame(rows), missing


def paper_changes(exp: DictConfig, paper_task: str | None) -> dict[str, tuple[float, bool]]:
    """Set label -> (the paper's change against its baseline, derived?) for one of the paper's tasks.

    ``experiment.paper.<paper task>.<set>`` is a number quoted from the paper, or ``{value: x, derived: "how"}``
    for one computed from its text (e.g. "a drop of 2.8")."""
    numbers = OmegaConf.to_container(exp.get("paper") or {}, resolve=True).get(paper_task or "", {})
    values = {str(k): (float(v["value"]), "derived" in v) if isinstance(v, Mapping) else (float(v), False)
              for k, v in numbers.items()}
    base = values.get(str(exp.baseline))
    if base is None:
        return {}
    return {k: (v - base[0], derived or base[1]) for k, (v, derived) in values.items()}


def summarize(frame: pd.DataFrame, exp: DictConfig) -> pd.DataFrame:
    """Mean and std over seeds per task and set, the change against the baseline, and the paper's change."""
    order = {str(e.label): i for i, e in enumerate(exp.sets)}
    out = []
    for (task, label), group in frame.groupby(["task", "set"], sort=False):
        first = group.iloc[0]
        out.append({
            "task": task, "set": label, "score_name": first["score_name"], "paper_task": first["paper_task"],
            "classes": first["classes"] if "classes" in group else math.nan,
            "images": first["images"] if "images" in group else math.nan,
            "pretrain_top1": group["pretrain_top1"].mean() if "pretrain_top1" in group else math.nan,
            "score": group["score"].mean(), "score_std": group["score"].std(ddof=1) if len(group) > 1 else math.nan,
            "seeds": len(group),
        })
    table = pd.DataFrame(out)
    table["order"] = table["set"].map(order)
    table = table.sort_values(["task", "order"]).drop(columns="order").reset_index(drop=True)
    base = table[table["set"] == str(exp.baseline)].set_index("task")["score"]
    table["delta"] = table["score"] - table["task"].map(base)
    changes = {task: paper_changes(exp, paper) for task, paper in zip(table["task"], table["paper_task"])}
    table["paper_delta"] = [changes[t].get(s, (math.nan, False))[0] for t, s in zip(table["task"], table["set"])]
    table["paper_derived"] = [changes[t].get(s, (math.nan, False))[1] for t, s in zip(table["task"], table["set"])]
    return table


def _fmt(value: Any, digits: int = 1, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"
    return str(value)


def markdown_table(table: pd.DataFrame) -> str:
    """One task's table, as the README shows it (scores and top-1 in percent)."""
    first = table.iloc[0]
    paper = first["paper_task"] if table["paper_delta"].notna().any() else None
    header = ["task", "pre-training set", "classes", "images", "pre-train top-1", first["score_name"], "± std",
              "seeds", "Δ vs baseline", *([f"paper Δ ({paper})"] if paper else [])]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in table.itertuples():
        cells = [r.task, r.set, _fmt(r.classes, 0), _fmt(r.images, 0), _fmt(r.pretrain_top1),
                 _fmt(100 * r.score), _fmt(100 * r.score_std), str(r.seeds), _fmt(100 * r.delta, signed=True)]
        if paper:
            cells.append(_fmt(r.paper_delta, signed=True) + (DERIVED if r.paper_derived else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_tables(table: pd.DataFrame) -> str:
    return "\n\n".join(markdown_table(group) for _, group in table.groupby("task", sort=False))


def per_class_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean per-class value (percent) over seeds: one row per task, set and class (tasks differ in classes)."""
    cols = [c for c in frame.columns if c.startswith("pc_")]
    long = frame.melt(id_vars=["task", "set", "seed"], value_vars=cols, var_name="class").dropna(subset=["value"])
    long["class"] = long["class"].str.removeprefix("pc_")
    means = 100 * long.groupby(["task", "set", "class"], sort=False)["value"].mean()
    return means.round(1).reset_index()


def _per_class_markdown(per_class: pd.DataFrame, max_classes: int = 30) -> str:
    """Per task, a set x class table (tasks with more classes than ``max_classes`` only in the CSV)."""
    parts = []
    for task, group in per_class.groupby("task", sort=False):
        wide = group.pivot(index="set", columns="class", values="value")
        wide = wide.loc[list(dict.fromkeys(group["set"])), list(dict.fromkeys(group["class"]))]
        if wide.shape[1] > max_classes:
            parts.append(f"{task}: {wide.shape[1]} classes, see per_class.csv")
            continue
        header = ["task", "set", *wide.columns]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join([task, label, *[_fmt(v) for v in values]]) + " |"
                  for label, values in wide.iterrows()]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def plot(table: pd.DataFrame, exp: DictConfig, path: Path) -> None:
    """The paper's figure for this question: one panel per task (its score per pre-training set) and one of the
    pre-training top-1. ``experiment.plot: line`` draws them against ``experiment.x`` (images or classes, log
    scale) like the paper's curves; ``bar`` compares unrelated sets side by side. Sets without that number
    (scratch) are a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_key, bar = str(exp.get("x", "images")), exp.get("plot", "line") == "bar"
    tasks = list(dict.fromkeys(table["task"]))
    fig, axes = plt.subplots(1, len(tasks) + 1, figsize=(4.5 * (len(tasks) + 1), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        group = table[table["task"] == task]
        ranked = group.dropna(subset=["classes"])
        if bar:
            ax.bar(range(len(ranked)), 100 * ranked["score"], yerr=100 * ranked["score_std"].fillna(0), capsize=3)
            ax.set_xticks(range(len(ranked)), ranked["set"], rotation=20)
        else:
            ranked = ranked.sort_values(x_key)
            ax.errorbar(ranked[x_key], 100 * ranked["score"], yerr=100 * ranked["score_std"].fillna(0), marker="o",
                        capsize=3)
            for r in ranked.itertuples():
                ax.annotate(r.set, (getattr(r, x_key), 100 * r.score), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
        for r in group[group["classes"].isna()].itertuples():
            ax.axhline(100 * r.score, linestyle="--", color="black", linewidth=1, label=r.set)
        ax.set_title(task, fontsize=9)
        ax.set_ylabel(f"{group['score_name'].iloc[0]} (%)")
    top = axes[0][-1]
    ranked = table[table["task"] == tasks[0]].dropna(subset=["classes"])
    if bar:
        top.bar(range(len(ranked)), ranked["pretrain_top1"])
        top.set_xticks(range(len(ranked)), ranked["set"], rotation=20)
    else:
        ranked = ranked.sort_values(x_key)
        top.plot(ranked[x_key], ranked["pretrain_top1"], marker="s")
    top.set_title("pre-training", fontsize=9)
    top.set_ylabel("top-1 on the set's own val (%)")
    for ax in axes[0]:
        if not bar:
            ax.set_xscale("log")
            ax.set_xlabel({"images": "pre-training images", "classes": "pre-training classes"}.get(x_key, x_key))
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(str(exp.get("title", exp.name)), fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def _csv(frame: pd.DataFrame, path: Path, index: bool = False) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=index)


def write(cfg: DictConfig, jobs: list) -> Path:
    """Write ``<paths.results>/<experiment>/``: README.md, table.csv, per_class.csv, runs.csv, plot.png; print the
    tables."""
    exp = cfg.experiment
    out = inside(cfg.paths.results, str(exp.name), "experiment.name")
    frame, missing = collect(jobs)
    table = summarize(frame, exp) if not frame.empty else pd.DataFrame()
    lines = [f"# {exp.get('title', exp.name)}", "",
             f"Data: `{cfg.data.name}`; baseline: `{exp.baseline}`; scores in percent, mean over seeds; Δ against "
             "this tool's own baseline, beside the paper's change for the same task where it gives one "
             f"({DERIVED}: computed from the paper's text, not quoted from a table).", ""]
    if not table.empty:
        lines += [markdown_tables(table), ""]
        _csv(table, out / "table.csv")
        per_class = per_class_table(frame)
        _csv(per_class, out / "per_class.csv")
        _csv(frame, out / "runs.csv")
        lines += ["## Per class", "", _per_class_markdown(per_class), ""]
        plot(table, exp, out / "plot.png")
        lines += ["![plot](plot.png)", ""]
    if exp.get("notes"):
        lines += ["## Notes", "", str(exp.notes).strip(), ""]
    if missing:
        lines += ["## Missing runs", "", *[f"- {m}" for m in missing], ""]
    atomic_write_text(out / "README.md", "\n".join(lines))
    print(markdown_tables(table) if not table.empty else "no finished runs yet")
    if missing:
        print(f"missing runs ({len(missing)}):")
        for m in missing:
            print(f"  {m}")
    print(f"report: {out / 'README.md'}" + (f", plot: {out / 'plot.png'}" if not table.empty else ""))
    return out
