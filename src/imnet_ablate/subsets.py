"""Pre-training subsets of ImageNet-1k: a spec (``conf/subset/*.yaml``) -> index files, never decoding an image.

Order of operations: halves -> exclusion -> class selection (all / random K / wnid list / budget) -> WordNet grouping
(computed on all 1000 classes, so merged classes mean the same in every subset) -> N images per class.

Random choices rank items by ``sha1("<seed>:<item>")`` and take a prefix, so they are deterministic and nested: with
one seed the 250-per-class subset is inside the 500-per-class one, and random 127 classes are inside random 500.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import statistics
import textwrap
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from omegaconf import DictConfig, OmegaConf

from . import conftree, datacheck, datasets, forked, imagenet, inputs, store, wordnet
from .errors import UserError

log = logging.getLogger(__name__)

KEYS = ("name", "images_per_class", "classes", "num_classes", "grouping", "exclude", "budget", "half", "seed",
        "strict")
HALVES = ("min-a", "min-b", "random-a", "random-b")


try:  # CPython's own SHA-1: the same digests as OpenSSL's, with less overhead per call on 30-byte inputs
    from _sha1 import sha1 as _sha1
except ImportError:  # pragma: no cover - other interpreters
    _sha1 = hashlib.sha1


def rank(seed: int, item: str) -> bytes:
    """The seeded sort key of every random choice: a prefix of this order is a random sample, nested in N."""
    return _sha1(f"{seed}:{item}".encode("utf-8", "surrogateescape")).digest()


def sample_indices(files: imagenet.Files, n: int | None, seed: int) -> list[int]:
    """Which of a class's names (sorted indices) ``sample`` keeps. The hot loop of N-per-class subsets (1.28M
    hashes), so it encodes the names in one call."""
    if n is None or n >= len(files):
        return list(range(len(files)))
    head = f"{seed}:{files.prefix}".encode("utf-8", "surrogateescape")
    names = "\0".join(files.names).encode("utf-8", "surrogateescape").split(b"\0")
    keys = [_sha1(head + name).digest() for name in names]
    return sorted(sorted(range(len(keys)), key=keys.__getitem__)[:n])


def sample(files: imagenet.Files, n: int | None, seed: int) -> imagenet.Files:
    """The ``n`` files of a class ranked first by ``rank(seed, path)`` (all if it has ``n`` or fewer), sorted."""
    if n is None or n >= len(files):
        return files
    return imagenet.Files(files.prefix, [files.names[i] for i in sample_indices(files, n, seed)])


def sample_classes(listing: imagenet.Listing, classes: list[str], n: int | None,
                   seed: int) -> dict[str, imagenet.Files]:
    """``sample`` of each class, the classes ranked in parallel (``forked``); indices travel as uint32 arrays."""
    if n is None:
        return {c: listing.train[c] for c in classes}

    def indices(c: str) -> bytes:
        return array("I", sample_indices(listing.train[c], n, seed)).tobytes()

    def chosen(c: str, data: bytes) -> imagenet.Files:
        files = listing.train[c]
        return imagenet.Files(files.prefix, [files.names[i] for i in array("I", data)])

    def here(c: str) -> imagenet.Files:
        return sample(listing.train[c], n, seed)

    return dict(zip(classes, forked.map_forked(classes, here, indices, chosen)))


# -- spec ---------------------------------------------------------------------------------------------------------


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _positive(spec: Mapping[str, Any], key: str, allow_none: bool = True) -> None:
    v = spec.get(key)
    if not ((v is None and allow_none) or (_is_int(v) and v > 0)):
        raise UserError(f"subset.{key}={v}: expected a positive integer" + (" or null" if allow_none else ""))


def read_spec(cfg: DictConfig) -> dict[str, Any]:
    """``cfg.subset`` as a plain, validated dict (one line per mistake, naming the key)."""
    spec = OmegaConf.to_container(cfg.subset, resolve=True)
    unknown = sorted(set(spec) - set(KEYS))
    if unknown:
        raise UserError(f"subset: unknown key(s) {', '.join(unknown)}; expected {', '.join(KEYS)}")
    spec = {k: spec.get(k) for k in KEYS}
    if inputs.plain_name(spec["name"], "subset.name").startswith("."):
        raise UserError(f"subset.name={spec['name']}: a hidden name; expected a name usable as a folder name")
    for key in ("images_per_class", "num_classes"):
        _positive(spec, key)
    classes = spec["classes"]
    if not (classes is None or (_is_int(classes) and classes > 0)
            or (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes))):
        raise UserError(f"subset.classes={classes}: expected null (all), a number K (random K) or a list of wnids")
    budget = spec["budget"]
    if budget is not None:
        if not isinstance(budget, dict) or set(budget) != {"classes", "images_per_class"}:
            raise UserError(f"subset.budget={budget}: expected {{classes: K, images_per_class: N}} or null")
        for key in budget:
            _positive(budget, key, allow_none=False)
        if classes is not None or spec["images_per_class"] is not None:
            raise UserError("subset.budget: sets classes and images_per_class itself; expected subset.classes and "
                            "subset.images_per_class to be null")
    if spec["half"] not in (None, *HALVES):
        raise UserError(f"subset.half={spec['half']}: expected null or one of {', '.join(HALVES)}")
    if not _is_int(spec["seed"]):
        raise UserError(f"subset.seed={spec['seed']}: expected an integer")
    if not isinstance(spec["strict"], bool):
        raise UserError(f"subset.strict={spec['strict']}: expected true or false")
    return spec


# Settings that tell a subset apart from the preset it is named after, in the order they apply, as folder-name tags.
TAGGED = ("half", "exclude", "classes", "budget", "grouping", "images_per_class", "seed")


def _tag(key: str, value: Any) -> str:
    """A short, folder-safe label of one setting: ``ipc6``, ``cls100``, ``top-down-10``, ``nopascal``, ..."""
    if key == "images_per_class":
        text = f"ipc{value if value is not None else 'all'}"
    elif key == "classes":
        text = "clsall" if value is None else f"cls{value}" if _is_int(value) else f"cls{len(value)}list"
    elif key == "budget":
        text = "nobudget" if value is None else f"budget{value['classes']}x{value['images_per_class']}"
    elif key == "grouping":
        text = str(value) if value is not None else "fine"
    elif key == "exclude":
        text = "noexclude" if value is None else f"no{value}" if isinstance(value, str) else f"exclude{len(value)}"
    elif key == "half":
        text = str(value) if value is not None else "whole"
    else:
        text = f"{key}{value}"
    return re.sub(r"[^\w.-]", "_", text)


def folder_name(spec: Mapping[str, Any]) -> str:
    """The name of a subset's folder: its preset's name, then a tag per setting changed from that preset, e.g.
    ``250pc-ipc6`` for ``subset=250pc subset.images_per_class=6``, so folders of one preset under different
    overrides tell themselves apart. Cosmetic only: the hash after it is computed as before, and ``store.Stage``
    finds a folder made under an older name by its hash. A name that is no preset (``subset.name=mine``) is kept."""
    preset = conftree.load_preset("subset", spec["name"])
    if preset is None:
        return spec["name"]
    return "-".join([spec["name"], *(_tag(k, spec[k]) for k in TAGGED if spec[k] != preset.get(k))])


# -- class selection ----------------------------------------------------------------------------------------------


@dataclass
class Selection:
    classes: list[str]  # original wnids kept, in class-index order
    grouping: dict[str, str]  # kept wnid -> merged class wnid
    excluded: list[str] = field(default_factory=list)  # removed by subset.exclude
    images_per_class: int | None = None

    def groups(self) -> dict[str, list[str]]:
        """Merged wnid -> its member wnids; merged classes sorted by wnid, which fixes the labels 0..K-1."""
        out: dict[str, list[str]] = {}
        for c in self.classes:
            out.setdefault(self.grouping[c], []).append(c)
        return dict(sorted(out.items()))


def _fmt(items: Sequence[str], limit: int = 5) -> str:
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _first_ranked(pool: list[str], k: int, seed: int) -> list[str]:
    """A random ``k`` of ``pool`` (nested in ``k`` for one seed), in ``pool``'s order."""
    chosen = set(sorted(pool, key=lambda c: rank(seed, c))[:k])
    return [c for c in pool if c in chosen]


