"""The built-in generated dataset pair: an ImageNet-like tree of all 1000 classes and a VOC 2007-like devkit.

Both are written in the real on-disk formats, so the same readers, subset builder and loaders run on them.
Appearance comes from the WordNet hierarchy, which is what makes transfer behave like the real thing: every synset
on a class's first-parent chain adds a random latent vector (seeded by the dataset seed and its wnid) to the
class's traits, so classes that share ancestors look alike. Each trait group listens to a different part of the
chain: coarse traits (shape family, palette) to internal ancestors, texture (kind, frequency, orientation) to the
nearer internal nodes, fine traits (parts, secondary colour, edge ripple) to the leaf and its parent. A PASCAL
object is drawn with the traits of an ImageNet class under its class's synset, so ImageNet features help on VOC.

A class is not one look: it has ``N_MODES`` modes (as a real class has breeds, models and viewpoints) that move
its texture and fine traits, and every drawn instance is one of them plus its own jitter (``instance_latent``). So
a class is seen whole only through many images, and a subset with fewer images per class sees less of it, which
is what the images-per-class experiment measures (generator version 1 drew every instance of a class with the same
traits, so 6 images taught what 24 did).

Every image has its own random generator seeded from (seed, class or scene, index): same seed, byte-identical files,
whatever the number of worker processes, on one kind of processor. numpy picks its float kernels (sin, exp, ...) by
the CPU's instruction set, so another kind can round a rare pixel the other way (1 of the tests' tiny demo's 8477
files differed between numpy's baseline and AVX2 kernels, ``NPY_DISABLE_CPU_FEATURES=X86_V3``). ``ensure`` generates
into a temporary folder and renames it into place, with ``manifest.json`` written last, so a folder that exists is
complete.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path
from typing import Any, NamedTuple
from xml.sax.saxutils import escape

import numpy as np
from PIL import Image

from . import cpus, wordnet
from .errors import UserError
from . import store
from .progress import Progress
from .store import spec_hash

log = logging.getLogger(__name__)

GENERATOR_VERSION = 2  # 2: modes and per-instance jitter (instance_latent)
MANIFEST = "manifest.json"
STALE_TMP_S = 3600.0
JPEG_QUALITY = 90

# The 20 VOC classes in devkit order and the WordNet synset the authors mapped each to (shared with the subset
# builder's `pascal` exclusion).
PASCAL_SYNSETS: dict[str, str] = wordnet.PASCAL
# Synsets outside the packaged hierarchy: cow (mature female mammal) -> placental, its WordNet 3.0 first hypernym.
EXTRA_FIRST_PARENTS = {"n01887787": "n01886756"}

SKIP_DEPTH = 2  # entity, physical entity, object/abstraction: shared by (nearly) all, carry no signal
N_TRAITS = 28
COARSE = slice(0, 9)  # hue (2), saturation, value, lobes, lobe amplitude, aspect, squareness, orientation
MID = slice(9, 16)  # texture kind (4), frequency, orientation, strength
FINE = slice(16, 28)  # secondary colour (3), parts (count, angle, radius, size, colour 2), edge ripple (2)
N_POSE = 12  # per-instance uniforms: centre (2), size, rotation, flip, light (2), texture phase, colour gain (4)
BG_GRID = 4  # background colour field: a BG_GRID x BG_GRID grid, bilinearly upsampled
N_MODES = 4  # looks per class
# How far a mode moves each trait group (COARSE, MID, FINE), and each instance's own jitter of every trait. Four
# times these (0.3, 0.7, 0.7; 0.25) left the full set at 7% top-1 and its transfers below version 1's; twice them,
# at 20%. At these a class stays learnable (the 48 images per class: 64% top-1 under train=demo) yet is seen whole
# only through many images (6 per class: 34%; docs/benchmarks.md, "Images per class on the demo").
MODE_SCALE = np.repeat([0.075, 0.175, 0.175], [9, 7, 12])
INSTANCE_SCALE = 0.08
LOOK_CODE = 5  # random streams of modes and instance jitter, apart from the images' own (1-4)


@dataclass(frozen=True)
class DemoParams:
    seed: int
    train_per_class: int
    val_per_class: int
    image_size: int
    voc_image_size: int
    voc_trainval: int
    voc_test: int


MINIMUM = {"seed": 0, "train_per_class": 1, "val_per_class": 1, "image_size": 16, "voc_image_size": 32,
           "voc_trainval": 2, "voc_test": 1}


def pair_settings(params: Mapping[str, Any]) -> dict[str, Any]:
    """The settings of this pair: ``data.demo`` without the nested sections of other generated datasets (such as
    ``voc2012``), so adding one never changes this pair's folder."""
    return {key: value for key, value in params.items() if not isinstance(value, Mapping)}


