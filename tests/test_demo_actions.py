"""The generated VOC 2012 action devkit: readers accept it (ours and torchvision's), its cues are where the module
says, it is deterministic, and adding it left the demo pair's folder where it was."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import SHIPPED_DEMO_FOLDER, TINY_DEMO, TINY_VOC2012
from omegaconf import OmegaConf

from imnet_ablate import demo, demo_actions, wordnet
from imnet_ablate import rescore
from imnet_ablate import voc_actions as va
from imnet_ablate.errors import UserError
from imnet_ablate.config import compose

TINY = {**TINY_DEMO, "voc2012": TINY_VOC2012}


@pytest.fixture(scope="module")
def devkit(demo_cache: Path) -> Path:
    return demo_actions.ensure(OmegaConf.create(TINY), demo_cache) / "VOCdevkit"


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_reader_loads_both_splits(devkit: Path):
    manifest = demo_actions.manifest(demo_actions.parse_params(TINY), demo_actions.split_ids(
        demo_actions.parse_params(TINY)), {im.id: im for s in ("train", "val") for im in va.load_split(devkit, s)})
    assert manifest == json.loads((devkit.parent / demo.MANIFEST).read_text())
    for split, n in (("train", 60), ("val", 30)):
        images = va.load_split(devkit, split)
        assert len(images) == n and all(1 <= len(im.persons) <= 3 for im in images)
        for p in va.listed_persons(images):
            x1, y1, x2, y2 = p.box
            assert 1 <= x1 <= x2 <= 64 and 1 <= y1 <= y2 <= 64 and sum(p.actions) in (1, 2)
    counts = manifest["counts"]["train"]["persons_per_action"]
    assert all(counts[a] >= 3 for a in va.ACTIONS), counts  # every action is there to learn
    assert len(va.load_split(devkit, "trainval")) == 90


def test_torchvision_reads_the_tree_and_the_actions(devkit: Path):
    from torchvision.datasets import VOCDetection

    data = VOCDetection(str(devkit.parent), year="2012", image_set="val")
    ours = va.load_split(devkit, "val")
    assert len(data) == len(ours) == 30
    image, target = data[3]
    assert image.size == (64, 64) and target["annotation"]["filename"] == f"{ours[3].id}.jpg"
    for obj, p in zip(target["annotation"]["object"], ours[3].persons):
        assert obj["name"] == "person" and {a: int(v) for a, v in obj["actions"].items()} == {
            a: int(p.does(a)) for a in va.ACTIONS}
        assert [float(obj["bndbox"][k]) for k in ("xmin", "ymin", "xmax", "ymax")] == list(p.box)


def test_lists_are_in_the_devkit_format(devkit: Path):
    year = va.year_dir(devkit)
    assert (year / "ImageSets" / "Main" / "train.txt").read_text() == va.split_path(devkit, "train").read_text()
    lines = va.list_path(devkit, "jumping", "val").read_text().splitlines()
    assert all(re.fullmatch(r"2012_\d{6} [123] ( 1|-1)", line) for line in lines) and len(lines) >= 30
    assert not va.list_path(devkit, "other", "val").exists()  # the devkit reads the scored actions' lists


def test_pose_and_objects_are_the_cues(devkit: Path):
    persons = va.listed_persons(va.load_split(devkit, "trainval"))

    def mean_width_ratio(action: str) -> float:
        return float(np.mean([(p.box[2] - p.box[0] + 1) / (p.box[3] - p.box[1] + 1) for p in persons
                              if p.does(action) and sum(p.actions) == 1]))

    assert mean_width_ratio("running") > 1.3 * mean_width_ratio("other")  # runners lean forward
    pools = demo_actions.class_pools()
    h = wordnet.load()
    assert sorted(h.short_name(w) for w in pools["phoning"]) == ["cellular telephone", "dial telephone", "pay-phone"]
    assert set(pools["ridinghorse"]) == set(demo.pascal_members(h)["horse"])
    taken = {w for k, pool in pools.items() if k in demo_actions.OBJECT_SYNSETS or k == "person" for w in pool}
    assert not taken & set(pools["decoy"]) and len(taken) + len(pools["decoy"]) == 1000
    assert all(set(pools[f"{a}-like"]) <= set(pools["decoy"]) for a in demo_actions.OBJECT_SYNSETS)
    assert {h.short_name(w) for w in pools["ridinghorse-like"]} >= {"zebra", "ox"}
    rng = np.random.default_rng(0)
    seen = set()
    while len(seen) < len(demo_actions.OBJECT_SYNSETS) + 1:
        plan = demo_actions.person_plan(rng, 0, (0.0, 64.0), 64, 1.0, pools)
        action = plan.actions[0]
        things = (*plan.behind, *plan.front)
        if action in demo_actions.OBJECT_SYNSETS:  # its own object, once, ridden or held where the action holds it
            assert [t.wnid in pools[action] for t in things] == [True] + [False] * (len(things) - 1)
            seen.add(action)
        if action in demo_actions.MOUNTED:
            assert plan.behind[0].cy > plan.person.cy
        if action == "other" and plan.behind:  # set up as a rider, on a look-alike
            assert any(plan.behind[0].wnid in pools[f"{a}-like"] for a in demo_actions.MOUNTED)
            seen.add("look-alike")


def test_same_seed_same_bytes_whatever_the_workers(tmp_path: Path):
    params = demo_actions.parse_params({"seed": 3, "voc2012": {**TINY_VOC2012, "train_images": 70, "val_images": 5}})
    for name, workers in (("one", 1), ("two", 2)):
        (tmp_path / name).mkdir()
        demo_actions.generate(params, tmp_path / name, workers)
    assert tree_digest(tmp_path / "one") == tree_digest(tmp_path / "two")
    other = demo_actions.parse_params({"seed": 4, "voc2012": {**TINY_VOC2012, "train_images": 70, "val_images": 5}})
    (tmp_path / "seed4").mkdir()
    demo_actions.generate(other, tmp_path / "seed4", 1)
    assert tree_digest(tmp_path / "seed4") != tree_digest(tmp_path / "one")


def test_the_demo_pair_folder_is_unchanged():
    """Its name is a contract with users' caches: a nested dataset section must not enter it."""
    shipped = compose("data_demo", []).data.demo
    assert "voc2012" in shipped and demo.folder_for(shipped, Path("/c")).name == SHIPPED_DEMO_FOLDER
    assert demo.folder_for(TINY, Path("/c")) == demo.folder_for(TINY_DEMO, Path("/c"))
    assert demo.folder_for(TINY, Path("/c")).name == "791a20c75c61"  # generator 1's: 234dcf6a972b


