"""The subset builder on a generated 1000-class tree of empty files (the builder never opens an image)."""
from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from imnet_ablate import imagenet, subsets, wordnet
from imnet_ablate.config import conf_dir
from imnet_ablate.errors import UserError

PER_CLASS = 6
BIG = "n01440764"  # one class with many images, for sampling tests
BIG_N = 40


def make_tree(root: Path, wnids, per_class: int = PER_CLASS, counts: dict[str, int] | None = None) -> Path:
    for w in wnids:
        for split, n in (("train", (counts or {}).get(w, per_class)), ("val", 1)):
            (root / split / w).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                (root / split / w / f"{w}_{i}.JPEG").touch()
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return make_tree(tmp_path_factory.mktemp("imagenet"), wordnet.load().classes, counts={BIG: BIG_N})


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def config(tree: Path, cache: Path, runs: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        return compose("subset", ["data=imagenet", f"data.root={tree}", "data.voc_root=unused",
                                  f"paths.runs={runs}", f"paths.cache={cache}", *overrides])


def read_tsv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def test_wordnet_127_matches_the_authors_grouping(tree, cache, tmp_path, reference):
    out = subsets.build(config(tree, cache, tmp_path, "subset=wordnet-127"))
    rows = read_tsv(out / "classes.tsv")
    assert len(rows) == 127 and [int(r["label"]) for r in rows] == list(range(127))
    with open(reference / "class_maps" / "up_down_127.csv", newline="") as f:
        authors = {r["orig_wnid"]: r["new_wnid"] for r in csv.DictReader(f)}
    assert {m: r["wnid"] for r in rows for m in r["members"].split()} == authors
    mammal = next(r for r in rows if r["wnid"] == "n01861778")
    assert len(mammal["members"].split()) == 218
    train = read_tsv(out / "train.tsv")
    label_of = {r["wnid"]: r["label"] for r in rows}
    assert all(label_of[authors[r["wnid"]]] == r["label"] for r in train)
    assert len(train) == 999 * PER_CLASS + BIG_N and len(read_tsv(out / "val.tsv")) == 1000


def test_outputs_and_manifest(tree, cache, tmp_path):
    out = subsets.build(config(tree, cache, tmp_path, "subset=full"))
    assert out.parent == tmp_path / "subset" and out.name.startswith("full-")
    assert {p.name for p in out.iterdir()} >= {"train.tsv", "val.tsv", "classes.tsv", "manifest.json", "config.yaml",
                                               "DONE"}
    train = read_tsv(out / "train.tsv")
    assert train[0] == {"path": "train/n01440764/n01440764_0.JPEG", "label": "0", "wnid": "n01440764"}
    assert all((tree / r["path"]).is_file() for r in train[:50])
    m = json.loads((out / "manifest.json").read_text())
    assert m["data_root"] == str(tree.resolve()) and m["num_classes"] == 1000 and m["num_train"] == len(train)
    assert m["train_per_class"] == {"min": PER_CLASS, "median": PER_CLASS, "max": BIG_N,
                                    "mean": round((999 * PER_CLASS + BIG_N) / 1000, 3)}
    assert m["checksums"]["hierarchy"] == wordnet.load().checksum and len(m["checksums"]["listing"]) == 64
    assert m["provenance"]["package_version"] and m["spec"]["name"] == "full"
    assert OmegaConf.load(out / "config.yaml").subset.name == "full"
    classes = read_tsv(out / "classes.tsv")
    assert classes[0] == {"label": "0", "wnid": "n01440764", "name": "tench, Tinca tinca", "n_images": str(BIG_N),
                          "members": "n01440764"}


def test_folder_names_tell_overrides_apart_and_older_names_are_reused(tree, cache, tmp_path):
    plain = subsets.build(config(tree, cache, tmp_path, "subset=250pc"))
    assert plain.name.rsplit("-", 1)[0] == "250pc"
    cfg = config(tree, cache, tmp_path, "subset=250pc", "subset.images_per_class=3")
    three = subsets.build(cfg)
    assert three.name.rsplit("-", 1)[0] == "250pc-ipc3"
    assert json.loads((three / "stage.json").read_text())["spec"]["subset"]["name"] == "250pc"  # hash rule as before
    older = three.with_name(f"250pc-{three.name.rsplit('-', 1)[1]}")  # how earlier versions named this folder
    three.rename(older)
    done = (older / "DONE").stat().st_mtime_ns
    assert subsets.build(cfg) == older and (older / "DONE").stat().st_mtime_ns == done and not three.exists()


def test_rerun_is_a_no_op(tree, cache, tmp_path):
    cfg = config(tree, cache, tmp_path, "subset=250pc")
    first = subsets.build(cfg)
    done = (first / "DONE").stat().st_mtime_ns
    assert subsets.build(cfg) == first and (first / "DONE").stat().st_mtime_ns == done
    assert subsets.build(config(tree, cache, tmp_path, "subset=250pc", "subset.seed=1")) != first


@pytest.mark.parametrize("preset, n_classes", [
    ("full", 1000), ("500pc", 1000), ("250pc", 1000), ("125pc", 1000), ("50pc", 1000), ("25pc", 1000),
    ("wordnet-918", 918), ("wordnet-753", 753), ("wordnet-486", 486), ("wordnet-127", 127), ("wordnet-79", 79),
    ("wordnet-9", 9), ("random-127", 127), ("nopascal-771", 771), ("nopascal-literal-771", 771),
    ("budget-500x1000", 500), ("budget-1000x500", 1000),
    ("halves-min-a", 500), ("halves-min-b", 500), ("halves-random-a", 500), ("halves-random-b", 500)])
def test_every_preset_builds(tree, cache, tmp_path, preset, n_classes):
    out = subsets.build(config(tree, cache, tmp_path, f"subset={preset}"))
    assert len(read_tsv(out / "classes.tsv")) == n_classes


def kept_classes(out: Path) -> set[str]:
    return {m for r in read_tsv(out / "classes.tsv") for m in r["members"].split()}


def test_nopascal_keeps_exactly_the_authors_771(tree, cache, tmp_path, reference):
    out = subsets.build(config(tree, cache, tmp_path, "subset=nopascal-771"))
    assert kept_classes(out) == set((reference / "class_maps" / "pascal_removed_771_wnids.txt").read_text().split())
    removed = json.loads((out / "manifest.json").read_text())["excluded"]
    assert set(removed) == set((reference / "class_maps" / "pascal_overlap_229_wnids.txt").read_text().split())
    assert not {r["wnid"] for r in read_tsv(out / "train.tsv")} & set(removed)


def test_halves_are_complementary(tree, cache, tmp_path):
    for kind in ("min", "random"):
        a, b = (kept_classes(subsets.build(config(tree, cache, tmp_path, f"subset=halves-{kind}-{p}"))) for p in "ab")
        assert len(a) == len(b) == 500 and a | b == set(wordnet.load().classes)


def train_paths(out: Path, wnid: str = BIG) -> list[str]:
    return [r["path"] for r in read_tsv(out / "train.tsv") if r["wnid"] == wnid]


def test_sampling_is_nested_and_deterministic(tree, cache, tmp_path):
    def build(n, seed=0, runs="a"):
        return train_paths(subsets.build(config(tree, cache, tmp_path / runs, "subset=full",
                                                f"subset.images_per_class={n}", f"subset.seed={seed}")))

    sizes = [5, 10, 20, 30]
    samples = [set(build(n)) for n in sizes]
    assert [len(s) for s in samples] == sizes
    assert all(small < big for small, big in zip(samples, samples[1:]))
    assert set(build(10, runs="b")) == samples[1]  # a fresh build gives the same sample
    assert set(build(10, seed=1)) != samples[1]
    assert samples[0] != set(sorted(train_paths(subsets.build(config(tree, cache, tmp_path, "subset=full"))))[:5])


def test_random_classes_are_nested(tree, cache, tmp_path):
    small = kept_classes(subsets.build(config(tree, cache, tmp_path, "subset=full", "subset.classes=50")))
    big = kept_classes(subsets.build(config(tree, cache, tmp_path, "subset=random-127")))
    assert len(small) == 50 and small < big


def test_budget_takes_exactly_k_by_n_from_classes_with_enough(tmp_path):
    h = wordnet.load()
    tree = make_tree(tmp_path / "inet", h.classes[:4], counts={h.classes[0]: 2})
    out = subsets.build(config(tree, tmp_path / "cache", tmp_path / "runs", "subset=full", "subset.strict=true",
                               "subset.budget={classes: 3, images_per_class: 5}"))
    train = read_tsv(out / "train.tsv")
    assert len(train) == 15 and {r["wnid"] for r in train} == set(h.classes[1:4])


def test_explicit_classes_with_grouping(tree, cache, tmp_path):
    dogs = ["n02085620", "n02085782", "n02086240"]  # Chihuahua, Japanese spaniel, Maltese
    out = subsets.build(config(tree, cache, tmp_path, "subset=full", f"subset.classes=[{','.join(dogs)}]",
                               "subset.grouping=bottom-up-9", "subset.name=dogs"))
    rows = read_tsv(out / "classes.tsv")
    assert len(rows) == 1 and sorted(rows[0]["members"].split()) == dogs


def runs_is_empty(runs: Path) -> bool:
    return not runs.exists() or not any(runs.rglob("*"))


@pytest.mark.parametrize("overrides, message", [
    (["subset.images_per_class=10", "subset.strict=true"],
     r"subset.images_per_class=10: 999 class\(es\) have fewer images \(n01443537: 6, .*strict=false takes all"),
    (["subset.classes=[n01440764,n99999999]"], r"subset.classes: unknown wnid\(s\) n99999999"),
    (["subset.classes=1001"], "subset.classes=1001: only 1000 classes available"),
    (["subset=nopascal-771", "subset.classes=772"], "subset.classes=772: only 771 classes available"),
    (["subset=nopascal-771", "subset.classes=[n02085620]"], "subset.classes: n02085620 removed by"),
    (["subset.grouping=bottom-up-100"], "subset.grouping=bottom-up-100: bottom-up merging never gives 100"),
    (["subset.half=min-c"], "subset.half=min-c: expected null or one of"),
    (["subset.images_per_class=0"], "subset.images_per_class=0: expected a positive integer"),
    (["subset.exclude=coco"], "subset.exclude=coco: unknown preset"),
    (["subset=wordnet-127", "subset.grouping=top-down-10"], "subset.num_classes=127: the spec gives 10 classes"),
    (["subset.budget={classes: 5, images_per_class: 500}", "subset.strict=true"],
     "subset.budget: only 0 classes have 500 or more images"),
    (["subset.budget={classes: 5, images_per_class: 5}", "subset.classes=3"], "subset.budget: sets classes"),
])
def test_bad_spec_is_one_line_and_writes_nothing(tree, cache, tmp_path, overrides, message):
    with pytest.raises(UserError, match=message) as e:
        subsets.build(config(tree, cache, tmp_path / "runs", "subset=full", *overrides))
    assert "\n" not in str(e.value)
    assert runs_is_empty(tmp_path / "runs")


def test_unknown_key_in_a_preset_file(tree, cache, tmp_path):
    cfg = config(tree, cache, tmp_path, "subset=full")
    OmegaConf.set_struct(cfg, False)
    cfg.subset.images_per_klass = 5
    with pytest.raises(UserError, match="subset: unknown key.*images_per_klass"):
        subsets.build(cfg)


def test_missing_class_folders(tmp_path):
    tree = make_tree(tmp_path / "inet", wordnet.load().classes[:10])
    with pytest.raises(UserError, match=r"no train images for 990 class\(es\) of the subset"):
        subsets.build(config(tree, tmp_path / "cache", tmp_path / "runs", "subset=full"))
    out = subsets.build(config(tree, tmp_path / "cache", tmp_path / "runs", "subset=full", "subset.classes=[n01440764]",
                               "subset.name=one"))
    assert len(read_tsv(out / "train.tsv")) == PER_CLASS


def test_show_classes_largest_first(tree, cache, tmp_path, capsys):
    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        cfg = compose("classes", ["subset=wordnet-127", f"paths.runs={tmp_path}"])
    out = subsets.show_classes(cfg)
    rows = read_tsv(out / "groups.tsv")
    assert len(rows) == 127 and rows[0]["wnid"] == "n01861778" and rows[0]["n_members"] == "218"
    assert [int(r["n_members"]) for r in rows] == sorted((int(r["n_members"]) for r in rows), reverse=True)
    printed = capsys.readouterr().out.splitlines()
    assert "127 classes" in printed[0] and "mammal" in printed[2] and "218" in printed[2]
    assert "tusker, echidna, platypus, wallaby, koala, ... (213 more)" in printed[2]
    assert rows[0]["member_names"].split("; ")[:2] == ["tusker", "echidna"]


def test_show_classes_names_every_excluded_class(tmp_path, capsys, reference):
    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        cfg = compose("classes", ["subset=nopascal-771", f"paths.runs={tmp_path}"])
    out = subsets.show_classes(cfg)
    printed = capsys.readouterr().out
    excluded = read_tsv(out / "excluded.tsv")
    authors = set((reference / "class_maps" / "pascal_overlap_229_wnids.txt").read_text().split())
    assert len(excluded) == 229 and {r["wnid"] for r in excluded} == authors
    assert "excluded by subset.exclude (229 classes" in printed
    dogs = next(r for r in excluded if r["wnid"] == "n02085620")
    assert dogs["name"].startswith("Chihuahua") and dogs["excluded_by"] == "dog (n02084071)"
    assert "dog (n02084071), 118: Chihuahua, Japanese spaniel" in printed and "Mexican hairless" in printed


def test_sample_is_the_first_n_by_sha1_of_seed_and_path():
    """The documented rule, so anyone can recompute a subset: rank by sha1("<seed>:<relative path>")."""
    files = imagenet.Files("train/n01440764/", sorted(f"n01440764_{i}.JPEG" for i in range(50)))
    by_rule = sorted(files.paths(), key=lambda p: hashlib.sha1(f"7:{p}".encode()).digest())[:10]
    assert subsets.sample(files, 10, 7).paths() == sorted(by_rule)
    assert subsets.sample(files, 50, 7) == subsets.sample(files, None, 7) == files
