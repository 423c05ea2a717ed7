"""Shared fixtures: the authors' reference files, a small generated demo pair, and the CLI in a subprocess."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / "shared" / "reference"

# Small enough for CI, big enough that every subset preset and both VOC splits have data.
TINY_DEMO = {"seed": 0, "train_per_class": 4, "val_per_class": 2, "image_size": 32, "voc_image_size": 64,
             "voc_trainval": 200, "voc_test": 200}
# The other generated datasets' sections of data.demo (generated on first use by the tasks that read them).
TINY_VOC2012 = {"train_images": 60, "val_images": 30, "image_size": 64}
# The generated SUN397 scenes (data.demo.sun397): every category, 2 + 2 images each.
# The shipped demo pair's folder name (data.demo at its defaults): a contract with users' caches, changed only with the
# generator's version or settings. 0.2's generator 2 with 48 images per class; 0.1.0's and generator 1's: b8b03f089368.
SHIPPED_DEMO_FOLDER = "d2356b85f41e"
TINY_SUN397 = {"train_per_class": 2, "test_per_class": 2, "image_size": 32}

# A 4-class ImageNet-layout tree written by ``write_tree`` (ImageNet wnids, so the layout is the real one).
TREE_WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361"]
TREE_COLOURS = [(220, 40, 40), (40, 200, 40), (40, 40, 220), (220, 220, 40)]


@pytest.fixture(scope="session")
def reference() -> Path:
    """../shared/reference (the authors' label sets); tests that need it skip only when it is absent."""
    if not REFERENCE.is_dir():
        pytest.skip(f"{REFERENCE} not present")
    return REFERENCE


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory) -> Path:
    """A cache folder holding the tiny demo pair, generated once per test session."""
    from omegaconf import OmegaConf

    from imnet_ablate import demo

    cache = tmp_path_factory.mktemp("cache")
    demo.ensure(OmegaConf.create(TINY_DEMO), cache)
    return cache


@pytest.fixture(scope="session")
def sun397_demo(demo_cache: Path) -> Path:
    """The tiny generated SUN397 tree (folder holding SUN397/ and Partitions/), in the session's demo cache."""
    from imnet_ablate import demo_sun397

    return demo_sun397.ensure({**TINY_DEMO, "sun397": TINY_SUN397}, demo_cache)


def tiny_recipe(epochs: int = 1) -> list[str]:
    """Training overrides for a pre-training of a few seconds on a tiny subset: batch 16, ``epochs`` epochs, lr step
    after the first. ``same_epochs`` because train=demo gives every set the full demo set's iterations: a tiny subset
    would otherwise train thousands of steps (a test then passes, minutes late)."""
    return ["train.batch_size=16", f"train.schedule.length={epochs}", "train.schedule.step_every=1",
            "train.budget=same_epochs", "loader.num_workers=0"]


def tiny_demo_overrides(cache: Path, runs: Path) -> list[str]:
    """Hydra overrides that point a command at the tiny demo and an isolated runs folder."""
    return ([f"paths.cache={cache}", f"paths.runs={runs}"] + [f"data.demo.{k}={v}" for k, v in TINY_DEMO.items()]
            + [f"data.demo.voc2012.{k}={v}" for k, v in TINY_VOC2012.items()]
            + [f"data.demo.sun397.{k}={v}" for k, v in TINY_SUN397.items()])


def run_ablate(*args: str, cwd: Path | None = None, timeout: float = 600, env: dict | None = None
               ) -> subprocess.CompletedProcess:
    """``ablate <args>`` in a fresh interpreter, as a user would run it."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "imnet_ablate.cli", *args], cwd=cwd or REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def run_dir_of(proc: subprocess.CompletedProcess) -> Path:
    """The folder named by the ``run_dir:`` line a command prints last."""
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("run_dir: "), proc.stdout + proc.stderr
    return Path(last.removeprefix("run_dir: "))


def write_tree(root: Path, train_per_class: int = 16, val_per_class: int = 8, size: int = 32
               ) -> dict[str, list[tuple[str, int]]]:
    """An ImageNet-layout tree of ``size`` x ``size``-``size + 8`` px JPEGs: each class a noisy colour with a
    stripe, so a net can learn it."""
    from PIL import Image

    rng = np.random.default_rng(0)
    rows: dict[str, list[tuple[str, int]]] = {"train": [], "val": []}
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for label, (wnid, colour) in enumerate(zip(TREE_WNIDS, TREE_COLOURS)):
            (root / split / wnid).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                h, w = size, int(rng.integers(size, size + 9))
                img = np.clip(np.array(colour) + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
                img[:, (label * 7) % w: (label * 7) % w + 4] = 255
                rel = f"{split}/{wnid}/{wnid}_{i}.JPEG"
                Image.fromarray(img).save(root / rel, quality=90)
                rows[split].append((rel, label))
    return rows


def write_subset(folder: Path, root: Path, rows: dict[str, list[tuple[str, int]]]) -> Path:
    """A subset folder in the contract format (what ``subsets.build`` writes) over ``root``."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, items in rows.items():
        lines = ["path\tlabel\twnid"] + [f"{p}\t{label}\t{TREE_WNIDS[label]}" for p, label in items]
        (folder / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    classes = ["label\twnid\tname\tn_images\tmembers"]
    counts = [sum(1 for _, lb in rows["train"] if lb == i) for i in range(len(TREE_WNIDS))]
    classes += [f"{i}\t{w}\tclass{i}\t{counts[i]}\t{w}" for i, w in enumerate(TREE_WNIDS)]
    (folder / "classes.tsv").write_text("\n".join(classes) + "\n")
    (folder / "manifest.json").write_text(json.dumps({"name": "tiny", "data_root": str(root),
                                                      "num_classes": len(TREE_WNIDS),
                                                      "num_train": len(rows["train"]), "num_val": len(rows["val"])}))
    return folder
