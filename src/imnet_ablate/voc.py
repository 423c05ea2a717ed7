"""PASCAL VOC 2007 on disk: annotations (parsed with defusedxml), ``ImageSets/Main`` splits, devkit results files.

Problems with the data are reported, never dropped silently:

- errors (``UserError`` naming the file; all problems of a split are collected into one message): missing split
  file, missing annotation, malformed XML, any DTD or entity declaration (refused, so no entity expansion and no
  external entities), missing fields, non-numeric values, unknown class names, boxes with x2 < x1 or y2 < y1,
  an image id listed twice, and missing JPEGs when ``check_images`` is true (training needs them; scoring does not);
- warnings with a count and the first files (in the log): boxes that extend outside the image. They are kept as
  written, because the devkit scores the XML boxes as they are and custom VOC-format sets often have boxes one
  pixel out.
"""
from __future__ import annotations

import functools
import logging
import math
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import defusedxml
import defusedxml.ElementTree as DET
import numpy as np

from . import inputs
from .errors import UserError
from .store import atomic_write_text

log = logging.getLogger(__name__)

CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
CLASS_INDEX: dict[str, int] = {name: i for i, name in enumerate(CLASSES)}
MAX_LISTED = 5  # problems quoted in one message


@dataclass(frozen=True)
class VocImage:
    """One annotated image; arrays are read-only (they are shared through the split cache)."""

    id: str
    width: int
    height: int
    boxes: np.ndarray  # float64 N x 4, 1-based x1 y1 x2 y2 as in the XML
    labels: np.ndarray  # int64 N, index into CLASSES
    difficult: np.ndarray  # bool N
    truncated: np.ndarray  # bool N


class ClassDets(NamedTuple):
    """Detections of one class, in file order (the order the devkit breaks score ties by)."""

    ids: np.ndarray  # str N, image ids
    scores: np.ndarray  # float64 N
    boxes: np.ndarray  # float64 N x 4, 1-based x1 y1 x2 y2


class ClassScores(NamedTuple):
    """Classification scores of one class, in file order."""

    ids: np.ndarray  # str N
    scores: np.ndarray  # float64 N


# -- layout -------------------------------------------------------------------------------------------------------
def year_dir(voc_root: Path | str, year: str = "2007") -> Path:
    """``<VOCdevkit>/VOC<year>``; a path that already is the year folder (it holds ImageSets/) is taken as it is.

    Applied once, to the root a user gave (never to its result: that doubled ``VOC2007/VOC2007``), and never
    resolved, so messages show the path as it was typed.
    """
    root = Path(voc_root).expanduser()
    nested = root / f"VOC{year}"
    return nested if nested.is_dir() or not (root / "ImageSets").is_dir() else root


def missing_year_dir(voc_root: Path | str, year: str = "2007") -> str | None:
    """Why ``year_dir(voc_root)`` is no folder (None when it is one): the root holds neither VOC<year>/ nor
    ImageSets/. Names the folder above that would work (a root given too deep, e.g. .../VOC2007/JPEGImages)."""
    root = Path(voc_root).expanduser()
    if year_dir(root, year).is_dir():
        return None
    fits = next((p for p in list(root.parents)[:3] if (p / f"VOC{year}").is_dir() or (p / "ImageSets").is_dir()), None)
    hint = f"; did you mean {fits}?" if fits is not None else ""
    return (f"{voc_root}: neither VOC{year}/ nor ImageSets/ is in this folder; expected the VOCdevkit folder "
            f"(holding VOC{year}/) or VOC{year}/ itself{hint}")


def image_path(voc_root: Path | str, image_id: str, year: str = "2007") -> Path:
    return year_dir(voc_root, year) / "JPEGImages" / f"{image_id}.jpg"


def split_ids(voc_root: Path | str, split: str, year: str = "2007", image_sets: str = "Main") -> list[str]:
    """The image ids of ``ImageSets/<image_sets>/<split>.txt`` (``Main`` for detection, ``Action`` in VOC 2012)
    under a VOCdevkit (or year) folder, in file order. The split name and every id become file names, so each
    must be a plain name (``inputs.plain_name``): ``split=../..`` or an id ``../../x`` never reads outside the VOC
    folder."""
    if problem := missing_year_dir(voc_root, year):
        raise UserError(problem)
    return _split_ids(year_dir(voc_root, year), split, year, image_sets)


