"""Listing of an ImageNet copy: which image files each class has, in train and val. Never opens an image.

A 1.28M-file scan takes seconds, so it is done once and cached under ``<paths.cache>/listings/``. The cache key
covers the root path and the mtime of ``train/``, ``val/`` and every class folder (a folder's mtime changes when a
file is added, removed or renamed in it), or the mtime and size of the listing/label files, so a changed tree is
rescanned and an unchanged one is read back in well under a second.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from . import forked, inputs, store
from .errors import UserError
from .wordnet import WNID

log = logging.getLogger(__name__)

# The extensions torchvision's ImageFolder accepts; anything else in a class folder is ignored, like there.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# The same test run by the regex engine over a folder's NUL-joined names: no Python work per file (names cannot hold
# NUL). Entries are not stat'ed: anything named like an image is taken as one, as ImageFolder does.
_IMAGES_IN = re.compile(r"(?<![^\0])[^.\0][^\0]*\.(?:jpe?g|png|ppm|bmp|pgm|tiff?|webp)(?![^\0])", re.IGNORECASE)
CACHE_VERSION = "3"


@dataclass(frozen=True)
class Files:
    """One class's image files: ``prefix + name`` is a path relative to the ImageNet root. Keeping the folder
    prefix once per class halves the cache and the memory of a 1.28M-file listing."""

    prefix: str  # "train/n01440764/"; "" when names are whole paths (listing and label files)
    names: list[str]  # sorted

    def __len__(self) -> int:
        return len(self.names)

    def paths(self) -> list[str]:
        return [self.prefix + n for n in self.names]


ClassFiles = dict[str, Files]  # wnid -> its files
# Listings made while planning (plan=true writes nothing, so no cache file), by the cache file they would have gone
# to: a plan composes the data's config once per stage, and without this each one would list the copy again.
_PLANNED: dict[Path, tuple[str, ClassFiles, ClassFiles]] = {}


@dataclass(frozen=True)
class Listing:
    root: Path
    train: ClassFiles
    val: ClassFiles
    checksum: str  # SHA-256 of the listing's content (paths and wnids; see _save), recorded in subset manifests
    cache_file: Path


@dataclass(frozen=True)
class Listed:
    """A class's sorted image names with their cache line and its SHA-256, made where the class was listed (in a
    forked lister, which sends only bytes)."""

    names: list[str]
    line: bytes  # the names TAB-joined (names hold neither TAB nor newline), UTF-8
    digest: bytes

    @classmethod
    def of(cls, names: list[str]) -> Listed:
        line = "\t".join(names).encode("utf-8", "surrogateescape")
        return cls(names, line, hashlib.sha256(line).digest())


def _unreadable(path: Path, e: OSError) -> UserError:
    return UserError(f"{path}: cannot read ({e.strerror or e}); expected a readable folder or file")


def _scandir(path: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(path) as it:
            return list(it)
    except OSError as e:
        raise _unreadable(path, e) from e


def _stat_sig(path: Path | os.DirEntry) -> str:
    """mtime and size: a folder's mtime changes whenever an entry is added, removed or renamed in it."""
    try:
        st = path.stat()
    except OSError as e:
        raise _unreadable(Path(path), e) from e
    return f"{st.st_mtime_ns}:{st.st_size}"


def class_folders(folder: Path, key: str) -> list[os.DirEntry]:
    """The ``<wnid>/`` folders of ``train/`` or ``val/``; any other (non-hidden) folder is an error."""
    dirs = [e for e in _scandir(folder) if not e.name.startswith(".") and e.is_dir()]
    bad = sorted(e.name for e in dirs if not WNID.fullmatch(e.name))
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise UserError(f"{key}: {folder} has folders that are not wnids: {', '.join(map(inputs.shown, bad[:5]))}"
                        f"{more}; expected one folder per class named by its wnid (n01440764, ...)")
    return sorted(dirs, key=lambda e: e.name)


def image_names(folder: Path) -> list[str]:
    """The sorted names of the image files in ``folder`` (not hidden, an image extension). Names with control
    characters or bytes that are not UTF-8 are skipped with a warning (``inputs``' rule for names; ``ablate data
    check`` reports them as ``bad-name``)."""
    try:
        names = os.listdir(folder)
    except OSError as e:
        raise _unreadable(folder, e) from e
    joined = "\0".join(names)
    ext = os.path.splitext(names[0])[1] if names else ""
    all_one_ext = (ext.lower() in IMG_EXTENSIONS and joined.count(ext + "\0") == len(names) - 1
                   and joined.endswith(ext) and not joined.startswith(".") and "\0." not in joined)
    names = sorted(names if all_one_ext else _IMAGES_IN.findall(joined))  # the usual folder skips the regex
    if inputs.BAD_CHARS.search(joined.replace("\0", "")):
        bad = [n for n in names if inputs.name_problem(n)]
        names = [n for n in names if not inputs.name_problem(n)]
        if bad:
            log.warning("%s: skipped %d image file(s) with control characters or bytes that are not UTF-8 in "
                        "their names (e.g. '%s'); rename them to use them", inputs.shown(folder, 200), len(bad),
                        inputs.shown(bad[0]))
    return names


