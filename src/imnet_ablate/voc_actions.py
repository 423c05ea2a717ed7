"""PASCAL VOC 2012 action classification on disk: person annotations, ``ImageSets/Action`` lists, results files.

The layout is the VOC2012 devkit's. ``VOC2012/Annotations/<id>.xml``: each person ``<object>`` holds ``<actions>``
(a 0/1 flag per action) and its ``<bndbox>``. ``ImageSets/Action/<split>.txt``: the split's image ids.
``ImageSets/Action/<action>_<split>.txt``: ``<image id> <person index> <1|-1>``, one line per person of the split;
the devkit reads these lists, not ``<split>.txt``, to know which persons are scored. The person index is what the
devkit's own code does with it (``rec.objects(objids(i))`` in ``example_action.m``): the 1-based position among
the annotation's ``<object>`` elements. In the real data every object of an action image is a person with
actions, so it is also the person's position among the image's persons.

Problems are errors (all of a split collected into one ``UserError``, each naming its file and line), never
dropped silently: a missing or empty split, a missing action list, malformed lines (only the offending token is
quoted), an image not in ``<split>.txt``, a person listed twice, an index that is not an ``<object>`` with
``<actions>``, a label that disagrees with the annotation's flag, lists that do not name the same persons in the
same order, persons not grouped by image in ``<split>.txt`` order (that order breaks score ties, as the
devkit's stable sort over its list does), malformed or hostile XML (parsed with defusedxml, as ``voc.py`` does),
and missing JPEGs when ``check_images`` is true. An image of ``<split>.txt`` without listed persons is only a
warning (it is never scored).

Results files ``comp10_action_<split>_<action>.txt`` (``<image id> <person index> <score>``), the devkit's: a
line naming a person the split does not list, a person listed twice, or a malformed line is a ``UserError``
naming file and line.
"""
from __future__ import annotations

import logging
import math
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from . import voc
from .errors import UserError
from .store import atomic_write_text

log = logging.getLogger(__name__)

YEAR = "2012"
# VOCinit.m's order: "other" first (the devkit skips it when training and scoring), then the 10 scored actions.
ACTIONS: tuple[str, ...] = ("other", "jumping", "phoning", "playinginstrument", "reading", "ridingbike",
                            "ridinghorse", "running", "takingphoto", "usingcomputer", "walking")
SCORED: tuple[str, ...] = ACTIONS[1:]
ACTION_INDEX: dict[str, int] = {a: i for i, a in enumerate(ACTIONS)}
LABELS = {"1": True, "-1": False}
TOKEN_CHARS = 40  # longest piece of a user's file quoted in a message

# Problem code -> (severity, what the reader does about it); ``ablate data check`` reports with these.
PROBLEMS: dict[str, tuple[str, str]] = {
    "action-folder": ("error", "a VOC2012 folder the action reader needs is missing"),
    "action-split": ("error", "ImageSets/Action/<split>.txt missing, empty or listing an id twice; the action "
                              "reader refuses it"),
    "action-list": ("error", "action list missing, malformed, naming an unknown image or person, or differing "
                             "from the other lists; the action reader refuses it"),
    "action-annotation": ("error", "malformed or refused XML, or a listed person without <actions> or "
                                   "<bndbox>; the action reader refuses it"),
    "action-label": ("error", "an action list's label disagrees with the annotation's flag; the action reader "
                              "refuses it"),
    "action-jpeg": ("error", "listed image without JPEGImages/<id>.jpg; training refuses it"),
    "action-unlisted": ("warning", "image in <split>.txt without a person in the action lists; never scored"),
}


@dataclass(frozen=True)
class ActionPerson:
    """One person to classify: the box is given, the flags are the ground truth."""

    image_id: str
    index: int  # 1-based position among the image's <object>s: the number the lists and results files use
    box: tuple[float, float, float, float]  # 1-based x1 y1 x2 y2 as in the XML
    actions: tuple[bool, ...]  # one flag per entry of ACTIONS

    def does(self, action: str) -> bool:
        return self.actions[ACTION_INDEX[action]]


