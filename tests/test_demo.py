"""The generated demo pair: formats real readers accept, consistent VOC splits, determinism, WordNet-shaped looks."""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
from defusedxml import ElementTree
from omegaconf import OmegaConf
from PIL import Image

from conftest import SHIPPED_DEMO_FOLDER, TINY_DEMO
from imnet_ablate import demo, wordnet
from imnet_ablate.errors import UserError

# Small enough to generate three times in a few seconds; still every class and both VOC splits.
MINI = {**TINY_DEMO, "train_per_class": 1, "val_per_class": 1, "voc_trainval": 24, "voc_test": 16}


@pytest.fixture(scope="module")
def folder(demo_cache: Path) -> Path:
    return demo.folder_for(TINY_DEMO, demo_cache)


@pytest.fixture(scope="module")
def voc(folder: Path) -> Path:
    return folder / "VOCdevkit" / "VOC2007"


@pytest.fixture(scope="module")
def annotations(voc: Path) -> dict[str, list[dict]]:
    """Every image's objects, parsed from the XML files independently of the generator's own records."""
    out = {}
    for path in sorted((voc / "Annotations").glob("*.xml")):
        root = ElementTree.parse(path).getroot()
        assert root.findtext("filename") == f"{path.stem}.jpg"
        size = (int(root.findtext("size/width")), int(root.findtext("size/height")), int(root.findtext("size/depth")))
        assert size == (TINY_DEMO["voc_image_size"], TINY_DEMO["voc_image_size"], 3)
        out[path.stem] = [{"name": o.findtext("name"), "difficult": o.findtext("difficult") == "1",
                           "truncated": o.findtext("truncated") == "1", "pose": o.findtext("pose"),
                           "box": [int(o.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax")]}
                          for o in root.findall("object")]
    return out


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_every_wnid_has_train_and_val_images(folder: Path):
    classes = wordnet.load().classes
    for split, per_class in (("train", TINY_DEMO["train_per_class"]), ("val", TINY_DEMO["val_per_class"])):
        root = folder / "imagenet" / split
        assert sorted(p.name for p in root.iterdir()) == sorted(classes)
        assert {len(list((root / w).glob("*.JPEG"))) for w in classes} == {per_class}
    counts = json.loads((folder / demo.MANIFEST).read_text())["counts"]
    assert counts["imagenet_images"] == 1000 * (TINY_DEMO["train_per_class"] + TINY_DEMO["val_per_class"])


def test_imagefolder_reads_train(folder: Path):
    from torchvision.datasets import ImageFolder

    data = ImageFolder(str(folder / "imagenet" / "train"))
    assert data.classes == sorted(wordnet.load().classes)
    assert len(data) == 1000 * TINY_DEMO["train_per_class"]
    image, label = data[len(data) - 1]
    assert image.size == (TINY_DEMO["image_size"],) * 2 and image.mode == "RGB" and label == 999


@pytest.mark.parametrize("image_set", ["trainval", "test"])
def test_vocdetection_reads(folder: Path, image_set: str):
    from torchvision.datasets import VOCDetection

    data = VOCDetection(str(folder), year="2007", image_set=image_set, download=False)
    assert len(data) == TINY_DEMO[f"voc_{image_set}"]
    image, target = data[0]
    assert image.size == (TINY_DEMO["voc_image_size"],) * 2
    objects = target["annotation"]["object"]
    assert objects and all(o["name"] in demo.PASCAL_SYNSETS for o in objects)


def test_split_files_match_annotations(voc: Path, annotations: dict[str, list[dict]]):
    main = voc / "ImageSets" / "Main"
    ids = {s: (main / f"{s}.txt").read_text().split() for s in ("train", "val", "trainval", "test")}
    assert sorted(ids["train"] + ids["val"]) == sorted(ids["trainval"])
    assert not set(ids["trainval"]) & set(ids["test"])
    assert sorted(ids["trainval"] + ids["test"]) == sorted(annotations)
    assert len(ids["test"]) == TINY_DEMO["voc_test"]
    for split, name in itertools.product(ids, demo.PASCAL_SYNSETS):
        lines = (main / f"{name}_{split}.txt").read_text().splitlines()
        assert all(re.fullmatch(r"\d{6} (-1| 0| 1)", line) for line in lines), lines[:3]
        flags = {line.split()[0]: int(line.split()[1]) for line in lines}
        assert list(flags) == ids[split]
        for image_id, flag in flags.items():
            mine = [o for o in annotations[image_id] if o["name"] == name]
            expected = 1 if any(not o["difficult"] for o in mine) else (0 if mine else -1)
            assert flag == expected, (split, name, image_id)
    all_flags = {int(line.split()[1]) for name in demo.PASCAL_SYNSETS
                 for line in (main / f"{name}_trainval.txt").read_text().splitlines()}
    assert all_flags == {-1, 0, 1}


def test_objects_boxes_and_flags(annotations: dict[str, list[dict]]):
    size = TINY_DEMO["voc_image_size"]
    objects = [o for objs in annotations.values() for o in objs]
    assert all(annotations.values()), "every image has an object"
    assert {o["name"] for o in objects} == set(demo.PASCAL_SYNSETS)
    assert max(len(objs) for objs in annotations.values()) >= 3
    for o in objects:
        x1, y1, x2, y2 = o["box"]
        assert 1 <= x1 <= x2 <= size and 1 <= y1 <= y2 <= size, o
        touches_border = x1 == 1 or y1 == 1 or x2 == size or y2 == size
        assert o["truncated"] == touches_border, o
        assert o["pose"] in ("Left", "Right")
    for flag in ("difficult", "truncated"):
        share = np.mean([o[flag] for o in objects])
        assert 0.02 < share < 0.5, (flag, share)


def test_pascal_members_match_the_authors_list(reference: Path):
    text = (reference / "wmigftl" / "pascal" / "common_pascal_coarse.txt").read_text()
    expected = {block.split("\n")[0].strip(): set(re.findall(r"\((n\d{8})\)", block))
                for block in text.split("Dataset class: ")[1:]}
    members = demo.pascal_members(wordnet.load())
    assert list(members) == list(demo.PASCAL_SYNSETS)
    for name, wnids in members.items():
        assert set(wnids) == (expected.get(name) or {demo.PASCAL_SYNSETS[name]}), name
    assert members["cow"] == ["n01887787"] and len(members["dog"]) == 118


def test_siblings_look_more_alike_than_distant_classes(folder: Path):
    """Mean images of classes with one first parent are closer than those of classes that part near the root."""
    hierarchy = wordnet.load()
    classes = hierarchy.classes
    means = {w: np.mean([np.asarray(Image.open(p), np.float32) for p in (folder / "imagenet" / "train" / w).iterdir()],
                        axis=0) for w in classes}
    roots = {w: hierarchy.chain(w)[::-1] for w in classes}

    def split_depth(a: str, b: str) -> int:
        return next((i for i, (x, y) in enumerate(zip(roots[a], roots[b])) if x != y), len(roots[a]))

    pairs = list(itertools.combinations(classes, 2))[::97]
    siblings = [p for p in itertools.combinations(classes, 2) if hierarchy.first_parent[p[0]] ==
                hierarchy.first_parent[p[1]]]
    distant = [p for p in pairs if split_depth(*p) <= 4]
    assert len(siblings) > 500 and len(distant) > 500

    def mean_distance(pairs: list[tuple[str, str]]) -> float:
        return float(np.mean([np.sqrt(np.mean((means[a] - means[b]) ** 2)) for a, b in pairs]))

    assert mean_distance(siblings) < 0.9 * mean_distance(distant)


def test_instances_vary_around_their_class():
    """A class's instances are its modes plus jitter: one key gives one look, a few images meet few of the class's
    modes and many meet all, and an instance stays nearer its own class's traits than a sibling's."""
    hierarchy = wordnet.load()
    a, b = next(p for p in itertools.combinations(hierarchy.classes, 2)
                if hierarchy.first_parent[p[0]] == hierarchy.first_parent[p[1]])
    za, zb = (demo.class_latent(0, hierarchy.chain(w)) for w in (a, b))
    looks = np.stack([demo.instance_latent(0, a, za, (1, int(a[1:]), i)) for i in range(200)])
    assert np.array_equal(looks[7], demo.instance_latent(0, a, za, (1, int(a[1:]), 7)))
    assert len({row.tobytes() for row in looks}) == 200
    modes = demo.class_modes(0, a)
    nearest = np.argmin(((looks[:, None] - za - modes[None]) ** 2).sum(axis=2), axis=1)
    assert len(set(nearest[:1])) == 1 and len(set(nearest[:24])) == demo.N_MODES
    to_own, to_sibling = (np.sqrt(((looks - z) ** 2).sum(axis=1)).mean() for z in (za, zb))
    assert 0.5 < to_own < 0.5 * to_sibling


def test_same_seed_same_bytes_whatever_the_workers(tmp_path: Path):
    """Two generations (2 workers via ensure, 1 in-process) are byte-identical; another seed changes every image."""
    params = demo.parse_params(MINI)
    first = demo.ensure(MINI, tmp_path / "a")
    inline = tmp_path / "inline"
    inline.mkdir()
    demo.generate(params, inline, workers=1)
    assert tree_digest(first) == tree_digest(inline)
    other = demo.ensure({**MINI, "seed": 1}, tmp_path / "a")
    assert other != first
    a, b = tree_digest(first), tree_digest(other)
    images = [k for k in a if k.endswith((".JPEG", ".jpg"))]
    assert len(images) == 2000 + 40 and all(a[k] != b[k] for k in images)


def test_ensure_reuses_a_finished_folder(demo_cache: Path, folder: Path):
    stamp = (folder / demo.MANIFEST).stat().st_mtime_ns
    started = time.perf_counter()
    assert demo.ensure(OmegaConf.create(TINY_DEMO), demo_cache) == folder
    assert time.perf_counter() - started < 1.0
    assert (folder / demo.MANIFEST).stat().st_mtime_ns == stamp
    assert [p.name for p in folder.parent.iterdir()] == [folder.name], "no temporary folders left behind"


def test_publish_keeps_the_winner_of_a_race(tmp_path: Path):
    final, late = tmp_path / "final", tmp_path / "late"
    for path, text in ((final, "winner"), (late, "loser")):
        path.mkdir()
        (path / demo.MANIFEST).write_text(text)
    demo.publish(late, final)
    assert (final / demo.MANIFEST).read_text() == "winner"


def test_publish_replaces_an_incomplete_folder(tmp_path: Path):
    final, fresh = tmp_path / "final", tmp_path / "fresh"
    final.mkdir()
    (final / "half-written.JPEG").write_bytes(b"")
    fresh.mkdir()
    (fresh / demo.MANIFEST).write_text("complete")
    demo.publish(fresh, final)
    assert sorted(p.name for p in final.iterdir()) == [demo.MANIFEST]


def test_stale_temporary_folders_are_swept(tmp_path: Path):
    final = tmp_path / "demo" / "abc"
    old, live = tmp_path / "demo" / ".abc.tmp-old", tmp_path / "demo" / ".abc.tmp-live"
    for path in (old, live):
        (path / "imagenet").mkdir(parents=True)
    os.utime(old, (time.time() - 2 * demo.STALE_TMP_S,) * 2)
    demo.sweep_stale(final)
    assert not old.exists() and live.exists()


def test_nested_sections_leave_the_pair_folder_unchanged(tmp_path: Path):
    """The pair's folder name is a contract (finished runs refer to it): ``data.demo.sun397`` must not change it."""
    from imnet_ablate.config import compose

    shipped = OmegaConf.to_container(compose("data_demo", []).data.demo)
    assert isinstance(shipped.get("sun397"), dict)
    assert demo.folder_for(shipped, tmp_path).name == SHIPPED_DEMO_FOLDER
    flat = {k: v for k, v in shipped.items() if not isinstance(v, dict)}
    other = {**shipped, "sun397": {"image_size": 1}}
    assert demo.folder_for(flat, tmp_path) == demo.folder_for(other, tmp_path) == demo.folder_for(shipped, tmp_path)


@pytest.mark.parametrize("change, key", [({"seed": -1}, "seed"), ({"image_size": 8}, "image_size"),
                                         ({"voc_test": "many"}, "voc_test"), ({"colour": 1}, "colour")])
def test_bad_params_name_the_key(tmp_path: Path, change: dict, key: str):
    with pytest.raises(UserError, match=rf"data\.demo\.{key}"):
        demo.ensure({**TINY_DEMO, **change}, tmp_path)
