"""The generated SUN397 scenes: the real layout, determinism, typical objects by WordNet name, and its folder."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from conftest import TINY_DEMO, TINY_SUN397, tiny_demo_overrides
from imnet_ablate import datasets, demo, demo_sun397, sun397, wordnet
from imnet_ablate.errors import UserError
from imnet_ablate.config import compose
from test_demo import tree_digest

MINI = {**TINY_DEMO, "sun397": {"train_per_class": 1, "test_per_class": 1, "image_size": 16}}


def test_layout_as_distributed(sun397_demo: Path):
    sun = sun397_demo / "SUN397"
    assert (sun / "ClassName.txt").read_text().split() == list(sun397.categories())
    per_split = {"train": TINY_SUN397["train_per_class"], "test": TINY_SUN397["test_per_class"]}
    lines = {split: (sun397_demo / "Partitions" / name).read_text().splitlines()
             for split, name in zip(per_split, sun397.partition_files(1))}
    for split, listed in lines.items():
        assert listed == sorted(listed) and len(set(listed)) == 397 * per_split[split]
        assert all(re.fullmatch(r"(/[a-z_]+){2,3}/sun_[a-z]{16}\.jpg", line) for line in listed)
    assert not set(lines["train"]) & set(lines["test"])
    on_disk = sorted("/" + p.relative_to(sun).as_posix() for p in sun.rglob("*.jpg"))
    assert on_disk == sorted(lines["train"] + lines["test"])
    with Image.open(sun / lines["test"][-1][1:]) as image:
        assert image.format == "JPEG" and image.size == (TINY_SUN397["image_size"],) * 2 and image.mode == "RGB"
    manifest = json.loads((sun397_demo / "manifest.json").read_text())
    counts = manifest["counts"]
    assert (counts["categories"], counts["train"], counts["test"]) == (397, 397 * 2, 397 * 2)
    assert sorted(manifest["typical_objects"]) == sorted(sun397.categories())


def test_same_seed_same_bytes_whatever_the_workers(tmp_path: Path):
    """Two generations (2 workers via ensure, 1 in-process) are byte-identical; another seed changes every image."""
    first = demo_sun397.ensure(MINI, tmp_path / "a")
    inline = tmp_path / "inline"
    inline.mkdir()
    demo_sun397.generate(demo_sun397.parse_params(MINI), inline, workers=1)
    assert tree_digest(first) == tree_digest(inline)
    other = demo_sun397.ensure({**MINI, "seed": 1}, tmp_path / "a")
    a, b = tree_digest(first), tree_digest(other)
    images = lambda digest: sorted(v for k, v in digest.items() if k.endswith(".jpg"))  # noqa: E731 (names differ)
    assert len(images(a)) == 2 * 397 and not set(images(a)) & set(images(b))
    assert [p.name for p in first.parent.iterdir() if p.name.startswith(".")] == [], "no temporary folders left"


def test_folder_name_follows_the_seed_and_its_section_only(tmp_path: Path):
    base = demo_sun397.folder_for(MINI, tmp_path)
    assert base.parent == tmp_path / "demo-sun397"
    assert demo_sun397.folder_for({**MINI, "voc_test": 7, "image_size": 64}, tmp_path) == base
    assert demo_sun397.folder_for({**MINI, "seed": 3}, tmp_path) != base
    assert demo_sun397.folder_for({**MINI, "sun397": {**MINI["sun397"], "image_size": 48}}, tmp_path) != base


def test_typical_objects_follow_the_name_where_wordnet_has_it():
    plans = {c.name: c for c in demo_sun397.plan_categories(0)}
    hierarchy = wordnet.load()
    assert all(2 <= len(c.objects) <= 4 and len(set(c.objects)) == len(c.objects) for c in plans.values())
    assert all(w in hierarchy.classes for c in plans.values() for w in c.objects)
    assert "n02776631" in plans["/b/bakery/shop"].objects  # the bakery class
    assert "n04200800" in plans["/s/shoe_shop"].objects  # shoe shop
    assert "n03028079" in plans["/c/church/indoor"].objects and "n03028079" in plans["/c/church/outdoor"].objects
    buses = set(hierarchy.classes) & {w for w, parent in hierarchy.first_parent.items() if parent == "n02924116"}
    assert plans["/b/bus_interior"].objects[0] in buses
    assert plans["/a/abbey"].related == 0  # WordNet has no "abbey" among ImageNet's synsets: random classes
    assert 120 < sum(c.related > 0 for c in plans.values()) < 200
    again, other = demo_sun397.plan_categories(0), demo_sun397.plan_categories(1)
    assert again == list(plans.values()) and sum(a.objects != b.objects for a, b in zip(again, other)) > 300


def test_scenes_show_their_categorys_objects():
    """A scene's typical objects are drawn with their ImageNet class's traits: rendering a category's scenes with
    another category's objects changes them, rendering them with its own reproduces them."""
    plans = demo_sun397.plan_categories(0)
    shot = demo_sun397.Shot(plans[5], "train", 0)
    plan = demo_sun397.scene_plan(0, shot, 32)
    latents = {w: demo.class_latent(0, wordnet.load().chain(w)) for w in plans[5].objects}
    own = demo_sun397.scene_images(0, [plan], 32, latents)
    swapped = demo_sun397.scene_images(0, [plan], 32, {w: latents[w][::-1].copy() for w in latents})
    assert np.array_equal(own, demo_sun397.scene_images(0, [plan], 32, latents))
    assert np.abs(own.astype(int) - swapped.astype(int)).mean() > 2


@pytest.mark.parametrize("change, key", [
    ({"sun397": None}, r"data\.demo\.sun397: missing"), ({"seed": -1}, r"data\.demo\.seed=-1"),
    ({"sun397": {**TINY_SUN397, "image_size": 8}}, r"data\.demo\.sun397\.image_size=8"),
    ({"sun397": {**TINY_SUN397, "colour": 1}}, r"data\.demo\.sun397\.colour: unknown setting"),
    ({"sun397": {"train_per_class": 2, "image_size": 32}}, r"data\.demo\.sun397\.test_per_class=None")])
def test_bad_params_name_the_key(tmp_path: Path, change: dict, key: str):
    with pytest.raises(UserError, match=key):
        demo_sun397.ensure({**MINI, **change}, tmp_path)
    assert not tmp_path.joinpath("demo-sun397").exists()


def test_data_sun397_root_is_the_demo_or_the_given_folder(sun397_demo: Path, demo_cache: Path, tmp_path: Path):
    cfg = compose("data_check", tiny_demo_overrides(demo_cache, tmp_path / "runs"))
    assert datasets.root(cfg, "sun397") == sun397_demo
    real = compose("data_check", ["data=imagenet", f"data.sun397_root={sun397_demo}"])
    assert datasets.root(real, "sun397") == sun397_demo
    with pytest.raises(UserError, match=r"data\.sun397_root is not set"):
        datasets.root(compose("data_check", ["data=imagenet"]), "sun397")
    shipped = OmegaConf.to_container(compose("data_check", []).data.demo)
    assert demo_sun397.parse_params(shipped) == demo_sun397.SunParams(0, 10, 10, 32)