def select(h: wordnet.Hierarchy, spec: Mapping[str, Any], counts: Mapping[str, int] | None = None) -> Selection:
    """The classes of a subset and their merged labels. ``counts`` (train images per class) is needed for budgets."""
    seed = spec["seed"]
    pool = list(h.classes)
    if spec["half"]:
        kind, part = spec["half"].split("-")
        a, b = wordnet.halves(h, kind, lambda c: rank(seed, c))
        pool = a if part == "a" else b
    synsets = [w for ws in wordnet.exclude_synsets(spec["exclude"]).values() for w in ws]
    excluded = wordnet.excluded(h, synsets) & set(pool)
    pool = [c for c in pool if c not in excluded]
    known, available = set(h.classes), set(pool)

    n = spec["images_per_class"]
    classes = spec["classes"]
    if isinstance(classes, list):
        unknown = [c for c in classes if c not in known]
        if unknown:
            raise UserError(f"subset.classes: unknown wnid(s) {_fmt(unknown)}; expected ILSVRC-2012 class wnids "
                            "(`ablate classes` lists them)")
        removed = [c for c in classes if c not in available]
        if removed:
            raise UserError(f"subset.classes: {_fmt(removed)} removed by subset.half/exclude; expected classes "
                            "that are still in the subset")
        wanted = set(classes)
        pool = [c for c in pool if c in wanted]
    elif isinstance(classes, int):
        if classes > len(pool):
            raise UserError(f"subset.classes={classes}: only {len(pool)} classes available after half/exclude; "
                            f"expected at most {len(pool)}")
        pool = _first_ranked(pool, classes, seed)
    elif spec["budget"] is not None:
        k, n = spec["budget"]["classes"], spec["budget"]["images_per_class"]
        if counts is None:
            raise ValueError("a budget needs the listing's counts")
        eligible = [c for c in pool if counts.get(c, 0) >= n]
        if k > len(pool):
            raise UserError(f"subset.budget.classes={k}: only {len(pool)} classes available after half/exclude; "
                            f"expected at most {len(pool)}")
        if len(eligible) < k:
            if spec["strict"]:
                raise UserError(f"subset.budget: only {len(eligible)} classes have {n} or more images, {k} needed; "
                                "strict=false picks among all classes and takes all images of the short ones")
            log.warning("budget: only %d classes have >= %d images; picking among all %d", len(eligible), n, len(pool))
            eligible = pool
        pool = _first_ranked(eligible, k, seed)

    grouping = wordnet.parse_grouping(h, spec["grouping"])
    selection = Selection(pool, {c: grouping[c] for c in pool}, sorted(excluded), n)
    expected = spec["num_classes"]
    if expected is not None and len(selection.groups()) != expected:
        raise UserError(f"subset.num_classes={expected}: the spec gives {len(selection.groups())} classes; expected "
                        "num_classes to match (or null)")
    return selection


