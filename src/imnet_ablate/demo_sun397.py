"""The generated SUN397-like scene dataset: all 397 categories in the real layout, for the demo of ``sun-cls``.

A scene is a ground (a large textured region under a horizon) over a background palette, both of the category's
look (one of a few, shared by many categories), with one to three of the category's two to four *typical objects*
in front and a plain distractor.
The typical objects are ImageNet classes drawn with exactly the traits the demo ImageNet gives them (``demo.py``'s
latents and renderer, same ``data.demo.seed``), so what a network learned on the demo ImageNet helps to recognise
the scenes (measured: see ``GROUND_LOOKS``). They are picked by WordNet relatedness where the packaged
hierarchy has a synset named like the category (``/b/bakery/shop``: the bakery class and classes under "shop";
``/b/bus_interior``: classes under "bus"), seeded random ImageNet classes otherwise and to fill up. Instances vary
in pose, in which typical objects appear, in horizon, palette and texture phase.

Layout, as distributed (read by torchvision's ``SUN397`` unchanged)::

    <folder>/SUN397/ClassName.txt                      the packaged category list
    <folder>/SUN397/<letter>/<category>/sun_<16 letters>.jpg
    <folder>/Partitions/Training_01.txt, Testing_01.txt   beside SUN397/, as the partitions archive unpacks
    <folder>/manifest.json                              written last; the typical objects of every category

Every image has its own random generator seeded from (seed, category, split, index): same seed, byte-identical
files, whatever the number of worker processes, on one kind of processor (see ``demo``). ``ensure`` generates like
``demo.ensure`` (temporary folder renamed into place) under ``<cache>/demo-sun397/<hash of the parameters, this
generator's and the pair's versions, WordNet and category lists>``.
"""
from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from importlib import resources
from multiprocessing import get_context
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from . import demo, sun397, wordnet
from .store import file_sha256, spec_hash

GENERATOR_VERSION = 2  # 2: objects drawn as instances of their class (demo.instance_latent)
SECTION = "sun397"  # data.demo.sun397
MINIMUM = {"train_per_class": 1, "test_per_class": 1, "image_size": 16}
SUN_CODE = 4  # random streams apart from the ImageNet (1, 2) and VOC (3) demo's
SPLIT_CODE = {"train": 1, "test": 2}
TYPICAL = (2, 4)  # typical objects per category, inclusive
MAX_SHOWN = 3  # typical objects in one scene, at most
GROUND_RADIUS = 1.5  # the ground is a shape this many image sizes wide, centred below the horizon
# Ground and palette come in a few looks shared by many categories, with strong per-scene noise, so that they
# narrow a scene down but the objects decide it. Measured (linear probe on fc7 of alexnet_small, 10 + 10 images per
# category, docs/benchmarks.md): with a look of its own per category, a random network beat the pre-trained one
# (23% vs 7.5% mean class accuracy), as palette and texture statistics alone told the categories apart; with these
# settings the pre-trained network leads, 8.9% vs 4.1% (chance 0.25%).
GROUND_LOOKS = 12  # distinct ground looks and palettes; each category draws one
GROUND_JITTER = 1.0  # per-scene noise added to its ground's latent
PALETTE_JITTER = 1.5  # per-scene noise mixed into its palette
OBJECT_RADIUS = (0.25, 0.4)  # of the image size
OBJECT_SPREAD = 0.5  # how far from the centre objects stand (fraction of the image)
CATEGORIES_PER_UNIT = 20
LETTERS = "abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class SunParams:
    seed: int
    train_per_class: int
    test_per_class: int
    image_size: int


def parse_params(params: Mapping[str, Any]) -> SunParams:
    """``data.demo.seed`` and the ``data.demo.sun397`` section, validated (one-line ``UserError`` naming the key)."""
    return SunParams(**demo.read_subsection(params, SECTION, MINIMUM))


# -- the typical objects of a category ------------------------------------------------------------------------------
class Category(NamedTuple):
    index: int  # label: index into sun397.categories()
    name: str  # "/a/abbey"
    look: int  # which of the GROUND_LOOKS its ground and palette are
    objects: tuple[str, ...]  # wnids of its typical ImageNet classes
    related: int  # how many of them were picked by the category's name (the first ones)