@dataclass(frozen=True)
class ActionImage:
    id: str
    width: int
    height: int
    persons: tuple[ActionPerson, ...]  # the persons the action lists name, in list order


class Problem(NamedTuple):
    path: Path
    code: str  # a key of PROBLEMS
    detail: str

    def __str__(self) -> str:
        return f"{self.path}: {self.detail}"


class ListRow(NamedTuple):
    line: int
    image_id: str
    index: int
    label: bool


# -- layout -------------------------------------------------------------------------------------------------------
def year_dir(voc2012_root: Path | str) -> Path:
    """``<VOCdevkit>/VOC2012``; the VOC2012 folder itself is accepted too."""
    return voc.year_dir(voc2012_root, YEAR)


def split_path(voc2012_root: Path | str, split: str) -> Path:
    return year_dir(voc2012_root) / "ImageSets" / "Action" / f"{split}.txt"


def list_path(voc2012_root: Path | str, action: str, split: str) -> Path:
    return year_dir(voc2012_root) / "ImageSets" / "Action" / f"{action}_{split}.txt"


def results_path(folder: Path | str, split: str, action: str) -> Path:
    return Path(folder) / f"comp10_action_{split}_{action}.txt"


def token(text: str) -> str:
    """A piece of a user's file, quoted and cut short."""
    return repr(text if len(text) <= TOKEN_CHARS else text[:TOKEN_CHARS] + "...")


def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e}); expected {what}") from e


def _positive_int(text: str) -> int:
    """A person index: a positive integer written as one (``2``, not ``2.0``)."""
    if not text.isdigit() or int(text) < 1:
        raise ValueError
    return int(text)


# -- annotations --------------------------------------------------------------------------------------------------
def _action_flags(obj: ET.Element, k: int) -> tuple[bool, ...]:
    """The ``<actions>`` flags of object ``k`` (0-based): each tag present and exactly 0 or 1, as the devkit's
    ``strcmp(value, '1')`` reads them."""
    node = obj.find("actions")
    flags = []
    for action in ACTIONS:
        raw = voc.xml_text(node, action, default="") if node is not None else ""
        if raw not in ("0", "1"):
            what = f"is {token(raw)}, expected 0 or 1" if raw else "is missing"
            raise ValueError(f"object {k}: <actions><{action}> {what}")
        flags.append(raw == "1")
    return tuple(flags)


def parse_annotation(path: Path) -> tuple[int, int, dict[int, ActionPerson]]:
    """(width, height, {person index: person}) of every ``<object>`` with ``<actions>``; ``UserError`` naming the
    file for malformed XML, a refused DTD or entity, or a malformed person."""
    root = voc.read_xml(path)
    try:
        width, height = voc.xml_size(root)
        persons = {}
        for k, obj in enumerate(root.findall("object")):
            if obj.find("actions") is None:
                continue
            persons[k + 1] = ActionPerson(path.stem, k + 1, voc.xml_box(obj, k), _action_flags(obj, k))
    except ValueError as e:
        raise UserError(f"{path}: {e}") from e
    return width, height, persons


# -- action lists -------------------------------------------------------------------------------------------------
def read_list(path: Path, split_ids: Mapping[str, int]) -> tuple[list[ListRow], list[Problem]]:
    """The rows of ``<action>_<split>.txt`` and the problems of its lines (malformed, unknown image, twice)."""
    rows, problems, seen = [], [], set()
    layout = "'<image id> <person index> <1|-1>'"
    for line, text in enumerate(_read_text(path, "an action list").splitlines(), 1):
        fields = text.split()
        if not fields:
            continue
        where = Path(f"{path}:{line}")
        if len(fields) != 3:
            problems.append(Problem(where, "action-list", f"{len(fields)} fields; expected {layout}"))
            continue
        image_id, index, label = fields
        try:
            row = ListRow(line, image_id, _positive_int(index), LABELS[label])
        except (ValueError, KeyError):
            bad = f"person index {token(index)}" if label in LABELS else f"label {token(label)}"
            problems.append(Problem(where, "action-list", f"{bad} is malformed; expected {layout}"))
            continue
        if image_id not in split_ids:
            problems.append(Problem(where, "action-list", f"image {token(image_id)} is not in the split's "
                                                          "<split>.txt"))
        elif (image_id, row.index) in seen:
            problems.append(Problem(where, "action-list", f"person ({token(image_id)}, {row.index}) listed twice"))
        else:
            seen.add((image_id, row.index))
            rows.append(row)
    return rows, problems