# -- the subset folder --------------------------------------------------------------------------------------------


def _check_images(listing: imagenet.Listing, sel: Selection, strict: bool, shown_root: object) -> None:
    missing = [c for c in sel.classes if not listing.train.get(c)]
    if missing:
        raise UserError(f"data.root={shown_root}: no train images for {len(missing)} class(es) of the subset "
                        f"({_fmt(missing)}); expected train/<wnid>/ with images for each")
    n = sel.images_per_class
    short = [c for c in sel.classes if n is not None and len(listing.train[c]) < n]
    if short and strict:
        detail = _fmt([f"{c}: {len(listing.train[c])}" for c in short])
        raise UserError(f"subset.images_per_class={n}: {len(short)} class(es) have fewer images ({detail}); "
                        "strict=false takes all images of those classes")
    if short:
        log.warning("%d classes have fewer than %d images; taking all of theirs (strict=false)", len(short), n)


def _tsv(rows: list[str], header: str) -> str:
    return header + "\n" + "".join(rows)


def _stats(values: list[int]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values),
            "mean": round(statistics.fmean(values), 3)} if values else {}


def _listing(cfg: DictConfig) -> imagenet.Listing:
    """The cached listing, minus the files the last `ablate data check` of this root found unusable."""
    data = cfg.data
    listing = imagenet.list_imagenet(datasets.root(cfg, "imagenet"), Path(cfg.paths.cache), data.get("train_listing"),
                                     data.get("val_dir") or "val", data.get("val_labels"))
    return datacheck.without_known_bad(listing, Path(cfg.paths.cache))