def _split_ids(folder: Path, split: str, year: str, image_sets: str = "Main") -> list[str]:
    inputs.plain_name(split, "split")
    path = folder / "ImageSets" / image_sets / f"{split}.txt"
    text = inputs.read_text(path, f"a VOCdevkit folder holding VOC{year}/ImageSets/{image_sets}/{split}.txt in UTF-8")
    ids = [inputs.plain_name(line.split()[0], f"{path}:{n}: image id")
           for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not ids:
        raise UserError(f"{path}: no image ids; expected one id per line")
    seen: set[str] = set()
    dupes = sorted({i for i in ids if i in seen or seen.add(i)})
    if dupes:
        raise UserError(f"{path}: image ids listed twice: {', '.join(dupes[:MAX_LISTED])}; expected each id once")
    return ids


# -- annotations --------------------------------------------------------------------------------------------------
def xml_text(node: ET.Element, tag: str, default: str | None = None) -> str:
    child = node.find(tag)
    if child is None or child.text is None or not child.text.strip():
        if default is None:
            raise ValueError(f"missing <{tag}>")
        return default
    return child.text.strip()


def xml_number(node: ET.Element, tag: str) -> float:
    raw = xml_text(node, tag)
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"<{tag}> is {raw!r}, not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"<{tag}> is {raw!r}, not a finite number")
    return value


def _flag(node: ET.Element, tag: str) -> bool:
    """``difficult``/``truncated``: missing means 0; VOC writes 0/1 (some tools write floats)."""
    raw = xml_text(node, tag, default="0")
    try:
        return float(raw) != 0
    except ValueError:
        raise ValueError(f"<{tag}> is {raw!r}, expected 0 or 1") from None


def read_xml(path: Path) -> ET.Element:
    """The root element of an annotation file, parsed with defusedxml; ``UserError`` naming the file."""
    try:
        return DET.parse(str(path), forbid_dtd=True, forbid_entities=True, forbid_external=True).getroot()
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror}); every listed image needs an annotation") from e
    except defusedxml.DefusedXmlException as e:
        raise UserError(f"{path}: refused ({type(e).__name__}); VOC annotations must not declare a DTD or "
                        "entities") from e
    except ET.ParseError as e:
        raise UserError(f"{path}: malformed XML ({e})") from e


def xml_size(root: ET.Element) -> tuple[int, int]:
    """(width, height) of an annotation's ``<size>``; ``ValueError`` when missing or not numeric."""
    size = root.find("size")
    if size is None:
        raise ValueError("missing <size>")
    return int(xml_number(size, "width")), int(xml_number(size, "height"))


def xml_box(obj: ET.Element, k: int) -> tuple[float, float, float, float]:
    """``<bndbox>`` of object ``k`` (0-based, for the message) as written: 1-based x1 y1 x2 y2."""
    bb = obj.find("bndbox")
    if bb is None:
        raise ValueError(f"object {k}: missing <bndbox>")
    x1, y1, x2, y2 = (xml_number(bb, t) for t in ("xmin", "ymin", "xmax", "ymax"))
    if x2 < x1 or y2 < y1:
        raise ValueError(f"object {k}: box ({x1:g}, {y1:g}, {x2:g}, {y2:g}) has x2 < x1 or y2 < y1")
    return x1, y1, x2, y2


def parse_annotation(path: Path) -> tuple[VocImage, list[str]]:
    """One ``Annotations/<id>.xml`` -> (image, warnings). Raises ``UserError`` naming the file."""
    root = read_xml(path)
    try:
        width, height = xml_size(root)
        boxes, labels, difficult, truncated, warnings = [], [], [], [], []
        for k, obj in enumerate(root.findall("object")):
            name = xml_text(obj, "name")
            if name not in CLASS_INDEX:
                raise ValueError(f"object {k}: unknown class {name!r}; expected one of the 20 VOC classes")
            x1, y1, x2, y2 = xml_box(obj, k)
            if x1 < 1 or y1 < 1 or x2 > width or y2 > height:
                warnings.append(f"{path.name}: object {k} box ({x1:g}, {y1:g}, {x2:g}, {y2:g}) outside "
                                f"{width}x{height}")
            boxes.append((x1, y1, x2, y2))
            labels.append(CLASS_INDEX[name])
            difficult.append(_flag(obj, "difficult"))
            truncated.append(_flag(obj, "truncated"))
    except ValueError as e:
        raise UserError(f"{path}: {e}") from e
    image = VocImage(path.stem, width, height, _frozen(np.array(boxes, np.float64).reshape(-1, 4)),
                     _frozen(np.array(labels, np.int64)), _frozen(np.array(difficult, bool)),
                     _frozen(np.array(truncated, bool)))
    return image, warnings


