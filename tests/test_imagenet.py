"""Listing an ImageNet tree: content, the cache and its invalidation, listing/label files, bad trees."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from imnet_ablate.errors import UserError
from imnet_ablate.imagenet import Listed, image_names, list_imagenet

WNIDS = ["n01440764", "n01443537", "n01484850"]


def make_tree(root: Path, wnids=WNIDS, n_train: int = 3, n_val: int = 1) -> Path:
    for split, n in (("train", n_train), ("val", n_val)):
        for w in wnids if n else ():
            (root / split / w).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                (root / split / w / f"{w}_{i}.JPEG").touch()
    return root


def test_lists_images_sorted_and_ignores_other_files(tmp_path):
    root = make_tree(tmp_path / "inet")
    (root / "train" / WNIDS[0] / "notes.txt").touch()
    (root / "train" / WNIDS[0] / ".hidden.JPEG").touch()
    (root / "train" / WNIDS[0] / "x.JPEG.txt").touch()
    (root / "train" / WNIDS[0] / "upper.JPG").touch()
    (root / "train" / ".cache").mkdir()
    (root / "train" / "README").touch()
    listing = list_imagenet(root, tmp_path / "cache")
    assert list(listing.train) == WNIDS
    assert listing.train[WNIDS[0]].paths() == [f"train/{WNIDS[0]}/{WNIDS[0]}_{i}.JPEG" for i in range(3)] + \
        [f"train/{WNIDS[0]}/upper.JPG"]
    assert listing.val[WNIDS[2]].paths() == [f"val/{WNIDS[2]}/{WNIDS[2]}_0.JPEG"]
    assert listing.cache_file.parent == tmp_path / "cache" / "listings"


@pytest.mark.parametrize("names, expected", [
    (["b.JPEG", "a.JPEG"], ["a.JPEG", "b.JPEG"]),  # one extension: the quick path
    (["b.JPEG", ".a.JPEG"], ["b.JPEG"]),
    (["b.JPEG", "a.JPEG.txt"], ["b.JPEG"]),
    (["b.png", "a.JPEG", "c.Jpeg"], ["a.JPEG", "b.png", "c.Jpeg"]),
    (["notes.txt"], []),
])
def test_image_names(tmp_path, names, expected):
    for n in names:
        (tmp_path / n).touch()
    assert image_names(tmp_path) == expected


def test_cache_is_reused_and_invalidated_when_the_tree_changes(tmp_path):
    root, cache = make_tree(tmp_path / "inet"), tmp_path / "cache"
    first = list_imagenet(root, cache)
    again = list_imagenet(root, cache)
    assert again == first and again.cache_file.stat().st_mtime_ns == first.cache_file.stat().st_mtime_ns
    added = root / "train" / WNIDS[1] / "new.JPEG"
    added.touch()
    os.utime(added.parent, ns=(1, 1))  # a different mtime even on file systems with coarse timestamps
    changed = list_imagenet(root, cache)
    assert f"train/{WNIDS[1]}/new.JPEG" in changed.train[WNIDS[1]].paths()
    assert changed.checksum != first.checksum and changed.cache_file != first.cache_file
    (root / "train" / "n01491361").mkdir()
    assert "n01491361" in list_imagenet(root, cache).train


def test_planning_lists_a_tree_once_writes_nothing_and_sees_a_change(tmp_path, monkeypatch, caplog):
    """plan=true composes the data's config once per stage; each used to list the copy again (no cache file)."""
    from imnet_ablate import imagenet, store

    root, cache = make_tree(tmp_path / "inet"), tmp_path / "cache"
    scans = []
    real_scan = imagenet.scan_folders
    monkeypatch.setattr(imagenet, "scan_folders", lambda *a: scans.append(1) or real_scan(*a))
    with store.read_only(), caplog.at_level("INFO", logger="imnet_ablate.imagenet"):
        first = list_imagenet(root, cache)
        assert list_imagenet(root, cache) == first and len(scans) == 1
        added = root / "train" / WNIDS[1] / "new.JPEG"
        added.touch()
        os.utime(added.parent, ns=(1, 1))
        assert f"train/{WNIDS[1]}/new.JPEG" in list_imagenet(root, cache).train[WNIDS[1]].paths()
    assert len(scans) == 2 and not cache.exists()
    assert "not cached: planning writes nothing" in caplog.text and "cached in" not in caplog.text