def _same_persons(reference: tuple[Path, list[ListRow]], other: tuple[Path, list[ListRow]]) -> list[Problem]:
    """Every list must name the same persons in the same order: one list's order is the devkit's for all."""
    (ref_path, ref_rows), (path, rows) = reference, other
    for a, b in zip(ref_rows, rows):
        if (a.image_id, a.index) != (b.image_id, b.index):
            return [Problem(Path(f"{path}:{b.line}"), "action-list",
                            f"names ({token(b.image_id)}, {b.index}) where {ref_path.name}:{a.line} names "
                            f"({token(a.image_id)}, {a.index}); expected the same persons in the same order")]
    if len(ref_rows) != len(rows):
        return [Problem(path, "action-list", f"lists {len(rows)} persons, {ref_path.name} lists {len(ref_rows)}; "
                                             "expected the same persons in every action list")]
    return []


def _grouped_in_split_order(path: Path, rows: list[ListRow], split_ids: Mapping[str, int]) -> list[Problem]:
    """Persons grouped by image in ``<split>.txt`` order (positions never go back), so the images' persons, in
    order, are the list's order."""
    for prev, row in zip(rows, rows[1:]):
        if split_ids[row.image_id] < split_ids[prev.image_id]:
            return [Problem(Path(f"{path}:{row.line}"), "action-list",
                            f"image {token(row.image_id)} out of order; expected persons grouped by image in the "
                            "order of <split>.txt")]
    return []


def read_lists(folder: Path, split: str, split_ids: Mapping[str, int]
               ) -> tuple[dict[str, tuple[Path, list[ListRow]]], list[Problem]]:
    """Every action list of a split (the scored ones required, ``other`` when present), checked against each
    other; returns {action: (path, rows)} and the problems."""
    lists, problems = {}, []
    for action in ACTIONS:
        path = list_path(folder, action, split)
        if not path.is_file():
            if action != "other":
                problems.append(Problem(path, "action-list", f"missing; every scored action needs "
                                                             f"ImageSets/Action/<action>_{split}.txt"))
            continue
        try:
            rows, found = read_list(path, split_ids)
        except UserError as e:
            rows, found = [], [Problem(path, "action-list", str(e).split(": ", 1)[-1])]
        problems += found
        lists[action] = (path, rows)
    if lists:
        reference = _majority(lists.values())
        problems += _grouped_in_split_order(*reference, split_ids)
        for listed in lists.values():
            problems += _same_persons(reference, listed)
    return lists, problems


def _majority(lists: Iterable[tuple[Path, list[ListRow]]]) -> tuple[Path, list[ListRow]]:
    """The list whose persons most lists share (the first such in ACTIONS order): a list that differs is the one
    reported, not all the others."""
    lists = list(lists)
    keys = [tuple((r.image_id, r.index) for r in rows) for _, rows in lists]
    return lists[max(range(len(lists)), key=lambda k: (keys.count(keys[k]), -k))]


# -- a split ------------------------------------------------------------------------------------------------------
Wanted = list[tuple[str, Path, ListRow]]  # (action, its list file, the row naming the person)