def _frozen(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


def load_split(voc_root: Path | str, split: str, year: str = "2007", *, check_images: bool = True
               ) -> list[VocImage]:
    """The annotated images of ``ImageSets/Main/<split>.txt`` in file order (cached per process)."""
    if problem := missing_year_dir(voc_root, year):
        raise UserError(problem)
    inputs.plain_name(split, "split")
    folder = year_dir(voc_root, year)
    split_file = folder / "ImageSets" / "Main" / f"{split}.txt"
    stamp = split_file.stat().st_mtime_ns if split_file.is_file() else 0
    return list(_load_split_cached(str(folder), split, year, stamp, check_images))


@functools.lru_cache(maxsize=8)
def _load_split_cached(folder: str, split: str, year: str, stamp: int, check_images: bool
                       ) -> tuple[VocImage, ...]:
    del stamp  # only part of the cache key: a rewritten split file is read again
    root = Path(folder)
    ids = _split_ids(root, split, year)
    images, errors, warnings = [], [], []
    for image_id in ids:
        try:
            image, warns = parse_annotation(root / "Annotations" / f"{image_id}.xml")
        except UserError as e:
            errors.append(str(e))
            continue
        images.append(image)
        warnings += warns
        if check_images and not (root / "JPEGImages" / f"{image_id}.jpg").is_file():
            errors.append(f"{root / 'JPEGImages' / f'{image_id}.jpg'}: missing (listed in {split}.txt)")
    if errors:
        more = f" (and {len(errors) - MAX_LISTED} more)" if len(errors) > MAX_LISTED else ""
        raise UserError(f"{len(errors)} problem(s) in the '{split}' split of {root}: "
                        f"{'; '.join(errors[:MAX_LISTED])}{more}")
    if warnings:
        log.warning("%s %s: %d box(es) extend outside their image, kept as written: %s%s", root, split,
                    len(warnings), "; ".join(warnings[:MAX_LISTED]), " ..." if len(warnings) > MAX_LISTED else "")
    return tuple(images)


# -- devkit results files -----------------------------------------------------------------------------------------
# The devkit's competitions share one file format and differ in the training data: comp3 (detection) and comp1
# (classification) for systems trained on VOC data only, comp4 and comp2 with outside data (ImageNet pre-training,
# as every network here). Readers take either; writers use the outside-data prefix.
DET_COMPS = ("comp3", "comp4")
CLS_COMPS = ("comp1", "comp2")


def det_results_path(folder: Path | str, split: str, cls: str, comp: str = "comp4") -> Path:
    return Path(folder) / f"{comp}_det_{split}_{cls}.txt"


def cls_results_path(folder: Path | str, split: str, cls: str, comp: str = "comp2") -> Path:
    return Path(folder) / f"{comp}_cls_{split}_{cls}.txt"


def exact_float(x: float) -> str:
    """Shortest text that reads back as the same float, so rescoring a written file gives identical APs."""
    return repr(float(x))


def write_det_results(folder: Path | str, split: str, dets: Mapping[str, ClassDets]) -> list[Path]:
    """One ``comp4_det_<split>_<class>.txt`` per VOC class (empty for classes without detections)."""
    paths = []
    for cls in CLASSES:
        d = dets.get(cls)
        lines = [] if d is None else [f"{i} {exact_float(s)} {' '.join(map(exact_float, b))}\n"
                                      for i, s, b in zip(d.ids, d.scores, np.asarray(d.boxes).tolist())]
        path = det_results_path(folder, split, cls)
        atomic_write_text(path, "".join(lines))
        paths.append(path)
    return paths


def write_cls_results(folder: Path | str, split: str, scores: Mapping[str, ClassScores]) -> list[Path]:
    """One ``comp2_cls_<split>_<class>.txt`` per VOC class present in ``scores``."""
    paths = []
    for cls in CLASSES:
        if cls not in scores:
            continue
        s = scores[cls]
        path = cls_results_path(folder, split, cls)
        atomic_write_text(path, "".join(f"{i} {exact_float(v)}\n" for i, v in zip(s.ids, s.scores)))
        paths.append(path)
    return paths


def _parse_rows(path: Path, n_fields: int, layout: str) -> tuple[list[str], np.ndarray]:
    """Image ids and the numeric columns of a whitespace-separated results file; errors name file and line."""
    text = inputs.read_text(path, "a UTF-8 text results file")
    ids: list[str] = []
    values: list[list[float]] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        try:
            if len(fields) != n_fields:
                raise ValueError
            nums = [float(f) for f in fields[1:]]
            if not all(math.isfinite(v) for v in nums):
                raise ValueError
        except ValueError:
            raise UserError(f"{path}:{lineno}: malformed line ({_malformed(fields, n_fields)}); expected "
                            f"'{layout}' with finite numbers") from None
        ids.append(fields[0])
        values.append(nums)
    return ids, np.array(values, np.float64).reshape(-1, n_fields - 1)


def _malformed(fields: list[str], n_fields: int) -> str:
    """What is wrong with a results line, quoting only the offending token: an error never shows the rest of a
    file that may not be a results file at all (a link to a private file, say)."""
    if len(fields) != n_fields:
        return f"{len(fields)} field(s)"
    token = next(f for f in fields[1:] if not _is_finite(f))
    return f"{inputs.quoted(token, 32)} is not a finite number"


def _is_finite(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _read_results(folder: Path | str, split: str, classes: Iterable[str], path_of: Callable[..., Path],
                  comps: tuple[str, ...], layout: str, build: Callable[[np.ndarray, np.ndarray], Any]
                  ) -> dict[str, Any]:
    """Every results file of ``classes`` present in ``folder`` under any of ``comps``, parsed by ``layout`` and built
    into its type. Two competitions' files for one class are an error (which one would be scored?)."""
    out, used = {}, {}
    for cls in classes:
        # a FIFO or a folder is refused, not scored as "no detections"
        present = [p for p in (path_of(folder, split, cls, comp) for comp in comps)
                   if inputs.is_present(p, "a regular results file")]
        if len(present) > 1:
            raise UserError(f"{folder}: {' and '.join(p.name for p in present)} both score {cls}; expected one "
                            f"results file per class ({comps[0]}: trained on VOC data only, {comps[1]}: with outside "
                            "data): move one competition's files out of the folder")
        if present:
            ids, values = _parse_rows(present[0], len(layout.split()), layout)
            out[cls] = build(np.array(ids, dtype=str), values)
            used.setdefault(present[0].name.split("_", 1)[0], []).append(cls)
    if len(used) > 1:
        log.warning("%s: results of two competitions, scored together: %s", folder,
                    "; ".join(f"{comp} for {', '.join(names)}" for comp, names in used.items()))
    return out


def read_det_results(folder: Path | str, split: str, classes: Iterable[str] = CLASSES) -> dict[str, ClassDets]:
    """The ``comp3_det`` / ``comp4_det`` files present in ``folder`` (classes without a file are left out)."""
    return _read_results(folder, split, classes, det_results_path, DET_COMPS, "<image_id> <score> <x1> <y1> <x2> <y2>",
                         lambda ids, v: ClassDets(ids, v[:, 0].copy(), v[:, 1:5].copy()))


def read_cls_results(folder: Path | str, split: str, classes: Iterable[str] = CLASSES) -> dict[str, ClassScores]:
    """The ``comp1_cls`` / ``comp2_cls`` files present in ``folder`` (classes without a file are left out)."""
    return _read_results(folder, split, classes, cls_results_path, CLS_COMPS, "<image_id> <score>",
                         lambda ids, v: ClassScores(ids, v[:, 0].copy()))


def results_to_score(folder: Path | str, split: str, kind: str, shown_as: str) -> dict[str, Any]:
    """The ``det`` or ``cls`` results files of a split that ``ablate evaluate`` scores: at least one (else a one-line
    error naming the folder as the user typed it, ``shown_as``); classes without a file score as if nothing was
    found, and a warning says which."""
    read, comps = (read_det_results, DET_COMPS) if kind == "det" else (read_cls_results, CLS_COMPS)
    results = read(folder, split)
    if not results:
        names = " or ".join(f"{comp}_{kind}_{split}_<class>.txt" for comp in comps)
        raise UserError(f"detections={shown_as}: no {names} files; expected the devkit's results files for this "
                        "split (docs/evaluate.md)")
    missing = [c for c in CLASSES if c not in results]
    if missing:
        log.warning("%s: no results file for %d class(es), scored as no detections: %s", shown_as, len(missing),
                    ", ".join(missing))
    return results
