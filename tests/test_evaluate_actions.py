"""VOC 2012 action AP against a plain-Python transcription of the devkit's VOCevalaction.m + VOCap.m, hand-computed
cases (ties, unscored persons, an action without positives) and ``ablate evaluate task=voc-act``."""
from __future__ import annotations

import json
import math

from pathlib import Path

import numpy as np
import pytest
from conftest import run_ablate, run_dir_of
from omegaconf import OmegaConf
from test_voc_actions import PEOPLE, write_tree

from imnet_ablate import evaluate as ev
from imnet_ablate import voc_actions as va
from imnet_ablate.config import conf_dir
from imnet_ablate.errors import UserError
from imnet_ablate.tasks import task_for
from imnet_ablate.voc_actions import SCORED, ActionPerson

MATLAB_THRESHOLDS = [0.0, 0.1, 0.2, 3 * 0.1, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]  # 0:0.1:1 (see test_evaluate)


def devkit_ap(labels: list[int], scores: list[float | None], metric: str) -> float:
    """VOCevalaction.m for one action, line by line: ``out`` starts at -inf, each result sets its person's score,
    ``[so, si] = sort(-out)`` (stable), tp/fp cumulated over the ranks, then VOCap.m (area) or 11 points."""
    out = [-math.inf if s is None else s for s in scores]
    order = sorted(range(len(out)), key=lambda i: -out[i])
    npos = sum(1 for g in labels if g > 0)
    if npos == 0:
        return math.nan  # rec = tp / 0: NaN everywhere, and so is the AP
    tp = fp = 0
    rec, prec = [], []
    for i in order:
        tp += labels[i] > 0
        fp += labels[i] < 0
        rec.append(tp / npos)
        prec.append(tp / (tp + fp))
    if metric == "voc07":
        return sum(max([p for r, p in zip(rec, prec) if r >= t], default=0.0) / 11 for t in MATLAB_THRESHOLDS)
    mrec, mpre = [0.0, *rec, 1.0], [0.0, *prec, 0.0]
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    return sum((mrec[i] - mrec[i - 1]) * mpre[i] for i in range(1, len(mrec)) if mrec[i] != mrec[i - 1])


def person(image_id: str, index: int, *actions: str) -> ActionPerson:
    return ActionPerson(image_id, index, (1.0, 1.0, 10.0, 20.0), tuple(a in actions for a in va.ACTIONS))


def random_split(seed: int, n: int = 240):
    """Persons with random actions (some actions rare or absent) and scores with ties and gaps."""
    rng = np.random.default_rng(seed)
    rates = rng.uniform(0.0, 0.4, len(SCORED)) * (rng.random(len(SCORED)) > 0.1)
    persons = [person(f"2012_{k // 2:06d}", k % 2 + 1, *(a for a, r in zip(SCORED, rates) if rng.random() < r))
               for k in range(n)]
    scores = {}
    for a, action in enumerate(SCORED):
        if rng.random() < 0.1:
            continue  # no results file for this action
        s = np.round(rng.normal(size=n) + 1.5 * np.array([p.does(action) for p in persons]), 1)  # ties
        s[rng.random(n) < 0.15] = -np.inf  # persons the file does not list
        scores[action] = s
    return persons, scores


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("metric", ["area", "voc07"])
def test_agrees_with_the_devkit_transcription(seed, metric):
    persons, scores = random_split(seed)
    ap = ev.voc_action_ap(persons, scores, metric)
    assert list(ap) == list(SCORED)
    for action in SCORED:
        labels = [1 if p.does(action) else -1 for p in persons]
        given = scores.get(action, np.full(len(persons), -np.inf))
        expected = devkit_ap(labels, [None if s == -np.inf else float(s) for s in given], metric)
        assert (math.isnan(ap[action]) and math.isnan(expected)) or ap[action] == pytest.approx(expected, abs=1e-12)


def test_ties_keep_the_list_order():
    neg_first = [person("a", 1), person("a", 2, "jumping")]
    same = {"jumping": np.array([0.5, 0.5])}
    assert ev.voc_action_ap(neg_first, same)["jumping"] == 0.5  # the positive ranks second: precision 1/2
    assert ev.voc_action_ap(neg_first[::-1], same)["jumping"] == 1.0


