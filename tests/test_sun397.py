"""SUN397 on disk: the packaged category list, the partition reader, the seeded split, and `ablate data check`."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, TINY_SUN397, run_ablate
from imnet_ablate import datacheck, sun397
from imnet_ablate.errors import UserError

CATEGORIES = ["/a/abbey", "/a/apartment_building/outdoor", "/b/bakery/shop"]
PER_CATEGORY = 6


def write_jpeg(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path, format="JPEG")


def make_tree(root: Path, partitions: str | None = "beside") -> Path:
    """A small copy in the layout as distributed: 3 categories (one with three levels) of 6 images, and
    partitions 01 and 02 (3 + 3 images per category) beside SUN397/, inside it, or none."""
    sun = root / "SUN397"
    sun.mkdir(parents=True)
    (sun / "ClassName.txt").write_text("".join(f"{c}\n" for c in CATEGORIES))
    names = {c: [f"sun_{c.split('/')[2][:4]}{i:012d}.jpg" for i in range(PER_CATEGORY)] for c in CATEGORIES}
    for k, (c, files) in enumerate(names.items()):
        for i, name in enumerate(files):
            write_jpeg(sun / c[1:] / name, 40 * k + i)
    if partitions:
        folder = root / "Partitions" if partitions == "beside" else sun / "Partitions"
        folder.mkdir()
        for p, (train, test) in enumerate([(slice(0, 3), slice(3, 6)), (slice(3, 6), slice(0, 3))], 1):
            for kind, part in (("Training", train), ("Testing", test)):
                lines = [f"{c}/{name}\n" for c, files in names.items() for name in files[part]]
                (folder / f"{kind}_{p:02d}.txt").write_text("".join(lines))
    return root


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "copy")


# -- the category list ------------------------------------------------------------------------------------------
def test_packaged_categories_are_the_datasets(reference: Path):
    expected = (reference / "sun397_categories.txt").read_text().split()
    assert list(sun397.categories()) == sorted(expected) and len(expected) == 397
    assert sun397.class_name("/a/apartment_building/outdoor") == "apartment_building/outdoor"


def test_build_script_sorts_and_checks_the_wheels_list(tmp_path: Path):
    """The script reads the label list out of a wheel (a zip) and writes it sorted; a malformed list is refused."""
    member = "tensorflow_datasets/image_classification/sun397_labels.txt"
    shuffled = list(reversed(sun397.categories()))
    for name, lines in (("good", shuffled), ("bad", shuffled[:-1] + ["/q/Quarry"])):
        with zipfile.ZipFile(tmp_path / f"{name}.whl", "w") as z:
            z.writestr(member, "\n".join(lines) + "\n")
    script = [sys.executable, str(REPO / "scripts" / "build_sun397.py")]
    out = tmp_path / "categories.txt"
    subprocess.run([*script, "--wheel", str(tmp_path / "good.whl"), "--out", str(out)], check=True,
                   capture_output=True)
    packaged = REPO / "src" / "imnet_ablate" / sun397.CATEGORY_FILE
    assert out.read_bytes() == packaged.read_bytes()
    bad = subprocess.run([*script, "--wheel", str(tmp_path / "bad.whl"), "--out", str(tmp_path / "x.txt")],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "1 malformed" in bad.stderr and not (tmp_path / "x.txt").exists()


# -- the reader -------------------------------------------------------------------------------------------------
def test_official_partitions_beside_or_inside_sun397(tmp_path: Path):
    labels = {c: sun397.categories().index(c) for c in CATEGORIES}
    splits = {}
    for place in ("beside", "inside"):
        root = make_tree(tmp_path / place, place)
        for given in (root, root / "SUN397"):
            for partition in (1, 2):
                split = sun397.load_partition(given, partition)
                splits[place, given.name, partition] = split
                assert len(split.train) == len(split.test) == 3 * len(CATEGORIES)
                assert not {s.path for s in split.train} & {s.path for s in split.test}
                assert all((root / "SUN397" / s.path).is_file() for s in split.train + split.test)
                assert {s.label for s in split.test} == set(labels.values())
                assert all(labels["/" + s.path.rpartition("/")[0]] == s.label for s in split.train + split.test)
                assert split.source["kind"] == "official" and split.source["partition"] == partition
    assert len({tuple(s.train) for s in splits.values()}) == 2, "same partition, same split wherever it sits"
    first = splits["beside", "beside", 1]
    assert first.train[0] == sun397.Sample("a/abbey/sun_abbe000000000000.jpg", labels["/a/abbey"])


def test_seeded_split_when_the_partitions_are_absent(tmp_path: Path):
    root = make_tree(tmp_path / "copy", partitions=None)
    a, b, other = (sun397.load_partition(root, 1, seed) for seed in (0, 0, 1))
    assert a == b and a.train != other.train
    assert a.source["kind"] == "seeded" and a.source["seed"] == 0 and a.source["per_class"] == sun397.PER_CLASS
    for split in (a, other):
        assert len(split.train) == len(split.test) == len(CATEGORIES) * PER_CATEGORY // 2
        assert not {s.path for s in split.train} & {s.path for s in split.test}
        for label in {s.label for s in split.train}:
            assert sum(s.label == label for s in split.train) == sum(s.label == label for s in split.test) == 3
    small = sun397.seeded_split(root / "SUN397", sun397.class_names(root / "SUN397", sun397.raise_problem), 0, 2)
    assert len(small.train) == len(small.test) == 2 * len(CATEGORIES), "at most per_class a side"


def _append(path: Path, data: bytes) -> None:
    path.write_bytes(path.read_bytes() + data)


MUTATIONS = {
    "no ClassName.txt": (lambda r: (r / "SUN397" / "ClassName.txt").unlink(),
                         r"SUN397/ClassName.txt: missing; expected the folder holding SUN397/"),
    "unknown ClassName line": (lambda r: _append(r / "SUN397" / "ClassName.txt", b"/z/zebra_park\n"),
                               r"ClassName.txt:4: '/z/zebra_park' is not a SUN397 category"),
    "unknown category": (lambda r: _append(r / "Partitions" / "Training_01.txt", b"/a/airport/sun_x.jpg\n"),
                         r"Training_01.txt:10: category '/a/airport' is not in ClassName.txt"),
    "missing file": (lambda r: (r / "SUN397" / "a" / "abbey" / "sun_abbe000000000004.jpg").unlink(),
                     r"Testing_01.txt:2: SUN397/a/abbey/sun_abbe000000000004.jpg is not on disk"),
    "outside the root": (lambda r: _append(r / "Partitions" / "Testing_01.txt", b"/a/abbey/../../../etc/passwd\n"),
                         r"Testing_01.txt:10: '/a/abbey/../../../etc/passwd' is not a path inside SUN397/"),
    "bad bytes": (lambda r: _append(r / "Partitions" / "Training_01.txt", b"/a/abbey/sun_\xff\xfe\x00secret.jpg\n"),
                  r"Training_01.txt:10: bytes that are not printable UTF-8 text; expected text lines$"),
    "listed twice": (lambda r: _append(r / "Partitions" / "Training_01.txt", b"/a/abbey/sun_abbe000000000000.jpg\n"),
                     r"Training_01.txt:10: '/a/abbey/sun_abbe000000000000.jpg' is listed twice"),
    "on both sides": (lambda r: _append(r / "Partitions" / "Testing_01.txt", b"/a/abbey/sun_abbe000000000000.jpg\n"),
                      r"Testing_01.txt:10: SUN397/a/abbey/sun_abbe000000000000.jpg is also in Training_01.txt"),
    "no Testing file": (lambda r: (r / "Partitions" / "Testing_01.txt").unlink(),
                        r"Testing_01.txt: missing; expected Training_01.txt and Testing_01.txt"),
}


@pytest.mark.parametrize("case", MUTATIONS)
def test_a_broken_copy_is_one_line_naming_file_and_line(tree: Path, case: str):
    mutate, message = MUTATIONS[case]
    mutate(tree)
    with pytest.raises(UserError, match=message) as info:
        sun397.load_partition(tree, 1)
    assert "\n" not in str(info.value) and "secret" not in str(info.value)


def test_partition_number_empty_splits_and_skipped_file_check(tree: Path, tmp_path: Path):
    with pytest.raises(UserError, match=r"partition=11: expected an integer from 1 to 10"):
        sun397.load_partition(tree, 11)
    empty = make_tree(tmp_path / "empty", partitions=None)
    for jpeg in (empty / "SUN397").rglob("*.jpg"):
        jpeg.unlink()
    with pytest.raises(UserError, match=r"SUN397: the seeded split has no training or no test images"):
        sun397.load_partition(empty)
    (tree / "Partitions" / "Testing_02.txt").write_bytes(b"\xef\xbb\xbf\r\n")  # a BOM and a CRLF: no lines
    with pytest.raises(UserError, match=r"the official split has no training or no test images"):
        sun397.load_partition(tree, 2)
    (tree / "SUN397" / "a" / "abbey" / "sun_abbe000000000004.jpg").unlink()
    assert len(sun397.load_partition(tree, 1, check_files=False).test) == 3 * len(CATEGORIES)


# -- the generated tree, read by a reader users have ---------------------------------------------------------------
def test_torchvision_reads_the_demo_tree_with_our_labels(sun397_demo: Path):
    from torchvision.datasets import SUN397

    data = SUN397(str(sun397_demo))
    per_class = TINY_SUN397["train_per_class"] + TINY_SUN397["test_per_class"]
    assert data.classes == [sun397.class_name(c) for c in sun397.categories()]
    assert len(data) == 397 * per_class
    split = sun397.load_partition(sun397_demo, 1)
    assert split.source["kind"] == "official"
    assert len(split.train) == 397 * TINY_SUN397["train_per_class"]
    assert len(split.test) == 397 * TINY_SUN397["test_per_class"]
    sun = sun397_demo / "SUN397"
    theirs = {p.relative_to(sun).as_posix(): label for p, label in zip(data._image_files, data._labels)}
    assert {s.path: s.label for s in split.train + split.test} == theirs
    image, label = data[0]
    assert image.size == (TINY_SUN397["image_size"],) * 2 and image.mode == "RGB"


# -- ablate data check --------------------------------------------------------------------------------------------
def test_data_check_of_the_demo_tree_is_clean(sun397_demo: Path):
    scan = sun397.scan(sun397_demo / "SUN397")
    report = datacheck.check_all({"sun397": scan}, datacheck.Check("sun397", 1, 5, 16))
    assert report["usable"] and report["findings"] == []
    assert report["datasets"]["sun397"] | {"modes": None} == {
        "root": str(sun397_demo), "categories": 397, "images": 397 * 4, "partitions": [1], "modes": None}


def test_data_check_names_each_problem(tree: Path, tmp_path: Path):
    """Unreadable images, partitions naming missing files or unknown categories, stray files: exit 1 naming them."""
    sun = tree / "SUN397"
    (sun / "a" / "abbey" / "sun_abbe000000000001.jpg").write_bytes(b"")
    shutil.copy(sun / "b" / "bakery" / "shop" / "sun_bake000000000000.jpg", sun / "b" / "bakery" / "notes.txt")
    jpeg = (sun / "b" / "bakery" / "shop" / "sun_bake000000000002.jpg").read_bytes()
    (sun / "b" / "bakery" / "shop" / "sun_bake000000000002.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (sun / "a" / "abbey" / "sun_abbe000000000004.jpg").unlink()
    _append(tree / "Partitions" / "Training_02.txt", b"/a/airport/sun_x.jpg\n")
    (tree / "Partitions" / "Testing_02.txt").unlink()
    scan = sun397.scan(tree)
    found = {(f.path, f.problem) for f in datacheck.check_sun397(scan, datacheck.Check("sun397", 1, 5, 4))[0]}
    assert found == {
        ("SUN397/a/abbey/sun_abbe000000000001.jpg", "empty"),
        ("SUN397/b/bakery/shop/sun_bake000000000002.jpg", "truncated"),
        ("SUN397/b/bakery/notes.txt", "stray-file"),
        ("Partitions/Testing_01.txt", "missing-image"),
        ("Partitions/Training_02.txt", "missing-image"),
        ("Partitions/Training_02.txt", "unknown-category"),
        ("Partitions/Testing_02.txt", "partition"),
    }
    proc = run_ablate("data", "check", "data=imagenet", "check.what=sun397", f"data.sun397_root={tree}",
                      "check.workers=1", f"paths.runs={tmp_path / 'runs'}", f"paths.cache={tmp_path / 'cache'}")
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "sun397:SUN397/a/abbey/sun_abbe000000000001.jpg (empty)" in last and "report.json" in last
    assert "unknown-category" in proc.stdout and "no Partitions" not in proc.stdout


def test_data_check_without_partitions_warns(tmp_path: Path):
    scan = sun397.scan(make_tree(tmp_path / "copy", partitions=None))
    assert [(f[0], f[1]) for f in scan.findings()] == [("Partitions", "no-partitions")]
    assert datacheck.PROBLEMS["no-partitions"][0] == "warning"