def test_corrupt_cache_is_rebuilt(tmp_path):
    root, cache = make_tree(tmp_path / "inet"), tmp_path / "cache"
    first = list_imagenet(root, cache)
    first.cache_file.write_text("garbage\n")
    assert list_imagenet(root, cache).train == first.train


def test_listing_file_instead_of_a_scan(tmp_path):
    root = tmp_path / "inet"
    root.mkdir()
    listing = tmp_path / "train.txt"
    listing.write_text(f"train/{WNIDS[0]}/a.JPEG\nelsewhere/b.JPEG\t{WNIDS[1]}\n\n# comment\n")
    out = list_imagenet(root, tmp_path / "cache", train_listing=str(listing))
    assert {w: f.paths() for w, f in out.train.items()} == {WNIDS[0]: [f"train/{WNIDS[0]}/a.JPEG"],
                                                            WNIDS[1]: ["elsewhere/b.JPEG"]}
    listing.write_text("train/dogs/a.JPEG\n")
    with pytest.raises(UserError, match=r"data.train_listing=.*train.txt:1: .*expected"):
        list_imagenet(root, tmp_path / "cache", train_listing=str(listing))


def test_flat_val_with_label_file(tmp_path):
    root = make_tree(tmp_path / "inet", n_val=0)
    (root / "val").mkdir()
    for name in ("ILSVRC2012_val_00000001.JPEG", "ILSVRC2012_val_00000002.JPEG"):
        (root / "val" / name).touch()
    labels = tmp_path / "LOC_val_solution.csv"
    labels.write_text(f"ImageId,PredictionString\nILSVRC2012_val_00000001,{WNIDS[0]} 1 2 3 4\n"
                      f"ILSVRC2012_val_00000002.JPEG,{WNIDS[2]} 1 2 3 4\n")
    out = list_imagenet(root, tmp_path / "cache", val_labels=str(labels))
    assert {w: f.paths() for w, f in out.val.items()} == {WNIDS[0]: ["val/ILSVRC2012_val_00000001.JPEG"],
                                                          WNIDS[2]: ["val/ILSVRC2012_val_00000002.JPEG"]}
    with pytest.raises(UserError, match="data.val_labels: .* holds images but no <wnid>/ folders"):
        list_imagenet(root, tmp_path / "cache2")
    labels.write_text(f"ILSVRC2012_val_00000009 {WNIDS[0]}\n")
    with pytest.raises(UserError, match="1 labelled files are not in"):
        list_imagenet(root, tmp_path / "cache3", val_labels=str(labels))


def test_no_train_folder(tmp_path):
    with pytest.raises(UserError, match=r"data.root=.*: no train/ folder"):
        list_imagenet(tmp_path, tmp_path / "cache")


def test_no_class_folders(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "x.JPEG").touch()
    with pytest.raises(UserError, match="train/ has no class folders"):
        list_imagenet(tmp_path, tmp_path / "cache")


