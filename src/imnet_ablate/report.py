"""Finished stages -> one pandas frame -> per-task tables (Markdown, CSV) and the paper's figure (PNG).

``ablate report experiment=<name>`` plans the experiment exactly as ``ablate run`` does, reads the metrics record of
every transfer stage that is DONE and lists the ones that are not, instead of failing. Each task gets its own table
and figure panel with its own metric (mAP, mean accuracy, ...), read from the records. A setting's change is shown
against this tool's own baseline (``experiment.baseline``, trained under the same budget rule) beside the change the
paper reports for the same task and set, where it gives one (``experiment.paper``, keyed by the paper's name for the
task), since absolute numbers depend on the detector code and the data.

Beside each score: the pre-training's budget rule, iterations and epochs, its own top-1, the paper's ImageNet column
(the 1000-way probe's top-1 / top-5, or the set's own for the 1000 fine classes), and how many pre-trainings and
transfers the mean and ± are over. A pre-training whose own top-1 is near chance (``did_not_train``) is marked,
left out of the changes, and warned about: a network that did not learn is no evidence about its data. Each change
carries its standard error where both sides have a spread (``delta_errors``); a change within two of them is warned
about as not told apart from the baseline by these runs, since on a few runs a fine-tuning's noise can be as large
as the paper's effect.
"""
from __future__ import annotations

import json
import logging
import math
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from .figure import plot
from .inputs import inside
from .store import atomic_path, atomic_write_text
from .tasks import read_metrics, task_for

log = logging.getLogger(__name__)

DERIVED = "†"  # marks a paper change computed from the paper's text rather than quoted from a table
OWN = "own"  # the ImageNet column holds the set's own top-1: its classes are the 1000 fine ones


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def chance(classes: float) -> float:
    return 100.0 / classes


def trained_threshold(classes: float) -> float:
    """The top-1 (%) a pre-training must reach to count as trained: chance plus 2 points or twice chance, whichever
    is more (1000 classes: 2.1%; 127: 2.8%; 9: 33.3%). Below it the network's features are close to its random
    initialisation, and its transfer measures that, not its data."""
    return chance(classes) + max(2.0, 2 * chance(classes))


def did_not_train(top1: float | None, classes: float | None) -> bool:
    return top1 is not None and classes is not None and not math.isnan(classes) and top1 < trained_threshold(classes)


def pretrain_columns(job: Any) -> dict[str, Any]:
    """What a transfer row shows of its pre-training (rule, iterations, epochs, own top-1, trained?) and of the
    1000-way measure (its probe, or its own top-1 on the 1000 fine classes); empty while they are not finished."""
    pre = job.deps[0] if job.deps else None
    if pre is None or not pre.stage.is_done():
        return {}
    m = _read_json(pre.stage.path / "metrics.json")
    row = {"rule": m.get("budget"), "iterations": m.get("iterations"), "epochs": m.get("epochs"),
           "pretrain_top1": m.get("top1"), "pretrain_classes": m.get("num_classes"),
           "trained": not did_not_train(m.get("top1"), m.get("num_classes"))}
    if job.probe is not None and job.probe.stage.is_done():
        probe = _read_json(job.probe.stage.path / "metrics.json")
        row |= {"imagenet_top1": probe["top1"], "imagenet_top5": probe["top5"], "imagenet_from": "probe"}
    elif pre.fine_classes:
        row |= {"imagenet_top1": m.get("top1"), "imagenet_top5": m.get("top5"), "imagenet_from": OWN}
    return row


def collect(jobs: list) -> tuple[pd.DataFrame, list[str]]:
    """One row per table group (budget rule) x set x task x pre-training x transfer, with its per-class values; and
    a line per missing stage (transfers, and probes of finished pre-trainings)."""
    rows, missing, seen = [], [], set()
    several = len({j.pretrain_seed for j in jobs if j.kind == "transfer" and j.pretrain_seed is not None}) > 1
    for job in jobs:
        if job.kind == "probe" and not job.stage.is_done():
            missing.append(f"{job.label} / 1000-way probe: {job.stage.path}")
        if job.kind != "transfer" or (job.budget, job.key) in seen:
            continue
        seen.add((job.budget, job.key))
        if not job.stage.is_done():
            pre = f", pre-training seed {job.pretrain_seed}" if several and job.pretrain_seed is not None else ""
            missing.append(f"{job.label} / {job.task} / seed {job.seed}{pre}: {job.stage.path}")
            continue
        metrics = read_metrics(_read_json(job.stage.path / "metrics.json"))
        # the task's name (voc-det for voc-det-demo too): tables are per task measured, whatever the recipe size
        row: dict[str, Any] = {"set": job.label, "task": metrics["task"], "budget": job.budget, "seed": job.seed,
                               "pretrain_seed": job.pretrain_seed, "score": metrics["score"],
                               "score_name": metrics["score_name"], "protocol": metrics.get("protocol"),
                               "paper_task": task_for(job.cfg.task).paper_name, **pretrain_columns(job)}
        row.update({f"pc_{name}": value for name, value in metrics["per_class"].items()})
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
    paper = exp.get("paper")  # a user's own experiment may quote no paper numbers
    numbers = OmegaConf.to_container(paper, resolve=True).get(paper_task or "", {}) if paper else {}
    values = {str(k): (float(v["value"]), "derived" in v) if isinstance(v, Mapping) else (float(v), False)
              for k, v in numbers.items()}
    base = values.get(str(exp.baseline))
    if base is None:
        return {}
    return {k: (v - base[0], derived or base[1]) for k, (v, derived) in values.items()}