def read_section(section: Mapping[str, Any], minimum: Mapping[str, int], prefix: str) -> dict[str, int]:
    """The integer settings ``minimum`` names, each checked against its lower bound; an unknown or bad one is a
    one-line ``UserError`` naming ``<prefix>.<key>``. Nested sections belong to other generators and are skipped."""
    given = pair_settings(section)
    unknown = sorted(set(given) - set(minimum))
    if unknown:
        raise UserError(f"{prefix}.{unknown[0]}: unknown setting; expected one of {', '.join(minimum)}")
    values = {}
    for key, low in minimum.items():
        value = given.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise UserError(f"{prefix}.{key}={value}: expected an integer >= {low}")
        values[key] = value
    return values


def read_subsection(params: Mapping[str, Any], name: str, minimum: Mapping[str, int]) -> dict[str, int]:
    """``data.demo.seed`` and the settings of the ``data.demo.<name>`` section (another dataset's generator),
    validated as ``read_section`` does."""
    section = params.get(name)
    if not isinstance(section, Mapping):
        given = "missing" if section is None else f"got {section!r}"
        raise UserError(f"data.demo.{name}: {given}; expected a section with {', '.join(minimum)}")
    seed = read_section({"seed": params.get("seed")}, {"seed": 0}, "data.demo")
    return {**seed, **read_section(section, minimum, f"data.demo.{name}")}


def parse_params(params: Mapping[str, Any]) -> DemoParams:
    """Validated parameters; a bad value is a one-line ``UserError`` naming the ``data.demo`` key. Nested sections
    (``data.demo.sun397``) belong to the other generated datasets: they neither enter this pair's folder hash nor
    are checked here."""
    return DemoParams(**read_section(params, MINIMUM, "data.demo"))


# -- the hierarchy -> class traits ------------------------------------------------------------------------------
def full_chain(hierarchy: wordnet.Hierarchy, wnid: str) -> list[str]:
    """First-parent chain, leaf first, also for the few PASCAL synsets outside the packaged hierarchy."""
    if wnid in EXTRA_FIRST_PARENTS:
        return [wnid, *full_chain(hierarchy, EXTRA_FIRST_PARENTS[wnid])]
    return hierarchy.chain(wnid)


def ancestors(hierarchy: wordnet.Hierarchy, wnid: str) -> set[str]:
    """Ancestors-or-self along all parents (not just the first)."""
    seen, todo = set(), [wnid]
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo.extend(hierarchy.parents.get(node, ()))
    return seen


def pascal_members(hierarchy: wordnet.Hierarchy) -> dict[str, list[str]]:
    """Per VOC class, the wnids whose traits its objects take: the ImageNet classes under its synset (any parent
    path), or the synset itself when none is (cow)."""
    closure = {c: ancestors(hierarchy, c) for c in hierarchy.classes}
    members = {}
    for name, synset in PASCAL_SYNSETS.items():
        under = [c for c in hierarchy.classes if synset in closure[c]]
        members[name] = under or [synset]
    return members


@functools.cache
def node_latent(seed: int, wnid: str) -> np.ndarray:
    """The random trait vector one synset contributes, fixed by (seed, wnid)."""
    return np.random.default_rng([seed, 0, int(wnid[1:])]).standard_normal(N_TRAITS)


def chain_weights(chain_len: int) -> np.ndarray:
    """(chain_len, N_TRAITS) weight of each chain node (leaf first) in each trait. Each trait's weights have unit
    sum of squares, so every class latent is N(0, 1) however long its chain."""
    index = np.arange(chain_len)
    depth = chain_len - 1 - index
    leaf, parent = index == 0, index == 1
    internal = ~leaf & ~parent & (depth > SKIP_DEPTH)
    near = internal & (index <= 5)
    w = np.zeros((chain_len, N_TRAITS))
    w[:, COARSE] = (1.0 * internal + 0.25 * (leaf | parent))[:, None]
    w[:, MID] = (1.0 * near + 0.4 * (internal & ~near) + 0.4 * (leaf | parent))[:, None]
    w[:, FINE] = (1.0 * leaf + 0.7 * parent + 0.15 * internal)[:, None]
    return w / np.sqrt((w ** 2).sum(axis=0, keepdims=True))


def class_latent(seed: int, chain: Sequence[str]) -> np.ndarray:
    """A class's trait latents (each ~ N(0, 1)): the weighted sum of its chain's node latents."""
    nodes = np.stack([node_latent(seed, w) for w in chain])
    return (chain_weights(len(chain)) * nodes).sum(axis=0)


@functools.cache
def class_modes(seed: int, wnid: str) -> np.ndarray:
    """(N_MODES, N_TRAITS) offsets of a class's modes from its traits, fixed by (seed, wnid)."""
    return MODE_SCALE * np.random.default_rng([seed, LOOK_CODE, 0, int(wnid[1:])]).standard_normal((N_MODES, N_TRAITS))


