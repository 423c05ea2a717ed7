"""VOC average precision exactly as the official devkit computes it, vectorised with numpy (``ablate evaluate``
is ``rescore.py``, which scores results files with these functions through each task).

Detection (``VOCevaldet.m``): detections of a class sorted by score, descending, ties in file order (MATLAB's
``sort`` is stable); each is matched to the ground truth object of its image with the highest IoU (+1 pixel
convention, strictly positive intersection, the first object on ties), whether or not that object was already
matched; IoU >= 0.5 with a difficult object: neither TP nor FP; with an object already matched: FP; IoU < 0.5: FP.
Classification (``VOCevalcls.m``): per class, an image is positive if it holds a non-difficult object of the class,
ignored if its objects of the class are all difficult, negative otherwise; images without a score rank last.

Action classification (VOC 2012 ``VOCevalaction.m``): per action, every person of the action list is ranked by
its score, descending, ties in list order (MATLAB's stable ``sort`` of ``-score`` over the list); persons without a
score get -inf, so they rank last, in list order; label 1 is a true positive, -1 a false positive. The devkit's
default metric for it is ``area``. The mean is over the 10 actions (``other`` is not scored).

Metrics: ``voc07`` averages the maximum precision at recall >= t over MATLAB's ``0:0.1:1`` (see
``matlab_colon``); ``area`` is the VOC2010+ area under the monotone precision envelope (``VOCap.m``).
SUN397 scene classification (single label): mean per-class accuracy (``class_accuracy``, ``mean_class_accuracy``).
SUN397 has no results-file convention (its benchmark published no submission format), so ``ablate evaluate``
reads none for it.

Deliberate differences from the devkit, in degenerate cases only:
- a class without non-difficult ground truth gets AP NaN (the devkit gives 0 for voc07, NaN for area) and is
  left out of the mAP, so a small split missing a class does not drag the mean down; JSON writes NaN as null;
- an action without a positive person gets AP NaN (the devkit's 0/0 recall makes its AP NaN too, and with it its
  mean over the actions) and is left out of the mean, as a class without positives is;
- an action results file that lists a person twice, or a person the split does not list, is an error (the devkit
  keeps the last line of a person twice and stops at an unknown one);
- precision is 0 where no detection has been counted yet (the devkit gets 0/0 = NaN and MATLAB's ``max`` skips
  it); this differs only when every detection hits a difficult object, where the devkit's voc07 AP is NaN and ours 0.
"""
from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Mapping, Sequence

import numpy as np
from .errors import UserError
from .voc import CLASSES, ClassDets, ClassScores, VocImage
from .voc_actions import SCORED, ActionPerson

METRICS = ("voc07", "area")
IOU_THRESHOLD = 0.5
CHUNK = 1 << 20  # detections per block of (detection, object) pairs, bounds memory for crowded classes


