"""Which folder each dataset lives in: a real copy (``data.<key>``) or the generated demo (``data=demo``).

Every dataset a stage reads is named here once: the config key of its real root, the key its identity takes in a
transfer stage's spec, and how the demo generates it. A task declares the datasets it reads by these names; a
name not listed here (a user's own task and data) is read from ``data.<name>_root`` and has no demo.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from omegaconf import DictConfig, OmegaConf

from .errors import UserError


@dataclass(frozen=True)
class Dataset:
    name: str
    root_key: str  # data.<root_key>: the real copy's folder
    spec_key: str  # the key of its identity in a transfer stage's spec (voc2007's is "voc", as in 0.1)
    layout: str  # what that folder must hold, for error messages
    generator: str | None = None  # the module generating its demo copy (ensure, folder_for), if it has one
    demo_subdir: str = ""  # where the dataset sits in that generated folder


def _generator(ds: Dataset) -> ModuleType:
    return importlib.import_module(f".{ds.generator}", __package__)


def _plain(node: DictConfig | dict) -> dict[str, Any]:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)


DATASETS: dict[str, Dataset] = {d.name: d for d in [
    Dataset("imagenet", "root", "imagenet", "ImageNet folder holding train/<wnid>/*.JPEG", "demo", "imagenet"),
    Dataset("voc2007", "voc_root", "voc", "VOCdevkit folder holding VOC2007/", "demo", "VOCdevkit"),
    Dataset("voc2012", "voc2012_root", "voc2012", "VOCdevkit folder holding VOC2012/", "demo_actions", "VOCdevkit"),
    Dataset("sun397", "sun397_root", "sun397", "folder holding SUN397/ (or SUN397/ itself)", "demo_sun397"),
]}


def dataset(name: str) -> Dataset:
    return DATASETS.get(name) or Dataset(name, f"{name}_root", name, f"{name} folder")


def is_demo(cfg: DictConfig) -> bool:
    return cfg.data.get("demo") is not None


def _given(cfg: DictConfig, ds: Dataset) -> Any:
    value = cfg.data.get(ds.root_key) if ds.root_key in cfg.data else None
    return None if value in (None, "", "???") else value


def root(cfg: DictConfig, name: str) -> Path:
    """The folder of dataset ``name``: ``data.<key>`` when set (checked to exist), else the demo's generated copy
    (generated on first use), else a one-line error saying which key to set."""
    ds = dataset(name)
    value = _given(cfg, ds)
    if value is not None:
        path = Path(str(value)).expanduser()
        if not path.is_dir():
            raise UserError(f"data.{ds.root_key}={value}: no such folder; expected the {ds.layout}")
        return path
    if is_demo(cfg) and ds.generator is not None:
        return _generator(ds).ensure(_plain(cfg.data.demo), Path(cfg.paths.cache)) / ds.demo_subdir
    raise UserError(f"data.{ds.root_key} is not set: pass data.{ds.root_key}=<{ds.layout}>")


def identity(cfg: DictConfig, name: str) -> Any:
    """What picks a dataset's content, for stage hashes, known without generating or reading it: the demo's
    generated folder relative to the cache (named by the hash of its settings and generator version, so a new
    generator never reuses a stage measured on the old one's images), or the real copy's absolute folder."""
    ds = dataset(name)
    value = _given(cfg, ds)
    if value is None and is_demo(cfg) and ds.generator is not None:
        return str(_generator(ds).folder_for(_plain(cfg.data.demo), Path()))
    return str(Path(str(value)).expanduser().resolve()) if value is not None else None


def generate_demo(cfg: DictConfig) -> Path:
    """``ablate data demo``: generate (or find) the demo pair and report its folder."""
    if not is_demo(cfg):
        raise UserError("`ablate data demo` needs data=demo (the current data config has no demo: section)")
    return root(cfg, "imagenet").parent
