"""SUN397 on disk: the 397 scene categories, the official train/test partitions, and what a copy holds.

The layout as distributed: ``SUN397/ClassName.txt`` (one ``/a/abbey`` line per category; some have a third level,
``/a/apartment_building/outdoor``), images at ``SUN397/<letter>/<category>/sun_<id>.jpg``, and the partitions
``Training_NN.txt`` / ``Testing_NN.txt`` (NN = 01..10; 50 + 50 images per category; lines like
``/a/abbey/sun_aaalbzqrimafwbiv.jpg``). The partitions ship as an archive of their own, so copies keep them either
in ``SUN397/Partitions/`` or in a ``Partitions/`` folder beside ``SUN397/``: both are read, in that order. Without
either, :func:`load_partition` makes a seeded split (:data:`PER_CLASS` + :data:`PER_CLASS` images per category,
or half and half of a smaller category) and says so in what it returns.

Labels are indices into the packaged category list (:func:`categories`, sorted as ``ClassName.txt`` is, written by
``scripts/build_sun397.py``), so a copy that holds only some categories keeps the same labels. Every problem with
a copy is a :class:`Problem`: the reader raises the first one as a one-line ``UserError``, ``ablate data check``
(:func:`scan`) collects them all.
"""
from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from .errors import UserError
from .imagenet import IMG_EXTENSIONS

CATEGORY_FILE = "sun397_categories.txt"
CLASS_NAMES = "ClassName.txt"
PARTITIONS = range(1, 11)
PER_CLASS = 50  # images per category and side of the official partitions
EXPECTED_LINE = "expected lines like /a/abbey/sun_aaalbzqrimafwbiv.jpg"
MAX_TOKEN = 80  # the most of an offending token a message repeats

# ``ablate data check`` problem codes -> (severity, what happens to such a file); datacheck.PROBLEMS takes them in.
PROBLEMS: dict[str, tuple[str, str]] = {
    "class-names": ("error", "SUN397/ClassName.txt missing, unreadable or naming an unknown category; "
                             "the SUN397 reader refuses the tree"),
    "partition": ("error", "partition file unreadable, malformed, with a path outside SUN397/, a line twice or "
                           "an image on both sides; the SUN397 reader refuses it"),
    "unknown-category": ("error", "partition line of a category not in ClassName.txt; the SUN397 reader refuses it"),
    "missing-image": ("error", "named in a partition file but not on disk; the SUN397 reader refuses the partition"),
    "no-partitions": ("warning", "no Partitions/ folder; the task uses a seeded 50 + 50 split per category"),
}


@functools.cache
def categories() -> tuple[str, ...]:
    """The 397 categories as ``ClassName.txt`` writes them (``/a/abbey``), sorted; a label is an index into it."""
    return tuple((resources.files(__package__) / CATEGORY_FILE).read_text(encoding="ascii").split())


def class_name(category: str) -> str:
    """torchvision's name of a category: ``/a/apartment_building/outdoor`` -> ``apartment_building/outdoor``."""
    return category[3:]


class Sample(NamedTuple):
    path: str  # relative to the SUN397 folder: "a/abbey/sun_aaalbzqrimafwbiv.jpg"
    label: int  # index into categories()


@dataclass(frozen=True)
class Split:
    """The train and test images of a partition, and which split it is (JSON-able, for a stage's spec)."""

    train: list[Sample]
    test: list[Sample]
    source: dict[str, Any]  # {"kind": "official", "partition", "sha256"} or {"kind": "seeded", "seed", ...}


class Problem(NamedTuple):
    file: Path
    line: int  # 1-based; 0 for the whole file
    code: str  # a key of PROBLEMS
    detail: str  # "<what was wrong>; <what is expected>"

    def message(self) -> str:
        return f"{self.file}{f':{self.line}' if self.line else ''}: {self.detail}"


Report = Callable[[Problem], None]


def raise_problem(problem: Problem) -> None:
    """The reader's :data:`Report`: the first problem stops it."""
    raise UserError(problem.message())


