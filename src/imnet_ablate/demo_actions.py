"""The generated VOC 2012 action-classification devkit: persons whose actions show in their pose and beside them.

It is written in the real layout (``VOCdevkit/VOC2012`` with ``Annotations``, ``JPEGImages``, ``ImageSets/Action``
and ``ImageSets/Main``), so ``voc_actions`` and torchvision read it as they read the real one, and it is drawn
with the demo pair's WordNet traits and renderer (``demo.py``), so that what pre-training on the demo ImageNet
learned matters here. A person is drawn with the traits of an ImageNet class under PASCAL's person synset (its
shape comes from its pose) and stands on the ground with its shadow under it. Its action shows
- in its pose: jumping spreads arms and legs and leaves its shadow behind, running leans far forward with a long
  stride, walking leans a little with a shorter one, riders sit; each cue is drawn from distributions that overlap
  those of the other actions, so no single measurement decides;
- in the thing it holds or rides, drawn with the traits of an ImageNet class under the action's synset, as that
  class looks in the demo ImageNet: a horse under a rider, a bicycle or motorbike under a cyclist, a telephone at
  the head, a camera before the face, a book, a computer or an instrument in front of the body.
What keeps "something is there" from being the answer, so that recognising the thing's class (what ImageNet
features add) matters: look-alikes, classes near the action's objects in WordNet (so with similar coarse traits),
held or ridden the same way by persons doing none of the actions ("other": a rider on an ox, a person holding a
CD player to the head), and decoys beside anyone (mostly look-alikes, the rest any class, never where the
person's own object is); now and then an action's own object is beside a person who is not doing it, held where
that action would not hold it. A few persons walk while phoning, reading or taking a photograph, as in VOC.

As ``demo.ensure``: every scene has its own random generator seeded by (seed, scene index), so a seed gives
byte-identical files whatever the number of workers (on one kind of processor: see ``demo``); the folder is
generated beside its final place and renamed into it with ``manifest.json`` written last; its name is the hash of
the settings (``data.demo.seed`` and the ``data.demo.voc2012`` section), this generator's version and the pair's,
and the WordNet file's checksum.
"""
from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from . import demo, wordnet
from .store import spec_hash
from .voc_actions import ACTIONS, SCORED, ActionImage, ActionPerson

GENERATOR_VERSION = 2  # 2: things drawn as instances of their class (demo.instance_latent)
FOLDER = "demo-voc2012"
SECTION = "voc2012"  # the nested section of data.demo
SCENE_CODE = 4  # random stream of the scenes (the demo pair uses 1-3)
UNIT = 50  # scenes per worker task: fixed, so the files do not depend on the number of workers
MINIMUM = {"train_images": 1, "val_images": 1, "image_size": 32}


@dataclass(frozen=True)
class ActionParams:
    seed: int
    train_images: int
    val_images: int
    image_size: int


def parse_params(params: Mapping[str, Any]) -> ActionParams:
    """``data.demo`` (its ``seed`` and ``voc2012`` section) validated; a one-line ``UserError`` names the key."""
    return ActionParams(**demo.read_subsection(params, SECTION, MINIMUM))


# -- what each action looks like ------------------------------------------------------------------------------------
# The ImageNet classes under these synsets (any parent path) lend their traits to an action's object.
OBJECT_SYNSETS: dict[str, tuple[str, ...]] = {
    "phoning": ("n04401088",),  # telephone
    "playinginstrument": ("n03800933",),  # musical instrument
    "reading": ("n06596364", "n07248320"),  # comic book, book jacket
    "ridingbike": (wordnet.PASCAL["bicycle"], wordnet.PASCAL["motorbike"]),  # VOC: a bicycle or motorcycle
    "ridinghorse": (wordnet.PASCAL["horse"],),
    "takingphoto": ("n02942699",),  # camera
    "usingcomputer": ("n03918480",),  # personal computer (desktop, laptop, notebook, hand-held)
}
# Look-alikes: classes near the action's objects in WordNet (so with similar coarse traits), not the object. A
# person who is doing none of the actions ("other") is often set up like an action with one of these instead.
LOOKALIKE_SYNSETS: dict[str, tuple[str, ...]] = {
    "phoning": ("n03278248",),  # electronic equipment: CD player, iPod, modem, printer, ...
    "playinginstrument": ("n03183080",),  # device: abacus, analog clock, binoculars, ...
    "reading": ("n03122748",),  # covering: binder, cloak, ...
    "ridingbike": ("n04576211",),  # wheeled vehicle: tricycle, unicycle, go-kart, ...
    "ridinghorse": ("n02370806",),  # ungulate: zebra, ox, bison, ram, ...
    "takingphoto": ("n03294048",),  # equipment: cassette player, dumbbell, ...
    "usingcomputer": ("n03699975", "n03278248"),  # machine, electronic equipment: cash machine, printer, ...
}
MOUNTED = ("ridingbike", "ridinghorse")


