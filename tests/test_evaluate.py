"""VOC AP against hand-computed cases, an independent per-detection loop, and the devkit's 0:0.1:1 thresholds."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import run_ablate, run_dir_of
from test_voc import make_xml, write_voc

from imnet_ablate import evaluate as ev
from imnet_ablate import rescore
from imnet_ablate import voc
from imnet_ablate.errors import UserError
from imnet_ablate.voc import CLASSES, ClassDets, VocImage

DOG, CAT = CLASSES.index("dog"), CLASSES.index("cat")
# MATLAB's 0:0.1:1, written out: 0.3 is 3*0.1 (as in numpy), 0.6 and 0.7 are the literals (numpy has 0.6000000000000001
# and 0.7000000000000001 there).
MATLAB_THRESHOLDS = [0.0, 0.1, 0.2, 3 * 0.1, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]


def image(image_id: str, objects=()) -> VocImage:
    """An image from (label, box, difficult) triples."""
    objects = list(objects)
    return VocImage(image_id, 500, 500, np.array([b for _, b, _ in objects], np.float64).reshape(-1, 4),
                    np.array([c for c, _, _ in objects], np.int64), np.array([d for _, _, d in objects], bool),
                    np.zeros(len(objects), bool))


def dets(rows) -> ClassDets:
    """ClassDets from (image id, score, box) rows in file order."""
    return ClassDets(np.array([r[0] for r in rows], dtype=str), np.array([r[1] for r in rows], np.float64),
                     np.array([r[2] for r in rows], np.float64).reshape(-1, 4))


A, B = (1, 1, 10, 10), (100, 100, 150, 150)


def dog_ap(images, rows, metric="voc07") -> float:
    return ev.voc_det_ap(images, {"dog": dets(rows)}, metric)["dog"]


# -- hand-computed detection cases ------------------------------------------------------------------------------------
def test_duplicates_are_false_positives():
    images = [image("1", [(DOG, A, False), (DOG, B, False)])]
    rows = [("1", 0.9, A), ("1", 0.8, A), ("1", 0.7, B)]  # rec .5 .5 1, prec 1 .5 2/3
    assert dog_ap(images, rows) == pytest.approx((6 * 1 + 5 * 2 / 3) / 11, abs=1e-12)
    assert dog_ap(images, rows, "area") == pytest.approx(0.5 * 1 + 0.5 * 2 / 3, abs=1e-12)


def test_best_overlap_already_matched_is_a_false_positive_not_a_second_chance():
    a2 = (1, 1, 10, 12)  # IoU with A = 100/120: would count if the detection could fall back to it
    images = [image("1", [(DOG, A, False), (DOG, a2, False)])]
    assert dog_ap(images, [("1", 0.9, A), ("1", 0.8, A)]) == pytest.approx(6 / 11, abs=1e-12)


def test_difficult_match_is_neither_true_nor_false_positive():
    images = [image("1", [(DOG, A, False), (DOG, B, True)])]
    # 11 * (1/11) summed as the devkit does is 1.0000000000000002
    assert dog_ap(images, [("1", 0.95, B), ("1", 0.9, A)]) == pytest.approx(1.0, abs=1e-15)
    assert dog_ap(images, [("1", 0.95, B), ("1", 0.9, A)], "area") == pytest.approx(1.0, abs=1e-15)
    # the same detection away from any object is a false positive ranked first
    assert dog_ap(images, [("1", 0.95, (300, 300, 320, 320)), ("1", 0.9, A)]) == pytest.approx(0.5, abs=1e-15)
    # and a non-difficult B is a positive that counts towards recall
    images2 = [image("1", [(DOG, A, False), (DOG, B, False)])]
    assert dog_ap(images2, [("1", 0.9, A)]) == pytest.approx(6 / 11, abs=1e-12)


def test_iou_uses_plus_one_pixels_and_threshold_is_inclusive():
    # gt 1..10 (10 px), detection 1..5 x 1..10: +1 convention gives IoU 50/100 = 0.5 exactly (TP);
    # without +1 it would be 36/81 < 0.5
    images = [image("1", [(DOG, A, False)])]
    assert dog_ap(images, [("1", 0.5, (1, 1, 5, 10))]) == pytest.approx(1.0, abs=1e-15)
    assert dog_ap(images, [("1", 0.5, (1, 1, 4, 10))]) == 0.0


def test_ties_keep_file_order():
    images = [image("1", [(DOG, A, False)])]
    miss, hit = ("1", 0.5, B), ("1", 0.5, A)
    assert dog_ap(images, [miss, hit]) == pytest.approx(6 * 0.5 / 11 + 5 * 0.5 / 11, abs=1e-12)
    assert dog_ap(images, [hit, miss]) == pytest.approx(1.0, abs=1e-15)


def test_empty_class_no_detections_and_all_difficult():
    images = [image("1", [(DOG, A, False), (CAT, B, True)]), image("2", [(CAT, A, True)])]
    ap = ev.voc_det_ap(images, {"cat": dets([("1", 0.9, B), ("2", 0.8, (300, 300, 310, 310))])})
    assert ap["dog"] == 0.0  # positives but no detections
    assert math.isnan(ap["cat"])  # only difficult objects: no positives
    assert math.isnan(ap["bus"])  # no objects at all
    assert ev.mean_ap(ap) == 0.0  # NaN classes are left out
    assert math.isnan(ev.mean_ap({"bus": math.nan}))
    # positives exist but every detection lands on a difficult object: AP 0 (the devkit's 0/0 would give NaN)
    images.append(image("3", [(DOG, B, True)]))
    assert dog_ap(images, [("3", 0.9, B)]) == 0.0


def test_detection_on_unknown_image_is_an_error():
    with pytest.raises(UserError, match="e.g. 'nope'; ids must match") as e:  # a plain id, never np.str_('nope')
        dog_ap([image("1", [(DOG, A, False)])], [("nope", 0.9, A)])
    with pytest.raises(UserError, match="image id 'nope' is not in the evaluated split") as empty:
        dog_ap([], [("nope", 0.9, A)])
    assert "np." not in str(e.value) + str(empty.value)


# -- the 0:0.1:1 thresholds -------------------------------------------------------------------------------------------
def test_thresholds_are_matlabs_colon():
    assert ev.VOC07_THRESHOLDS.tolist() == MATLAB_THRESHOLDS
    numpy_t = np.arange(0.0, 1.1, 0.1)
    assert [i for i in range(11) if numpy_t[i] != ev.VOC07_THRESHOLDS[i]] == [6, 7]
    assert ev.matlab_colon(0, 0.25, 1).tolist() == [0, 0.25, 0.5, 0.75, 1]
    assert ev.matlab_colon(1, 1, 4).tolist() == [1, 2, 3, 4]


@pytest.mark.parametrize("npos, hits, expected, with_numpy_arange", [
    (5, 3, 7 / 11, 6 / 11),   # recall 3/5 == 0.6 counts for t = 0.6, not for numpy's 0.6000000000000001
    (10, 7, 8 / 11, 7 / 11),  # recall 7/10 == 0.7 counts for t = 0.7, not for numpy's 0.7000000000000001
    (10, 3, 3 / 11, 3 / 11),  # recall 3/10 is below 3*0.1 in both
])
def test_recall_exactly_at_a_threshold(npos, hits, expected, with_numpy_arange):
    images = [image(str(i), [(DOG, A, False)]) for i in range(npos)]
    assert dog_ap(images, [(str(i), 1.0 - i / 100, A) for i in range(hits)]) == pytest.approx(expected, abs=1e-15)
    numpy_ap = reference_ap_from_flags([1] * hits, [0] * hits, npos, np.arange(0, 1.1, 0.1))
    assert numpy_ap == pytest.approx(with_numpy_arange, abs=1e-15)


# -- an independent, straightforward implementation (py-faster-rcnn voc_eval style, devkit order) ---------------------
def reference_ap_from_flags(tp, fp, npos, thresholds=MATLAB_THRESHOLDS, metric="voc07") -> float:
    ctp = cfp = 0
    rec, prec = [], []
    for t_, f_ in zip(tp, fp):
        ctp, cfp = ctp + t_, cfp + f_
        rec.append(ctp / npos)
        prec.append(ctp / (ctp + cfp) if ctp + cfp else 0.0)
    if metric == "voc07":
        ap = 0.0
        for t in thresholds:
            p = [pr for r, pr in zip(rec, prec) if r >= t]
            ap += (max(p) if p else 0.0) / 11
        return ap
    mrec, mpre = [0.0, *rec, 1.0], [0.0, *prec, 0.0]
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    return sum((mrec[i] - mrec[i - 1]) * mpre[i] for i in range(1, len(mrec)) if mrec[i] != mrec[i - 1])


def reference_det_ap(images, d: ClassDets, c: int, metric: str) -> float:
    gts = {im.id: (im.boxes[im.labels == c], im.difficult[im.labels == c], [False] * int((im.labels == c).sum()))
           for im in images}
    npos = sum(int((~diff).sum()) for _, diff, _ in gts.values())
    if npos == 0:
        return math.nan
    order = sorted(range(len(d.scores)), key=lambda k: -d.scores[k])  # Python's sort is stable
    tp, fp = [], []
    for k in order:
        boxes, diff, seen = gts[str(d.ids[k])]
        bb = d.boxes[k]
        ovmax, jmax = -math.inf, -1
        for j, g in enumerate(boxes):
            iw = min(bb[2], g[2]) - max(bb[0], g[0]) + 1
            ih = min(bb[3], g[3]) - max(bb[1], g[1]) + 1
            if iw > 0 and ih > 0:
                ua = (bb[2] - bb[0] + 1) * (bb[3] - bb[1] + 1) + (g[2] - g[0] + 1) * (g[3] - g[1] + 1) - iw * ih
                if iw * ih / ua > ovmax:
                    ovmax, jmax = iw * ih / ua, j
        if ovmax >= 0.5:
            if not diff[jmax]:
                tp.append(0 if seen[jmax] else 1)
                fp.append(1 if seen[jmax] else 0)
                seen[jmax] = True
            else:
                tp.append(0)
                fp.append(0)
        else:
            tp.append(0)
            fp.append(1)
    return reference_ap_from_flags(tp, fp, npos, metric=metric)


def random_case(rng: np.random.Generator, n_images: int = 60, n_classes: int = 3):
    images, per_class = [], {CLASSES[c]: [] for c in range(n_classes)}
    for i in range(n_images):
        n = int(rng.integers(0, 5))
        xy = rng.integers(1, 60, size=(n, 2)).astype(float)
        wh = rng.integers(5, 40, size=(n, 2)).astype(float)
        objs = [(int(rng.integers(n_classes)), (*xy[k], *(xy[k] + wh[k])), bool(rng.random() < 0.2)) for k in range(n)]
        images.append(image(f"{i:06d}", objs))
        for label, box, _ in objs:  # jittered copies: duplicates, near misses, hits on difficult objects
            for _ in range(int(rng.integers(0, 3))):
                per_class[CLASSES[label]].append((f"{i:06d}", np.round(rng.random(), 1), np.add(box, rng.normal(0, 3, 4))))
        for _ in range(int(rng.integers(0, 4))):  # background detections
            xy0 = rng.uniform(-5, 80, 2)
            per_class[CLASSES[int(rng.integers(n_classes))]].append(
                (f"{i:06d}", np.round(rng.random(), 1), (*xy0, *(xy0 + rng.uniform(-2, 40, 2)))))
    order = {cls: rng.permutation(len(rows)) for cls, rows in per_class.items()}
    return images, {cls: dets([rows[k] for k in order[cls]]) for cls, rows in per_class.items()}


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("metric", ev.METRICS)
def test_agrees_with_a_per_detection_loop(seed, metric):
    images, by_class = random_case(np.random.default_rng(seed))
    ap = ev.voc_det_ap(images, by_class, metric)
    for cls, d in by_class.items():
        expected = reference_det_ap(images, d, CLASSES.index(cls), metric)
        assert ap[cls] == pytest.approx(expected, abs=1e-9, nan_ok=True), cls
    assert any(0 < v < 1 for v in ap.values())  # the cases are not degenerate


def test_small_chunks_give_the_same_answer(monkeypatch):
    images, by_class = random_case(np.random.default_rng(7))
    full = ev.voc_det_ap(images, by_class)
    monkeypatch.setattr(ev, "CHUNK", 3)
    assert ev.voc_det_ap(images, by_class) == full


# -- classification ---------------------------------------------------------------------------------------------------
def cls_images():
    return [image("0", [(DOG, A, False)]), image("1", [(DOG, A, True), (CAT, B, False)]), image("2", [(CAT, A, False)]),
            image("3", [(DOG, B, False), (DOG, A, True)])]


def scores_for(dog_scores) -> np.ndarray:
    s = np.zeros((4, 20))
    s[:, DOG] = dog_scores
    return s


def test_classification_ignores_images_with_only_difficult_objects():
    # ranks: 0 TP, 2 FP, 1 ignored (only a difficult dog), 3 TP (its difficult dog does not matter)
    ap = ev.voc_cls_ap(cls_images(), scores_for([0.9, 0.7, 0.8, 0.6]))
    assert ap["dog"] == pytest.approx((6 + 5 * 2 / 3) / 11, abs=1e-12)  # counted as negative it would be 8.5/11
    assert ev.voc_cls_ap(cls_images(), scores_for([0.9, 0.7, 0.8, 0.6]), "area")["dog"] == pytest.approx(5 / 6)
    assert math.isnan(ap["bus"])


def test_classification_ties_follow_the_image_list_and_missing_scores_rank_last():
    images = cls_images()
    # 2 (negative) before 3 (positive) on their tie: TP FP TP; the other order would give 1
    assert ev.voc_cls_ap(images, scores_for([0.9, 0.1, 0.5, 0.5]))["dog"] == pytest.approx(28 / 33, abs=1e-15)
    results = {"dog": voc.ClassScores(np.array(["2", "0"]), np.array([0.9, 0.8]))}  # 3 unlisted: -inf
    matrix = ev.cls_score_matrix(images, results)
    assert matrix[3, DOG] == -np.inf and matrix[2, DOG] == 0.9 and matrix[0, CAT] == -np.inf
    assert ev.voc_cls_ap(images, matrix)["dog"] == pytest.approx(reference_ap_from_flags([0, 1, 0, 1], [1, 0, 0, 0], 2))
    with pytest.raises(UserError, match="more than once"):
        ev.cls_score_matrix(images, {"dog": voc.ClassScores(np.array(["0", "0"]), np.array([1.0, 2.0]))})


# -- COCO ---------------------------------------------------------------------------------------------------------------
def test_coco_ap_perfect_and_empty():
    images = [image("1", [(DOG, (1, 1, 40, 40), False), (CAT, (50, 50, 200, 200), False)])]
    by_class = {"dog": dets([("1", 0.9, (1, 1, 40, 40))]), "cat": dets([("1", 0.8, (50, 50, 200, 200))])}
    coco = ev.coco_det_ap(images, by_class)
    assert coco["AP"] == pytest.approx(1.0) and coco["AP50"] == pytest.approx(1.0)
    assert coco["APm"] == pytest.approx(1.0) and coco["APl"] == pytest.approx(1.0)  # 40x40 and 151x151 boxes
    assert math.isnan(coco["APs"])  # no small objects
    assert all(math.isnan(v) for v in ev.coco_det_ap(images, {}).values())


def test_coco_difficult_objects_are_ignored_not_missed():
    images = [image("1", [(DOG, (1, 1, 40, 40), False), (DOG, (100, 100, 160, 160), True)])]
    only_easy = ev.coco_det_ap(images, {"dog": dets([("1", 0.9, (1, 1, 40, 40))])})
    both = ev.coco_det_ap(images, {"dog": dets([("1", 0.9, (1, 1, 40, 40)), ("1", 0.95, (100, 100, 160, 160))])})
    assert only_easy["AP"] == pytest.approx(1.0) and both["AP"] == pytest.approx(1.0)


# -- ablate evaluate ----------------------------------------------------------------------------------------------------
@pytest.fixture
def tiny_voc(tmp_path):
    anns = {"000001": make_xml(objects=[("dog", A, 0), ("cat", B, 0)], width=200, height=200),
            "000002": make_xml(objects=[("dog", (20, 20, 60, 60), 0), ("dog", B, 1)], width=200, height=200),
            "000003": make_xml(objects=[("person", (5, 5, 90, 70), 0)])}
    return write_voc(tmp_path / "VOCdevkit", anns, {"test": list(anns)}, jpegs=False)


def test_cli_evaluate_detection_writes_json(tmp_path, tiny_voc):
    d = tmp_path / "dets"
    by_class = {"dog": dets([("000001", 0.9, A), ("000002", 0.8, (20, 20, 60, 60)), ("000001", 0.7, A)]),
                "person": dets([("000003", 0.4, (50, 50, 60, 60))])}
    voc.write_det_results(d, "test", by_class)
    before = sorted(p.name for p in d.iterdir())
    proc = run_ablate("evaluate", f"detections={d}", f"data.voc_root={tiny_voc}", f"paths.runs={tmp_path / 'runs'}",
                      timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert run_dir_of(proc).parent == tmp_path / "runs" / "evaluate" and run_dir_of(proc).name.startswith("dets-")
    assert sorted(p.name for p in d.iterdir()) == before  # nothing written beside the detections
    out = json.loads((run_dir_of(proc) / "eval_voc-det_test_voc07.json").read_text())
    images = voc.load_split(tiny_voc, "test", check_images=False)
    expected = ev.voc_det_ap(images, by_class)
    assert out["task"] == "voc-det" and out["metric"] == "voc07" and out["n_images"] == 3 and out["n_detections"] == 4
    assert out["ap"]["dog"] == expected["dog"] == pytest.approx(1.0) and out["ap"]["person"] == 0.0 and out["ap"]["cat"] == 0.0
    assert out["ap"]["bus"] is None and out["map"] == pytest.approx(1 / 3)
    assert set(out["coco"]) == set(ev.COCO_KEYS)
    assert "mAP" in proc.stdout and "dog" in proc.stdout


def test_cli_evaluate_classification_and_errors(tmp_path, tiny_voc):
    d = tmp_path / "cls"
    voc.write_cls_results(d, "test", {"dog": voc.ClassScores(np.array(["000003", "000001"]), np.array([0.9, 0.5]))})
    out_file = tmp_path / "cls.json"
    proc = run_ablate("evaluate", "task=voc-cls", f"detections={d}", f"data.voc_root={tiny_voc}", "metric=area",
                      f"output={out_file}", timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(out_file.read_text())
    # ranks: 000003 FP, 000001 TP, 000002 TP (unscored, last): precision .5 then 2/3; the envelope is 2/3 throughout
    assert out["task"] == "voc-cls" and out["ap"]["dog"] == pytest.approx(2 / 3, abs=1e-15)
    assert "coco" not in out and out["n_detections"] == 2
    bad = run_ablate("evaluate", f"detections={tmp_path / 'none'}", f"data.voc_root={tiny_voc}", timeout=120)
    assert bad.returncode == 2 and "no such folder" in bad.stderr and "Traceback" not in bad.stderr


def compose_evaluate(*overrides: str):
    from hydra import compose, initialize_config_dir

    from imnet_ablate.config import conf_dir

    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        return compose(config_name="evaluate", overrides=list(overrides))


def test_evaluate_config_errors(tmp_path, tiny_voc):
    d = tmp_path / "cls"
    voc.write_cls_results(d, "test", {"dog": voc.ClassScores(np.array(["000001"]), np.array([0.5]))})
    with pytest.raises(UserError, match=r"comp4_det_test_<class>\.txt"):  # only comp2 files there
        rescore.run(compose_evaluate(f"detections={d}", f"data.voc_root={tiny_voc}"))
    with pytest.raises(UserError, match="data.voc_root is not set"):
        rescore.run(compose_evaluate("data=imagenet", f"detections={d}"))
    with pytest.raises(UserError, match="detections is not set"):
        rescore.run(compose_evaluate(f"data.voc_root={tiny_voc}"))
    with pytest.raises(UserError, match="metric=map: unknown"):
        rescore.run(compose_evaluate(f"detections={d}", f"data.voc_root={tiny_voc}", "metric=map"))
    with pytest.raises(UserError, match=r"Main/val\.txt: cannot read"):  # a task variant passes, the split not
        rescore.run(compose_evaluate(f"detections={d}", f"data.voc_root={tiny_voc}", "task=voc-cls-demo", "split=val"))


# -- SUN397: mean per-class accuracy --------------------------------------------------------------------------
def test_class_accuracy_by_hand():
    """a: 2 of 3 right, b: 1 of 2, c: 1 of 1, d: no test image (NaN, left out): mean (2/3 + 1/2 + 1) / 3."""
    acc = ev.class_accuracy([0, 0, 0, 1, 1, 2], [0, 1, 0, 1, 0, 2], ["a", "b", "c", "d"])
    assert list(acc) == ["a", "b", "c", "d"]
    assert acc["a"] == pytest.approx(2 / 3) and acc["b"] == 0.5 and acc["c"] == 1.0 and math.isnan(acc["d"])
    assert ev.mean_class_accuracy(acc) == pytest.approx((2 / 3 + 0.5 + 1.0) / 3)
    # per-class, not per-image: 9 of 10 images right (0.9) but one of the two classes always wrong
    skewed = ev.class_accuracy([0] * 9 + [1], [0] * 10, ["big", "small"])
    assert skewed == {"big": 1.0, "small": 0.0} and ev.mean_class_accuracy(skewed) == 0.5
    assert math.isnan(ev.mean_class_accuracy(ev.class_accuracy([], [], ["a"])))


def test_class_accuracy_matches_a_plain_loop():
    rng = np.random.default_rng(0)
    labels, predicted = rng.integers(0, 7, 200), rng.integers(0, 7, 200)
    labels[labels == 3] = 4  # class 3 has no test image
    acc = ev.class_accuracy(labels, predicted, list("abcdefg"))
    for c, name in enumerate("abcdefg"):
        mine = [p == c for lab, p in zip(labels, predicted) if lab == c]
        assert (math.isnan(acc[name]) and not mine) or acc[name] == pytest.approx(sum(mine) / len(mine))


@pytest.mark.parametrize("labels, predicted", [([0, 1], [0]), ([0, 3], [0, 1]), ([0, 1], [0, -1])])
def test_class_accuracy_refuses_mismatched_input(labels, predicted):
    with pytest.raises(ValueError):
        ev.class_accuracy(labels, predicted, ["a", "b", "c"])