def _persons_of(path: Path, image_id: str, wanted: Wanted) -> tuple[ActionImage | None, list[Problem]]:
    """The image's annotation with its listed persons (in list order), and index / label problems."""
    try:
        width, height, persons = parse_annotation(path)
    except UserError as e:
        return None, [Problem(path, "action-annotation", str(e).split(": ", 1)[-1])]
    problems, chosen = [], {}
    for action, list_file, row in wanted:
        where = Path(f"{list_file}:{row.line}")
        person = persons.get(row.index)
        if person is None:
            problems.append(Problem(where, "action-annotation",
                                    f"person {row.index} of {token(image_id)} is not an <object> with <actions> in "
                                    f"{path.name}"))
        elif person.does(action) != row.label:
            problems.append(Problem(where, "action-label",
                                    f"label {1 if row.label else -1} for ({token(image_id)}, {row.index}) but "
                                    f"{path.name} has <{action}>{int(person.does(action))}</{action}>"))
        else:
            chosen[row.index] = person
    order = dict.fromkeys(row.index for _, _, row in wanted)
    return ActionImage(image_id, width, height, tuple(chosen[i] for i in order if i in chosen)), problems


def read_split(voc2012_root: Path | str, split: str, check_images: bool = True
               ) -> tuple[list[ActionImage], list[Problem]]:
    """The images of ``<split>.txt`` (in its order) with their listed persons, and every problem found."""
    folder = year_dir(voc2012_root)
    try:
        ids = voc.split_ids(folder, split, YEAR, "Action")
    except UserError as e:
        return [], [Problem(split_path(folder, split), "action-split", str(e).split(": ", 1)[-1])]
    if not ids:
        return [], [Problem(split_path(folder, split), "action-split", "lists no image; expected the split's "
                                                                       "image ids")]
    position = {image_id: i for i, image_id in enumerate(ids)}
    lists, problems = read_lists(folder, split, position)
    wanted: dict[str, Wanted] = {i: [] for i in ids}
    for action, (list_file, rows) in lists.items():
        for row in rows:
            wanted[row.image_id].append((action, list_file, row))
    images = []
    for image_id in ids:
        if not wanted[image_id]:
            problems.append(Problem(split_path(folder, split), "action-unlisted",
                                    f"image {token(image_id)} has no person in the action lists"))
        image, found = _persons_of(folder / "Annotations" / f"{image_id}.xml", image_id, wanted[image_id])
        problems += found
        if image is not None:
            images.append(image)
        jpeg = folder / "JPEGImages" / f"{image_id}.jpg"
        if check_images and wanted[image_id] and not jpeg.is_file():
            problems.append(Problem(jpeg, "action-jpeg", f"missing (listed in {split}.txt)"))
    if not any(image.persons for image in images) and not _errors(problems):
        problems.append(Problem(split_path(folder, split), "action-split", "no person of the split is listed in "
                                                                            "the action lists; expected some"))
    return images, problems


def _errors(problems: Iterable[Problem]) -> list[Problem]:
    return [p for p in problems if PROBLEMS[p.code][0] == "error"]


def load_split(voc2012_root: Path | str, split: str, *, check_images: bool = True) -> list[ActionImage]:
    """The images of ``ImageSets/Action/<split>.txt`` with their listed persons; one ``UserError`` listing the
    split's first problems if there are any."""
    images, problems = read_split(voc2012_root, split, check_images)
    errors = _errors(problems)
    if errors:
        more = f" (and {len(errors) - voc.MAX_LISTED} more)" if len(errors) > voc.MAX_LISTED else ""
        raise UserError(f"{len(errors)} problem(s) in the {split!r} action split of {year_dir(voc2012_root)}: "
                        f"{'; '.join(map(str, errors[:voc.MAX_LISTED]))}{more}")
    unlisted = [p for p in problems if p.code == "action-unlisted"]
    if unlisted:
        log.warning("%s %s: %d image(s) without listed persons, never scored: %s", year_dir(voc2012_root), split,
                    len(unlisted), "; ".join(p.detail for p in unlisted[:voc.MAX_LISTED]))
    return images


def listed_persons(images: Iterable[ActionImage]) -> list[ActionPerson]:
    """Every scored person of a split, in the action lists' order (the order that breaks score ties)."""
    return [p for image in images for p in image.persons]


# -- checking a copy (``ablate data check``) ----------------------------------------------------------------------
REQUIRED_SPLITS = ("train", "val")  # the paper trains on train and reports on val (test labels are not public)


