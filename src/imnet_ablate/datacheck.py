"""``ablate data check``: validate an ImageNet and/or VOC copy before hours of training depend on it.

Every problem is a finding with a severity. *Errors* make a file (or the copy) unusable: the loaders would drop the
image at training time, or the listing / VOC reader would refuse the tree. *Warnings* are usable and handled:
CMYK and grayscale images are converted to RGB by the loaders, a PNG named ``.JPEG`` is decoded by its content,
non-image files are ignored by the listing. The command exits 0 when there are no errors and 1 otherwise, naming
the first offending paths.

The report is a stage folder (``<runs>/datacheck/<data>-<what>-<hash>/report.json``) keyed by the roots and a
signature of every checked file's path, size and mtime, so rerunning on an unchanged copy is instant and a changed
copy is checked again. Data roots may be read-only, so nothing is written beside the data; the unusable ImageNet
files are also recorded under ``<paths.cache>/datacheck/`` where :func:`known_bad` finds them for the subset
builder (:func:`without_known_bad`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing as mp
import os
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from . import cpus, datasets, imagenet, inputs, store, sun397, voc_actions
from .errors import UserError
from .progress import Progress

WHAT = ("imagenet", "voc", "both", "voc2012", "sun397")
RULES = 2  # bump when a check changes: reports of unchanged trees made by older rules are not reused
CHUNK = 256  # files per worker task: big enough to amortise the pickling, small enough to balance two cores

# problem code -> (severity, what happens to such a file)
PROBLEMS: dict[str, tuple[str, str]] = {
    "empty": ("error", "zero-byte file; the loaders drop it"),
    "unreadable": ("error", "cannot be read; the loaders drop it"),
    "not-an-image": ("error", "not an image; the loaders drop it"),
    "truncated": ("error", "truncated image data; the loaders drop it"),
    "undecodable": ("error", "image data cannot be decoded; the loaders drop it"),
    "too-large": ("error", "over data.max_pixels (from its header, never decoded); the loaders drop it"),
    "bad-name": ("error", "name with control characters or bytes that are not UTF-8; every reader skips it"),
    "missing-folder": ("error", "a folder the readers need is missing"),
    "not-a-wnid": ("error", "folder name is not a wnid; the listing refuses the tree"),
    "listing": ("error", "data.train_listing / data.val_labels / val folder refused by the listing"),
    "annotation": ("error", "malformed, refused (DTD/entities) or schema-violating XML; the VOC reader refuses it"),
    "split": ("error", "split file missing, empty, not UTF-8, or with an id twice or not a plain name; the VOC "
                       "reader refuses it"),
    "missing-annotation": ("error", "listed in a split without Annotations/<id>.xml; the VOC reader refuses it"),
    "missing-jpeg": ("error", "listed in a split without JPEGImages/<id>.jpg; training refuses it"),
    "cmyk": ("warning", "CMYK; the loaders convert it to RGB"),
    "grayscale": ("warning", "grayscale; the loaders convert it to RGB"),
    "misnamed": ("warning", "content format differs from the extension; the loaders decode by content"),
    "tiny": ("warning", "smaller than check.min_side; usable, upscaled by the loaders"),
    "stray-file": ("warning", "not an image or outside a class folder; ignored by the listing"),
    "unknown-class": ("warning", "wnid is not one of the 1000 ILSVRC-2012 classes; ignored by the subset builder"),
    "symlink-outside": ("warning", "symbolic link to outside the root; followed (a link the data's owner made)"),
    "bad-size": ("warning", "annotation <size> is not positive; unused by the readers (boxes kept as written)"),
    "box-outside": ("warning", "box extends outside the image; kept as written (the devkit scores it so)"),
    "box-empty": ("warning", "box has zero width or height; kept as written"),
    "no-objects": ("warning", "annotation without objects; contributes only negatives"),
    "size-mismatch": ("warning", "annotation <size> differs from the JPEG; boxes are used as written"),
    "unlisted": ("warning", "in no split file; never used"),
    **voc_actions.PROBLEMS,  # the VOC 2012 action devkit's (what=voc2012), checked by its reader
}
PROBLEMS |= sun397.PROBLEMS  # SUN397's own codes live with its reader
# Image problems that make one file unusable: these are what known_bad() hands the subset builder.
BAD_IMAGE = {"empty", "unreadable", "not-an-image", "truncated", "undecodable", "too-large"}
GRAYSCALE_MODES = {"1", "L", "LA", "I", "I;16", "F"}
FORMAT_OF_EXT = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".ppm": "PPM", ".pgm": "PPM", ".bmp": "BMP",
                 ".tif": "TIFF", ".tiff": "TIFF", ".webp": "WEBP"}
VOC_SPLITS = {"trainval": True, "test": True, "train": False, "val": False}  # split -> required by transfer


@dataclass(frozen=True)
class Finding:
    dataset: str  # "imagenet" | "voc"
    path: str  # relative to that dataset's root
    problem: str  # a key of PROBLEMS
    detail: str = ""

    @property
    def severity(self) -> str:
        return PROBLEMS[self.problem][0]


@dataclass(frozen=True)
class Check:
    what: str
    workers: int
    max_show: int
    min_side: int
    max_pixels: int = inputs.DEFAULT_MAX_PIXELS  # data.max_pixels: the loaders' limit


@dataclass
class Scan:
    """Files found by walking a tree: what to decode, what is already a finding, and the tree's signature."""

    root: Path
    images: list[str] = dataclasses.field(default_factory=list)
    findings: list[Finding] = dataclasses.field(default_factory=list)
    stats: list[str] = dataclasses.field(default_factory=list)  # "rel size mtime_ns" of every file seen