def _list(folder: Path) -> Listed:
    return Listed.of(image_names(folder))


def _list_bytes(folder: Path) -> bytes:
    listed = _list(folder)
    return listed.digest + listed.line


def _from_bytes(folder: Path, data: bytes) -> Listed:
    line = data[32:]
    return Listed(line.decode("utf-8", "surrogateescape").split("\t") if line else [], line, data[:32])


def list_folders(folders: list[Path], workers: int | None = None) -> list[Listed]:
    """The image names of each folder, over one forked process per core: most of a scan is the kernel's readdir
    and the sorting of names, which run in parallel over folders (and so does waiting on a network filesystem)."""
    return forked.map_forked(folders, _list, _list_bytes, _from_bytes, workers)


Scan = dict[str, tuple[str, Listed]]  # wnid -> (folder prefix, its files)


def scan_folders(*splits: tuple[list[os.DirEntry], str]) -> list[Scan]:
    """The image files of each ``<sub>/<wnid>/`` folder, for each ``(folders, sub)``: one parallel listing."""
    listed = iter(list_folders([Path(d.path) for folders, _ in splits for d in folders]))
    return [{d.name: (f"{sub}/{d.name}/", next(listed)) for d in folders} for folders, sub in splits]


def _scan_of(files: ClassFiles) -> Scan:
    return {wnid: (f.prefix, Listed.of(f.names)) for wnid, f in files.items()}


def read_train_listing(listing: Path) -> ClassFiles:
    """A listing file (its own path relative to the working folder): ``<path relative to data.root>[<TAB><wnid>]``
    per line; without a wnid, the file's folder name is the wnid (``train/<wnid>/x.JPEG``)."""
    out: dict[str, list[str]] = {}
    lines = inputs.read_text(listing, key="data.train_listing").splitlines()
    for i, line in enumerate(lines, 1):
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.rstrip("\r").split("\t")
        rel = inputs.relative_path(fields[0], f"data.train_listing={listing}:{i}")
        wnid = fields[1] if len(fields) > 1 else Path(rel).parent.name
        if len(fields) > 2 or not WNID.fullmatch(wnid):
            raise UserError(f"data.train_listing={listing}:{i}: {len(fields)} field(s), wnid "
                            f"{inputs.quoted(wnid)}; expected '<path relative to data.root><TAB><wnid>' or "
                            "'train/<wnid>/<file>'")
        out.setdefault(wnid, []).append(rel)
    if not out:
        raise UserError(f"data.train_listing={listing}: no entries; expected one image path per line")
    return {w: Files("", sorted(paths)) for w, paths in sorted(out.items())}


def read_flat_val(root: Path, val: Path, labels: Path) -> ClassFiles:
    """A flat ``val/`` folder and a label file: ``<file name or stem> <wnid>`` per line (space, tab or comma
    separated; a header line is skipped), e.g. ILSVRC's ``LOC_val_solution.csv``."""
    files = set(image_names(val))
    by_stem = {Path(n).stem: n for n in files}
    lines = inputs.read_text(labels, key="data.val_labels").splitlines()
    rel = val.relative_to(root).as_posix()
    out: dict[str, list[str]] = {}
    missing: list[str] = []
    for i, line in enumerate(lines, 1):
        fields = line.replace(",", " ").split()
        if not fields or (i == 1 and (len(fields) < 2 or not WNID.fullmatch(fields[1]))):
            continue  # blank or header
        if len(fields) < 2 or not WNID.fullmatch(fields[1]):
            token = fields[1] if len(fields) > 1 else fields[0]
            raise UserError(f"data.val_labels={labels}:{i}: {inputs.quoted(token)} is not a wnid; expected "
                            "'<file name> <wnid>'")
        name = fields[0] if fields[0] in files else by_stem.get(fields[0])
        if name is None:
            missing.append(fields[0])
            continue
        out.setdefault(fields[1], []).append(name)
    if missing:
        raise UserError(f"data.val_labels={labels}: {len(missing)} labelled files are not in {val} (e.g. "
                        f"{inputs.quoted(missing[0])}); expected labels for the files of data.val_dir")
    return {w: Files(f"{rel}/", sorted(names)) for w, names in sorted(out.items())}


