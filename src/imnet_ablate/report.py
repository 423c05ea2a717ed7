"""Finished stages -> one pandas frame -> the paper's tables (Markdown, CSV) and figures (PNG).

``ablate report experiment=<name>`` plans the experiment exactly as ``ablate run`` does, reads the metrics of every
stage that is DONE and lists the ones that are not, instead of failing. Each setting's change is shown against
this tool's own baseline (``experiment.baseline``) beside the change the paper reports, since absolute mAP depends
on the detector code and the data.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig

from .inputs import inside
from .store import atomic_path, atomic_write_text


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def collect(jobs: list) -> tuple[pd.DataFrame, list[str]]:
    """One row per pre-training set x task x seed with per-class AP; and a line per missing run."""
    rows, missing = [], []
    for job in jobs:
        if job.kind != "transfer":
            continue
        if not job.stage.is_done():
            missing.append(f"{job.label} / {job.task} / seed {job.seed}: {job.stage.path}")
            continue
        metrics = _read_json(job.stage.path / "metrics.json")
        row: dict[str, Any] = {"set": job.label, "task": job.task, "seed": job.seed, "map": metrics["map"]}
        row.update({f"ap_{name}": value for name, value in metrics["ap"].items()})
        pre = job.deps[0] if job.deps else None
        if pre is not None and pre.stage.is_done():
            row["pretrain_top1"] = _read_json(pre.stage.path / "metrics.json").get("top1")  # percent
        if job.subset is not None and job.subset.is_done():
            manifest = _read_json(job.subset.path / "manifest.json")
            row["classes"] = manifest["num_classes"]
            row["images"] = manifest["num_train"]
        rows.append(row)
    return pd.DataFrame(rows), missing


def summarize(frame: pd.DataFrame, exp: DictConfig) -> pd.DataFrame:
    """Mean and std over seeds per set and task, the change against the baseline, and the paper's change."""
    order = [str(e.label) for e in exp.sets]
    paper = exp.get("paper") or {}
    out = []
    for (task, label), group in frame.groupby(["task", "set"], sort=False):
        out.append({
            "task": task, "set": label,
            "classes": group["classes"].iloc[0] if "classes" in group else math.nan,
            "images": group["images"].iloc[0] if "images" in group else math.nan,
            "pretrain_top1": group["pretrain_top1"].mean() if "pretrain_top1" in group else math.nan,
            "map": group["map"].mean(), "map_std": group["map"].std(ddof=1) if len(group) > 1 else math.nan,
            "seeds": len(group),
        })
    table = pd.DataFrame(out)
    if table.empty:
        return table
    table["order"] = table["set"].map({label: i for i, label in enumerate(order)})
    table = table.sort_values(["task", "order"]).drop(columns="order").reset_index(drop=True)
    base = table[table["set"] == str(exp.baseline)].set_index("task")["map"]
    table["delta"] = table["map"] - table["task"].map(base)
    paper_map = {str(k): float(v) for k, v in paper.items()}
    if str(exp.baseline) in paper_map:
        table["paper_delta"] = table["set"].map(lambda s: paper_map.get(s, math.nan) - paper_map[str(exp.baseline)])
    else:
        table["paper_delta"] = math.nan
    return table