@dataclass
class VocScan(Scan):
    prefix: str = ""  # "VOC2007/" when the root is the VOCdevkit folder
    xmls: dict[str, str] = dataclasses.field(default_factory=dict)  # id -> rel path of Annotations/<id>.xml
    jpegs: dict[str, str] = dataclasses.field(default_factory=dict)  # id -> rel path of JPEGImages/<id>.jpg
    splits: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # split -> ids


# -- config -------------------------------------------------------------------------------------------------------
def read_check(cfg: DictConfig) -> Check:
    """``cfg.check`` validated; one line per mistake naming key, value and what is allowed (exit 2)."""
    c = cfg.check
    if c.what not in WHAT:
        raise UserError(f"check.what={c.what}: expected one of {', '.join(WHAT)}")
    workers = c.workers
    if workers == "auto":
        workers = cpus.available()
    elif not (isinstance(workers, int) and not isinstance(workers, bool) and workers >= 1):
        raise UserError(f"check.workers={c.workers}: expected auto or a whole number >= 1")
    for key in ("max_show", "min_side"):
        v = c[key]
        if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            raise UserError(f"check.{key}={v}: expected a whole number >= 1")
    return Check(str(c.what), int(workers), int(c.max_show), int(c.min_side),
                 int(cfg.data.get("max_pixels") or inputs.DEFAULT_MAX_PIXELS))