def test_unscored_persons_rank_last_in_list_order():
    persons = [person("a", 1, "reading"), person("b", 1), person("c", 1, "reading")]
    scores = {"reading": np.array([-np.inf, 0.1, 0.9])}
    # ranks: c (TP), b (FP), a (TP, unscored): precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1
    assert ev.voc_action_ap(persons, scores)["reading"] == pytest.approx(0.5 + 0.5 * 2 / 3, abs=1e-15)
    # an action without a results file: every person unscored, ranked in list order (a TP, b FP, c TP)
    assert ev.voc_action_ap(persons, {})["reading"] == pytest.approx(0.5 + 0.5 * 2 / 3, abs=1e-15)


def test_action_without_positives_is_nan_and_left_out_of_the_mean():
    persons = [person("a", 1, "running"), person("b", 1)]
    ap = ev.voc_action_ap(persons, {"running": np.array([0.9, 0.1]), "walking": np.array([0.9, 0.1])})
    assert ap["running"] == 1.0 and all(math.isnan(ap[a]) for a in SCORED if a != "running")
    assert ev.mean_ap(ap) == 1.0


def test_score_shape_is_checked():
    with pytest.raises(ValueError, match="shape"):
        ev.voc_action_ap([person("a", 1)], {"running": np.array([0.9, 0.1])})


# -- results files and ablate evaluate ------------------------------------------------------------------------------
@pytest.fixture
def scored_tree(tmp_path):
    """The reader tests' tree with results files for its train split (every action but walking)."""
    root = write_tree(tmp_path / "VOCdevkit", PEOPLE, {"train": list(PEOPLE)})
    persons = va.listed_persons(va.load_split(root, "train"))
    scores = {a: np.linspace(-1, 1, len(persons)) * (k - 4.5) for k, a in enumerate(SCORED) if a != "walking"}
    va.write_results(tmp_path / "results", "train", persons, scores)
    return root, tmp_path / "results", persons, scores


def action_record(root: Path, folder: Path, split: str) -> dict:
    """What ``ablate evaluate task=voc-act`` writes: the voc-act task's Metrics record of the results files."""
    task = task_for(OmegaConf.load(conf_dir() / "task" / "voc-act.yaml"))
    options = OmegaConf.create({"detections": str(folder)})
    return task.score_files(folder, {"voc2012": root}, split, "area", options).record()


def test_action_record_from_files(scored_tree):
    root, folder, persons, scores = scored_tree
    record = action_record(root, folder, "train")
    expected = ev.voc_action_ap(persons, scores)
    assert record["task"] == "voc-act" and record["metric"] == "area" and record["split"] == "train"
    assert (record["n_images"], record["n_persons"], record["n_scores"]) == (3, 4, 4 * 9)
    assert record["ap"]["jumping"] == expected["jumping"] and record["ap"]["usingcomputer"] is None
    assert record["map"] == pytest.approx(ev.mean_ap(expected))
    with pytest.raises(UserError, match=r"no comp10_action_train_<action>\.txt files"):
        action_record(root, root, "train")


def test_cli_evaluate_voc_act(scored_tree, tmp_path):
    root, folder, _, _ = scored_tree
    proc = run_ablate("evaluate", "task=voc-act", f"detections={folder}", f"data.voc2012_root={root}", "split=train",
                      "data=imagenet", f"paths.runs={tmp_path / 'runs'}", timeout=120)
    assert proc.returncode == 0, proc.stderr
    out_dir = run_dir_of(proc)
    assert out_dir.parent == tmp_path / "runs" / "evaluate"  # under paths.runs, never in the detections folder
    out = json.loads((out_dir / "eval_voc-act_train_area.json").read_text())  # the task's metric: the area AP
    assert out == json.loads(json.dumps(action_record(root, folder, "train")))
    assert "playinginstrument" in proc.stdout and "4 persons" in proc.stdout
    bad = run_ablate("evaluate", "task=voc-act", f"detections={folder}", "data=imagenet", timeout=120)
    assert bad.returncode == 2 and "data.voc2012_root is not set" in bad.stderr