def _token(text: str) -> str:
    return repr(text if len(text) <= MAX_TOKEN else text[:MAX_TOKEN] + "...")


# -- text files ---------------------------------------------------------------------------------------------------
def read_lines(path: Path, code: str, report: Report) -> list[tuple[int, str]]:
    """(line number, stripped text) of the non-empty lines of a small text file. A line with bytes that are not
    UTF-8 or with control characters is reported (by number, never echoed) and skipped."""
    try:
        data = path.read_bytes()
    except OSError as e:
        report(Problem(path, 0, code, f"cannot read ({e.strerror}); expected a readable text file"))
        return []
    out = []
    for number, raw in enumerate(data.split(b"\n"), 1):
        try:
            text = raw.decode("utf-8").strip().lstrip("\ufeff")  # a byte-order mark from a Windows editor
        except UnicodeDecodeError:
            text = None
        if text is None or any(ord(ch) < 32 or ord(ch) == 127 for ch in text):
            report(Problem(path, number, code, "bytes that are not printable UTF-8 text; expected text lines"))
        elif text:
            out.append((number, text))
    return out


def class_names(sun: Path, report: Report) -> dict[str, int]:
    """The categories of ``SUN397/ClassName.txt`` and their labels; each must be one of the packaged 397."""
    path = sun / CLASS_NAMES
    if not path.is_file():
        report(Problem(path, 0, "class-names", "missing; expected the folder holding SUN397/ (or SUN397/ itself) "
                                               f"with {CLASS_NAMES} as distributed"))
        return {}
    labels = {c: i for i, c in enumerate(categories())}
    out = {}
    for number, text in read_lines(path, "class-names", report):
        if text in labels:
            out[text] = labels[text]
        else:
            report(Problem(path, number, "class-names", f"{_token(text)} is not a SUN397 category; expected "
                                                         "lines like /a/abbey, one of the 397 categories"))
    return out


# -- where things are ---------------------------------------------------------------------------------------------
def sun_dir(root: Path | str) -> Path:
    """The ``SUN397`` folder of a copy: ``root/SUN397``, or ``root`` itself when it holds ``ClassName.txt``."""
    root = Path(root).expanduser()
    return root if (root / CLASS_NAMES).is_file() and not (root / "SUN397").is_dir() else root / "SUN397"


def partitions_dir(sun: Path) -> Path | None:
    """``SUN397/Partitions/`` or a ``Partitions/`` beside ``SUN397/`` (the first that exists), else None."""
    return next((d for d in (sun / "Partitions", sun.parent / "Partitions") if d.is_dir()), None)


def partition_files(partition: int) -> tuple[str, str]:
    return f"Training_{partition:02d}.txt", f"Testing_{partition:02d}.txt"


def image_names(folder: Path) -> list[str]:
    """Names of the image files directly in a category folder (none if it is missing)."""
    try:
        with os.scandir(folder) as it:
            return sorted(e.name for e in it if e.name.lower().endswith(IMG_EXTENSIONS) and e.is_file())
    except OSError:
        return []


# -- partitions ---------------------------------------------------------------------------------------------------
def parse_line(path: Path, number: int, text: str, known: dict[str, int], report: Report) -> str | None:
    """A partition line -> the image path relative to SUN397/ (None, reported, when it is not a usable line)."""
    parts = text.split("/")
    if len(parts) < 4 or parts[0] or "\\" in text or any(p in ("", ".", "..") for p in parts[1:]):
        report(Problem(path, number, "partition", f"{_token(text)} is not a path inside SUN397/; {EXPECTED_LINE}"))
        return None
    category = "/".join(parts[:-1])
    if category not in known:
        report(Problem(path, number, "unknown-category", f"category {_token(category)} is not in {CLASS_NAMES}; "
                                                         f"expected one of its categories"))
        return None
    return text[1:]


