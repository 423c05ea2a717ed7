"""Which dataset pair a config points to: real folders (``data=imagenet``) or the generated demo (``data=demo``)."""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from omegaconf import DictConfig

from .errors import UserError


class DataRoots(NamedTuple):
    imagenet: Path  # holds train/<wnid>/*.JPEG and val/
    voc: Path  # VOCdevkit folder holding VOC2007/


def _existing_dir(value: object, key: str) -> Path:
    if value in (None, "", "???"):
        raise UserError(f"{key} is not set: pass {key}=<folder>")
    path = Path(str(value)).expanduser()
    if not path.is_dir():
        raise UserError(f"{key}={value}: no such folder")
    return path


def resolve(cfg: DictConfig, need_voc: bool = False) -> DataRoots:
    """The dataset roots of ``cfg.data``; generates the demo pair on first use."""
    data = cfg.data
    if data.get("demo") is not None and data.get("root") is None:
        from . import demo

        folder = demo.ensure(data.demo, Path(cfg.paths.cache))
        return DataRoots(folder / "imagenet", folder / "VOCdevkit")
    imagenet = _existing_dir(data.get("root"), "data.root")
    voc_value = data.get("voc_root") if need_voc else (data.get("voc_root") or imagenet)
    voc = _existing_dir(voc_value, "data.voc_root") if need_voc else Path(str(voc_value))
    return DataRoots(imagenet, voc)


def sun397_root(cfg: DictConfig) -> Path:
    """The SUN397 copy of ``cfg.data``: ``data.sun397_root`` (the folder holding ``SUN397/``, or ``SUN397/``
    itself), or with ``data=demo`` and no root the generated scenes (generated on first use)."""
    data = cfg.data
    if data.get("sun397_root") is None and data.get("demo") is not None:
        from . import demo_sun397

        return demo_sun397.ensure(data.demo, Path(cfg.paths.cache))
    return _existing_dir(data.get("sun397_root"), "data.sun397_root")


def generate_demo(cfg: DictConfig) -> Path:
    """``ablate data demo``: generate (or find) the demo pair and report its folder."""
    if cfg.data.get("demo") is None:
        raise UserError("`ablate data demo` needs data=demo (the current data config has no demo: section)")
    return resolve(cfg).imagenet.parent
