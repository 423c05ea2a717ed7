"""Time ``evaluate.voc_det_ap`` at VOC07-test scale against a plain per-class, per-detection loop of the same rule.

    .venv/bin/python scripts/bench_evaluate.py [--images 4952] [--per-image 300] [--seed 0]

The reference is py-faster-rcnn's ``voc_eval`` (numpy IoU against the image's objects, one detection at a time)
with the devkit's stable sort and MATLAB thresholds, so both must give identical APs, which the script checks.
"""
from __future__ import annotations

import argparse
import math
import platform
import time

import numpy as np

from imnet_ablate import evaluate
from imnet_ablate.voc import CLASSES, ClassDets, VocImage


def synthetic(n_images: int, per_image: int, seed: int) -> tuple[list[VocImage], dict[str, ClassDets]]:
    """VOC-like objects (1-6 per image, ~15% difficult) and a detector-like mix: several jittered boxes per object
    (right and wrong class) with high scores, the rest random boxes with low scores; scores to 3 decimals (ties)."""
    rng = np.random.default_rng(seed)
    images, rows_ids, rows_cls, rows_box, rows_score = [], [], [], [], []
    for i in range(n_images):
        w, h = int(rng.integers(300, 501)), int(rng.integers(250, 501))
        n = int(rng.integers(1, 7))
        bw, bh = rng.uniform(20, w * 0.8, n), rng.uniform(20, h * 0.8, n)
        x1, y1 = rng.uniform(1, w - bw), rng.uniform(1, h - bh)
        boxes = np.round(np.stack([x1, y1, x1 + bw, y1 + bh], 1))
        labels = rng.integers(0, 20, n)
        images.append(VocImage(f"{i:06d}", w, h, boxes, labels, rng.random(n) < 0.15, np.zeros(n, bool)))
        k_obj = min(per_image // 2, 8 * n)
        src = rng.integers(0, n, k_obj)
        jitter = rng.normal(0, 0.08, (k_obj, 4)) * np.stack([bw, bh, bw, bh], 1)[src]
        near = boxes[src] + jitter
        near_cls = np.where(rng.random(k_obj) < 0.8, labels[src], rng.integers(0, 20, k_obj))
        k_bg = per_image - k_obj
        cx, cy = rng.uniform(1, w, k_bg), rng.uniform(1, h, k_bg)
        hw, hh = rng.uniform(8, w / 2, k_bg), rng.uniform(8, h / 2, k_bg)
        bg = np.stack([np.maximum(cx - hw, 1), np.maximum(cy - hh, 1), np.minimum(cx + hw, w), np.minimum(cy + hh, h)], 1)
        rows_ids.append(np.full(per_image, i))
        rows_cls.append(np.concatenate([near_cls, rng.integers(0, 20, k_bg)]))
        rows_box.append(np.concatenate([near, bg]))
        rows_score.append(np.round(np.concatenate([rng.beta(5, 2, k_obj), rng.beta(1, 5, k_bg)]), 3))
    ids, cls = np.concatenate(rows_ids), np.concatenate(rows_cls)
    boxes, scores = np.concatenate(rows_box), np.concatenate(rows_score)
    names = np.array([im.id for im in images])
    dets = {c: ClassDets(names[ids[cls == k]], scores[cls == k], boxes[cls == k]) for k, c in enumerate(CLASSES)}
    return images, dets


def loop_ap(images: list[VocImage], dets: dict[str, ClassDets], metric: str) -> dict[str, float]:
    """py-faster-rcnn's voc_eval, class by class and detection by detection (stable sort, MATLAB thresholds)."""
    out = {}
    for c, cls in enumerate(CLASSES):
        recs = {}
        npos = 0
        for im in images:
            sel = im.labels == c
            recs[im.id] = {"bbox": im.boxes[sel], "difficult": im.difficult[sel], "det": [False] * int(sel.sum())}
            npos += int((~im.difficult[sel]).sum())
        d = dets[cls]
        order = np.argsort(-d.scores, kind="stable")
        bbs, ids = d.boxes[order], d.ids[order]
        tp, fp = np.zeros(len(ids)), np.zeros(len(ids))
        for k in range(len(ids)):
            r, bb = recs[ids[k]], bbs[k]
            g = r["bbox"]
            ovmax = -np.inf
            if g.size:
                iw = np.minimum(g[:, 2], bb[2]) - np.maximum(g[:, 0], bb[0]) + 1.0
                ih = np.minimum(g[:, 3], bb[3]) - np.maximum(g[:, 1], bb[1]) + 1.0
                inter = iw * ih
                uni = (bb[2] - bb[0] + 1.0) * (bb[3] - bb[1] + 1.0) + (g[:, 2] - g[:, 0] + 1.0) * (g[:, 3] - g[:, 1] + 1.0) - inter
                ov = np.where((iw > 0) & (ih > 0), inter / uni, -np.inf)
                jmax = int(np.argmax(ov))
                ovmax = ov[jmax]
            if ovmax >= 0.5:
                if not r["difficult"][jmax]:
                    if not r["det"][jmax]:
                        tp[k] = 1.0
                        r["det"][jmax] = True
                    else:
                        fp[k] = 1.0
            else:
                fp[k] = 1.0
        fp, tp = np.cumsum(fp), np.cumsum(tp)
        rec = tp / float(npos)
        prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
        if metric == "voc07":
            ap = 0.0
            for t in evaluate.VOC07_THRESHOLDS:
                p = np.max(prec[rec >= t]) if np.sum(rec >= t) else 0.0
                ap = ap + p / 11.0
        else:
            mrec, mpre = np.concatenate(([0.0], rec, [1.0])), np.concatenate(([0.0], prec, [0.0]))
            for i in range(mpre.size - 1, 0, -1):
                mpre[i - 1] = max(mpre[i - 1], mpre[i])
            i = np.where(mrec[1:] != mrec[:-1])[0]
            ap = np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1])
        out[cls] = float(ap)
    return out


def best_of(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return min(times), result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=4952)
    ap.add_argument("--per-image", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="runs of the vectorised evaluator (best is reported)")
    args = ap.parse_args()
    images, dets = synthetic(args.images, args.per_image, args.seed)
    n_obj = sum(len(im.labels) for im in images)
    n_diff = sum(int(im.difficult.sum()) for im in images)
    print(f"{len(images)} images, {n_obj} objects ({n_diff} difficult), "
          f"{sum(len(d.ids) for d in dets.values())} detections; {platform.processor() or platform.machine()}")
    for metric in evaluate.METRICS:
        fast_s, fast = best_of(lambda: evaluate.voc_det_ap(images, dets, metric), args.repeats)
        loop_s, slow = best_of(lambda: loop_ap(images, dets, metric), 1)
        diff = max(abs(fast[c] - slow[c]) for c in CLASSES)
        identical = all(fast[c] == slow[c] or math.isnan(fast[c]) and math.isnan(slow[c]) for c in CLASSES)
        print(f"{metric}: vectorised {fast_s:.2f} s, loop {loop_s:.2f} s, speed-up {loop_s / fast_s:.1f}x, "
              f"mAP {100 * evaluate.mean_ap(fast):.3f} vs {100 * evaluate.mean_ap(slow):.3f}, "
              f"max |dAP| {diff:.1e}, identical: {identical}")
        if not identical:
            raise SystemExit(f"{metric}: APs differ")


if __name__ == "__main__":
    main()