class Place(NamedTuple):
    """Where an action's object sits, in units of the person's radius R, x towards where the person faces."""
    dx: float
    dy: float
    radius: float


SHAPE_KEYS = ("aspect", "lobes", "lobe_amp", "pnorm")  # a person's shape comes from its pose, not its class
PLACES: dict[str, Place] = {
    "phoning": Place(0.25, -0.6, 0.38),
    "takingphoto": Place(0.3, -0.45, 0.5),
    "reading": Place(0.2, -0.1, 0.6),
    "usingcomputer": Place(0.35, 0.2, 0.75),
    "playinginstrument": Place(0.1, 0.05, 0.8),
}
MOUNT_RADIUS = {"ridinghorse": 1.2, "ridingbike": 1.0}


class Pose(NamedTuple):
    """A person's shape cue, each (mean, spread) in a normal or (low, high) in a uniform draw: forward lean
    (radians, normal), stride (lobe amplitude, normal), lift off the ground (in R, normal), width (aspect,
    uniform); limbs (lobes: 2 legs, 4 spread arms and legs); height (in R: riders sit)."""
    lean: tuple[float, float]
    stride: tuple[float, float]
    lift: tuple[float, float]
    width: tuple[float, float]
    lobes: int
    height: float


POSES: dict[str, Pose] = {
    "stand": Pose((0.0, 0.08), (0.06, 0.04), (0.0, 0.0), (0.36, 0.48), 2, 1.0),
    "walk": Pose((0.22, 0.08), (0.22, 0.06), (0.0, 0.0), (0.36, 0.48), 2, 1.0),
    "run": Pose((0.6, 0.1), (0.32, 0.07), (0.0, 0.06), (0.36, 0.48), 2, 1.0),
    "jump": Pose((0.0, 0.12), (0.4, 0.08), (0.6, 0.15), (0.6, 0.8), 4, 1.0),
    "sit": Pose((0.05, 0.08), (0.08, 0.04), (0.0, 0.0), (0.4, 0.52), 2, 0.78),
}
POSE_OF = {"jumping": "jump", "running": "run", "walking": "walk", "ridingbike": "sit", "ridinghorse": "sit"}
ACTION_P = {"other": 0.3, **{a: 0.07 for a in SCORED}}
P_LOOKALIKE = 0.75  # "other" is set up like an action with a look-alike object
WALKS_TOO = ("phoning", "reading", "takingphoto")  # actions a person may do while walking...
P_WALKS_TOO = 0.12  # ...this often
P_DECOY = 0.5  # a person has an object of another class beside it...
P_DECOY_LOOKALIKE = 0.7  # ...often a look-alike of an action's object
P_STRAY = 0.12  # a person has an action's object beside it without doing the action
PERSON_COUNTS, PERSON_COUNT_P = np.array([1, 2, 3]), np.array([0.5, 0.3, 0.2])


@functools.cache
def class_pools() -> dict[str, tuple[str, ...]]:
    """ImageNet wnids whose traits each kind of thing takes: ``person``; every action with an object; its
    look-alikes (``<action>-like``); ``decoy`` (every class that is neither a person nor an action's object)."""
    h = wordnet.load()
    closure = {c: demo.ancestors(h, c) for c in h.classes}

    def under(synsets: Sequence[str]) -> tuple[str, ...]:
        return tuple(c for c in h.classes if closure[c] & set(synsets))

    pools = {action: under(synsets) for action, synsets in OBJECT_SYNSETS.items()}
    pools["person"] = tuple(demo.pascal_members(h)["person"])
    taken = {c for pool in pools.values() for c in pool}
    pools |= {f"{action}-like": tuple(c for c in under(synsets) if c not in taken)
              for action, synsets in LOOKALIKE_SYNSETS.items()}
    pools["decoy"] = tuple(c for c in h.classes if c not in taken)
    return pools


@functools.cache
def latent(seed: int, wnid: str) -> np.ndarray:
    """A class's trait latents, as the demo pair computes them."""
    return demo.class_latent(seed, demo.full_chain(wordnet.load(), wnid))