class Planned(NamedTuple):
    stage: store.Stage
    spec: dict[str, Any]
    hierarchy: wordnet.Hierarchy
    listing: imagenet.Listing
    selection: Selection


def plan(cfg: DictConfig) -> Planned:
    """Resolve ``cfg.subset`` against the hierarchy and the (cached) listing, and name its stage folder."""
    spec = read_spec(cfg)
    h = wordnet.load()
    sel = None if spec["budget"] else select(h, spec)  # spec mistakes first, before any scan
    listing = _listing(cfg)
    unknown = sorted(set(listing.train) - set(h.classes))
    if unknown:
        log.warning("ignoring %d class folders that are not ILSVRC-2012 classes: %s", len(unknown), _fmt(unknown))
    sel = sel or select(h, spec, {c: len(p) for c, p in listing.train.items()})
    _check_images(listing, sel, spec["strict"], cfg.data.get("root") or listing.root)  # the root as typed
    stage = store.Stage(cfg.paths.runs, "subset", folder_name(spec),
                        {"subset": spec, "data_root": str(listing.root), "listing": listing.checksum,
                         "hierarchy": h.checksum})
    return Planned(stage, spec, h, listing, sel)


def stage(cfg: DictConfig) -> store.Stage:
    """The subset's stage folder (done or not), without writing anything."""
    return plan(cfg).stage


def build(cfg: DictConfig) -> Path:
    """Write (or find) the subset folder of ``cfg.subset``: train.tsv, val.tsv, classes.tsv, manifest.json."""
    p = plan(cfg)
    if p.stage.is_done():
        return p.stage.path
    # Sampled before taking the lock, whose heartbeat is a thread: the sampling forks only while there is none.
    per_class = sample_classes(p.listing, p.selection.classes, p.selection.images_per_class, p.spec["seed"])
    with p.stage.lock():
        if p.stage.is_done():
            return p.stage.path
        p.stage.write_spec()
        _write_subset(p.stage, cfg, p.spec, p.hierarchy, p.listing, p.selection, per_class)
    return p.stage.path


def _rows(files: imagenet.Files, label: int, wnid: str) -> str:
    """The index rows (``<path> TAB <label> TAB <wnid>``) of one class, in one join: a full subset has 1.28M."""
    end = f"\t{label}\t{wnid}\n"
    return files.prefix + (end + files.prefix).join(files.names) + end if len(files) else ""


