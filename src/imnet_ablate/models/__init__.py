"""Networks by name: ``build(model_cfg, num_classes) -> Backbone`` and ``load_pretrained(folder)``.

A model config (``conf/model/<name>.yaml``) picks its builder by ``name`` from ``BUILTIN``, or names any builder
with ``_target_`` (``mypkg.models.build_tiny``: a function ``(model_cfg, num_classes) -> Backbone``), which is how a
user's own package adds a backbone without touching this one. Built-in configs carry no ``_target_``, so the
configs (and stage folders) of earlier versions stay what they were.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ..config import locate
from ..errors import UserError
from .backbone import CAFFE_MEAN, CAFFE_STD, MEAN, STD, Backbone, DetectionParts, normalize

__all__ = ["BUILTIN", "CAFFE_MEAN", "CAFFE_STD", "MEAN", "STD", "Backbone", "DetectionParts", "build",
           "load_pretrained", "normalize"]

BUILTIN: dict[str, str] = {
    "alexnet": "imnet_ablate.models.alexnet:alexnet",
    "alexnet_caffe": "imnet_ablate.models.alexnet:alexnet_caffe",
    "alexnet_small": "imnet_ablate.models.alexnet:alexnet_small",
    "resnet18": "imnet_ablate.models.resnet:resnet18",
    "resnet50": "imnet_ablate.models.resnet:resnet50",
}


def build(model_cfg: DictConfig | Mapping[str, Any], num_classes: int) -> Backbone:
    """A freshly initialised network for ``model_cfg`` with ``num_classes`` outputs."""
    name = model_cfg.get("name")
    target = model_cfg.get("_target_") or BUILTIN.get(str(name))
    if target is None:
        raise UserError(f"model.name={name}: unknown model; expected one of {', '.join(BUILTIN)}, or a "
                        "model._target_ naming your own builder")
    model = locate(str(target), "model._target_")(model_cfg, num_classes)
    if not isinstance(model, Backbone):
        raise UserError(f"model._target_={target}: returned {type(model).__name__}; expected an "
                        "imnet_ablate.models.Backbone")
    return model


def load_pretrained(pretrain_dir: Path | str) -> tuple[Backbone, dict[str, Any]]:
    """The final network of a pre-training folder, rebuilt from its ``config.yaml``, and its ``metrics.json``.

    ``model.pt`` holds tensors only and is read with ``weights_only=True``: a shared checkpoint cannot run code.
    """
    import torch

    folder = Path(pretrain_dir)
    try:
        cfg = OmegaConf.load(folder / "config.yaml")
        manifest = json.loads((folder / "metrics.json").read_text())
        state = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
    except (OSError, ValueError) as e:
        raise UserError(f"{folder}: not a finished pre-training folder ({e}); run `ablate pretrain` first") from e
    model = build(cfg.model, int(manifest["num_classes"]))
    model.load_state_dict(state)
    return model, manifest
