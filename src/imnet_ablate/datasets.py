"""Which folder each dataset lives in: a real copy (``data.<key>``) or the generated demo (``data=demo``).

Every dataset a stage reads is named here once: the config key of its real root, the key its identity takes in a
transfer stage's spec, and how the demo generates it. A task declares the datasets it reads by these names; a
name not listed here (a user's own task and data) is read from ``data.<name>_root`` and has no demo.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from .errors import UserError


@dataclass(frozen=True)
class Dataset:
    name: str
    root_key: str  # data.<root_key>: the real copy's folder
    spec_key: str  # the key of its identity in a transfer stage's spec (voc2007's is "voc", as in 0.1)
    layout: str  # what that folder must hold, for error messages
    demo: Callable[[DictConfig, Path], Path] | None = None  # (data.demo, cache) -> the generated root


def _demo_pair(cfg_demo: DictConfig, cache: Path) -> Path:
    from . import demo

    return demo.ensure(_plain(cfg_demo), cache)


def _demo_actions(cfg_demo: DictConfig, cache: Path) -> Path:
    from . import demo_actions

    return demo_actions.ensure(_plain(cfg_demo), cache) / "VOCdevkit"


def _demo_scenes(cfg_demo: DictConfig, cache: Path) -> Path:
    from . import demo_sun397

    return demo_sun397.ensure(_plain(cfg_demo), cache)


def _plain(node: DictConfig | dict) -> dict[str, Any]:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)


DATASETS: dict[str, Dataset] = {d.name: d for d in [
    Dataset("imagenet", "root", "imagenet", "ImageNet folder holding train/<wnid>/*.JPEG",
            lambda d, cache: _demo_pair(d, cache) / "imagenet"),
    Dataset("voc2007", "voc_root", "voc", "VOCdevkit folder holding VOC2007/",
            lambda d, cache: _demo_pair(d, cache) / "VOCdevkit"),
    Dataset("voc2012", "voc2012_root", "voc2012", "VOCdevkit folder holding VOC2012/", _demo_actions),
    Dataset("sun397", "sun397_root", "sun397", "folder holding SUN397/ (or SUN397/ itself)", _demo_scenes),
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
    if is_demo(cfg) and ds.demo is not None:
        return ds.demo(cfg.data.demo, Path(cfg.paths.cache))
    raise UserError(f"data.{ds.root_key} is not set: pass data.{ds.root_key}=<{ds.layout}>")


def identity(cfg: DictConfig, name: str) -> Any:
    """What picks a dataset's content, for stage hashes, known without generating or reading it: the demo's
    generation settings, or the real copy's absolute folder."""
    ds = dataset(name)
    value = _given(cfg, ds)
    if value is None and is_demo(cfg) and ds.demo is not None:
        return demo_identity(cfg.data.demo, name)
    return str(Path(str(value)).expanduser().resolve()) if value is not None else None


def demo_identity(cfg_demo: DictConfig, name: str) -> dict[str, Any]:
    """The demo settings that determine dataset ``name``: the pair's for ImageNet and VOC 2007, else the seed and
    the dataset's own section ``data.demo.<name>``."""
    from .demo import pair_settings

    if name in ("imagenet", "voc2007"):  # the generated pair: adding a dataset's section never changes its hash
        return pair_settings(_plain(cfg_demo))
    section = cfg_demo.get(name)
    return {"seed": int(cfg_demo.seed), **(OmegaConf.to_container(section, resolve=True) if section else {})}


def generate_demo(cfg: DictConfig) -> Path:
    """``ablate data demo``: generate (or find) the demo pair and report its folder."""
    if not is_demo(cfg):
        raise UserError("`ablate data demo` needs data=demo (the current data config has no demo: section)")
    return root(cfg, "imagenet").parent