@functools.cache
def synset_index() -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(lemma -> synsets named so, synset -> the ImageNet classes under it along any parent) of the hierarchy."""
    hierarchy = wordnet.load()
    lemmas: dict[str, list[str]] = {}
    for wnid in sorted(hierarchy.names):
        for lemma in hierarchy.names[wnid].lower().split(", "):
            lemmas.setdefault(lemma, []).append(wnid)
    under: dict[str, list[str]] = {}
    for wnid in hierarchy.classes:
        for node in sorted(demo.ancestors(hierarchy, wnid)):
            under.setdefault(node, []).append(wnid)
    return lemmas, under


def name_phrases(category: str) -> list[str]:
    """What a category's name may be called in WordNet: ``/a/apartment_building/outdoor`` -> the whole first
    level ("apartment building"), then each word ("apartment", "building", "outdoor")."""
    levels = category.split("/")[2:]
    phrases = [levels[0].replace("_", " ")] + [w for level in levels for w in level.split("_")]
    return list(dict.fromkeys(phrases))


def plan_category(seed: int, index: int, name: str) -> Category:
    """2-4 typical objects: one from each synset named like the category first, then seeded random classes."""
    lemmas, under = synset_index()
    classes = wordnet.load().classes
    rng = np.random.default_rng([seed, SUN_CODE, 0, index])
    look = int(rng.integers(GROUND_LOOKS))
    count = int(rng.integers(TYPICAL[0], TYPICAL[1] + 1))
    picks: list[str] = []
    for synset in (s for phrase in name_phrases(name) for s in lemmas.get(phrase, ())):
        pool = [c for c in under.get(synset, ()) if c not in picks]
        if pool and len(picks) < count:
            picks.append(pool[rng.integers(len(pool))])
    related = len(picks)
    while len(picks) < count:
        wnid = classes[rng.integers(len(classes))]
        if wnid not in picks:
            picks.append(wnid)
    return Category(index, name, look, tuple(picks), related)


def plan_categories(seed: int) -> list[Category]:
    return [plan_category(seed, i, name) for i, name in enumerate(sun397.categories())]


# -- scenes ---------------------------------------------------------------------------------------------------------
class Shot(NamedTuple):
    category: Category
    split: str
    index: int


def image_name(seed: int, shot: Shot) -> str:
    """A name like the dataset's (``sun_`` and 16 letters), fixed by (seed, category, split, index)."""
    digest = hashlib.sha256(f"{seed}/{shot.category.name}/{shot.split}/{shot.index}".encode()).digest()
    return "sun_" + "".join(LETTERS[b % len(LETTERS)] for b in digest[:16]) + ".jpg"


def scene_plan(seed: int, shot: Shot, size: int) -> dict[str, Any]:
    """Everything random about one scene, from its category's generator and its own."""
    look = np.random.default_rng([seed, SUN_CODE, 1, shot.category.look])  # shared by the scenes of a look
    ground_z = look.standard_normal(demo.N_TRAITS)
    grid = look.standard_normal((demo.BG_GRID, demo.BG_GRID, 3))
    horizon = 0.35 + 0.35 * look.random()
    rng = np.random.default_rng([seed, SUN_CODE, 1 + SPLIT_CODE[shot.split], shot.category.index, shot.index])
    objects = shot.category.objects
    shown = rng.choice(len(objects), int(rng.integers(1, min(MAX_SHOWN, len(objects)) + 1)), replace=False)
    return {"ground_z": ground_z + GROUND_JITTER * rng.standard_normal(demo.N_TRAITS),
            "ground_u": rng.random(demo.N_POSE), "horizon": horizon + 0.1 * (rng.random() - 0.5),
            "grid": (grid + PALETTE_JITTER * rng.standard_normal(grid.shape)) / np.hypot(1, PALETTE_JITTER),
            "wnids": [objects[i] for i in shown], "u": rng.random((len(shown), demo.N_POSE)),
            "keys": [(SUN_CODE, SPLIT_CODE[shot.split], shot.category.index, shot.index, j) for j in range(len(shown))],
            "clutter_z": rng.standard_normal(demo.N_TRAITS), "clutter_u": rng.random(demo.N_POSE),
            "noise": rng.standard_normal((3, size, size), dtype=np.float32)}


