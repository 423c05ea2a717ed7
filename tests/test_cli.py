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


SESSION = """
import contextlib, io, json, shlex, sys
from imnet_ablate import cli
results = []
for line in sys.argv[1:]:
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli.main(shlex.split(line))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    results.append({"line": line, "code": code, "out": out.getvalue(), "err": err.getvalue()})
print(json.dumps(results))
"""


def typed(*lines: str) -> dict[str, dict]:
    """Several ``ablate ...`` command lines as a user types them, in one fresh interpreter (one start, not one each):
    each line's exit code, stdout and stderr."""
    import json
    import subprocess
    import sys

    from conftest import REPO

    proc = subprocess.run([sys.executable, "-c", SESSION, *lines], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    return {r["line"]: r for r in json.loads(proc.stdout.splitlines()[-1])}


def test_newcomer_walk_through_help_version_and_misspellings(tmp_path):
    runs = f"paths.runs={tmp_path / 'runs'}"
    misspelt = {f"subset subset=250 {runs}": "subset=250: no such subset preset; did you mean 250pc?",
                f"pretrain model=alexnet_smal {runs}": "model=alexnet_smal: no such model preset; did you mean "
                                                       "alexnet_small?",
                f"transfer task=voc-dett {runs}": "task=voc-dett: no such task preset; did you mean voc-det?",
                f"pretrain train.batchsize=8 {runs}": "train.batchsize: no such key in `ablate pretrain`; did you "
                                                      "mean train.batch_size?",
                f"subset -m subset=500pc,25opc {runs}": "subset=25opc: no such subset preset; did you mean 25pc",
                "data chek": "unknown command 'data chek'; did you mean data check?",
                "subset -m subset=full,250pc --cfg job": "-m with --cfg: Hydra shows the config of a single run"}
    r = typed("--version", "data --help", "subset --help", "transfer task=voc-det-demo --help", *misspelt,
              "subset --hydra-help")  # last: it runs Hydra, which keeps global state
    assert r["subset --hydra-help"]["code"] == 0 and "--cfg,-c : Show config" in r["subset --hydra-help"]["out"]

    from imnet_ablate import __version__
    assert r["--version"]["code"] == 0 and r["--version"]["out"] == f"ablate {__version__}\n"
    assert r["data --help"]["code"] == 0 and "data demo" in r["data --help"]["out"] and \
        "data check" in r["data --help"]["out"]

    page = r["subset --help"]["out"]
    assert r["subset --help"]["code"] == 0 and "task" not in page and "model" not in page
    assert "  subset=\n" in page and "   * full " in page and "  data=\n" in page  # its groups, the choice marked
    assert "  subset.images_per_class=null\n      Images per class: N, or null for all." in page  # YAML comments
    assert "examples:\n  ablate subset subset=250pc\n" in page
    det = r["transfer task=voc-det-demo --help"]["out"]
    assert "   * voc-det-demo  voc-det for the demo's 64 px scenes" in det
    assert "  task.max_size=128\n      Images: shorter side min_size, longer side at most max_size" in det

    for line, words in misspelt.items():
        assert r[line]["code"] == 2 and r[line]["out"] == "", r[line]
        errors = r[line]["err"].strip().splitlines()
        assert len(errors) == 1 and words in errors[0], errors
        assert "search path" not in errors[0] and "+" not in errors[0] and len(errors[0]) < 160, errors[0]
    assert not (tmp_path / "runs").exists()
