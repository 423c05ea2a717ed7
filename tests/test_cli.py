"""`ablate subset` / `ablate classes` as a user runs them: in a fresh interpreter, on a generated ImageNet tree."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest

from conftest import run_ablate, run_dir_of
from imnet_ablate import wordnet


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """A newcomer's ImageNet layout: 1000 wnid folders with a few empty files each."""
    root = tmp_path_factory.mktemp("imagenet")
    for w in wordnet.load().classes:
        for split, n in (("train", 3), ("val", 1)):
            (root / split / w).mkdir(parents=True)
            for i in range(n):
                (root / split / w / f"{w}_{i}.JPEG").touch()
    return root


def data_args(root: Path, tmp_path: Path) -> list[str]:
    return ["data=imagenet", f"data.root={root}", f"data.voc_root={tmp_path}", f"paths.runs={tmp_path / 'runs'}",
            f"paths.cache={tmp_path / 'cache'}"]


def assert_user_error(proc, *words: str) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for word in words:
        assert word in errors[0], errors[0]


def test_help_lists_the_commands():
    proc = run_ablate("--help")
    assert proc.returncode == 0 and "subset" in proc.stdout and "classes" in proc.stdout


def test_cfg_job_shows_the_subset_config():
    proc = run_ablate("subset", "subset=500pc", "--cfg", "job")
    assert proc.returncode == 0, proc.stderr
    assert "images_per_class: 500" in proc.stdout and "name: 500pc" in proc.stdout


@pytest.mark.parametrize("args, words", [(["subset=nope"], ["subset=nope: no such subset preset"]),
                                         (["subset.images_per_klass=5"], ["images_per_klass"])])
def test_bad_preset_or_key_exits_2(tmp_path, args, words):
    proc = run_ablate("subset", *args, f"paths.runs={tmp_path / 'runs'}")
    assert_user_error(proc, *words)
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_newcomer_run_wordnet_127(tree, tmp_path, reference):
    proc = run_ablate("subset", "subset=wordnet-127", *data_args(tree, tmp_path))
    assert proc.returncode == 0, proc.stderr
    out = run_dir_of(proc)
    assert "classes           127" in proc.stdout and "images/class" in proc.stdout
    with open(out / "classes.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    with open(reference / "class_maps" / "up_down_127.csv", newline="") as f:
        authors = {r["orig_wnid"]: r["new_wnid"] for r in csv.DictReader(f)}
    assert len(rows) == 127 and {m: r["wnid"] for r in rows for m in r["members"].split()} == authors

    done = (out / "DONE").stat().st_mtime_ns
    again = run_ablate("subset", "subset=wordnet-127", *data_args(tree, tmp_path))
    assert run_dir_of(again) == out and (out / "DONE").stat().st_mtime_ns == done


def test_classes_shows_the_groups(tmp_path):
    proc = run_ablate("classes", "subset=wordnet-127", f"paths.runs={tmp_path / 'runs'}")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "mammal" in lines[2] and "218" in lines[2]
    assert (run_dir_of(proc) / "groups.tsv").is_file()


def test_too_many_images_with_strict_exits_2(tree, tmp_path):
    proc = run_ablate("subset", "subset=500pc", "subset.strict=true", *data_args(tree, tmp_path))
    assert_user_error(proc, "subset.images_per_class=500", "n01440764: 3", "strict=false takes all")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("make, words", [
    (lambda root: (root / "train").mkdir(parents=True), ["train/ has no class folders"]),
    (lambda root: (root / "train" / "golden_retriever").mkdir(parents=True), ["not wnids: golden_retriever"]),
])
def test_bad_tree_exits_2(tmp_path, make, words):
    root = tmp_path / "inet"
    make(root)
    proc = run_ablate("subset", *data_args(root, tmp_path))
    assert_user_error(proc, "data.root", *words)
    assert not (tmp_path / "runs").exists()