def ground_layers(plans: Sequence[dict[str, Any]], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Each scene's ground: its category's look as a wide, strongly textured shape (flat, round or peaked) whose top
    is the horizon."""
    look = demo.decode(np.stack([p["ground_z"] for p in plans]))
    n = len(plans)
    look |= {"aspect": np.ones(n), "lobe_amp": np.zeros(n), "parts": np.zeros(n, int),
             "tex_freq": 4 * look["tex_freq"], "tex_strength": 0.3 + 0.7 * look["tex_strength"]}
    u = np.stack([p["ground_u"] for p in plans])
    where = demo.pose(u, size, (GROUND_RADIUS, GROUND_RADIUS), 0.2, np.zeros(n), 0.3)
    where["cy"] = size * (np.array([p["horizon"] for p in plans]) + GROUND_RADIUS)
    return demo.render(look, where, size)


def scene_images(seed: int, plans: Sequence[dict[str, Any]], size: int, latents: Mapping[str, np.ndarray]
                 ) -> np.ndarray:
    """(N, S, S, 3) uint8: palette, ground, a plain distractor, then the typical objects, rendered together."""
    canvases = demo.background(np.stack([p["grid"] for p in plans]), size)
    ground_colour, ground_alpha = ground_layers(plans, size)
    canvases = demo.over(canvases, ground_colour, ground_alpha)
    cu = np.stack([p["clutter_u"] for p in plans])
    canvases = demo.over(canvases, *demo.render(demo.plain(demo.decode(np.stack([p["clutter_z"] for p in plans]))),
                                                demo.pose(cu, size, (0.08, 0.2), 1.0, 2 * np.pi * cu[:, 3], 0.0), size))
    look = demo.decode(np.stack([demo.instance_latent(seed, w, latents[w], key) for p in plans
                                 for w, key in zip(p["wnids"], p["keys"])]))
    colour, alpha = demo.render(look, demo.pose(np.concatenate([p["u"] for p in plans]), size, OBJECT_RADIUS,
                                                OBJECT_SPREAD, look["rot0"], 0.7), size)
    first = np.cumsum([0] + [len(p["wnids"]) for p in plans])
    for s in range(len(plans)):
        for k in range(first[s], first[s + 1]):
            canvases[s] = demo.over(canvases[s], colour[k], alpha[k])
    return np.stack([demo.to_uint8(canvases[s], plan["noise"]) for s, plan in enumerate(plans)])


def write_categories(out: Path, params: SunParams, categories: Sequence[Category]) -> dict[str, dict[str, list[str]]]:
    """Worker unit: every image of some categories. Returns their file names by category and split."""
    hierarchy = wordnet.load()
    latents = {w: demo.class_latent(params.seed, hierarchy.chain(w)) for c in categories for w in c.objects}
    shots = [Shot(c, split, i) for c in categories
             for split, count in (("train", params.train_per_class), ("test", params.test_per_class))
             for i in range(count)]
    names: dict[str, dict[str, list[str]]] = {c.name: {"train": [], "test": []} for c in categories}
    for c in categories:
        (out / "SUN397" / c.name[1:]).mkdir(parents=True, exist_ok=True)
    for batch in demo.chunks(shots, demo.RENDER_BATCH):
        plans = [scene_plan(params.seed, shot, params.image_size) for shot in batch]
        for shot, pixels in zip(batch, scene_images(params.seed, plans, params.image_size, latents)):
            name = image_name(params.seed, shot)
            demo.save_jpeg(pixels, out / "SUN397" / shot.category.name[1:] / name)
            names[shot.category.name][shot.split].append(name)
    return names


# -- the folder -------------------------------------------------------------------------------------------------------
def folder_spec(params: SunParams) -> dict[str, Any]:
    """Everything that determines the files, the pair's generator version included (its ``instance_latent`` draws
    the objects here): the folder's name is its hash."""
    with resources.as_file(resources.files(sun397.__package__) / sun397.CATEGORY_FILE) as categories:
        categories_sha256 = file_sha256(categories)
    return {"params": asdict(params), "generator_version": GENERATOR_VERSION,
            "demo_generator_version": demo.GENERATOR_VERSION,
            "wordnet_sha256": wordnet.load().checksum, "categories_sha256": categories_sha256}


def folder_for(params: Mapping[str, Any], cache_dir: Path) -> Path:
    return Path(cache_dir) / "demo-sun397" / spec_hash(folder_spec(parse_params(params)))


def run_units(out: Path, params: SunParams, categories: list[Category], workers: int
              ) -> dict[str, dict[str, list[str]]]:
    """Write all images (in parallel when ``workers`` > 1); returns the file names by category and split."""
    units = demo.chunks(categories, CATEGORIES_PER_UNIT)
    write = functools.partial(write_categories, out, params)
    if workers == 1:
        results = [write(unit) for unit in units]
    else:
        with ProcessPoolExecutor(workers, mp_context=get_context(demo.start_method())) as pool:
            results = list(pool.map(write, units))
    return {name: splits for result in results for name, splits in result.items()}


def partition_text(names: Mapping[str, Mapping[str, list[str]]], split: str) -> str:
    """A partition file as distributed: ``/a/abbey/sun_<id>.jpg`` lines, sorted."""
    return "".join(sorted(f"{category}/{name}\n" for category, splits in names.items() for name in splits[split]))


def generate(params: SunParams, out: Path, workers: int) -> None:
    """Write the whole tree into ``out`` (an empty folder); ``manifest.json`` last."""
    categories = plan_categories(params.seed)
    (out / "SUN397").mkdir(parents=True)
    (out / "SUN397" / sun397.CLASS_NAMES).write_text("".join(f"{c.name}\n" for c in categories))
    names = run_units(out, params, categories, workers)
    (out / "Partitions").mkdir()
    for split, file in zip(("train", "test"), sun397.partition_files(1)):
        (out / "Partitions" / file).write_text(partition_text(names, split))
    hierarchy = wordnet.load()
    manifest = {**folder_spec(params),
                "counts": {"categories": len(categories), "train": params.train_per_class * len(categories),
                           "test": params.test_per_class * len(categories),
                           "related_by_name": sum(c.related > 0 for c in categories)},
                "typical_objects": {c.name: {"related": c.related, "look": c.look,
                                             "objects": [f"{w} {hierarchy.short_name(w)}" for w in c.objects]}
                                    for c in categories}}
    (out / demo.MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def ensure(params: Mapping[str, Any], cache_dir: Path) -> Path:
    """The demo SUN397 folder for ``params`` (``data.demo``), generated if missing; holds ``SUN397/``,
    ``Partitions/`` and ``manifest.json``."""
    spec = parse_params(params)
    return demo.materialise(folder_for(params, cache_dir), lambda tmp: generate(spec, tmp, demo.worker_count()))