def _fmt(value: Any, digits: int = 1, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"
    return str(value)


def markdown_table(table: pd.DataFrame) -> str:
    """The main table, as the README shows it (mAP and top-1 in percent)."""
    header = ["task", "pre-training set", "classes", "images", "pre-train top-1", "mAP", "± std", "seeds",
              "Δ vs baseline", "paper Δ (PASCAL-DET)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in table.itertuples():
        cells = [r.task, r.set, _fmt(r.classes, 0), _fmt(r.images, 0), _fmt(r.pretrain_top1),
                 _fmt(100 * r.map), _fmt(100 * r.map_std), str(r.seeds), _fmt(100 * r.delta, signed=True),
                 _fmt(r.paper_delta, signed=True)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_class_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean AP (percent) over seeds for every VOC class, one row per task and set."""
    ap_cols = [c for c in frame.columns if c.startswith("ap_")]
    table = 100 * frame.groupby(["task", "set"], sort=False)[ap_cols].mean()
    return table.rename(columns=lambda c: c.removeprefix("ap_")).round(1)


def plot(table: pd.DataFrame, exp: DictConfig, path: Path) -> None:
    """The paper's figure for this question: transfer mAP (and pre-training top-1) per pre-training set.

    ``experiment.plot: line`` draws them against ``experiment.x`` (images or classes, log scale) like the paper's
    curves; ``bar`` compares unrelated sets side by side. Sets without that number (scratch) are a dashed line.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_key = str(exp.get("x", "images"))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    tasks = list(dict.fromkeys(table["task"]))
    for t, (task, group) in enumerate(table.groupby("task", sort=False)):
        floor = group[group["classes"].isna()]
        ranked = group.dropna(subset=["classes"])
        if exp.get("plot", "line") == "bar":
            width = 0.8 / len(tasks)
            pos = [i + t * width for i in range(len(ranked))]
            axes[0].bar(pos, 100 * ranked["map"], width, yerr=100 * ranked["map_std"].fillna(0), capsize=3,
                        label=task)
            axes[0].set_xticks([i + 0.4 - width / 2 for i in range(len(ranked))], ranked["set"], rotation=20)
            if t == 0:
                axes[1].bar(range(len(ranked)), ranked["pretrain_top1"])
                axes[1].set_xticks(range(len(ranked)), ranked["set"], rotation=20)
        else:
            ranked = ranked.sort_values(x_key)
            axes[0].errorbar(ranked[x_key], 100 * ranked["map"], yerr=100 * ranked["map_std"].fillna(0),
                             marker="o", capsize=3, label=task)
            for r in ranked.itertuples():
                axes[0].annotate(r.set, (getattr(r, x_key), 100 * r.map), fontsize=7, xytext=(3, 3),
                                 textcoords="offset points")
            if t == 0:
                axes[1].plot(ranked[x_key], ranked["pretrain_top1"], marker="s")
        for r in floor.itertuples():
            axes[0].axhline(100 * r.map, linestyle="--", color="black", linewidth=1, label=f"{r.set} ({task})")
    axes[0].set_ylabel("transfer mAP (%)")
    axes[1].set_ylabel("pre-training top-1 on its own val (%)")
    if exp.get("plot", "line") != "bar":
        for ax in axes:
            ax.set_xscale("log")
            ax.set_xlabel({"images": "pre-training images", "classes": "pre-training classes"}.get(x_key, x_key))
    for ax in axes:
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(str(exp.get("title", exp.name)), fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def write(cfg: DictConfig, jobs: list) -> Path:
    """Write ``<paths.results>/<experiment>/``: table.md/csv, per_class_ap.md/csv, plot.png; print the table."""
    exp = cfg.experiment
    out = inside(cfg.paths.results, str(exp.name), "experiment.name")
    frame, missing = collect(jobs)
    table = summarize(frame, exp) if not frame.empty else pd.DataFrame()
    lines = [f"# {exp.get('title', exp.name)}", "",
             f"Data: `{cfg.data.name}`; baseline: `{exp.baseline}`; mAP in percent, mean over seeds; Δ against "
             "this tool's own baseline, beside the paper's reported change where it gives one.", ""]
    if not table.empty:
        lines += [markdown_table(table), ""]
        with atomic_path(out / "table.csv") as tmp:
            table.to_csv(tmp, index=False)
        per_class = per_class_table(frame)
        with atomic_path(out / "per_class_ap.csv") as tmp:
            per_class.to_csv(tmp)
        with atomic_path(out / "runs.csv") as tmp:
            frame.to_csv(tmp, index=False)
        lines += ["## Per-class AP", "", _per_class_markdown(per_class), ""]
        plot(table, exp, out / "plot.png")
        lines += ["![plot](plot.png)", ""]
    if exp.get("notes"):
        lines += ["## Notes", "", str(exp.notes).strip(), ""]
    if missing:
        lines += ["## Missing runs", "", *[f"- {m}" for m in missing], ""]
    atomic_write_text(out / "README.md", "\n".join(lines))
    print(markdown_table(table) if not table.empty else "no finished runs yet")
    if missing:
        print(f"missing runs ({len(missing)}):")
        for m in missing:
            print(f"  {m}")
    print(f"report: {out / 'README.md'}" + (f", plot: {out / 'plot.png'}" if not table.empty else ""))
    return out


def _per_class_markdown(table: pd.DataFrame) -> str:
    header = ["task", "set", *table.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (task, label), values in table.iterrows():
        lines.append("| " + " | ".join([task, label, *[_fmt(v) for v in values]]) + " |")
    return "\n".join(lines)


def run(cfg: DictConfig) -> Path:
    """``ablate report experiment=<name>``: tables and plots from whatever has finished."""
    from .experiments import plan

    return write(cfg, plan(cfg))