def test_folders_that_are_not_wnids_are_named(tmp_path):
    root = make_tree(tmp_path / "inet")
    (root / "train" / "dogs").mkdir()
    (root / "train" / "cats").mkdir()
    with pytest.raises(UserError, match="folders that are not wnids: cats, dogs; expected"):
        list_imagenet(root, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_file_names_with_control_characters_or_bad_bytes_are_skipped(tmp_path, caplog):
    root = make_tree(tmp_path / "inet")
    folder = root / "train" / WNIDS[0]
    for name in ("a\tb.JPEG", "c\nd.JPEG", "e\x1b[31m.JPEG", "f\x7f.JPEG"):
        (folder / name).touch()
    os.close(os.open(os.path.join(os.fsencode(folder), b"\xff\xfe.JPEG"), os.O_CREAT | os.O_WRONLY))
    (folder / "notes\t.txt").touch()  # not an image: ignored as before (it once stopped the listing)
    listing = list_imagenet(root, tmp_path / "cache")
    assert listing.train[WNIDS[0]].names == [f"{WNIDS[0]}_{i}.JPEG" for i in range(3)]
    warning = next(r.getMessage() for r in caplog.records if "skipped 5 image file(s)" in r.getMessage())
    assert "\n" not in warning and "\x1b" not in warning  # escaped: one line, no terminal sequence


def test_unreadable_listing_file_is_named(tmp_path):
    folder = tmp_path / "listing.txt"
    folder.mkdir()
    with pytest.raises(UserError, match=f"data.train_listing={folder}: cannot read"):
        list_imagenet(tmp_path, tmp_path / "cache", train_listing=str(folder))
    with pytest.raises(UserError, match=f"{tmp_path / 'missing.txt'}: cannot read"):
        list_imagenet(tmp_path, tmp_path / "cache", train_listing=str(tmp_path / "missing.txt"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads everything")
def test_unreadable_folder_is_named(tmp_path):
    root = make_tree(tmp_path / "inet")
    locked = root / "train" / WNIDS[1]
    locked.chmod(0)
    try:
        with pytest.raises(UserError, match=f"{locked}: cannot read"):
            list_imagenet(root, tmp_path / "cache")
    finally:
        locked.chmod(0o755)
    assert not (tmp_path / "cache").exists()


FORKED_LISTING = """
import json, sys
from pathlib import Path
from imnet_ablate import imagenet
from imnet_ablate.errors import UserError
from imnet_ablate import forked
assert forked.can_fork(), "expected a single-threaded process"
folders = sorted(Path(sys.argv[1]).iterdir())
try:
    listed = imagenet.list_folders(folders, workers=3)
except UserError as e:
    sys.exit(f"UserError: {e}")
print(json.dumps([[x.names, x.line.hex(), x.digest.hex()] for x in listed]))
"""


def _forked_listing(root: Path) -> subprocess.CompletedProcess:
    """``list_folders`` with 3 forked listers, in a fresh process: pytest-xdist's workers run threads, where the
    listing (rightly) stays in one process."""
    return subprocess.run([sys.executable, "-c", FORKED_LISTING, str(root)], capture_output=True, text=True)


def test_forked_listing_matches_one_process(tmp_path):
    for i in range(40):  # sizes 0..39, so the listers' shares differ; non-ASCII and undecodable names
        folder = tmp_path / f"n{i:08d}"
        folder.mkdir()
        for j in range(i):
            (folder / f"n{i:08d}_{j}.JPEG").touch()
    (tmp_path / "n00000007" / "café.JPEG").touch()
    os.close(os.open(os.path.join(os.fsencode(tmp_path / "n00000008"), b"\xff.JPEG"), os.O_CREAT | os.O_WRONLY))
    run = _forked_listing(tmp_path)
    assert run.returncode == 0, run.stderr
    one = [Listed.of(image_names(f)) for f in sorted(tmp_path.iterdir())]
    assert json.loads(run.stdout) == [[x.names, x.line.hex(), x.digest.hex()] for x in one]
    assert one[0].names == [] and "café.JPEG" in one[7].names and len(one[8].names) == 8  # "\xff.JPEG" skipped


def test_forked_lister_errors_are_raised_with_their_file(tmp_path):
    for i in range(40):
        (tmp_path / f"n{i:08d}").mkdir()
    bad = tmp_path / "n00000035"  # in a forked lister's share (the folders are dealt round-robin)
    bad.rmdir()
    bad.touch()  # a file where a class folder was listed
    run = _forked_listing(tmp_path)
    assert run.returncode == 1 and f"UserError: {bad}: cannot read" in run.stderr