def _save(path: Path, root: Path, train: Scan, val: Scan) -> tuple[str, ClassFiles, ClassFiles]:
    """Writes the cache: a header with the checksum, then ``<split> TAB <wnid> TAB <prefix> TAB <line>`` per class.
    The checksum is the SHA-256 of the same rows with each line replaced by its digest, so the listers hash their
    own share in parallel and the result does not depend on how many there were."""
    rows = [(f"{split}\t{wnid}\t{prefix}\t".encode("utf-8", "surrogateescape"), listed)
            for split, scan in (("train", train), ("val", val)) for wnid, (prefix, listed) in scan.items()]
    checksum = hashlib.sha256(b"".join(b"%s%s\n" % (head, x.digest) for head, x in rows)).hexdigest()
    header = f"# imnet-ablate listing v{CACHE_VERSION}\t{checksum}\t{root}\n".encode("utf-8", "surrogateescape")
    files = [{wnid: Files(prefix, x.names) for wnid, (prefix, x) in scan.items()} for scan in (train, val)]
    if store.writes_allowed():
        store.atomic_write_bytes(path, b"".join([header, *(part for head, x in rows for part in (head, x.line,
                                                                                                  b"\n"))]))
    else:  # planning: kept for this process only
        _PLANNED[path] = (checksum, *files)
    return checksum, *files


def _read_cache(path: Path) -> tuple[str, ClassFiles, ClassFiles] | None:
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            header = f.readline().rstrip("\n").split("\t")
            if header[0] != f"# imnet-ablate listing v{CACHE_VERSION}":
                return None
            out: dict[str, ClassFiles] = {"train": {}, "val": {}}
            for line in f:
                split, wnid, prefix, *names = line.rstrip("\n").split("\t")
                out[split][wnid] = Files(prefix, names if names != [""] else [])
    except (OSError, ValueError, KeyError, IndexError):
        return None
    return header[1], out["train"], out["val"]


def list_imagenet(root: Path, cache_dir: Path, train_listing: str | None = None, val_dir: str = "val",
                  val_labels: str | None = None) -> Listing:
    """The train and val files of the ImageNet copy at ``root``, from the cache when the tree is unchanged.
    Messages show ``root`` as given; the listing records it resolved."""
    given, root = root, Path(root).resolve()
    key = [CACHE_VERSION, str(root)]
    train_dirs: list[os.DirEntry] = []
    if train_listing:
        listing_file = Path(train_listing).expanduser().resolve()
        key += ["listing", str(listing_file), _stat_sig(listing_file)]
    else:
        train = root / "train"
        if not train.is_dir():
            raise UserError(f"data.root={given}: no train/ folder; expected train/<wnid>/*.JPEG (or set "
                            "data.train_listing)")
        train_dirs = class_folders(train, "data.root")
        if not train_dirs:
            raise UserError(f"data.root={given}: train/ has no class folders; expected train/<wnid>/*.JPEG")
        key += ["train", _stat_sig(train), *(f"{d.name}={_stat_sig(d)}" for d in train_dirs)]
    val = inputs.inside(root, str(val_dir).strip("/") or ".", f"data.val_dir={val_dir}")
    val_dirs: list[os.DirEntry] = []
    if val_labels:
        labels_file = Path(val_labels).expanduser().resolve()
        key += ["val-flat", _stat_sig(val), str(labels_file), _stat_sig(labels_file)]
    elif val.is_dir():
        val_dirs = class_folders(val, "data.val_dir")
        if not val_dirs and image_names(val):
            raise UserError(f"data.val_labels: {val} holds images but no <wnid>/ folders; expected "
                            "data.val_labels=<file with '<file name> <wnid>' lines>")
        key += ["val", _stat_sig(val), *(f"{d.name}={_stat_sig(d)}" for d in val_dirs)]
    key.append(f"{len(train_dirs)}:{len(val_dirs)}")

    cache_file = Path(cache_dir) / "listings" / f"{hashlib.sha256(chr(0).join(key).encode()).hexdigest()[:24]}.tsv"
    if (cached := _PLANNED.get(cache_file) or _read_cache(cache_file)) is not None:
        checksum, train_files, val_files = cached
        return Listing(root, train_files, val_files, checksum, cache_file)

    log.info("listing %s (first time; %s)", root,
             f"cached in {cache_file}" if store.writes_allowed() else "not cached: planning writes nothing")
    val_sub = val.relative_to(root).as_posix()
    *train_scan, val_scan = scan_folders(*([] if train_listing else [(train_dirs, "train")]), (val_dirs, val_sub))
    if train_listing:
        train_scan = [_scan_of(read_train_listing(listing_file))]
    if val_labels:
        val_scan = _scan_of(read_flat_val(root, val, labels_file))
    checksum, train_files, val_files = _save(cache_file, root, train_scan[0], val_scan)
    return Listing(root, train_files, val_files, checksum, cache_file)