def matlab_colon(a: float, d: float, b: float) -> np.ndarray:
    """MATLAB's ``a:d:b`` for d > 0 (MathWorks' ``colonop``): the first half is ``a + k*d``, the second half
    ``b - k*d`` counted from the end, the middle ``(a+b)/2``. So ``0:0.1:1`` holds 0.6 and 0.7 exactly as typed
    (``1 - 0.4``, ``1 - 0.3``) where ``numpy.arange(0, 1.1, 0.1)`` has 0.6000000000000001 and 0.7000000000000001;
    0.3 is 0.30000000000000004 in both.
    """
    tol = 2.0 * np.finfo(float).eps * max(abs(a), abs(b))
    n = round((b - a) / d)
    if a + n * d - b > tol:
        n -= 1
    last = a + n * d
    if last - b > -tol:
        last = b
    out = np.empty(n + 1)
    k = np.arange(n // 2 + 1)
    out[k] = a + k * d
    out[n - k] = last - k * d
    if n % 2 == 0:
        out[n // 2] = (a + last) / 2
    return out


VOC07_THRESHOLDS = matlab_colon(0.0, 0.1, 1.0)


# -- precision/recall -> AP ---------------------------------------------------------------------------------------
def ap_from_counts(tp: np.ndarray, fp: np.ndarray, npos: int, metric: str = "voc07") -> float:
    """AP from per-rank TP/FP flags (ranked by score) and the number of positives; NaN when ``npos`` is 0."""
    if metric not in METRICS:
        raise UserError(f"metric={metric}: unknown; expected one of {', '.join(METRICS)}")
    if npos == 0:
        return math.nan
    tpc = np.cumsum(tp, dtype=np.float64)
    fpc = np.cumsum(fp, dtype=np.float64)
    rec = tpc / npos
    prec = tpc / np.maximum(tpc + fpc, np.finfo(np.float64).eps)
    return voc07_ap(rec, prec) if metric == "voc07" else area_ap(rec, prec)


def voc07_ap(rec: np.ndarray, prec: np.ndarray) -> float:
    """11-point AP: ``p = max(prec(rec >= t))`` (0 if none) summed as ``ap = ap + p/11`` in the devkit's order."""
    envelope = np.maximum.accumulate(prec[::-1])[::-1]  # max over each suffix; rec is non-decreasing
    first = np.searchsorted(rec, VOC07_THRESHOLDS, side="left")  # first rank with rec >= t
    ap = 0.0
    for i in first.tolist():
        ap += (float(envelope[i]) if i < len(rec) else 0.0) / 11
    return ap


def area_ap(rec: np.ndarray, prec: np.ndarray) -> float:
    """``VOCap.m``: area under the precision envelope at the points where recall changes."""
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    i = np.flatnonzero(mrec[1:] != mrec[:-1]) + 1
    return float(np.sum((mrec[i] - mrec[i - 1]) * mpre[i]))


def mean_defined(values: Mapping[str, float]) -> float:
    """Mean over the classes with a defined value (NaN: no positives / no test images); NaN if none."""
    defined = [v for v in values.values() if not math.isnan(v)]
    return float(np.mean(defined)) if defined else math.nan


def mean_ap(ap: Mapping[str, float]) -> float:
    """Mean over classes with a defined AP (NaN classes have no positives); NaN if none."""
    return mean_defined(ap)


# -- detection ----------------------------------------------------------------------------------------------------
def _concat(arrays: list[np.ndarray], dtype: type) -> np.ndarray:
    return np.concatenate(arrays).astype(dtype, copy=False) if arrays else np.zeros(0, dtype)


class _GroundTruth:
    """All objects of a split, grouped by class and image, so each detection finds its candidates by slicing."""

    def __init__(self, images: Sequence[VocImage]):
        self.ids = np.array([im.id for im in images], dtype=str)
        self.order = np.argsort(self.ids, kind="stable")
        self.sorted_ids = self.ids[self.order]
        n_obj = [len(im.labels) for im in images]
        self.image = np.repeat(np.arange(len(images)), n_obj)
        self.boxes = _concat([im.boxes for im in images], np.float64).reshape(-1, 4)
        self.labels = _concat([im.labels for im in images], np.int64)
        self.difficult = _concat([im.difficult for im in images], bool)
        self.n_images = len(images)

    def image_index(self, ids: np.ndarray, what: str) -> np.ndarray:
        """Positions in the split of image ids; unknown ids are an error (the devkit stops there too)."""
        ids = np.asarray(ids, dtype=str)
        if len(self.sorted_ids) == 0:
            if len(ids):
                raise UserError(f"{what}: image id '{ids[0]}' is not in the evaluated split (which is empty)")
            return np.zeros(0, np.int64)
        pos = np.minimum(np.searchsorted(self.sorted_ids, ids), len(self.sorted_ids) - 1)
        bad = self.sorted_ids[pos] != ids
        if bad.any():
            raise UserError(f"{what}: {int(bad.sum())} detection(s) on image ids not in the evaluated split, e.g. "
                            f"'{ids[bad][0]}'; ids must match ImageSets/Main/<split>.txt")
        return self.order[pos]

    def of_class(self, c: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Boxes and difficult flags of class ``c`` grouped by image, with each image's start and count."""
        sel = np.flatnonzero(self.labels == c)  # already grouped by image, in image order
        count = np.bincount(self.image[sel], minlength=self.n_images)
        start = np.concatenate(([0], np.cumsum(count)[:-1])) if self.n_images else count
        return self.boxes[sel], self.difficult[sel], start, count


def _best_overlap(det_boxes: np.ndarray, img: np.ndarray, gt_boxes: np.ndarray, start: np.ndarray,
                  count: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each detection, the IoU with the best object of its image and that object's index (-inf, 0 if none).

    Works on (detection, object of its image) pairs, so the cost follows the number of real candidates, and
    detections on images without objects of the class cost nothing.
    """
    n = len(det_boxes)
    best_ov, best_j = np.full(n, -np.inf), np.zeros(n, np.int64)
    has = np.flatnonzero(count[img] > 0)
    for lo in range(0, len(has), CHUNK):  # bounds memory: at most CHUNK detections' pairs at once
        d = has[lo:lo + CHUNK]
        k = count[img[d]]
        pair_det = np.repeat(np.arange(len(d)), k)
        seg = np.concatenate(([0], np.cumsum(k)[:-1]))  # first pair of each detection
        j = np.repeat(start[img[d]] - seg, k) + np.arange(len(pair_det))
        b, g = det_boxes[d][pair_det], gt_boxes[j]
        iw = np.minimum(b[:, 2], g[:, 2]) - np.maximum(b[:, 0], g[:, 0]) + 1
        ih = np.minimum(b[:, 3], g[:, 3]) - np.maximum(b[:, 1], g[:, 1]) + 1
        inter = iw * ih
        ua = (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1) + (g[:, 2] - g[:, 0] + 1) * (g[:, 3] - g[:, 1] + 1) - inter
        with np.errstate(divide="ignore", invalid="ignore"):
            ov = np.where((iw > 0) & (ih > 0), inter / ua, -np.inf)
        top = np.maximum.reduceat(ov, seg)
        # first pair reaching the maximum, as the devkit's strict ``ov > ovmax`` keeps the first object on ties
        first = np.minimum.reduceat(np.where(ov == top[pair_det], np.arange(len(ov)), len(ov)), seg)
        best_ov[d], best_j[d] = top, j[first]
    return best_ov, best_j


def det_outcomes(dets: ClassDets, img: np.ndarray, gt_boxes: np.ndarray, gt_difficult: np.ndarray,
                 start: np.ndarray, count: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """TP and FP flags of one class's detections in ranked order (difficult matches are neither)."""
    order = np.argsort(-np.asarray(dets.scores, np.float64), kind="stable")
    boxes = np.asarray(dets.boxes, np.float64).reshape(-1, 4)[order]
    ov, j = _best_overlap(boxes, img[order], gt_boxes, start, count)
    hit = ov >= IOU_THRESHOLD
    candidate = hit & ~gt_difficult[np.where(hit, j, 0)] if len(gt_difficult) else np.zeros(len(ov), bool)
    cand = np.flatnonzero(candidate)
    _, first = np.unique(j[cand], return_index=True)  # the first (highest-ranked) detection of each object
    tp = np.zeros(len(ov), bool)
    tp[cand[first]] = True
    fp = ~hit | (candidate & ~tp)
    return tp, fp


def voc_det_ap(images: Sequence[VocImage], dets_by_class: Mapping[str, ClassDets], metric: str = "voc07"
               ) -> dict[str, float]:
    """Per-class detection AP at IoU 0.5 (devkit rule): NaN for a class without positives, else 0 without detections.

    ``dets_by_class`` maps class names to detections in file order; missing classes have none.
    """
    gt = _GroundTruth(images)
    out = {}
    for c, cls in enumerate(CLASSES):
        boxes, difficult, start, count = gt.of_class(c)
        dets = dets_by_class.get(cls)
        if dets is None:
            dets = ClassDets(np.zeros(0, str), np.zeros(0), np.zeros((0, 4)))
        img = gt.image_index(dets.ids, f"detections of {cls!r}")
        tp, fp = det_outcomes(dets, img, boxes, difficult, start, count)
        out[cls] = ap_from_counts(tp, fp, int((~difficult).sum()), metric)
    return out


# -- classification -----------------------------------------------------------------------------------------------
def cls_ground_truth(images: Sequence[VocImage]) -> np.ndarray:
    """int8 (n_images, 20): 1 positive, 0 only difficult objects of the class (ignored), -1 negative."""
    gt = np.full((len(images), len(CLASSES)), -1, np.int8)
    for i, im in enumerate(images):
        gt[i, im.labels[im.difficult]] = 0
    for i, im in enumerate(images):
        gt[i, im.labels[~im.difficult]] = 1
    return gt


def cls_score_matrix(images: Sequence[VocImage], results: Mapping[str, ClassScores]) -> np.ndarray:
    """(n_images, 20) scores from per-class results; images a file does not list get -inf (ranked last)."""
    gt = _GroundTruth(images)
    out = np.full((len(images), len(CLASSES)), -np.inf)
    for c, cls in enumerate(CLASSES):
        if cls not in results:
            continue
        ids, scores = results[cls]
        idx = gt.image_index(ids, f"classification scores of {cls!r}")
        if len(np.unique(idx)) != len(idx):
            raise UserError(f"classification scores of {cls!r}: an image is listed more than once; "
                            "expected one score per image")
        out[idx, c] = scores
    return out


def voc_cls_ap(images: Sequence[VocImage], scores: np.ndarray, metric: str = "voc07") -> dict[str, float]:
    """Per-class classification AP (devkit rule); ``scores`` is (n_images, 20) aligned with ``images``."""
    scores = np.asarray(scores, np.float64)
    if scores.shape != (len(images), len(CLASSES)):
        raise ValueError(f"scores has shape {scores.shape}, expected ({len(images)}, {len(CLASSES)})")
    gt = cls_ground_truth(images)
    out = {}
    for c, cls in enumerate(CLASSES):
        ranked = gt[np.argsort(-scores[:, c], kind="stable"), c]
        out[cls] = ap_from_counts(ranked > 0, ranked < 0, int((gt[:, c] > 0).sum()), metric)
    return out


# -- action classification ----------------------------------------------------------------------------------------
def action_ground_truth(persons: Sequence[ActionPerson]) -> np.ndarray:
    """int8 (n_persons, 10): 1 where the person does the scored action, -1 where not."""
    gt = np.array([[p.does(a) for a in SCORED] for p in persons], bool).reshape(-1, len(SCORED))
    return np.where(gt, 1, -1).astype(np.int8)


def voc_action_ap(persons: Sequence[ActionPerson], scores: Mapping[str, np.ndarray], metric: str = "area"
                  ) -> dict[str, float]:
    """Per-action AP (devkit rule) over ``persons`` in list order; ``scores[action]`` has one score per person,
    -inf for persons without one (ranked last). An action missing from ``scores`` has no scores at all."""
    gt = action_ground_truth(persons)
    out = {}
    for a, action in enumerate(SCORED):
        s = np.asarray(scores.get(action, np.full(len(persons), -np.inf)), np.float64)
        if s.shape != (len(persons),):
            raise ValueError(f"scores[{action!r}] has shape {s.shape}, expected ({len(persons)},)")
        ranked = gt[np.argsort(-s, kind="stable"), a]
        out[action] = ap_from_counts(ranked > 0, ranked < 0, int((gt[:, a] > 0).sum()), metric)
    return out
# -- single-label classification (SUN397) -------------------------------------------------------------------------
def class_accuracy(labels: Sequence[int] | np.ndarray, predicted: Sequence[int] | np.ndarray,
                   classes: Sequence[str]) -> dict[str, float]:
    """Per class, the fraction of its test images predicted as it (recall); NaN for a class without test images,
    left out of :func:`mean_class_accuracy` as a class without positives is left out of the mAP."""
    labels, predicted = np.asarray(labels, np.int64), np.asarray(predicted, np.int64)
    k = len(classes)
    if labels.shape != predicted.shape or labels.ndim != 1:
        raise ValueError(f"labels {labels.shape} and predictions {predicted.shape}: expected two equal-length vectors")
    if ((labels < 0) | (labels >= k) | (predicted < 0) | (predicted >= k)).any():
        raise ValueError(f"labels and predictions must be class indices in [0, {k})")
    total = np.bincount(labels, minlength=k)
    correct = np.bincount(labels[labels == predicted], minlength=k)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = correct / total
    return {c: float(a) for c, a in zip(classes, accuracy)}


def mean_class_accuracy(accuracy: Mapping[str, float]) -> float:
    """SUN397's metric: the mean of the per-class accuracies, so every category weighs the same."""
    return mean_defined(accuracy)


# -- COCO-style ---------------------------------------------------------------------------------------------------
COCO_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _coco_xywh(boxes: np.ndarray) -> np.ndarray:
    """VOC 1-based inclusive x1 y1 x2 y2 -> COCO 0-based x y w h (a 1-pixel box is 1 wide)."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    return np.stack([boxes[:, 0] - 1, boxes[:, 1] - 1, boxes[:, 2] - boxes[:, 0] + 1,
                     boxes[:, 3] - boxes[:, 1] + 1], axis=1)


def coco_det_ap(images: Sequence[VocImage], dets_by_class: Mapping[str, ClassDets]) -> dict[str, float]:
    """COCO AP (IoU .50:.95), AP50, AP75 and per size, via pycocotools; NaN where undefined.

    Difficult objects become ``iscrowd=1``: pycocotools then ignores detections that fall on them, the nearest
    equivalent of VOC's rule (its crowd overlap is intersection over detection area, so it is not identical).
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = _GroundTruth(images)
    xywh = _coco_xywh(gt.boxes)
    anns = [{"id": k + 1, "image_id": int(gt.image[k]), "category_id": int(gt.labels[k]) + 1,
             "bbox": xywh[k].tolist(), "area": float(xywh[k, 2] * xywh[k, 3]), "iscrowd": int(gt.difficult[k])}
            for k in range(len(gt.labels))]
    rows = [np.column_stack([gt.image_index(d.ids, f"detections of {cls!r}"), _coco_xywh(d.boxes),
                             np.asarray(d.scores, np.float64), np.full(len(d.ids), CLASSES.index(cls) + 1)])
            for cls, d in dets_by_class.items() if len(d.ids)]
    if not rows or not anns:
        return {k: math.nan for k in COCO_KEYS}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress and its summary table
        coco = COCO()
        coco.dataset = {"images": [{"id": i} for i in range(gt.n_images)], "annotations": anns,
                        "categories": [{"id": c + 1, "name": n} for c, n in enumerate(CLASSES)]}
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(np.concatenate(rows)), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {k: (float(v) if v >= 0 else math.nan) for k, v in zip(COCO_KEYS, ev.stats[:6])}
