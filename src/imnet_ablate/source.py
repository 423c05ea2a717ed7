"""The network a transfer starts from: ``pretrain=subset | <run_dir> | scratch | torchvision``.

``source_of`` names it without loading or training anything (``ablate run`` plans with it, and ``plan=true`` writes
nothing); ``load_network`` returns it as a ``Backbone``, pre-training it first for ``pretrain=subset`` when its
folder is not finished. Shared by every task.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import NamedTuple

from omegaconf import DictConfig

from . import models
from .config import locate
from .errors import UserError
from .store import finished, load_torch, restoring

log = logging.getLogger(__name__)

SCRATCH_HEAD = 20  # classes of a scratch network's (replaced) head: 0.1 built it for VOC, so seeds draw the same weights


class Source(NamedTuple):
    """Which network a transfer starts from; known without loading (or training) it."""

    key: str  # the pretrain stage hash, or "scratch" / "torchvision[-<model>]": what the transfer's hash takes
    name: str  # the pretrain folder name, or the key: the start of the transfer folder's name
    folder: Path | None  # the pretrain folder (it may not be trained yet for pretrain=subset)


class TorchvisionWeights(NamedTuple):
    file: str  # in <torch hub dir>/checkpoints/, as torchvision's downloader names it (IMAGENET1K_V1)
    model: dict  # the model config they fit
    keys: str  # "module:NAME" of the model's key mapping from torchvision's state dict (models.renamed_keys)


# pretrain=torchvision: the ImageNet weights torchvision publishes, by model name (any other model: AlexNet, as 0.1)
_RESNET = {"input_size": 224, "resize": 256}
TORCHVISION: dict[str, TorchvisionWeights] = {
    "alexnet": TorchvisionWeights(
        "alexnet-owt-7be5be79.pth",
        {"name": "alexnet", "input_size": 224, "resize": 256, "dropout": 0.5, "init": "default"},
        "imnet_ablate.models.alexnet:TORCHVISION_KEYS"),
    "resnet18": TorchvisionWeights("resnet18-f37072fd.pth", {"name": "resnet18", **_RESNET},
                                   "imnet_ablate.models.resnet:TORCHVISION_KEYS"),
    "resnet50": TorchvisionWeights("resnet50-0676ba61.pth", {"name": "resnet50", **_RESNET},
                                   "imnet_ablate.models.resnet:TORCHVISION_KEYS"),
}


def pretrain_cfg(cfg: DictConfig) -> DictConfig:
    """The pre-training config of ``pretrain=subset``: this config with ``seed = pretrain_seed``."""
    pre = cfg.copy()
    pre.seed = cfg.pretrain_seed
    return pre


def _torchvision_entry(cfg: DictConfig) -> tuple[str, TorchvisionWeights]:
    name = str(cfg.model.name)
    return (f"torchvision-{name}", TORCHVISION[name]) if name in TORCHVISION and name != "alexnet" \
        else ("torchvision", TORCHVISION["alexnet"])


def source_of(cfg: DictConfig) -> Source:
    """``cfg.pretrain``: a pre-training folder, ``subset`` (the pre-training of cfg.subset/model/train),
    ``scratch`` (the architecture of ``cfg.model``, random weights) or ``torchvision`` (its ImageNet weights of
    ``cfg.model``; AlexNet for models it has none of)."""
    choice = str(cfg.pretrain)
    if choice == "scratch":
        return Source("scratch", "scratch", None)
    if choice == "torchvision":
        key, _ = _torchvision_entry(cfg)
        return Source(key, key, None)
    if choice == "subset":
        from . import pretrain

        stage = pretrain.stage(pretrain_cfg(cfg))
        return Source(stage.hash, stage.path.name, stage.path)
    folder = Path(choice).expanduser().resolve()
    record = finished(folder, f"pretrain={choice}", "pre-training folder",
                      "a run_dir printed by `ablate pretrain`, or subset / scratch / torchvision")
    return Source(str(record["hash"]), folder.name, folder)


def model_config(cfg: DictConfig, source: Source) -> DictConfig:
    """The model config of the network ``source`` names, known without loading (or training) it."""
    from omegaconf import OmegaConf

    if source.key.startswith("torchvision"):
        return OmegaConf.create(_torchvision_entry(cfg)[1].model)
    if source.folder is not None and str(cfg.pretrain) != "subset":
        try:
            return OmegaConf.load(source.folder / "config.yaml").model
        except Exception as e:  # OSError, YAML errors, a config without a model: not a pre-training folder
            raise UserError(f"pretrain={cfg.pretrain}: {source.folder / 'config.yaml'} has no model config "
                            f"({type(e).__name__}); expected a folder written by `ablate pretrain`") from e
    return cfg.model


def load_network(cfg: DictConfig, source: Source) -> models.Backbone:
    """The network ``source`` names; ``pretrain=subset`` trains it first unless its folder is finished."""
    import torch

    if source.key == "scratch":
        torch.manual_seed(int(cfg.seed))  # the random initialisation is part of what the seed picks
        return models.build(cfg.model, SCRATCH_HEAD)
    if source.key.startswith("torchvision"):
        return torchvision_network(cfg)
    if str(cfg.pretrain) == "subset":
        from . import pretrain

        pretrain.run(pretrain_cfg(cfg))
    return models.load_pretrained(source.folder)[0]


def torchvision_network(cfg: DictConfig) -> models.Backbone:
    """torchvision's ImageNet weights for ``cfg.model`` (same layout), read from the torch hub cache only: this
    tool never downloads."""
    import torch

    _, weights = _torchvision_entry(cfg)
    path = Path(torch.hub.get_dir()) / "checkpoints" / weights.file
    if not path.is_file():
        raise UserError(f"pretrain=torchvision: {path} not found; download it where there is network access "
                        f"(torchvision.models.{weights.model['name']}(weights='IMAGENET1K_V1')) and copy it there")
    state = load_torch(path, f"torchvision's {weights.model['name']} weights", valid=lambda s: isinstance(s, dict))
    model = models.build(weights.model, 1000)
    with restoring(path, f"torchvision's {weights.model['name']} weights", "download it again"):
        model.load_state_dict(models.renamed_keys(state, locate(weights.keys, "torchvision weights")))
    return model