def read_partition(path: Path, known: dict[str, int], report: Report) -> list[tuple[int, str]]:
    """(line number, relative image path) of one partition file; a path listed twice is reported."""
    out, seen = [], set()
    for number, text in read_lines(path, "partition", report):
        rel = parse_line(path, number, text, known, report)
        if rel is None:
            continue
        if rel in seen:
            report(Problem(path, number, "partition", f"{_token(text)} is listed twice; expected each image once"))
            continue
        seen.add(rel)
        out.append((number, rel))
    return out


def on_disk(sun: Path) -> Callable[[str], bool]:
    """Whether an image path relative to SUN397/ exists; each category folder is listed once, not each file."""
    listed: dict[str, set[str]] = {}

    def exists(rel: str) -> bool:
        folder, _, name = rel.rpartition("/")
        if folder not in listed:
            listed[folder] = set(image_names(sun / folder))
        return name in listed[folder]
    return exists


def missing_images(path: Path, lines: list[tuple[int, str]], exists: Callable[[str], bool], report: Report) -> None:
    for number, rel in lines:
        if not exists(rel):
            report(Problem(path, number, "missing-image", f"SUN397/{rel} is not on disk; expected every image "
                                                          "a partition names"))


def official_split(sun: Path, folder: Path, partition: int, known: dict[str, int], check_files: bool) -> Split:
    train_file, test_file = (folder / name for name in partition_files(partition))
    for path in (train_file, test_file):
        if not path.is_file():
            raise UserError(f"{path}: missing; expected Training_{partition:02d}.txt and Testing_{partition:02d}.txt "
                            f"in {folder}")
    train, test = read_partition(train_file, known, raise_problem), read_partition(test_file, known, raise_problem)
    in_train = {rel for _, rel in train}
    both = [(number, rel) for number, rel in test if rel in in_train]
    if both:
        raise_problem(Problem(test_file, both[0][0], "partition", f"SUN397/{both[0][1]} is also in {train_file.name}; "
                                                                  "expected disjoint training and test images"))
    if check_files:
        exists = on_disk(sun)
        missing_images(train_file, train, exists, raise_problem)
        missing_images(test_file, test, exists, raise_problem)
    samples = [[Sample(rel, known["/" + rel.rpartition("/")[0]]) for _, rel in lines] for lines in (train, test)]
    digest = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (train_file, test_file)}
    return Split(samples[0], samples[1], {"kind": "official", "partition": partition, "sha256": digest})