def test_the_action_folder_follows_its_own_settings_only(demo_cache: Path):
    base = demo_actions.folder_for(TINY, demo_cache)
    assert base.parent.name == "demo-voc2012"
    assert demo_actions.folder_for({**TINY, "train_per_class": 9}, demo_cache) == base
    assert demo_actions.folder_for({**TINY, "seed": 1}, demo_cache) != base
    assert demo_actions.folder_for({**TINY, "voc2012": {**TINY_VOC2012, "image_size": 48}}, demo_cache) != base


@pytest.mark.parametrize("change, key", [
    ({"voc2012": {**TINY_VOC2012, "image_size": 16}}, "data.demo.voc2012.image_size=16"),
    ({"voc2012": {**TINY_VOC2012, "val_images": 0}}, "data.demo.voc2012.val_images=0"),
    ({"voc2012": {**TINY_VOC2012, "persons": 2}}, "data.demo.voc2012.persons: unknown"),
    ({"voc2012": None}, "data.demo.voc2012: missing"),
    ({"seed": -1}, "data.demo.seed=-1"),
])
def test_bad_params_name_the_key(tmp_path: Path, change: dict, key: str):
    with pytest.raises(UserError, match=re.escape(key)):
        demo_actions.ensure({**TINY, **change}, tmp_path)
    assert not (tmp_path / "demo-voc2012").exists() or not any((tmp_path / "demo-voc2012").iterdir())


def test_ensure_reuses_a_finished_folder(devkit: Path, demo_cache: Path):
    manifest = devkit.parent / demo.MANIFEST
    before = manifest.stat().st_mtime_ns
    assert demo_actions.ensure(TINY, demo_cache) == devkit.parent and manifest.stat().st_mtime_ns == before


def test_evaluate_finds_the_demo_devkit(devkit: Path, demo_cache: Path, tmp_path: Path):
    """``data=demo`` without ``data.voc2012_root``: ``ablate evaluate task=voc-act`` scores against the demo."""
    persons = va.listed_persons(va.load_split(devkit, "val"))
    truth = {a: np.array([float(p.does(a)) for p in persons]) for a in va.SCORED}
    va.write_results(tmp_path, "val", persons, truth)
    overrides = ["task=voc-act", f"detections={tmp_path}", f"paths.cache={demo_cache}", f"paths.runs={tmp_path}/runs"]
    overrides += [f"data.demo.{k}={v}" for k, v in TINY_DEMO.items()]
    overrides += [f"data.demo.voc2012.{k}={v}" for k, v in TINY_VOC2012.items()]
    out = rescore.run(compose("evaluate", overrides))
    record = json.loads((out / "eval_voc-act_val_area.json").read_text())
    assert record["n_persons"] == len(persons) and record["map"] == 1.0
