"""The paper's figure for one experiment, from the report's summary table: one panel per task (its score per
pre-training set) and one of the pre-trainings' own top-1, one series per budget rule."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig

from .store import atomic_path


def _label(r: Any, several_rules: bool) -> str:
    return str(r.set) + (f" ({r.budget})" if several_rules else "") + ("" if r.trained else " (did not train)")


def panel(ax: Any, rows: pd.DataFrame, column: str, x_key: str, bar: bool, rules: list[str],
          error: str | None = None) -> None:
    """``column`` (in percent) of each pre-trained set: bars side by side, or one line per budget rule against
    ``x_key``, each point named (sets that did not train say so)."""
    several = len(rules) > 1
    if bar:
        yerr = rows[error].fillna(0) if error else None
        ax.bar(range(len(rows)), rows[column], yerr=yerr, capsize=3,
               color=[f"C{rules.index(b)}" for b in rows["budget"]])
        ax.set_xticks(range(len(rows)), [_label(r, several) for r in rows.itertuples()], rotation=20, ha="right",
                      fontsize=7)
        return
    for rule in rules:
        ranked = rows[rows["budget"] == rule].sort_values(x_key)
        ax.errorbar(ranked[x_key], ranked[column], yerr=ranked[error].fillna(0) if error else None, marker="o",
                    capsize=3, label=rule if several else None)
        for r in ranked.itertuples():
            ax.annotate(_label(r, False), (getattr(r, x_key), getattr(r, column)), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")


def plot(table: pd.DataFrame, exp: DictConfig, path: Path) -> None:
    """``experiment.plot: line`` draws the panels against ``experiment.x`` (images or classes, log scale) like the
    paper's curves; ``bar`` compares unrelated sets side by side. Sets without a pre-training (scratch) are a
    dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_key, bar = str(exp.get("x", "images")), exp.get("plot", "line") == "bar"
    table = table.assign(score_pct=100 * table["score"], std_pct=100 * table["score_std"])
    tasks = list(dict.fromkeys(table["task"]))
    pretrained = table.dropna(subset=["classes"])
    rules = list(dict.fromkeys(pretrained["budget"]))
    fig, axes = plt.subplots(1, len(tasks) + 1, figsize=(4.5 * (len(tasks) + 1), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        group = table[table["task"] == task]
        panel(ax, pretrained[pretrained["task"] == task], "score_pct", x_key, bar, rules, "std_pct")
        for r in group[group["classes"].isna()].drop_duplicates("set").itertuples():
            ax.axhline(r.score_pct, linestyle="--", color="black", linewidth=1, label=r.set)
        ax.set_title(task, fontsize=9)
        ax.set_ylabel(f"{group['score_name'].iloc[0]} (%)")
    top = axes[0][-1]
    panel(top, pretrained[pretrained["task"] == tasks[0]], "pretrain_top1", x_key, bar, rules)
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