def seeded_split(sun: Path, known: dict[str, int], seed: int, per_class: int = PER_CLASS) -> Split:
    """Per category, a seeded draw of ``per_class`` training and ``per_class`` test images (half and half of a
    category with fewer than ``2 * per_class``); the same seed and files give the same split."""
    train, test, listing = [], [], hashlib.sha256()
    for category, label in sorted(known.items(), key=lambda kv: kv[1]):
        names = image_names(sun / category[1:])
        listing.update("\n".join([category, *names, ""]).encode())
        order = np.random.default_rng([seed, label]).permutation(len(names))
        k = min(per_class, len(names) // 2)
        train += [Sample(f"{category[1:]}/{names[i]}", label) for i in sorted(order[:k])]
        test += [Sample(f"{category[1:]}/{names[i]}", label) for i in sorted(order[k:2 * k])]
    return Split(train, test, {"kind": "seeded", "seed": seed, "per_class": per_class,
                               "listing_sha256": listing.hexdigest()})


def load_partition(root: Path | str, partition: int = 1, seed: int = 0, check_files: bool = True) -> Split:
    """The train and test images of official partition ``partition`` (1..10) of the copy at ``root`` (the folder
    holding ``SUN397/``, or ``SUN397/`` itself); a seeded split when the copy has no ``Partitions/`` folder.
    ``check_files=False`` skips checking that every listed image is on disk."""
    if isinstance(partition, bool) or not isinstance(partition, int) or partition not in PARTITIONS:
        raise UserError(f"partition={partition}: expected an integer from 1 to 10 (Training_01.txt .. Training_10.txt)")
    sun = sun_dir(root)
    known = class_names(sun, raise_problem)
    folder = partitions_dir(sun)
    split = seeded_split(sun, known, seed) if folder is None else official_split(sun, folder, partition, known,
                                                                                   check_files)
    if not split.train or not split.test:
        raise UserError(f"{sun}: the {split.source['kind']} split has no training or no test images; expected "
                        "images at SUN397/<letter>/<category>/*.jpg and partitions that list them")
    return split


# -- ablate data check --------------------------------------------------------------------------------------------
@dataclass
class Scan:
    """What ``ablate data check`` needs of a copy: the images to decode and the problems found without decoding,
    with paths relative to ``root`` (the folder holding ``SUN397/``)."""

    root: Path
    images: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    stray: list[str] = field(default_factory=list)  # files outside a category folder
    stats: list[str] = field(default_factory=list)  # "rel size mtime_ns" of every file seen
    summary: dict[str, Any] = field(default_factory=dict)

    def relative(self, path: Path) -> str:
        return Path(os.path.relpath(path, self.root)).as_posix()

    def findings(self) -> Iterator[tuple[str, str, str]]:
        """(relative path, problem code, detail) of every problem found without decoding."""
        for p in self.problems:
            yield self.relative(p.file), p.code, (f"line {p.line}: " if p.line else "") + p.detail
        for rel in self.stray:
            yield rel, "stray-file", "not an image in a category folder"


def walk(folder: Path) -> Iterator[os.DirEntry]:
    """Every file under ``folder`` (hidden entries skipped), in sorted order."""
    try:
        with os.scandir(folder) as it:
            entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    except OSError:
        return
    for e in entries:
        if e.is_dir(follow_symlinks=False):
            yield from walk(Path(e.path))
        else:
            yield e


def scan_files(scan: Scan, sun: Path, known: set[str], partitions: Path | None) -> None:
    """Images in category folders; anything else is stray (top-level text files such as ClassName.txt aside)."""
    for e in walk(sun):
        path = Path(e.path)
        rel = scan.relative(path)
        if partitions is not None and path.is_relative_to(partitions):
            continue
        try:
            st = e.stat()
            scan.stats.append(f"{rel} {st.st_size} {st.st_mtime_ns}")
        except OSError:
            scan.stats.append(f"{rel} ? ?")
        category = "/" + path.parent.relative_to(sun).as_posix()
        if category in known and e.name.lower().endswith(IMG_EXTENSIONS):
            scan.images.append(rel)
        elif not (path.parent == sun and e.name.endswith(".txt")):
            scan.stray.append(rel)


def scan_partitions(scan: Scan, sun: Path, folder: Path, known: dict[str, int]) -> list[int]:
    """Check every partition pair present; returns the partition numbers found."""
    found = []
    exists = {rel.removeprefix(scan.relative(sun) + "/") for rel in scan.images}.__contains__
    for partition in PARTITIONS:
        paths = [folder / name for name in partition_files(partition)]
        present = [p for p in paths if p.is_file()]
        if not present:
            continue
        found.append(partition)
        for path in paths:
            if path not in present:
                scan.problems.append(Problem(path, 0, "partition", f"missing; expected it beside {present[0].name}"))
                continue
            scan.stats.append(f"{scan.relative(path)} {path.stat().st_size} {path.stat().st_mtime_ns}")
            missing_images(path, read_partition(path, known, scan.problems.append), exists, scan.problems.append)
    return found


def scan(root: Path | str) -> Scan:
    """Files, ``ClassName.txt`` and every partition file of a copy (nothing decoded yet)."""
    sun = sun_dir(root)
    result = Scan(sun.parent)
    known = class_names(sun, result.problems.append)
    folder = partitions_dir(sun)
    scan_files(result, sun, set(known), folder)
    if folder is None:
        result.problems.append(Problem(sun.parent / "Partitions", 0, "no-partitions",
                                       "no SUN397/Partitions/ nor Partitions/ beside SUN397/; "
                                       "expected the official Training_NN.txt / Testing_NN.txt"))
        partitions = []
    else:
        partitions = scan_partitions(result, sun, folder, known)
    result.summary = {"root": str(sun.parent), "categories": len(known), "images": len(result.images),
                      "partitions": partitions}
    return result
