"""Shared fixtures: the authors' reference files, a small generated demo pair, and the CLI in a subprocess."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / "shared" / "reference"

# Small enough for CI, big enough that every subset preset and both VOC splits have data.
TINY_DEMO = {"seed": 0, "train_per_class": 4, "val_per_class": 2, "image_size": 32, "voc_image_size": 64,
             "voc_trainval": 200, "voc_test": 200}
# The other generated datasets' sections of data.demo (generated on first use by the tasks that read them).
TINY_VOC2012 = {"train_images": 60, "val_images": 30, "image_size": 64}
# The generated SUN397 scenes (data.demo.sun397): every category, 2 + 2 images each.
TINY_SUN397 = {"train_per_class": 2, "test_per_class": 2, "image_size": 32}


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