@functools.cache
def orientation(seed: int, wnid: str) -> float:
    """The class's usual rotation in the demo ImageNet: its objects here are drawn the way it was learned."""
    return float(demo.decode(latent(seed, wnid)[None])["rot0"][0])


# -- one scene's plan ---------------------------------------------------------------------------------------------
@dataclass
class Thing:
    """One drawn instance: a class's traits and where it goes (pixels); persons also carry their shape cue."""
    wnid: str
    cx: float
    cy: float
    radius: float
    rot: float
    facing: float
    u: np.ndarray  # N_POSE uniforms: light, texture phase, colour gain
    shape: dict[str, float] | None = None  # persons: the pose's shape, in place of the class's (see SHAPE_KEYS)


@dataclass
class PersonPlan:
    actions: tuple[str, ...]
    person: Thing
    behind: list[Thing]  # drawn before the person (a mount)
    front: list[Thing]  # drawn after it (held objects, decoys)
    shadow: tuple[float, float, float]  # (cx, cy, radius) of its shadow on the ground (under the mount if any)


def _normal(rng: np.random.Generator, mean_sd: tuple[float, float]) -> float:
    return float(mean_sd[0] + mean_sd[1] * rng.standard_normal())


def _pick(rng: np.random.Generator, pool: Sequence[str]) -> str:
    return pool[int(rng.integers(len(pool)))]


def choose_actions(rng: np.random.Generator) -> tuple[str, ...]:
    action = str(rng.choice(list(ACTION_P), p=list(ACTION_P.values())))
    if action in WALKS_TOO and rng.random() < P_WALKS_TOO:
        return action, "walking"
    return (action,)


def held_object(rng: np.random.Generator, seed: int, person: Thing, place: Place, wnid: str) -> Thing:
    """An object at ``place`` beside ``person``, jittered, turned about as its class is in the demo ImageNet."""
    r = person.radius
    cx = person.cx + person.facing * (place.dx + 0.12 * rng.standard_normal()) * r
    cy = person.cy + (place.dy + 0.12 * rng.standard_normal()) * r
    rot = orientation(seed, wnid) + 0.7 * (rng.random() - 0.5)
    return Thing(wnid, cx, cy, place.radius * r * (0.85 + 0.3 * rng.random()), rot, person.facing,
                 rng.random(demo.N_POSE))


def mount(rng: np.random.Generator, seed: int, wnid: str, scale: float, cx: float, ground: float, r: float,
          facing: float) -> Thing:
    """A horse or a bicycle (or a look-alike) on the ground line, under the rider's seat."""
    radius = scale * r * (0.9 + 0.2 * rng.random())
    rot = orientation(seed, wnid) + 0.7 * (rng.random() - 0.5)
    return Thing(wnid, cx + 0.1 * facing * r, ground - 0.6 * radius, radius, rot, facing, rng.random(demo.N_POSE))


def person_plan(rng: np.random.Generator, seed: int, slot: tuple[float, float], size: int, scale: float,
                pools: Mapping[str, Sequence[str]]) -> PersonPlan:
    """A person's actions, look, pose and the things around it; ``slot`` is its horizontal range in pixels."""
    actions = choose_actions(rng)
    setup, pool = actions[0], actions[0]  # the configuration drawn and whose objects fill it
    if setup == "other" and rng.random() < P_LOOKALIKE:
        setup = _pick(rng, list(OBJECT_SYNSETS))
        pool = f"{setup}-like"
    pose = POSES[POSE_OF.get(setup if setup in MOUNTED else actions[-1], "stand")]
    r = size * scale * (0.17 + 0.08 * rng.random()) * pose.height
    facing = 1.0 if rng.random() < 0.5 else -1.0
    cx = slot[0] + (slot[1] - slot[0]) * (0.35 + 0.3 * rng.random())
    ground = size * (0.82 + 0.14 * rng.random())
    behind = []
    if setup in MOUNTED:
        behind.append(mount(rng, seed, _pick(rng, pools[pool]), MOUNT_RADIUS[setup], cx, ground, r, facing))
        cy = behind[0].cy - 0.45 * behind[0].radius - 0.5 * r
    else:
        cy = ground - r * (1.0 + max(0.0, _normal(rng, pose.lift)))
    lean = _normal(rng, pose.lean)
    shape = {"aspect": rng.uniform(*pose.width), "lobes": pose.lobes,
             "lobe_amp": max(0.0, _normal(rng, pose.stride)), "pnorm": 1.6 + 0.8 * rng.random()}
    person = Thing(_pick(rng, pools["person"]), cx, max(cy, 0.5 * r), r, np.pi / 2 + facing * lean, facing,
                   rng.random(demo.N_POSE), shape)
    under = behind[0] if behind else person
    shadow = (under.cx, ground, 0.6 * under.radius)
    front = []
    if setup in PLACES:
        front.append(held_object(rng, seed, person, PLACES[setup], _pick(rng, pools[pool])))
    if rng.random() < P_DECOY:  # a look-alike where its action's object would be, or anything anywhere
        place = _pick(rng, [a for a in PLACES if a != setup])
        decoys = pools[f"{place}-like"] if rng.random() < P_DECOY_LOOKALIKE else pools["decoy"]
        front.append(held_object(rng, seed, person, PLACES[place], _pick(rng, decoys)))
    if rng.random() < P_STRAY:  # an action's object, but not where it is held for the action
        stray = _pick(rng, [a for a in PLACES if a not in actions and a != setup])
        place = _pick(rng, [a for a in PLACES if a not in (stray, setup)])
        front.append(held_object(rng, seed, person, PLACES[place], _pick(rng, pools[stray])))
    return PersonPlan(actions, person, behind, front, shadow)