def instance_latent(seed: int, wnid: str, latent: np.ndarray, key: Sequence[int]) -> np.ndarray:
    """One drawn instance's traits: its class's ``latent``, one of the class's modes and its own jitter, drawn from
    a generator of its own (``key`` names the instance within its dataset), so the images' other draws are those of
    generator version 1."""
    rng = np.random.default_rng([seed, LOOK_CODE, 1, *key])
    mode = class_modes(seed, wnid)[rng.integers(N_MODES)]
    return latent + mode + INSTANCE_SCALE * rng.standard_normal(N_TRAITS)


# -- latents -> drawing parameters --------------------------------------------------------------------------------
def _unit(z: np.ndarray) -> np.ndarray:
    """Approximately the normal CDF: N(0, 1) latents -> (0, 1)."""
    return 0.5 * (1.0 + np.tanh(0.7978845608 * (z + 0.044715 * z ** 3)))


def _hue(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """A uniformly distributed, circular hue from two independent latents."""
    return (np.arctan2(a, b) / (2 * np.pi)) % 1.0


def hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV -> RGB: (...), (...), (...) -> (..., 3), all in [0, 1]."""
    k = (np.array([5.0, 3.0, 1.0]) + h[..., None] * 6.0) % 6.0
    return v[..., None] - (v * s)[..., None] * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


def texture_mix(z: np.ndarray) -> np.ndarray:
    """(N, 4) latents -> blend weights of the four textures; small weights are dropped (so never drawn)."""
    w = np.exp(3 * (z - z.max(axis=1, keepdims=True)))
    w = np.where(w < 0.1, 0.0, w)
    return w / w.sum(axis=1, keepdims=True)


def decode(z: np.ndarray) -> dict[str, np.ndarray]:
    """(N, N_TRAITS) latents -> named drawing parameters, each (N,) or (N, 3) / (N, 4)."""
    u = _unit(z)
    hue1 = _hue(z[:, 0], z[:, 1])
    return {
        "colour1": hsv_to_rgb(hue1, 0.3 + 0.65 * u[:, 2], 0.35 + 0.6 * u[:, 3]),
        "lobes": np.array([0, 2, 3, 4, 5, 6])[np.minimum((u[:, 4] * 6).astype(int), 5)],
        "lobe_amp": 0.08 + 0.3 * u[:, 5],
        "aspect": 0.45 + 0.55 * u[:, 6],
        "pnorm": 6.0 ** u[:, 7],
        "rot0": np.pi * u[:, 8],
        "tex_kind": texture_mix(z[:, 9:13]),
        "tex_freq": 0.7 + 2.3 * u[:, 13],
        "tex_orient": np.pi * u[:, 14],
        "tex_strength": 0.25 + 0.6 * u[:, 15],
        "colour2": hsv_to_rgb(_hue(z[:, 16], z[:, 17]), 0.2 + 0.8 * u[:, 18], 0.15 + 0.8 * u[:, 19]),
        "parts": np.minimum((u[:, 20] * 4).astype(int), 3),
        "part_angle": 2 * np.pi * u[:, 21],
        "part_radius": 0.45 + 0.5 * u[:, 22],
        "part_size": 0.14 + 0.2 * u[:, 23],
        "colour3": hsv_to_rgb(_hue(z[:, 24], z[:, 25]), np.full(len(z), 0.8), np.full(len(z), 0.9)),
        "ripple": 6 + np.minimum((u[:, 26] * 6).astype(int), 5),
        "ripple_amp": 0.12 * u[:, 27],
    }


def plain(look: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Distractor shapes: a class-like outline and colour, but no texture and no parts."""
    return {**look, "tex_strength": np.zeros_like(look["tex_strength"]), "parts": np.zeros_like(look["parts"])}


def pose(u: np.ndarray, size: int, radius: tuple[float, float], spread: float, rot0: np.ndarray,
         rot_jitter: float) -> dict[str, np.ndarray]:
    """(N, N_POSE) uniforms -> where and how each instance is drawn on a ``size`` canvas."""
    lo, hi = radius
    gain = np.exp(0.25 * (u[:, 8:9] - 0.5)) * np.exp(0.2 * (u[:, 9:12] - 0.5))
    return {
        "cx": size * (0.5 + spread * (u[:, 0] - 0.5)),
        "cy": size * (0.5 + spread * (u[:, 1] - 0.5)),
        "radius": size * lo * (hi / lo) ** u[:, 2],
        "rot": rot0 + rot_jitter * (u[:, 3] - 0.5),
        "flip": np.where(u[:, 4] < 0.5, -1.0, 1.0),
        "light": 0.5 * (u[:, 5:7] - 0.5),
        "phase": 2 * np.pi * u[:, 7],
        "gain": gain,
    }


# -- rendering -------------------------------------------------------------------------------------------------------
def _col(x: np.ndarray) -> np.ndarray:
    """(N,) -> (N, 1, 1) for broadcasting over a canvas."""
    return np.asarray(x, dtype=np.float32)[:, None, None]


def _rgb(x: np.ndarray) -> np.ndarray:
    """(N, 3) -> (N, 3, 1, 1): canvases are channel-first, as numpy is slow on a trailing axis of 3."""
    return np.asarray(x, dtype=np.float32)[:, :, None, None]


def render(look: dict[str, np.ndarray], where: dict[str, np.ndarray], size: int) -> tuple[np.ndarray, np.ndarray]:
    """N instances on N ``size`` x ``size`` canvases -> colour (N, 3, S, S) and coverage alpha (N, S, S)."""
    grid = np.arange(size, dtype=np.float32) + 0.5
    radius = _col(where["radius"])
    dx = (grid[None, None, :] - _col(where["cx"])) / radius
    dy = (grid[None, :, None] - _col(where["cy"])) / radius
    cos, sin = _col(np.cos(where["rot"])), _col(np.sin(where["rot"]))
    x = cos * dx + sin * dy
    y = (cos * dy - sin * dx) * _col(where["flip"]) / _col(look["aspect"])
    p = _col(look["pnorm"])
    rho = (np.abs(x) ** p + np.abs(y) ** p) ** (1.0 / p)
    phi = np.arctan2(y, x)
    amp, ripple_amp = _col(look["lobe_amp"]), _col(look["ripple_amp"])
    edge = (1 + amp * np.cos(_col(look["lobes"]) * phi)
            + ripple_amp * np.cos(_col(look["ripple"]) * phi + _col(where["phase"]))) / (1 + amp + ripple_amp)
    body = np.clip((edge - rho) * radius + 0.5, 0.0, 1.0)

    parts = np.zeros_like(body)
    count = np.maximum(look["parts"], 1)
    for j in range(int(look["parts"].max())):
        angle = look["part_angle"] + 2 * np.pi * j / count
        px, py = _col(look["part_radius"] * np.cos(angle)), _col(look["part_radius"] * np.sin(angle))
        dist = np.sqrt((x - px) ** 2 + (y - py) ** 2)
        blob = np.clip((_col(look["part_size"]) - dist) * radius + 0.5, 0.0, 1.0) * _col(look["parts"] > j)
        parts = np.maximum(parts, blob)

    freq, phase = _col(2 * np.pi * look["tex_freq"]), _col(where["phase"])
    o_cos, o_sin = _col(np.cos(look["tex_orient"])), _col(np.sin(look["tex_orient"]))
    patterns = (lambda: np.sin(freq * (o_cos * x + o_sin * y) + phase),  # stripes
                lambda: np.tanh(3 * np.sin(freq * x + phase) * np.sin(freq * y)),  # checks
                lambda: np.sin(freq * rho + phase),  # rings
                lambda: np.tanh(4 * (np.cos(freq * x) * np.cos(freq * y) - 0.3)))  # spots
    kind = look["tex_kind"].astype(np.float32)
    pattern = sum(_col(kind[:, k]) * draw() for k, draw in enumerate(patterns) if kind[:, k].any())
    mix = (_col(look["tex_strength"]) * 0.5 * (pattern + 1))[:, None]
    light = where["light"]
    shade = (1 + _col(light[:, 0]) * x + _col(light[:, 1]) * y)[:, None]
    c1, c2, c3 = (_rgb(look[k]) for k in ("colour1", "colour2", "colour3"))
    colour = (c1 + mix * (c2 - c1)) * shade
    colour = (colour + parts[:, None] * (c3 - colour)) * _rgb(where["gain"])
    return colour, np.maximum(body, parts)


def background(grids: np.ndarray, size: int) -> np.ndarray:
    """(N, BG_GRID, BG_GRID, 3) latents -> smooth (N, 3, S, S) colour fields around a per-image base colour."""
    base = 0.25 + 0.5 * _unit(grids.mean(axis=(1, 2)) * 2.0)
    cells = np.clip(base[:, None, None, :] + 0.18 * grids, 0.0, 1.0).astype(np.float32)
    pos = np.linspace(0, BG_GRID - 1, size)
    lo = np.minimum(np.floor(pos).astype(int), BG_GRID - 2)
    interp = np.zeros((size, BG_GRID), dtype=np.float32)
    interp[np.arange(size), lo] = 1 - (pos - lo)
    interp[np.arange(size), lo + 1] = pos - lo
    return interp @ cells.transpose(0, 3, 1, 2) @ interp.T


def over(canvas: np.ndarray, colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Alpha-composite a (..., 3, S, S) layer with (..., S, S) coverage over a canvas."""
    return canvas + alpha[..., None, :, :] * (colour - canvas)


def to_uint8(canvas: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """(..., 3, S, S) floats plus pixel noise -> (..., S, S, 3) uint8 for JPEG encoding."""
    pixels = (np.clip(canvas + 0.04 * noise, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)
    return np.ascontiguousarray(np.moveaxis(pixels, -3, -1))


def save_jpeg(pixels: np.ndarray, path: Path) -> None:
    Image.fromarray(pixels).save(path, format="JPEG", quality=JPEG_QUALITY)


# -- the ImageNet-like tree ------------------------------------------------------------------------------------------
SPLIT_CODE = {"train": 1, "val": 2}
N_DISTRACTORS = 2
RENDER_BATCH = 256  # images rendered together: amortises numpy's per-call overhead, bounds memory


class Shot(NamedTuple):
    """One ImageNet-like image: its class, split and index within the class's split."""
    wnid: str
    class_index: int
    split: str
    index: int


def class_shots(params: DemoParams, class_indices: Sequence[int]) -> list[Shot]:
    classes = wordnet.load().classes
    return [Shot(classes[ci], ci, split, i) for ci in class_indices
            for split, count in (("train", params.train_per_class), ("val", params.val_per_class))
            for i in range(count)]


def shot_images(seed: int, shots: Sequence[Shot], size: int, latents: Mapping[str, np.ndarray]) -> np.ndarray:
    """(N, S, S, 3) uint8: each shot's class instance with pose/colour jitter over clutter and noise."""
    rngs = [np.random.default_rng([seed, SPLIT_CODE[s.split], int(s.wnid[1:]), s.index]) for s in shots]
    u = np.stack([r.random(N_POSE) for r in rngs])
    grids = np.stack([r.standard_normal((BG_GRID, BG_GRID, 3)) for r in rngs])
    clutter_z = np.stack([r.standard_normal((N_DISTRACTORS, N_TRAITS)) for r in rngs]).reshape(-1, N_TRAITS)
    clutter_u = np.stack([r.random((N_DISTRACTORS, N_POSE)) for r in rngs]).reshape(-1, N_POSE)
    noise = np.stack([r.standard_normal((3, size, size), dtype=np.float32) for r in rngs])

    clutter_colour, clutter_alpha = render(plain(decode(clutter_z)), pose(clutter_u, size, (0.12, 0.3), 1.0,
                                                                          2 * np.pi * clutter_u[:, 3], 0.0), size)
    canvas = background(grids, size)
    for k in range(N_DISTRACTORS):
        canvas = over(canvas, clutter_colour[k::N_DISTRACTORS], clutter_alpha[k::N_DISTRACTORS])
    look = decode(np.stack([instance_latent(seed, s.wnid, latents[s.wnid], (SPLIT_CODE[s.split], int(s.wnid[1:]), s.index))
                            for s in shots]))
    colour, alpha = render(look, pose(u, size, (0.28, 0.42), 0.2, look["rot0"], 0.7), size)
    return to_uint8(over(canvas, colour, alpha), noise)


def shot_path(shot: Shot, per_class: int) -> Path:
    """ImageNet-style names: ``train/n01440764/n01440764_1.JPEG``, ``val/<wnid>/ILSVRC2012_val_00000001.JPEG``."""
    if shot.split == "train":
        return Path("train", shot.wnid, f"{shot.wnid}_{shot.index + 1}.JPEG")
    number = shot.class_index * per_class + shot.index + 1
    return Path("val", shot.wnid, f"ILSVRC2012_val_{number:08d}.JPEG")


def write_classes(out: Path, params: DemoParams, class_indices: Sequence[int]) -> int:
    """Worker unit: every train and val image of some classes. Returns the number of images written."""
    hierarchy = wordnet.load()
    wnids = [hierarchy.classes[ci] for ci in class_indices]
    latents = {w: class_latent(params.seed, hierarchy.chain(w)) for w in wnids}
    for split, w in itertools.product(SPLIT_CODE, wnids):
        (out / "imagenet" / split / w).mkdir(parents=True, exist_ok=True)
    shots = class_shots(params, class_indices)
    for batch in chunks(shots, RENDER_BATCH):
        for shot, pixels in zip(batch, shot_images(params.seed, batch, params.image_size, latents)):
            per_class = params.train_per_class if shot.split == "train" else params.val_per_class
            save_jpeg(pixels, out / "imagenet" / shot_path(shot, per_class))
    return len(shots)


# -- the VOC-like devkit ------------------------------------------------------------------------------------------------
VOC_CODE = 3
OBJECT_COUNTS = np.array([1, 2, 3, 4])
OBJECT_COUNT_P = np.array([0.35, 0.3, 0.2, 0.15])
MIN_VISIBLE_FRACTION = 0.4  # objects less visible than this (occluded by later ones) are "difficult"
MIN_AREA_FRACTION = 0.025  # ... as are tiny ones (box area / image area)


@dataclass(frozen=True)
class VocObject:
    name: str
    pose: str
    truncated: bool
    difficult: bool
    box: tuple[int, int, int, int]  # xmin ymin xmax ymax, 1-based inclusive pixel coordinates


def scene_plan(seed: int, index: int, size: int, members: dict[str, list[str]]) -> dict[str, Any]:
    """Everything random about one scene, from its own generator: objects (class, member, pose), clutter, noise."""
    rng = np.random.default_rng([seed, VOC_CODE, index])
    n_obj = int(rng.choice(OBJECT_COUNTS, p=OBJECT_COUNT_P))
    names = list(PASCAL_SYNSETS)
    classes = [names[i] for i in rng.integers(len(names), size=n_obj)]
    wnids = [members[c][rng.integers(len(members[c]))] for c in classes]
    u = rng.random((n_obj, N_POSE))
    u[0, :2] = 0.25 + 0.5 * u[0, :2]  # the first object is always well inside the image...
    u[0, 2] = 0.5 + 0.5 * u[0, 2]  # ...and not tiny, so every scene has an annotated object
    n_clutter = int(rng.integers(2, 5))
    return {"classes": classes, "wnids": wnids, "u": u, "keys": [(VOC_CODE, index, j) for j in range(n_obj)],
            "clutter_z": rng.standard_normal((n_clutter, N_TRAITS)), "clutter_u": rng.random((n_clutter, N_POSE)),
            "grid": rng.standard_normal((BG_GRID, BG_GRID, 3)),
            "noise": rng.standard_normal((3, size, size), dtype=np.float32)}


def box_of(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """1-based inclusive pixel box of a boolean mask (None when empty)."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not len(rows):
        return None
    return int(cols[0]) + 1, int(rows[0]) + 1, int(cols[-1]) + 1, int(rows[-1]) + 1


def annotate(masks: np.ndarray, names: Sequence[str], flips: np.ndarray) -> list[VocObject]:
    """VOC objects from the per-object coverage masks (drawing order): box, truncated at the border, difficult
    when mostly hidden by later objects or tiny."""
    size = masks.shape[-1]
    objects = []
    for j, mask in enumerate(masks):
        box = box_of(mask)
        if box is None:
            continue
        visible = mask & ~masks[j + 1:].any(axis=0)
        truncated = bool(mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())
        area = (box[2] - box[0] + 1) * (box[3] - box[1] + 1)
        difficult = bool(visible.sum() < MIN_VISIBLE_FRACTION * mask.sum() or area < MIN_AREA_FRACTION * size ** 2)
        objects.append(VocObject(names[j], "Left" if flips[j] < 0 else "Right", truncated, difficult, box))
    return objects


def scene_images(seed: int, plans: Sequence[dict[str, Any]], size: int, latents: Mapping[str, np.ndarray]
                 ) -> list[tuple[np.ndarray, list[VocObject]]]:
    """Scenes rendered together: background, clutter, then each scene's objects in random overlapping order."""
    look = decode(np.stack([instance_latent(seed, w, latents[w], key) for plan in plans
                            for w, key in zip(plan["wnids"], plan["keys"])]))
    where = pose(np.concatenate([plan["u"] for plan in plans]), size, (0.07, 0.32), 0.9, look["rot0"], 0.7)
    colour, alpha = render(look, where, size)
    cu = np.concatenate([plan["clutter_u"] for plan in plans])
    clutter = render(plain(decode(np.concatenate([plan["clutter_z"] for plan in plans]))),
                     pose(cu, size, (0.06, 0.25), 1.0, 2 * np.pi * cu[:, 3], 0.0), size)
    canvases = background(np.stack([plan["grid"] for plan in plans]), size)
    first_object = np.cumsum([0] + [len(plan["wnids"]) for plan in plans])
    first_clutter = np.cumsum([0] + [len(plan["clutter_u"]) for plan in plans])
    out = []
    for s, plan in enumerate(plans):
        canvas = canvases[s]
        for k in range(first_clutter[s], first_clutter[s + 1]):
            canvas = over(canvas, clutter[0][k], clutter[1][k])
        mine = np.arange(first_object[s], first_object[s + 1])
        mine = mine[(alpha[mine] > 0.5).any(axis=(1, 2))]  # too thin to cover a pixel: neither drawn nor annotated
        for j in mine:
            canvas = over(canvas, colour[j], alpha[j])
        names = [plan["classes"][j - first_object[s]] for j in mine]
        out.append((to_uint8(canvas, plan["noise"]), annotate(alpha[mine] > 0.5, names, where["flip"][mine])))
    return out


def annotation_xml(image_id: str, size: int, objects: Sequence[VocObject]) -> str:
    """A VOC 2007 annotation file."""
    parts = ["<annotation>", "\t<folder>VOC2007</folder>", f"\t<filename>{image_id}.jpg</filename>",
             "\t<source>", "\t\t<database>imnet-ablate demo</database>", "\t\t<annotation>PASCAL VOC2007</annotation>",
             "\t\t<image>generated</image>", "\t</source>",
             "\t<size>", f"\t\t<width>{size}</width>", f"\t\t<height>{size}</height>", "\t\t<depth>3</depth>",
             "\t</size>", "\t<segmented>0</segmented>"]
    for obj in objects:
        x1, y1, x2, y2 = obj.box
        parts += ["\t<object>", f"\t\t<name>{escape(obj.name)}</name>", f"\t\t<pose>{obj.pose}</pose>",
                  f"\t\t<truncated>{int(obj.truncated)}</truncated>", f"\t\t<difficult>{int(obj.difficult)}</difficult>",
                  "\t\t<bndbox>", f"\t\t\t<xmin>{x1}</xmin>", f"\t\t\t<ymin>{y1}</ymin>", f"\t\t\t<xmax>{x2}</xmax>",
                  f"\t\t\t<ymax>{y2}</ymax>", "\t\t</bndbox>", "\t</object>"]
    return "\n".join(parts + ["</annotation>", ""])


def image_id(index: int) -> str:
    return f"{index + 1:06d}"


def write_scenes(out: Path, params: DemoParams, indices: Sequence[int]) -> dict[str, list[VocObject]]:
    """Worker unit: JPEG and XML of some scenes. Returns their objects by image id."""
    hierarchy = wordnet.load()
    members = pascal_members(hierarchy)
    size = params.voc_image_size
    plans = [scene_plan(params.seed, i, size, members) for i in indices]
    latents = {w: class_latent(params.seed, full_chain(hierarchy, w)) for plan in plans for w in plan["wnids"]}
    root = out / "VOCdevkit" / "VOC2007"
    result = {}
    for i, (pixels, objects) in zip(indices, scene_images(params.seed, plans, size, latents)):
        save_jpeg(pixels, root / "JPEGImages" / f"{image_id(i)}.jpg")
        (root / "Annotations" / f"{image_id(i)}.xml").write_text(annotation_xml(image_id(i), size, objects))
        result[image_id(i)] = objects
    return result


def voc_splits(params: DemoParams) -> dict[str, list[str]]:
    """Image ids per split: trainval first (its first half train, the rest val), then test."""
    trainval = [image_id(i) for i in range(params.voc_trainval)]
    half = (len(trainval) + 1) // 2
    return {"train": trainval[:half], "val": trainval[half:], "trainval": trainval,
            "test": [image_id(i) for i in range(params.voc_trainval, params.voc_trainval + params.voc_test)]}


def class_flag(objects: Sequence[VocObject], name: str) -> int:
    """The devkit's per-class image label: 1 present, 0 only difficult instances, -1 absent."""
    mine = [o for o in objects if o.name == name]
    if any(not o.difficult for o in mine):
        return 1
    return 0 if mine else -1


def write_image_sets(root: Path, splits: dict[str, list[str]], objects: dict[str, list[VocObject]]) -> None:
    """``ImageSets/Main/<split>.txt`` and ``<class>_<split>.txt`` in the devkit's layout (``000001 -1``)."""
    main = root / "ImageSets" / "Main"
    main.mkdir(parents=True, exist_ok=True)
    for split, ids in splits.items():
        (main / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
        for name in PASCAL_SYNSETS:
            (main / f"{name}_{split}.txt").write_text("".join(f"{i} {class_flag(objects[i], name):2d}\n"
                                                              for i in ids))


# -- the folder -------------------------------------------------------------------------------------------------------
def folder_spec(params: DemoParams) -> dict[str, Any]:
    """Everything that determines the files: the folder's name is its hash."""
    return {"params": asdict(params), "generator_version": GENERATOR_VERSION,
            "wordnet_sha256": wordnet.load().checksum}


def folder_for(params: Mapping[str, Any], cache_dir: Path) -> Path:
    return Path(cache_dir) / "demo" / spec_hash(folder_spec(parse_params(params)))


def chunks(items: Sequence[Any], size: int) -> list[list[Any]]:
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


def worker_count() -> int:
    """Two single-threaded worker processes ran faster and steadier than threads on 2-core machines."""
    return min(2, cpus.available())


def start_method() -> str:
    """fork: workers need nothing from the parent but arguments, and spawn would re-run a caller's script that
    lacks an ``if __name__ == "__main__"`` guard."""
    return "fork" if "fork" in get_all_start_methods() else "spawn"


def run_units(out: Path, params: DemoParams, workers: int) -> tuple[int, dict[str, list[VocObject]]]:
    """Write all images (in parallel when ``workers`` > 1); returns the ImageNet count and the VOC objects."""
    per_class = params.train_per_class + params.val_per_class
    class_units = chunks(range(len(wordnet.load().classes)), 25)
    units = [(write_classes, unit, len(unit) * per_class) for unit in class_units]
    units += [(write_scenes, unit, len(unit)) for unit in chunks(range(params.voc_trainval + params.voc_test), 100)]
    with Progress(sum(n for _, _, n in units), "demo data", "img") as bar:
        if workers == 1:
            results = []
            for write, unit, n in units:
                results.append(write(out, params, unit))
                bar.update(n)
        else:
            with ProcessPoolExecutor(workers, mp_context=get_context(start_method())) as pool:
                jobs = {pool.submit(write, out, params, unit): n for write, unit, n in units}
                for job in as_completed(jobs):
                    bar.update(jobs[job])
                results = [job.result() for job in jobs]
    images, scenes = results[:len(class_units)], results[len(class_units):]
    return sum(images), {k: v for unit in scenes for k, v in unit.items()}


def manifest(params: DemoParams, images: int, objects: dict[str, list[VocObject]]) -> dict[str, Any]:
    """What the folder holds; deterministic (no times or hosts) so two generations are byte-identical."""
    flat = [o for objs in objects.values() for o in objs]
    return {
        **folder_spec(params),
        "counts": {
            "imagenet_classes": len(wordnet.load().classes),
            "imagenet_train": params.train_per_class * len(wordnet.load().classes),
            "imagenet_val": params.val_per_class * len(wordnet.load().classes),
            "imagenet_images": images,
            "voc_images": len(objects),
            "voc_objects": len(flat),
            "voc_difficult": sum(o.difficult for o in flat),
            "voc_truncated": sum(o.truncated for o in flat),
            "voc_objects_per_class": {n: sum(o.name == n for o in flat) for n in PASCAL_SYNSETS},
        },
    }


def generate(params: DemoParams, out: Path, workers: int) -> None:
    """Write the whole pair into ``out`` (an empty folder); ``manifest.json`` last."""
    root = out / "VOCdevkit" / "VOC2007"
    for sub in ("JPEGImages", "Annotations"):
        (root / sub).mkdir(parents=True)
    images, objects = run_units(out, params, workers)
    write_image_sets(root, voc_splits(params), objects)
    (out / MANIFEST).write_text(json.dumps(manifest(params, images, objects), indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def scratch_dir(parent: Path, prefix: str) -> Iterator[Path]:
    """A temporary folder beside the final one (same file system, so the final rename is atomic), removed after.
    Every generator starts here: while planning (plan=true writes nothing) a missing dataset is a one-line error."""
    if not store.writes_allowed():
        raise UserError(f"the demo data is not generated yet ({parent}) and planning writes nothing: generate it "
                        "first (run without plan=true, or `ablate data demo` with the same data.demo settings, an "
                        "experiment's `demo:` ones included)")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        path = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    except OSError as e:
        raise UserError(f"paths.cache: cannot write {parent}: {e.strerror}") from e
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def publish(tmp: Path, final: Path) -> None:
    """Rename a finished folder into place; if another generator won the race, keep theirs."""
    try:
        os.rename(tmp, final)
    except OSError:
        if not (final / MANIFEST).is_file():  # an incomplete leftover (not ours to trust): replace it
            shutil.rmtree(final, ignore_errors=True)
            os.rename(tmp, final)


def sweep_stale(final: Path, max_age_s: float = STALE_TMP_S) -> None:
    """Remove temporary folders of ``final`` left by killed generators (a live one finishes in minutes)."""
    for tmp in final.parent.glob(f".{final.name}.tmp-*"):
        with contextlib.suppress(OSError):
            if time.time() - tmp.stat().st_mtime > max_age_s:
                shutil.rmtree(tmp, ignore_errors=True)


def materialise(final: Path, write: Callable[[Path], None]) -> Path:
    """``final``, filled by ``write`` (which puts ``manifest.json`` last) if it is not complete yet: written into a
    temporary folder beside it and renamed into place, so a folder that exists is complete."""
    if (final / MANIFEST).is_file():
        return final
    sweep_stale(final)
    with scratch_dir(final.parent, f".{final.name}.tmp-") as tmp:
        log.info("generating the demo data in %s (once; later commands reuse it)", final)
        write(tmp)
        publish(tmp, final)
    return final


def ensure(params: Mapping[str, Any], cache_dir: Path) -> Path:
    """The demo folder for ``params`` (``imagenet/``, ``VOCdevkit/``, ``manifest.json``), generated if missing."""
    spec = parse_params(params)
    return materialise(folder_for(params, cache_dir), lambda tmp: generate(spec, tmp, worker_count()))