def _first(group: pd.DataFrame, column: str) -> Any:
    return group[column].iloc[0] if column in group else math.nan


def _mean(group: pd.DataFrame, column: str) -> float:
    return group[column].astype(float).mean() if column in group else math.nan


def summarize(frame: pd.DataFrame, exp: DictConfig) -> pd.DataFrame:
    """Per task, budget rule and set: the pre-training's numbers, mean and std over every run (pre-trainings x
    transfers), the change against the baseline of the same rule (none for sets that did not train), the paper's."""
    order = {str(e.label): i for i, e in enumerate(exp.sets)}
    out = []
    for (task, budget, label), group in frame.groupby(["task", "budget", "set"], sort=False, dropna=False):
        trained = group["trained"].dropna() if "trained" in group else pd.Series(dtype=bool)
        out.append({
            "task": task, "budget": budget, "set": label, "score_name": _first(group, "score_name"),
            "paper_task": _first(group, "paper_task"), "protocol": _first(group, "protocol"),
            "classes": _first(group, "classes"), "images": _first(group, "images"),
            "rule": _first(group, "rule"), "iterations": _mean(group, "iterations"), "epochs": _mean(group, "epochs"),
            "pretrain_top1": _mean(group, "pretrain_top1"), "pretrain_classes": _first(group, "pretrain_classes"),
            "trained": bool(trained.all()), "imagenet_top1": _mean(group, "imagenet_top1"),
            "imagenet_top5": _mean(group, "imagenet_top5"), "imagenet_from": _first(group, "imagenet_from"),
            "score": group["score"].mean(), "score_std": group["score"].std(ddof=1) if len(group) > 1 else math.nan,
            "pretrainings": group["pretrain_seed"].nunique(), "transfers": group["seed"].nunique(),
            "runs": len(group),
        })
    table = pd.DataFrame(out)
    table["order"] = table["set"].map(order)
    table = table.sort_values(["task", "budget", "order"], kind="stable").drop(columns="order").reset_index(drop=True)
    base = table[(table["set"] == str(exp.baseline)) & table["trained"]].set_index(["task", "budget"])["score"]
    keys = list(zip(table["task"], table["budget"]))
    table["delta"] = [score - base.get(k, math.nan) if ok else math.nan
                      for score, k, ok in zip(table["score"], keys, table["trained"])]
    table["delta_se"] = delta_errors(table, str(exp.baseline))
    changes = {task: paper_changes(exp, paper) for task, paper in zip(table["task"], table["paper_task"])}
    table["paper_delta"] = [changes[t].get(s, (math.nan, False))[0] for t, s in zip(table["task"], table["set"])]
    table["paper_derived"] = [changes[t].get(s, (math.nan, False))[1] for t, s in zip(table["task"], table["set"])]
    return table


def delta_errors(table: pd.DataFrame, baseline: str) -> list[float]:
    """Standard error of each change, sqrt(s^2/n + s_b^2/m) from the set's and the baseline's spread over their runs.
    None (NaN) for the baseline itself, for a side with a single run (no spread to read), and where both spreads are
    0 (runs that cannot differ, e.g. a deterministic probe of one network, say nothing about noise)."""
    base = table[table["set"] == baseline].set_index(["task", "budget"])
    errors = []
    for r in table.itertuples():
        if r.set == baseline or math.isnan(r.delta):  # no change, or no trained baseline to change against
            errors.append(math.nan)
            continue
        b = base.loc[(r.task, r.budget)]
        spread = r.runs >= 2 and b["runs"] >= 2 and max(r.score_std, b["score_std"]) >= 1e-9  # 0 up to rounding
        errors.append(math.sqrt(r.score_std ** 2 / r.runs + b["score_std"] ** 2 / b["runs"]) if spread else math.nan)
    return errors


def _delta_cell(r: Any) -> str:
    cell = _fmt(100 * r.delta, signed=True)
    return cell if math.isnan(r.delta_se) else f"{cell} ± {100 * r.delta_se:.1f}"


