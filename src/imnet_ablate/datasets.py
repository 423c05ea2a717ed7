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


def voc2012_root(cfg: DictConfig) -> Path:
    """The VOCdevkit holding ``VOC2012/`` (action classification): ``data.voc2012_root`` when set, else the
    generated demo devkit when the data config is the demo's."""
    data = cfg.data
    if data.get("voc2012_root") not in (None, ""):
        return _existing_dir(data.voc2012_root, "data.voc2012_root")
    if data.get("demo") is not None and data.get("root") is None:
        from . import demo_actions

        return demo_actions.ensure(data.demo, Path(cfg.paths.cache)) / "VOCdevkit"
    raise UserError("data.voc2012_root is not set: pass data.voc2012_root=<VOCdevkit folder holding VOC2012/>")


def generate_demo(cfg: DictConfig) -> Path:
    """``ablate data demo``: generate (or find) the demo pair and report its folder."""
    if cfg.data.get("demo") is None:
        raise UserError("`ablate data demo` needs data=demo (the current data config has no demo: section)")
    return resolve(cfg).imagenet.parent