# -- one image (runs in the workers) ------------------------------------------------------------------------------
def inspect_image(path: Path, min_side: int, max_pixels: int = inputs.DEFAULT_MAX_PIXELS
                  ) -> tuple[list[tuple[str, str]], str | None]:
    """(problems as (code, detail), PIL mode) of one image file, decoding all of its data.

    JPEGs are decoded at 1/8 scale (``draft``): every byte is still entropy-decoded, so truncation is caught, at
    a fraction of the cost of a full decode. An image over ``max_pixels`` is refused from its header, as the
    loaders refuse it.
    """
    from PIL import UnidentifiedImageError

    try:
        if path.stat().st_size == 0:
            return [("empty", "0 bytes")], None
        with inputs.open_image(path, max_pixels) as im:
            fmt, mode, (w, h) = im.format, im.mode, im.size
            im.draft("RGB", (max(1, w // 8), max(1, h // 8)))
            im.load()
    except UnidentifiedImageError:
        return [("not-an-image", "PIL cannot identify the content")], None
    except inputs.TooLarge as e:
        return [("too-large", str(e))], None
    except OSError as e:
        if "truncated" in str(e).lower():
            return [("truncated", str(e))], None
        if isinstance(e, (PermissionError, IsADirectoryError)) or e.errno is not None:
            return [("unreadable", e.strerror or str(e))], None
        return [("undecodable", str(e))], None
    except (ValueError, SyntaxError, EOFError, IndexError) as e:  # what PIL's plugins raise on broken data
        return [("undecodable", f"{type(e).__name__}: {e}")], None
    problems = []
    if mode == "CMYK":
        problems.append(("cmyk", "CMYK"))
    elif mode in GRAYSCALE_MODES:
        problems.append(("grayscale", f"mode {mode}"))
    expected = FORMAT_OF_EXT.get(path.suffix.lower())
    if expected and fmt != expected:
        problems.append(("misnamed", f"{fmt} content named {path.suffix}"))
    if min(w, h) < min_side:
        problems.append(("tiny", f"{w}x{h}"))
    return problems, mode


def _check_images_chunk(args: tuple[str, str, list[str], int, int]
                        ) -> list[tuple[list[Finding], str | None, str]]:
    dataset, root, rels, min_side, max_pixels = args
    out = []
    for rel in rels:
        problems, mode = inspect_image(Path(root) / rel, min_side, max_pixels)
        out.append(([Finding(dataset, rel, code, detail) for code, detail in problems], mode, rel))
    return out


def _check_xml_chunk(args: tuple[str, list[str]]) -> list[tuple[str, tuple[int, int] | None, list[Finding]]]:
    """(annotation rel path, (width, height) or None, findings) for each Annotations/*.xml."""
    from . import voc

    root, rels = args
    out = []
    for rel in rels:
        try:
            image, warnings = voc.parse_annotation(Path(root) / rel)
        except UserError as e:
            out.append((rel, None, [Finding("voc", rel, "annotation", str(e).split(": ", 1)[-1])]))
            continue
        if image.width <= 0 or image.height <= 0:  # then every box is "outside": report the cause only
            findings = [Finding("voc", rel, "bad-size", f"{image.width}x{image.height}")]
        else:
            findings = [Finding("voc", rel, "box-outside", w.split(": ", 1)[-1]) for w in warnings]
        if len(image.labels) == 0:
            findings.append(Finding("voc", rel, "no-objects"))
        for k, (x1, y1, x2, y2) in enumerate(image.boxes.tolist()):
            if x1 == x2 or y1 == y2:
                findings.append(Finding("voc", rel, "box-empty", f"object {k} box ({x1:g}, {y1:g}, {x2:g}, {y2:g})"))
        out.append((rel, (image.width, image.height), findings))
    return out


def _pool_map(fn: Callable, tasks: list, workers: int) -> Iterable:
    """``map(fn, tasks)`` in ``workers`` spawned processes (inline for one worker or one task)."""
    workers = min(workers, len(tasks))
    if workers <= 1:
        yield from map(fn, tasks)
        return
    with mp.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(fn, tasks)


def _chunks(items: Sequence[str]) -> list[list[str]]:
    return [list(items[i:i + CHUNK]) for i in range(0, len(items), CHUNK)]


# -- walking the trees --------------------------------------------------------------------------------------------
def _entries(folder: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as it:
            return sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    except OSError as e:
        raise UserError(f"{folder}: cannot read ({e.strerror}); expected a readable folder") from e


def _stat_line(entry: os.DirEntry | Path, rel: str) -> str:
    try:
        st = entry.stat()
        return f"{inputs.shown(rel, 1000)} {st.st_size} {st.st_mtime_ns}"
    except OSError:
        return f"{inputs.shown(rel, 1000)} ? ?"


def _is_image_name(name: str) -> bool:
    from .imagenet import IMG_EXTENSIONS

    return name.lower().endswith(IMG_EXTENSIONS)


def _usable_name(scan: Scan, dataset: str, entry: os.DirEntry, rel: str) -> bool:
    """False, with a ``bad-name`` finding, for a file every reader skips (``inputs.name_problem``); a link that
    leaves the root is reported (``symlink-outside``) and followed, as the readers follow it."""
    problem = inputs.name_problem(entry.name)
    if problem:
        scan.findings.append(Finding(dataset, inputs.shown(rel, 1000), "bad-name", f"name {problem}"))
        return False
    if entry.is_symlink() and inputs.leaves_root(entry.path, scan.root):
        target = inputs.shown(os.path.realpath(entry.path), 200)
        scan.findings.append(Finding(dataset, rel, "symlink-outside", f"-> {target}"))
    return True


def scan_class_folder(scan: Scan, folder: Path, rel: str) -> None:
    """Images of ``<split>/<wnid>/``, taken by their names as the listing takes them (a folder or a broken link
    named like an image is then an unreadable image); anything else in it is stray."""
    for e in _entries(folder):
        child = f"{rel}/{e.name}"
        scan.stats.append(_stat_line(e, child))
        if not _usable_name(scan, "imagenet", e, child):
            continue
        if _is_image_name(e.name):
            scan.images.append(child)
        else:
            scan.findings.append(Finding("imagenet", child, "stray-file", "folder" if e.is_dir() else "not an image"))


def scan_split(scan: Scan, root: Path, sub: str, classes: frozenset[str], flat: bool) -> int:
    """``train/`` or the val folder: ``<wnid>/`` class folders, or (``flat``) images with a label file. Returns
    the number of folders found (the listing refuses a split without any)."""
    from .wordnet import WNID

    folders = 0
    for e in _entries(root / sub):
        rel = f"{sub}/{e.name}"
        if e.is_dir():
            folders += 1
            if not WNID.fullmatch(e.name):  # names with control characters included: the listing refuses them
                scan.findings.append(Finding("imagenet", inputs.shown(rel, 1000), "not-a-wnid",
                                             "expected <split>/<wnid>/ folders"))
            elif e.name not in classes:
                scan.findings.append(Finding("imagenet", rel, "unknown-class"))
            elif _usable_name(scan, "imagenet", e, rel):
                scan_class_folder(scan, Path(e.path), rel)
            continue
        scan.stats.append(_stat_line(e, rel))
        if flat and _is_image_name(e.name):
            if _usable_name(scan, "imagenet", e, rel):
                scan.images.append(rel)
        else:
            scan.findings.append(Finding("imagenet", inputs.shown(rel, 1000), "stray-file", "outside a class folder"))
    return folders


def scan_listing(scan: Scan, listing: Path, classes: frozenset[str]) -> None:
    """``data.train_listing``: the images it names are what a run trains on, so they are the ones checked; a
    listing the reader refuses is a ``listing`` error."""
    scan.stats.append(_stat_line(listing, str(listing)))
    try:
        files = imagenet.read_train_listing(listing)
    except UserError as e:
        scan.findings.append(Finding("imagenet", inputs.shown(listing, 1000), "listing", str(e)))
        return
    for wnid, f in files.items():
        if wnid not in classes:
            scan.findings.append(Finding("imagenet", inputs.shown(listing, 1000), "unknown-class", wnid))
        for rel in f.paths():
            scan.stats.append(_stat_line(scan.root / rel, rel))
            scan.images.append(rel)


def check_val_labels(scan: Scan, val: Path, labels: Path) -> None:
    """``data.val_labels`` read as the listing reads it (every labelled file must be in the val folder)."""
    scan.stats.append(_stat_line(labels, str(labels)))
    try:
        imagenet.read_flat_val(scan.root, val, labels)
    except UserError as e:
        scan.findings.append(Finding("imagenet", inputs.shown(labels, 1000), "listing", str(e)))


def scan_imagenet(root: Path, val_dir: str, flat_val: bool, train_listing: Path | None = None,
                  val_labels: Path | None = None) -> Scan:
    """The train images (of ``train/<wnid>/`` or of ``train_listing``) and the val images (of ``<val_dir>/<wnid>/``
    or, with ``val_labels``, of the flat ``val_dir``), with everything the listing would refuse as findings."""
    from .wordnet import load

    scan, classes = Scan(root), frozenset(load().classes)
    if train_listing is not None:
        scan_listing(scan, train_listing, classes)
    elif not (root / "train").is_dir():
        scan.findings.append(Finding("imagenet", "train", "missing-folder", "expected train/<wnid>/*.JPEG"))
    elif not scan_split(scan, root, "train", classes, flat=False):
        scan.findings.append(Finding("imagenet", "train", "missing-folder", "no class folders; expected "
                                     "train/<wnid>/*.JPEG"))
    sub = val_dir.strip("/")
    if (root / sub).is_dir():
        folders = scan_split(scan, root, sub, classes, flat=flat_val)
        if val_labels is not None:
            check_val_labels(scan, root / sub, val_labels)
        elif not folders and imagenet.image_names(root / sub):
            scan.findings.append(Finding("imagenet", sub, "listing", "images but no <wnid>/ folders; expected "
                                         "class folders, or data.val_labels for a flat val folder"))
    return scan


def _voc_ids(folder: Path, sub: str, suffix: str, scan: Scan, prefix: str) -> dict[str, str]:
    """``{id: rel path}`` of ``<sub>/*<suffix>``, taken by name as the readers open them (a folder named so is
    then unreadable); other files there are stray."""
    out = {}
    for e in _entries(folder / sub):
        rel = f"{prefix}{sub}/{e.name}"
        scan.stats.append(_stat_line(e, rel))
        if not _usable_name(scan, "voc", e, rel):
            continue
        if e.name.endswith(suffix):
            out[e.name[: -len(suffix)]] = rel
        else:
            scan.findings.append(Finding("voc", rel, "stray-file", f"expected *{suffix}"))
    return out


def _voc_splits(folder: Path, prefix: str, scan: Scan) -> dict[str, list[str]]:
    from . import voc

    splits = {}
    for split, required in VOC_SPLITS.items():
        path = folder / "ImageSets" / "Main" / f"{split}.txt"
        rel = f"{prefix}ImageSets/Main/{split}.txt"
        scan.stats.append(_stat_line(path, rel))
        try:
            if inputs.is_present(path, "a split file"):
                splits[split] = voc.split_ids(folder, split)
            elif required:
                scan.findings.append(Finding("voc", rel, "split", "missing; `ablate transfer` needs it"))
        except UserError as e:
            scan.findings.append(Finding("voc", rel, "split", str(e).split(": ", 1)[-1]))
    return splits


# -- the checks ---------------------------------------------------------------------------------------------------
def check_images(dataset: str, root: Path, rels: list[str], check: Check) -> tuple[list[Finding], Counter]:
    """Decode every image in parallel; (findings, count of PIL modes)."""
    findings, modes = [], Counter()
    tasks = [(dataset, str(root), chunk, check.min_side, check.max_pixels) for chunk in _chunks(rels)]
    bar = Progress(len(rels), f"{dataset} images", "img")
    for results in _pool_map(_check_images_chunk, tasks, check.workers):
        for found, mode, _ in results:
            findings += found
            modes[mode or "unusable"] += 1
        bar.update(len(results))
    bar.close()
    return findings, modes


def check_imagenet(scan: Scan, check: Check) -> tuple[list[Finding], dict[str, Any]]:
    found, modes = check_images("imagenet", scan.root, scan.images, check)
    classes = {rel.split("/")[1] for rel in scan.images if rel.startswith("train/")}
    summary = {"root": str(scan.root), "images": len(scan.images), "train_classes": len(classes), "modes": dict(modes)}
    return scan.findings + found, summary


def scan_voc(voc_root: Path) -> VocScan:
    """Folders, annotation and JPEG ids, and split files of a VOCdevkit (nothing parsed or decoded yet)."""
    from . import voc

    folder = voc.year_dir(voc_root)
    prefix = "" if folder == voc_root else f"{folder.name}/"
    scan = VocScan(voc_root, prefix=prefix)
    if problem := voc.missing_year_dir(voc_root):  # one finding naming the root, not three under a made-up path
        scan.findings.append(Finding("voc", folder.name, "missing-folder", problem))
        return scan
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        if not (folder / sub).is_dir():
            scan.findings.append(Finding("voc", f"{prefix}{sub}", "missing-folder", f"expected {folder / sub}"))
    if scan.findings:
        return scan
    scan.xmls = _voc_ids(folder, "Annotations", ".xml", scan, prefix)
    scan.jpegs = _voc_ids(folder, "JPEGImages", ".jpg", scan, prefix)
    scan.splits = _voc_splits(folder, prefix, scan)
    return scan


def check_voc(scan: VocScan, check: Check) -> tuple[list[Finding], dict[str, Any]]:
    """Annotations (schema and boxes), split files against annotations and JPEGs, and every JPEG decoded."""
    findings = list(scan.findings)
    sizes: dict[str, tuple[int, int]] = {}
    tasks = [(str(scan.root), chunk) for chunk in _chunks(sorted(scan.xmls.values()))]
    bar = Progress(len(scan.xmls), "voc annotations", "file")
    for results in _pool_map(_check_xml_chunk, tasks, check.workers):
        for rel, size, found in results:
            findings += found
            if size is not None:
                sizes[Path(rel).stem] = size
        bar.update(len(results))
    bar.close()
    prefix = scan.prefix
    listed = {i for ids in scan.splits.values() for i in ids}
    for split, ids in scan.splits.items():
        findings += [Finding("voc", f"{prefix}Annotations/{i}.xml", "missing-annotation", f"listed in {split}.txt")
                     for i in ids if i not in scan.xmls]
        findings += [Finding("voc", f"{prefix}JPEGImages/{i}.jpg", "missing-jpeg", f"listed in {split}.txt")
                     for i in ids if i not in scan.jpegs]
    findings += [Finding("voc", rel, "unlisted") for i, rel in sorted(scan.xmls.items()) if i not in listed]
    image_findings, modes = check_images("voc", scan.root, sorted(scan.jpegs.values()), check)
    findings += image_findings + _size_mismatches(scan.root, scan.jpegs, sizes)
    summary = {"root": str(scan.root), "annotations": len(scan.xmls), "images": len(scan.jpegs),
               "modes": dict(modes), "splits": {s: len(ids) for s, ids in scan.splits.items()}}
    return findings, summary


def check_sun397(scan: sun397.Scan, check: Check) -> tuple[list[Finding], dict[str, Any]]:
    """The reader's findings (ClassName.txt, partitions, stray files) and every image decoded."""
    found, modes = check_images("sun397", scan.root, scan.images, check)
    return [Finding("sun397", *f) for f in scan.findings()] + found, scan.summary | {"modes": dict(modes)}


def _size_mismatches(voc_root: Path, jpegs: dict[str, str], sizes: dict[str, tuple[int, int]]) -> list[Finding]:
    from PIL import Image

    out = []
    for i, (w, h) in sorted(sizes.items()):
        if i not in jpegs:
            continue
        try:
            with Image.open(voc_root / jpegs[i]) as im:
                actual = im.size
        except (OSError, ValueError):
            continue  # already an image finding
        if actual != (w, h):
            out.append(Finding("voc", jpegs[i], "size-mismatch", f"annotation {w}x{h}, JPEG {actual[0]}x{actual[1]}"))
    return out


def scan_voc2012(voc2012_root: Path) -> Scan:
    """The VOC 2012 action splits, lists and annotations, checked by ``voc_actions`` (no image decoded yet)."""
    found = voc_actions.check_tree(voc2012_root)

    def rel(path: Path) -> str:
        return str(path.relative_to(voc2012_root)) if path.is_relative_to(voc2012_root) else str(path)

    return Scan(voc2012_root, images=[rel(p) for p in found.jpegs],
                findings=[Finding("voc2012", rel(p.path), p.code, p.detail) for p in found.problems],
                stats=[f"{rel(p)} {p.stat().st_size} {p.stat().st_mtime_ns}" for p in found.files])


# -- report -------------------------------------------------------------------------------------------------------
def _sorted(findings: Iterable[Finding]) -> list[Finding]:
    return sorted(set(findings), key=lambda f: (f.severity != "error", f.dataset, f.problem, f.path))


def report(findings: list[Finding], summaries: dict[str, Any]) -> dict[str, Any]:
    findings = _sorted(findings)
    counts = Counter(f.problem for f in findings)
    return {
        "usable": not any(f.severity == "error" for f in findings),
        "datasets": summaries,
        "counts": {p: {"n": n, "severity": PROBLEMS[p][0], "handling": PROBLEMS[p][1]} for p, n in counts.items()},
        "findings": [dataclasses.asdict(f) | {"severity": f.severity} for f in findings],
    }


def format_summary(rep: dict[str, Any], max_show: int) -> str:
    """The per-dataset totals, then one line per problem with its handling and its first paths."""
    lines = []
    for name, s in rep["datasets"].items():
        extra = ", ".join(f"{k} {v}" for k, v in s.items() if k != "root")
        lines.append(f"{name}: {s['root']} ({extra})")
    by_problem: dict[str, list[str]] = {}
    for f in rep["findings"]:
        by_problem.setdefault(f["problem"], []).append(f["path"] + (f" ({f['detail']})" if f["detail"] else ""))
    for problem, paths in by_problem.items():
        c = rep["counts"][problem]
        lines.append(f"{c['severity']:<7} {problem:<18} {c['n']:>7}  {c['handling']}")
        lines += [f"          {p}" for p in paths[:max_show]]
        if len(paths) > max_show:
            lines.append(f"          ... {len(paths) - max_show} more in the report")
    lines.append("usable: " + ("yes" if rep["usable"] else "no (errors above)"))
    return "\n".join(lines)


def error_message(rep: dict[str, Any], report_path: Path, max_show: int) -> str:
    errors = [f for f in rep["findings"] if f["severity"] == "error"]
    shown = "; ".join(f"{f['dataset']}:{f['path']} ({f['problem']})" for f in errors[:max_show])
    more = f" and {len(errors) - max_show} more" if len(errors) > max_show else ""
    return (f"data check found {len(errors)} error(s): {shown}{more}; full report: {report_path} "
            "(the subset builder skips the unusable ImageNet images it lists)")


# -- known bad files (read by the subset builder) ----------------------------------------------------------------
def _bad_file(imagenet_root: Path, cache_dir: Path) -> Path:
    key = hashlib.sha256(str(Path(imagenet_root).resolve()).encode()).hexdigest()[:24]
    return Path(cache_dir) / "datacheck" / f"{key}.json"


def _stat_of(path: Path) -> dict[str, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def write_known_bad(imagenet_root: Path, cache_dir: Path, findings: Iterable[Finding], report_path: Path) -> None:
    root = Path(imagenet_root).resolve()
    bad = {f.path: {"problem": f.problem, **(_stat_of(root / f.path) or {})}
           for f in findings if f.dataset == "imagenet" and f.problem in BAD_IMAGE}
    store.atomic_write_json(_bad_file(root, cache_dir), {"root": str(root), "report": str(report_path), "bad": bad})


def known_bad(imagenet_root: Path | str, cache_dir: Path | str) -> set[str]:
    """Paths (relative to the root) the last ``ablate data check`` of this root found unusable and that are
    unchanged since (same size and mtime): a file replaced by a good copy is no longer skipped."""
    root = Path(imagenet_root).resolve()
    try:
        record = json.loads(_bad_file(root, Path(cache_dir)).read_text())
        bad = record["bad"] if record["root"] == str(root) else {}
        return {rel for rel, meta in bad.items()
                if _stat_of(root / rel) == {"size": meta["size"], "mtime_ns": meta["mtime_ns"]}}
    except (OSError, ValueError, KeyError, TypeError):
        return set()


def without_known_bad(listing: imagenet.Listing, cache_dir: Path | str) -> imagenet.Listing:
    """An ``imagenet.Listing`` minus :func:`known_bad`'s files. Its checksum changes only when files are dropped,
    so a subset built from it gets its own stage folder and clean copies keep their hashes."""
    bad = known_bad(listing.root, cache_dir)
    if not bad:
        return listing
    dropped = sorted(p for files in [*listing.train.values(), *listing.val.values()] for p in files.paths()
                     if p in bad)
    if not dropped:
        return listing

    def keep(classes: imagenet.ClassFiles) -> imagenet.ClassFiles:
        return {w: dataclasses.replace(f, names=[n for n in f.names if f.prefix + n not in bad])
                for w, f in classes.items()}

    checksum = hashlib.sha256("\0".join([listing.checksum, *dropped]).encode()).hexdigest()
    return dataclasses.replace(listing, train=keep(listing.train), val=keep(listing.val), checksum=checksum)


# -- the command --------------------------------------------------------------------------------------------------
def _signature(scans: Iterable[Scan]) -> str:
    h = hashlib.sha256()
    for scan in scans:
        h.update("\n".join(sorted(scan.stats)).encode())
        h.update(b"\0")
    return h.hexdigest()


def check_all(scans: dict[str, Scan], check: Check) -> dict[str, Any]:
    """The report of the scanned trees: every image decoded, every annotation parsed (the slow part)."""
    findings: list[Finding] = []
    summaries: dict[str, Any] = {}
    if "imagenet" in scans:
        found, summaries["imagenet"] = check_imagenet(scans["imagenet"], check)
        findings += found
    if "voc" in scans:
        found, summaries["voc"] = check_voc(scans["voc"], check)
        findings += found
    if "voc2012" in scans:
        scan = scans["voc2012"]
        found, modes = check_images("voc2012", scan.root, scan.images, check)
        findings += scan.findings + found
        summaries["voc2012"] = {"root": str(scan.root), "images": len(scan.images), "modes": dict(modes)}
    if "sun397" in scans:
        found, summaries["sun397"] = check_sun397(scans["sun397"], check)
        findings += found
    return report(findings, summaries)


def _given_file(value: object) -> Path | None:
    """A listing or label file named in the config, resolved as ``imagenet.list_imagenet`` resolves it."""
    return Path(str(value)).expanduser().resolve() if value else None


def run(cfg: DictConfig) -> Path:
    """``ablate data check``: check, print the summary, write the report; exit 1 (after writing) on errors."""
    check = read_check(cfg)
    scans: dict[str, Any] = {}
    spec: dict[str, Any] = {"what": check.what, "min_side": check.min_side, "max_pixels": check.max_pixels,
                            "rules": RULES}
    if check.what == "sun397":
        scans["sun397"] = sun397.scan(datasets.root(cfg, "sun397").resolve())
        spec["sun397"] = str(scans["sun397"].root)
    if check.what in ("imagenet", "both"):
        root = datasets.root(cfg, "imagenet").resolve()
        val_dir, val_labels = str(cfg.data.get("val_dir") or "val"), cfg.data.get("val_labels")
        listing = cfg.data.get("train_listing")
        scans["imagenet"] = scan_imagenet(root, val_dir, flat_val=bool(val_labels),
                                          train_listing=_given_file(listing), val_labels=_given_file(val_labels))
        spec |= {"imagenet": str(root), "val_dir": val_dir, "val_labels": val_labels, "train_listing": listing}
    if check.what in ("voc", "both"):
        voc_root = datasets.root(cfg, "voc2007").resolve()
        scans["voc"] = scan_voc(voc_root)
        spec["voc"] = str(voc_root)
    if check.what == "voc2012":
        scans["voc2012"] = scan_voc2012(datasets.root(cfg, "voc2012").resolve())
        spec["voc2012"] = str(scans["voc2012"].root)
    stage = store.Stage(cfg.paths.runs, "datacheck", f"{cfg.data.name}-{check.what}",
                        spec | {"signature": _signature(scans.values())})
    report_path = stage.path / "report.json"
    if not stage.is_done():
        with stage.lock():
            if not stage.is_done():
                stage.write_spec()
                store.atomic_write_json(report_path, check_all(scans, check))
                store.atomic_write_text(stage.path / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
                stage.finish(["report.json", "config.yaml"])
    rep = json.loads(report_path.read_text())
    if "imagenet" in scans:
        bad = [Finding(**{k: f[k] for k in ("dataset", "path", "problem", "detail")}) for f in rep["findings"]]
        write_known_bad(datasets.root(cfg, "imagenet"), Path(cfg.paths.cache), bad, report_path)
    print(format_summary(rep, check.max_show))
    if not rep["usable"]:
        raise UserError(error_message(rep, report_path, check.max_show), exit_code=1)
    return stage.path