def _write_subset(stage: store.Stage, cfg: DictConfig, spec: Mapping[str, Any], h: wordnet.Hierarchy,
                  listing: imagenet.Listing, sel: Selection, per_class: dict[str, imagenet.Files]) -> None:
    groups = sel.groups()
    label = {merged: i for i, merged in enumerate(groups)}
    train_rows, val_rows, class_rows, per_label = [], [], [], []
    empty = imagenet.Files("", [])
    for c in sel.classes:
        lab = label[sel.grouping[c]]
        train_rows.append(_rows(per_class[c], lab, c))
        val_rows.append(_rows(listing.val.get(c, empty), lab, c))
    num_val = sum(len(listing.val.get(c, empty)) for c in sel.classes)
    for merged, members in groups.items():
        n_images = sum(len(per_class[c]) for c in members)
        per_label.append(n_images)
        class_rows.append(f"{label[merged]}\t{merged}\t{h.names[merged]}\t{n_images}\t{' '.join(members)}\n")
    header = "path\tlabel\twnid"
    store.atomic_write_text(stage.path / "train.tsv", _tsv(train_rows, header))
    store.atomic_write_text(stage.path / "val.tsv", _tsv(val_rows, header))
    store.atomic_write_text(stage.path / "classes.tsv", _tsv(class_rows, "label\twnid\tname\tn_images\tmembers"))
    store.atomic_write_text(stage.path / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    short = [c for c in sel.classes if sel.images_per_class and len(per_class[c]) < sel.images_per_class]
    store.atomic_write_json(stage.path / "manifest.json", {
        "name": spec["name"], "spec": dict(spec), "seed": spec["seed"], "data_root": str(listing.root),
        "num_classes": len(groups), "num_original_classes": len(sel.classes),
        "num_train": sum(per_label), "num_val": num_val,
        "train_per_class": _stats(per_label), "train_per_original_class": _stats([len(v) for v in per_class.values()]),
        "excluded": sel.excluded, "short_classes": {c: len(per_class[c]) for c in short},
        "checksums": {"hierarchy": h.checksum, "listing": listing.checksum},
        "listing_cache": str(listing.cache_file), "provenance": store.provenance(),
    })
    stage.finish(["train.tsv", "val.tsv", "classes.tsv", "config.yaml", "manifest.json"])


def summary(manifest: Mapping[str, Any]) -> str:
    """The few numbers a user checks first, as a two-column table."""
    s = manifest["train_per_class"]
    rows = [("subset", manifest["name"]), ("classes", manifest["num_classes"]),
            ("original classes", manifest["num_original_classes"]), ("train images", manifest["num_train"]),
            ("images/class", f"min {s['min']}  median {s['median']:g}  max {s['max']}"),
            ("val images", manifest["num_val"]), ("excluded", len(manifest["excluded"])),
            ("short classes", len(manifest["short_classes"]))]
    return "\n".join(f"{k:<17} {v}" for k, v in rows)


def run(cfg: DictConfig) -> Path:
    """``ablate subset``: build the subset and print its summary."""
    path = build(cfg)
    print(summary(json.loads((path / "manifest.json").read_text())))
    return path


# -- `ablate classes` ---------------------------------------------------------------------------------------------


def _names(h: wordnet.Hierarchy, wnids: Sequence[str], limit: int | None) -> str:
    """``Chihuahua, Japanese spaniel, ... (215 more)``: the first ``limit`` short names (all with None)."""
    shown = list(wnids) if limit is None else list(wnids)[:limit]
    more = f", ... ({len(wnids) - len(shown)} more)" if len(shown) < len(wnids) else ""
    return ", ".join(h.short_name(w) for w in shown) + more


def excluded_by(h: wordnet.Hierarchy, spec: Mapping[str, Any], sel: Selection) -> dict[str, list[str]]:
    """``subset.exclude``'s targets (``dog``, or a listed wnid) -> the subset's classes each one removed."""
    removed = set(sel.excluded)
    out = {}
    for target, synsets in wordnet.exclude_synsets(spec["exclude"]).items():
        label = f"{h.short_name(target)} ({target})" if target in h.names else f"{target} ({', '.join(synsets)})"
        out[label] = sorted(wordnet.excluded(h, synsets) & removed)
    return out


def _print_classes(h: wordnet.Hierarchy, spec: Mapping[str, Any], sel: Selection,
                   rows: list[tuple[int, str, list[str]]], show: DictConfig) -> None:
    limit, members = show.get("groups"), show.get("members")
    print(f"{spec['name']}: {len(rows)} classes from {len(sel.classes)} ImageNet classes"
          f" ({len(sel.excluded)} excluded), largest first")
    print(f"{'label':>5}  {'wnid':<9}  {'name':<24} {'members':>7}  member names")
    for lab, m, ms in rows[:limit]:
        print(f"{lab:>5}  {m:<9}  {h.short_name(m)[:24]:<24} {len(ms):>7}  {_names(h, ms, members)}")
    if limit is not None and len(rows) > limit:
        print(f"... {len(rows) - limit} more in groups.tsv (show.groups=null prints them all)")
    if sel.excluded:
        print(f"\nexcluded by subset.exclude ({len(sel.excluded)} classes, also in excluded.tsv):")
        for target, removed in excluded_by(h, spec, sel).items():
            names = f": {_names(h, removed, None)}" if removed else ""
            print(textwrap.fill(f"{target}, {len(removed)}{names}", width=118, initial_indent="  ",
                                subsequent_indent="      "))


def show_classes(cfg: DictConfig) -> Path:
    """``ablate classes``: the subset's classes, largest group first, each with its members' names, and the classes
    ``subset.exclude`` removed, by name; from the hierarchy alone (a budget also needs the listing, to know which
    classes have enough images). Writes groups.tsv and excluded.tsv so the tables can be kept."""
    spec = read_spec(cfg)
    h = wordnet.load()
    counts = None
    if spec["budget"] is not None:
        listing = _listing(cfg)
        counts = {c: len(p) for c, p in listing.train.items()}
    sel = select(h, spec, counts)
    groups = sorted(sel.groups().items(), key=lambda kv: (-len(kv[1]), kv[0]))
    label = {merged: i for i, merged in enumerate(sel.groups())}
    rows = [(label[m], m, members) for m, members in groups]

    # layout 2: groups.tsv has member names, excluded.tsv is new (a new folder, as an old one lacks them)
    stage = store.Stage(cfg.paths.runs, "classes", folder_name(spec),
                        {"subset": spec, "hierarchy": h.checksum, "counts": counts, "layout": 2})
    if not stage.is_done():
        with stage.lock():
            if not stage.is_done():
                stage.write_spec()
                _write_classes(stage, cfg, h, spec, sel, rows)
    _print_classes(h, spec, sel, rows, cfg.show)
    return stage.path


def _write_classes(stage: store.Stage, cfg: DictConfig, h: wordnet.Hierarchy, spec: Mapping[str, Any],
                   sel: Selection, rows: list[tuple[int, str, list[str]]]) -> None:
    groups = "".join(f"{lab}\t{m}\t{h.names[m]}\t{len(ms)}\t{' '.join(ms)}\t"
                     f"{'; '.join(h.short_name(c) for c in ms)}\n" for lab, m, ms in rows)
    store.atomic_write_text(stage.path / "groups.tsv",
                            _tsv([groups], "label\twnid\tname\tn_members\tmembers\tmember_names"))
    by_class: dict[str, list[str]] = {}
    for target, removed in excluded_by(h, spec, sel).items():
        for c in removed:
            by_class.setdefault(c, []).append(target)
    excluded = "".join(f"{c}\t{h.names[c]}\t{'; '.join(by_class.get(c, []))}\n" for c in sel.excluded)
    store.atomic_write_text(stage.path / "excluded.tsv", _tsv([excluded], "wnid\tname\texcluded_by"))
    store.atomic_write_text(stage.path / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    stage.finish(["groups.tsv", "excluded.tsv", "config.yaml"])