@dataclass
class ScenePlan:
    index: int
    persons: list[PersonPlan]  # in drawing order: the farther (higher on the image) first
    clutter_z: np.ndarray
    clutter_u: np.ndarray
    grid: np.ndarray
    noise: np.ndarray


def scene_plan(seed: int, index: int, size: int) -> ScenePlan:
    """Everything random about one scene, from its own generator: 1-3 persons side by side, clutter, noise."""
    rng = np.random.default_rng([seed, SCENE_CODE, index])
    n = int(rng.choice(PERSON_COUNTS, p=PERSON_COUNT_P))
    pools = class_pools()
    persons = [person_plan(rng, seed, (size * k / n, size * (k + 1) / n), size, 1.1 - 0.1 * n, pools)
               for k in range(n)]
    n_clutter = int(rng.integers(2, 5))
    return ScenePlan(index, sorted(persons, key=lambda p: p.person.cy + p.person.radius),
                     rng.standard_normal((n_clutter, demo.N_TRAITS)), rng.random((n_clutter, demo.N_POSE)),
                     rng.standard_normal((demo.BG_GRID, demo.BG_GRID, 3)),
                     rng.standard_normal((3, size, size), dtype=np.float32))


# -- drawing --------------------------------------------------------------------------------------------------------
def render_things(things: Sequence[Thing], keys: Sequence[tuple[int, ...]], size: int, seed: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Colour (N, 3, S, S) and coverage (N, S, S) of each thing: an instance of its class (``keys`` name them),
    persons with their pose's shape."""
    look = demo.decode(np.stack([demo.instance_latent(seed, t.wnid, latent(seed, t.wnid), key)
                                 for t, key in zip(things, keys)]))
    persons = [i for i, t in enumerate(things) if t.shape is not None]
    for key in SHAPE_KEYS:
        look[key] = look[key].astype(np.float64)
        look[key][persons] = [things[i].shape[key] for i in persons]
    u = np.stack([t.u for t in things])
    rot = np.array([t.rot for t in things])
    where = demo.pose(u, size, (1.0, 1.0), 0.0, rot, 0.0)  # light, texture phase, colour gain from u
    where |= {"cx": np.array([t.cx for t in things]), "cy": np.array([t.cy for t in things]),
              "radius": np.array([t.radius for t in things]), "flip": np.array([t.facing for t in things])}
    return demo.render(look, where, size)


SHADOW_ALPHA = 0.5


def render_shadows(shadows: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat dark ellipses on the ground, (N, 3) rows of (cx, cy, radius): where a person stands, or how high it
    jumps."""
    n = len(shadows)
    look = demo.plain(demo.decode(np.zeros((n, demo.N_TRAITS))))
    look |= {"colour1": np.full((n, 3), 0.08), "aspect": np.full(n, 0.22), "lobe_amp": np.zeros(n),
             "ripple_amp": np.zeros(n), "pnorm": np.full(n, 2.0)}
    where = demo.pose(np.full((n, demo.N_POSE), 0.5), size, (1.0, 1.0), 0.0, np.zeros(n), 0.0)
    where |= {"cx": shadows[:, 0], "cy": shadows[:, 1], "radius": shadows[:, 2]}
    colour, alpha = demo.render(look, where, size)
    return colour, SHADOW_ALPHA * alpha


class Drawn(NamedTuple):
    plan: PersonPlan
    box: tuple[int, int, int, int]  # 1-based inclusive pixels of the person's coverage


def scene_images(plans: Sequence[ScenePlan], size: int, seed: int) -> list[tuple[np.ndarray, list[Drawn]]]:
    """Scenes rendered together: background, clutter, then per person its shadow, mount, itself, what it holds."""
    in_scene = [[t for p in plan.persons for t in (*p.behind, p.person, *p.front)] for plan in plans]
    keys = [(SCENE_CODE, plan.index, k) for plan, things in zip(plans, in_scene) for k in range(len(things))]
    colour, alpha = render_things([t for things in in_scene for t in things], keys, size, seed)
    shadow = render_shadows(np.array([p.shadow for plan in plans for p in plan.persons]), size)
    cu = np.concatenate([plan.clutter_u for plan in plans])
    clutter = demo.render(demo.plain(demo.decode(np.concatenate([plan.clutter_z for plan in plans]))),
                          demo.pose(cu, size, (0.06, 0.25), 1.0, 2 * np.pi * cu[:, 3], 0.0), size)
    canvases = demo.background(np.stack([plan.grid for plan in plans]), size)
    out, k, c, h = [], 0, 0, 0
    for s, plan in enumerate(plans):
        canvas = canvases[s]
        for _ in plan.clutter_u:
            canvas = demo.over(canvas, clutter[0][c], clutter[1][c])
            c += 1
        drawn = []
        for p in plan.persons:
            canvas = demo.over(canvas, shadow[0][h], shadow[1][h])
            h += 1
            for t in (*p.behind, p.person, *p.front):
                canvas = demo.over(canvas, colour[k], alpha[k])
                box = demo.box_of(alpha[k] > 0.5) if t is p.person else None
                if box is not None:
                    drawn.append(Drawn(p, box))
                k += 1
        out.append((demo.to_uint8(canvas, plan.noise), drawn))
    return out


# -- files ----------------------------------------------------------------------------------------------------------
def image_id(index: int) -> str:
    return f"2012_{index + 1:06d}"


def annotation_xml(image: ActionImage) -> str:
    """A VOC 2012 action annotation, laid out as the real ones are (tags in alphabetical order)."""
    parts = ["<annotation>", f"\t<filename>{image.id}.jpg</filename>", "\t<folder>VOC2012</folder>"]
    for p in image.persons:
        x1, y1, x2, y2 = (int(v) for v in p.box)
        parts += ["\t<object>", "\t\t<name>person</name>", "\t\t<actions>"]
        parts += [f"\t\t\t<{a}>{int(p.does(a))}</{a}>" for a in sorted(ACTIONS)]
        parts += ["\t\t</actions>", "\t\t<bndbox>", f"\t\t\t<xmax>{x2}</xmax>", f"\t\t\t<xmin>{x1}</xmin>",
                  f"\t\t\t<ymax>{y2}</ymax>", f"\t\t\t<ymin>{y1}</ymin>", "\t\t</bndbox>",
                  "\t\t<difficult>0</difficult>", "\t\t<pose>Unspecified</pose>", "\t\t<point>",
                  f"\t\t\t<x>{(x1 + x2) // 2}</x>", f"\t\t\t<y>{(y1 + y2) // 2}</y>", "\t\t</point>", "\t</object>"]
    parts += ["\t<segmented>0</segmented>", "\t<size>", "\t\t<depth>3</depth>", f"\t\t<height>{image.height}</height>",
              f"\t\t<width>{image.width}</width>", "\t</size>", "\t<source>",
              "\t\t<annotation>imnet-ablate demo</annotation>", "\t\t<database>imnet-ablate demo VOC2012</database>",
              "\t\t<image>generated</image>", "\t</source>", "</annotation>", ""]
    return "\n".join(parts)


def write_scenes(out: Path, params: ActionParams, indices: Sequence[int]) -> dict[str, ActionImage]:
    """Worker unit: JPEG and XML of some scenes. Returns their images by id."""
    size, root = params.image_size, out / "VOCdevkit" / "VOC2012"
    plans = [scene_plan(params.seed, i, size) for i in indices]
    result = {}
    for i, (pixels, drawn) in zip(indices, scene_images(plans, size, params.seed)):
        persons = tuple(ActionPerson(image_id(i), k + 1, tuple(map(float, d.box)),
                                     tuple(a in d.plan.actions for a in ACTIONS))
                        for k, d in enumerate(drawn))
        image = ActionImage(image_id(i), size, size, persons)
        demo.save_jpeg(pixels, root / "JPEGImages" / f"{image.id}.jpg")
        (root / "Annotations" / f"{image.id}.xml").write_text(annotation_xml(image))
        result[image.id] = image
    return result


def split_ids(params: ActionParams) -> dict[str, list[str]]:
    """Image ids per split: train first, then val; trainval is both, as in the devkit."""
    train = [image_id(i) for i in range(params.train_images)]
    val = [image_id(i) for i in range(params.train_images, params.train_images + params.val_images)]
    return {"train": train, "val": val, "trainval": train + val}


def write_image_sets(root: Path, splits: Mapping[str, list[str]], images: Mapping[str, ActionImage]) -> None:
    """``ImageSets/Action``: ``<split>.txt`` and ``<action>_<split>.txt`` (``2012_000001 1 -1``) for the scored
    actions, which the devkit reads; ``ImageSets/Main/<split>.txt`` too, for readers that list images there
    (torchvision's ``VOCDetection``)."""
    for sets in ("Action", "Main"):
        (root / "ImageSets" / sets).mkdir(parents=True, exist_ok=True)
    for split, ids in splits.items():
        listing = "".join(f"{i}\n" for i in ids)
        (root / "ImageSets" / "Action" / f"{split}.txt").write_text(listing)
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text(listing)
        for action in SCORED:
            lines = [f"{p.image_id} {p.index} {1 if p.does(action) else -1:2d}\n"
                     for i in ids for p in images[i].persons]
            (root / "ImageSets" / "Action" / f"{action}_{split}.txt").write_text("".join(lines))


# -- the folder -------------------------------------------------------------------------------------------------------
def folder_spec(params: ActionParams) -> dict[str, Any]:
    """Everything that determines the files, the pair's generator version included (its ``instance_latent`` draws
    the objects here): the folder's name is its hash."""
    return {"params": asdict(params), "generator_version": GENERATOR_VERSION,
            "demo_generator_version": demo.GENERATOR_VERSION,
            "wordnet_sha256": wordnet.load().checksum}


def folder_for(params: Mapping[str, Any], cache_dir: Path | str) -> Path:
    return Path(cache_dir) / FOLDER / spec_hash(folder_spec(parse_params(params)))


def run_units(out: Path, params: ActionParams, workers: int) -> dict[str, ActionImage]:
    """Write every scene (in parallel when ``workers`` > 1); returns the images by id."""
    units = demo.chunks(range(params.train_images + params.val_images), UNIT)
    class_pools()  # computed once here, inherited by forked workers
    if workers == 1 or len(units) == 1:
        results = [write_scenes(out, params, unit) for unit in units]
    else:
        with ProcessPoolExecutor(workers, mp_context=get_context(demo.start_method())) as pool:
            results = list(pool.map(write_scenes, [out] * len(units), [params] * len(units), units))
    return {k: v for unit in results for k, v in unit.items()}


def manifest(params: ActionParams, splits: Mapping[str, list[str]], images: Mapping[str, ActionImage]
             ) -> dict[str, Any]:
    """What the folder holds; deterministic (no times or hosts) so two generations are byte-identical."""
    counts = {}
    for split, ids in splits.items():
        persons = [p for i in ids for p in images[i].persons]
        counts[split] = {"images": len(ids), "persons": len(persons),
                         "persons_per_action": {a: sum(p.does(a) for p in persons) for a in ACTIONS}}
    return {**folder_spec(params), "counts": counts}


def generate(params: ActionParams, out: Path, workers: int) -> None:
    """Write the devkit into ``out`` (an empty folder); ``manifest.json`` last."""
    root = out / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "Annotations"):
        (root / sub).mkdir(parents=True)
    images = run_units(out, params, workers)
    splits = split_ids(params)
    write_image_sets(root, splits, images)
    (out / demo.MANIFEST).write_text(json.dumps(manifest(params, splits, images), indent=2, sort_keys=True) + "\n")


def ensure(params: Mapping[str, Any], cache_dir: Path | str) -> Path:
    """The demo VOC2012 folder for ``data.demo`` (``VOCdevkit/``, ``manifest.json``), generated if missing."""
    spec = parse_params(params)
    return demo.materialise(folder_for(params, cache_dir), lambda tmp: generate(spec, tmp, demo.worker_count()))