def _fmt(value: Any, digits: int = 1, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"
    return str(value)


def spread_label(table: pd.DataFrame) -> str:
    """What the ± is over, e.g. "± std over 3 transfers of 1 pre-training", read from the pre-trained sets (a scratch
    set's runs are its pre-trainings x transfers random initialisations: "- x 6")."""
    pretrained = table[table["pretrainings"] > 0]
    rows = table if pretrained.empty else pretrained
    pre, tr = int(rows["pretrainings"].max()), int(rows["transfers"].max())
    if pre <= 1:
        return f"± std over {tr} transfer{'s' if tr != 1 else ''} of 1 pre-training"
    return f"± std over {pre} pre-trainings x {tr} transfers"


def _imagenet_cell(r: Any) -> str:
    if isinstance(r.imagenet_top1, float) and math.isnan(r.imagenet_top1):
        return "-"
    return f"{_fmt(r.imagenet_top1)} / {_fmt(r.imagenet_top5)}" + (f" ({OWN})" if r.imagenet_from == OWN else "")


def markdown_table(table: pd.DataFrame) -> str:
    """One task's table, as the README shows it (scores and top-1 in percent)."""
    first = table.iloc[0]
    paper = first["paper_task"] if table["paper_delta"].notna().any() else None
    header = ["task", "pre-training set", "budget", "classes", "images", "iterations", "epochs", "pre-train top-1",
              "ImageNet top-1 / top-5", first["score_name"], spread_label(table), "pre-trainings x transfers",
              "Δ vs baseline (± its standard error)", *([f"paper Δ ({paper})"] if paper else [])]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in table.itertuples():
        pretrained = not (isinstance(r.pretrain_top1, float) and math.isnan(r.pretrain_top1))
        runs = f"{r.pretrainings} x {r.transfers}" if pretrained else f"- x {r.transfers}"
        cells = [r.task, r.set, r.budget if pretrained else "-", _fmt(r.classes, 0), _fmt(r.images, 0),
                 _fmt(r.iterations, 0), _fmt(r.epochs, 0),
                 _fmt(r.pretrain_top1) + ("" if r.trained else " (did not train)"), _imagenet_cell(r),
                 _fmt(100 * r.score), _fmt(100 * r.score_std), runs, _delta_cell(r)]
        if paper:
            cells.append(_fmt(r.paper_delta, signed=True) + (DERIVED if r.paper_derived else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_tables(table: pd.DataFrame) -> str:
    return "\n\n".join(markdown_table(group) for _, group in table.groupby("task", sort=False))


def machine(stage_dir: Path) -> str:
    """How a stage's ``stage.json`` says its numbers were computed: processor, kernels' instruction set, threads,
    torch, or on a GPU its name, CUDA, cuDNN and torch; "not recorded" for stages of versions that did not record
    them (or whose ``stage.json`` is gone)."""
    spec = stage_dir / "stage.json"
    p = _read_json(spec).get("provenance", {}) if spec.is_file() else {}
    if "cpu" not in p:
        return f"not recorded (torch {p.get('torch', '?')})"
    if "gpu" in p:
        return f"{p['gpu']} (CUDA {p['cuda']}, cuDNN {p['cudnn']}), torch {p.get('torch', '?')}"
    threads = f"{p['threads']} thread{'s' if p['threads'] != 1 else ''}"
    return f"{p['cpu']} ({p['cpu_capability']}), {threads}, torch {p.get('torch', '?')}"


def computed_on(jobs: list) -> list[str]:
    """One line per machine setup the report's finished pre-trainings, probes and transfers ran on, with how many
    stages each: a rerun is bitwise the same only on the same setup (``store.numerics``)."""
    stages = {j.stage.path for job in jobs for j in [job, *job.deps] if j.stage.is_done()}
    counts = Counter(machine(path) for path in sorted(stages))
    return [f"{setup}: {n} stage{'s' if n != 1 else ''}" for setup, n in counts.items()]


def warnings(table: pd.DataFrame, exp: DictConfig) -> list[str]:
    """Lines for the reader: sets that did not train (left out of the changes), a baseline that did not (no change
    in its group), tasks whose transfer is deterministic given the network (no spread over transfer seeds), changes
    within two standard errors of 0 (not told apart from the baseline by these runs)."""
    lines = []
    for r in table[~table["trained"]].drop_duplicates(["budget", "set"]).itertuples():
        lines.append(f"{r.set} ({r.budget}): pre-training top-1 {r.pretrain_top1:.1f}% is below "
                     f"{trained_threshold(r.pretrain_classes):.1f}% (chance {chance(r.pretrain_classes):.2g}% + "
                     "max(2 points, 2 x chance)): did not train; left out of the changes")
        if r.set == str(exp.baseline):
            lines.append(f"the baseline {r.set} did not train under {r.budget}: no change is shown for that rule")
    for task, group in table[table["protocol"] == "linear"].groupby("task", sort=False):
        if group["pretrainings"].max() <= 1 and group["transfers"].max() > 1:  # repeats that cannot differ
            lines.append(f"{task}: the linear probe is deterministic given the network (L-BFGS from zeros on frozen "
                         "features), so its spread over transfer seeds of a pre-trained network is 0; pre-training "
                         "noise needs pretrain_seeds=N")
    unresolved = table[table["delta"].abs() < 2 * table["delta_se"]]
    for (task, budget), group in unresolved.groupby(["task", "budget"], sort=False):
        changes = ", ".join(f"{r.set} {_delta_cell(r)}" for r in group.itertuples())
        lines.append(f"{task} ({budget}): {changes} within two standard errors of 0: these runs do not tell them "
                     "from the baseline (more transfer_seeds=N or pretrain_seeds=N narrow the error)")
    return lines


def per_class_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean per-class value (percent) over runs: one row per task, budget rule, set and class."""
    cols = [c for c in frame.columns if c.startswith("pc_")]
    long = frame.melt(id_vars=["task", "budget", "set", "seed"], value_vars=cols, var_name="class")
    long = long.dropna(subset=["value"])
    long["class"] = long["class"].str.removeprefix("pc_")
    means = 100 * long.groupby(["task", "budget", "set", "class"], sort=False, dropna=False)["value"].mean()
    return means.round(1).reset_index()


def _per_class_markdown(per_class: pd.DataFrame, max_classes: int = 30) -> str:
    """Per task, a set x class table (tasks with more classes than ``max_classes`` only in the CSV)."""
    parts = []
    several = per_class["budget"].nunique() > 1
    per_class = per_class.assign(row=[f"{s} ({b})" if several else s
                                      for s, b in zip(per_class["set"], per_class["budget"])])
    for task, group in per_class.groupby("task", sort=False):
        wide = group.pivot(index="row", columns="class", values="value")
        wide = wide.loc[list(dict.fromkeys(group["row"])), list(dict.fromkeys(group["class"]))]
        if wide.shape[1] > max_classes:
            parts.append(f"{task}: {wide.shape[1]} classes, see per_class.csv")
            continue
        header = ["task", "set", *wide.columns]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join([task, label, *[_fmt(v) for v in values]]) + " |"
                  for label, values in wide.iterrows()]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


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
             f"Data: `{cfg.data.name}`; baseline: `{exp.baseline}` (trained under the same budget rule); scores in "
             "percent, mean over every run of a set (pre-trainings x transfers); Δ against this tool's own baseline "
             "(± its standard error, sqrt(s²/n + s_b²/m) over both sides' runs, where both have a spread), "
             "beside the paper's change for the same task where it gives one "
             f"({DERIVED}: computed from the paper's text, not quoted from a table). Budget: the rule a set smaller "
             "than the reference set was trained under (same_epochs: fewer iterations; same_iterations: more passes "
             "over it), with the iterations and epochs it got. ImageNet top-1 / top-5: the paper's ImageNet column, "
             "a new 1000-way last layer on the frozen network (the probe), or the set's own top-1 where its classes "
             f"are the 1000 fine ones ({OWN}). A set whose own top-1 is below chance + max(2 points, 2 x chance) "
             "did not train and has no Δ.", ""]
    notes = warnings(table, exp) if not table.empty else []
    if not table.empty:
        lines += [markdown_tables(table), ""]
        if notes:
            lines += ["## Warnings", "", *[f"- {n}" for n in notes], ""]
        _csv(table, out / "table.csv")
        per_class = per_class_table(frame)
        _csv(per_class, out / "per_class.csv")
        _csv(frame, out / "runs.csv")
        lines += ["## Per class", "", _per_class_markdown(per_class), ""]
        plot(table, exp, out / "plot.png")
        lines += ["![plot](plot.png)", ""]
    if exp.get("notes"):
        lines += ["## Notes", "", str(exp.notes).strip(), ""]
    if setups := computed_on(jobs):
        lines += ["## Computed on", "", "A stage's numbers are bitwise the same on a rerun only with the same "
                  "processor kind, instruction set, thread count and library versions, and on a GPU the same "
                  "GPU, CUDA and cuDNN (`stage.json`, provenance).",
                  "", *[f"- {line}" for line in setups], ""]
    if missing:
        lines += ["## Missing runs", "", *[f"- {m}" for m in missing], ""]
    atomic_write_text(out / "README.md", "\n".join(lines))
    print(markdown_tables(table) if not table.empty else "no finished runs yet")
    for note in notes:
        log.warning("%s", note)
    if missing:
        print(f"missing runs ({len(missing)}):")
        for m in missing:
            print(f"  {m}")
    print(f"report: {out / 'README.md'}" + (f", plot: {out / 'plot.png'}" if not table.empty else ""))
    return out