class TreeCheck(NamedTuple):
    problems: list[Problem]
    jpegs: list[Path]  # the listed images' JPEGs that exist, to decode
    files: list[Path]  # every file read, for the checker's signature


def check_tree(voc2012_root: Path | str) -> TreeCheck:
    """Every problem of the action splits (train and val required, trainval when present), without decoding."""
    folder = year_dir(voc2012_root)
    missing = [Problem(folder / sub, "action-folder", f"expected {folder / sub}")
               for sub in ("Annotations", "JPEGImages", "ImageSets/Action") if not (folder / sub).is_dir()]
    if missing:
        return TreeCheck(missing, [], [])
    problems, ids = [], set()
    for split in (*REQUIRED_SPLITS, "trainval"):
        if split == "trainval" and not split_path(folder, split).is_file():
            continue
        images, found = read_split(folder, split)
        problems += found
        ids |= {image.id for image in images if image.persons}
    lists = sorted((folder / "ImageSets" / "Action").glob("*.txt"))
    jpegs = [folder / "JPEGImages" / f"{i}.jpg" for i in sorted(ids)]
    jpegs = [p for p in jpegs if p.is_file()]
    xmls = [folder / "Annotations" / f"{i}.xml" for i in sorted(ids)]
    return TreeCheck(list(dict.fromkeys(problems)), jpegs, lists + xmls + jpegs)


# -- results files ------------------------------------------------------------------------------------------------
def write_results(folder: Path | str, split: str, persons: Sequence[ActionPerson],
                  scores: Mapping[str, np.ndarray]) -> list[Path]:
    """One ``comp10_action_<split>_<action>.txt`` per action of ``scores`` (a finite score per person)."""
    paths = []
    for action in ACTIONS:
        if action not in scores:
            continue
        values = np.asarray(scores[action], np.float64)
        if values.shape != (len(persons),) or not np.isfinite(values).all():
            raise ValueError(f"scores[{action!r}]: expected {len(persons)} finite scores, got shape {values.shape}")
        path = results_path(folder, split, action)
        atomic_write_text(path, "".join(f"{p.image_id} {p.index} {voc.exact_float(v)}\n"
                                        for p, v in zip(persons, values.tolist())))
        paths.append(path)
    return paths


def _parse_results_line(fields: list[str]) -> tuple[str, int, float]:
    """``<image id> <person index> <score>``; ``ValueError`` with what is wrong (quoting one token at most)."""
    if len(fields) != 3:
        raise ValueError(f"{len(fields)} fields")
    image_id, index, score = fields
    try:
        number = _positive_int(index)
    except ValueError:
        raise ValueError(f"person index {token(index)} is not a positive integer") from None
    try:
        value = float(score)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise ValueError(f"score {token(score)} is not a finite number")
    return image_id, number, value


def read_results(folder: Path | str, split: str, persons: Sequence[ActionPerson],
                 actions: Iterable[str] = SCORED) -> dict[str, np.ndarray]:
    """Per action whose results file is in ``folder``: a score per person of ``persons`` (``-inf`` for persons the
    file has no line for, ranked last as the devkit does)."""
    where = {(p.image_id, p.index): k for k, p in enumerate(persons)}
    out = {}
    for action in actions:
        path = results_path(folder, split, action)
        if not path.is_file():
            continue
        scores = np.full(len(persons), -np.inf)
        for line, text in enumerate(_read_text(path, "a text results file").splitlines(), 1):
            if not text.split():
                continue
            try:
                image_id, index, value = _parse_results_line(text.split())
            except ValueError as e:
                raise UserError(f"{path}:{line}: {e}; expected '<image id> <person index> <score>'") from None
            k = where.get((image_id, index))
            if k is None:
                raise UserError(f"{path}:{line}: person ({token(image_id)}, {index}) is not listed in the "
                                f"{split!r} split; expected the persons of ImageSets/Action/<action>_{split}.txt")
            if scores[k] != -np.inf:
                raise UserError(f"{path}:{line}: person ({token(image_id)}, {index}) scored twice; expected one "
                                "line per person")
            scores[k] = value
        out[action] = scores
    return out
