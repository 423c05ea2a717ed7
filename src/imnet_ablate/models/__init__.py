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
from .backbone import CAFFE_MEAN, CAFFE_STD, MEAN, STD, Backbone, DetectionParts, normalize, renamed_keys

__all__ = ["BUILTIN", "CAFFE_MEAN", "CAFFE_STD", "MEAN", "STD", "Backbone", "DetectionParts", "build", "check_name",
           "load_pretrained", "normalize", "renamed_keys", "skeleton"]

BUILTIN: dict[str, str] = {
    "alexnet": "imnet_ablate.models.alexnet:alexnet",
    "alexnet_caffe": "imnet_ablate.models.alexnet:alexnet_caffe",
    "alexnet_small": "imnet_ablate.models.alexnet:alexnet_small",
    "resnet18": "imnet_ablate.models.resnet:resnet18",
    "resnet50": "imnet_ablate.models.resnet:resnet50",
}


def check_name(model_cfg: DictConfig | Mapping[str, Any]) -> str:
    """The builder a model config names: ``_target_``, else the built-in of its ``name`` (one line if neither)."""
    name = model_cfg.get("name")
    target = model_cfg.get("_target_") or BUILTIN.get(str(name))
    if target is None:
        raise UserError(f"model.name={name}: unknown model; expected one of {', '.join(BUILTIN)}, or a "
                        "model._target_ naming your own builder")
    return str(target)


def build(model_cfg: DictConfig | Mapping[str, Any], num_classes: int) -> Backbone:
    """A freshly initialised network for ``model_cfg`` with ``num_classes`` outputs."""
    model = locate(check_name(model_cfg), "model._target_")(model_cfg, num_classes)
    if not isinstance(model, Backbone):
        raise UserError(f"model._target_={check_name(model_cfg)}: returned {type(model).__name__}; expected an "
                        "imnet_ablate.models.Backbone")
    return model


def skeleton(model_cfg: DictConfig | Mapping[str, Any]) -> Backbone:
    """The network a model config builds, on PyTorch's ``meta`` device (no memory, no compute): for checking what
    it offers (feature layers) before any work starts."""
    import torch

    with torch.device("meta"):
        return build(model_cfg, 1)


def load_pretrained(pretrain_dir: Path | str) -> tuple[Backbone, dict[str, Any]]:
    """The final network of a pre-training folder, rebuilt from its ``config.yaml``, and its ``metrics.json``.

    ``model.pt`` holds tensors only and is read with ``weights_only=True``: a shared checkpoint cannot run code.
    """
    import yaml

    from ..store import load_torch, restoring

    folder = Path(pretrain_dir)
    try:
        model_cfg = OmegaConf.load(folder / "config.yaml").model
        manifest = json.loads((folder / "metrics.json").read_text())
        num_classes = int(manifest["num_classes"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError, yaml.YAMLError) as e:
        raise UserError(f"{folder}: not a finished pre-training folder ({type(e).__name__} in its config.yaml or "
                        "metrics.json); run `ablate pretrain` first") from e
    state = load_torch(folder / "model.pt", "a pre-trained model's weights", valid=lambda s: isinstance(s, dict))
    model = build(model_cfg, num_classes)
    with restoring(folder / "model.pt", "the weights of the model its config.yaml describes"):
        model.load_state_dict(state)
    return model, manifest
