"""``ablate probe subset=<preset>``: the paper's ImageNet column for a network pre-trained on other classes.

Huh et al. measure a reduced-class network (127 WordNet groups, 771 classes, a 500-class half...) on the 1000-way
ImageNet task "after re-training only the last layer". Here: the pre-trained network frozen, a new 1000-way linear
layer on the features its own last layer reads (fc7 for AlexNet) is trained on the training images of
``subset=full`` (same data) and scored, top-1 / top-5, on full's validation images.

Protocol (``conf/probe/<name>.yaml``, recorded in the stage): each training image's centre crop, and with
``mirror`` its mirror image, is passed through the network once (augmentation would need a new pass every epoch);
the features are standardised and a linear layer is trained on them by SGD with momentum, ``epochs`` passes with the
lr multiplied by ``gamma`` after each epoch in ``steps``. The loss of every epoch is in ``metrics.csv`` (the flat end
of that curve is the check that the schedule converged). The features are kept in ``features_*.npy`` while the stage
runs (a resumed probe does not pass the network over the data again) and removed when it finishes.

A probe is its own stage, ``<runs>/probe/<pretrain folder>-<hash of the probe settings and the full subset>``: it
never enters the pre-training's hash, so a finished pre-training gains it without being trained again.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from . import loaders, models, pretrain, runtime, store, subsets
from .config import conf_dir
from .errors import UserError

log = logging.getLogger(__name__)

OUTPUTS = ["config.yaml", "metrics.json", "metrics.csv", "head.pt", "log.txt"]
CHUNK = 65_536  # feature rows read at once when standardising and scoring


def full_cfg(cfg: DictConfig) -> DictConfig:
    """This config with ``subset=full`` (the 1000 fine classes, every image) and no ``subset_dir``."""
    return OmegaConf.merge(cfg, {"subset": OmegaConf.load(conf_dir() / "subset" / "full.yaml"), "subset_dir": None})


def pretrain_only(cfg: DictConfig) -> DictConfig:
    """The pre-training's own config (without ``probe``), as ``ablate pretrain`` would have it."""
    return OmegaConf.masked_copy(cfg, [k for k in cfg if k != "probe"])


def stage(cfg: DictConfig) -> store.Stage:
    """The probe's folder (finished or not) for the pre-training ``cfg`` names, without building anything."""
    pre = pretrain.stage(cfg)
    spec = {"pretrain": pre.hash, "full": subsets.stage(full_cfg(cfg)).hash,
            "probe": OmegaConf.to_container(cfg.probe, resolve=True)}
    return store.Stage(cfg.paths.runs, "probe", pre.name, spec)


def check(p: DictConfig) -> None:
    steps = list(p.steps)
    if any(not isinstance(s, int) or not 0 < s < int(p.epochs) for s in steps) or steps != sorted(steps):
        raise UserError(f"probe.steps={steps}: expected increasing epochs between 1 and "
                        f"probe.epochs-1={int(p.epochs) - 1}")


def run(cfg: DictConfig) -> Path:
    """Probe the pre-training of ``cfg`` (trained first unless finished); reuse a finished probe."""
    check(cfg.probe)
    st = stage(cfg)
    if st.is_done():
        return st.path
    pre_dir = pretrain.run(pretrain_only(cfg))
    full = subsets.build(full_cfg(cfg))
    device = runtime.pick_device(cfg.device)
    with st.lock():
        if st.is_done():
            return st.path
        st.write_spec({"pretrain_dir": str(pre_dir), "full_dir": str(full)}, device)
        store.atomic_write_text(st.path / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        with runtime.log_to(st.path / "log.txt"):
            started = time.perf_counter()
            record = probe(cfg, st, pre_dir, full, device)
            record["seconds"] = round(time.perf_counter() - started, 1)
        store.atomic_write_json(st.path / "metrics.json", record)
        for scratch in ("features_train.npy", "features_val.npy", "checkpoint.pt"):
            (st.path / scratch).unlink(missing_ok=True)
        st.finish(OUTPUTS)
    return st.path


# -- features -----------------------------------------------------------------------------------------------------
def features(cfg: DictConfig, model: models.Backbone, folder: Path, split: str, views: int, st: store.Stage,
             device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """(features (rows x D, float16, memory-mapped), labels) of a split's centre crops (``views`` 2: and their
    mirrors), computed once into the stage folder; unreadable images are skipped, as the training loop skips them."""
    feats_path, labels_path = st.path / f"features_{split}.npy", st.path / f"labels_{split}.npy"
    if feats_path.is_file() and labels_path.is_file():  # labels are written last: both there = complete
        labels = np.load(labels_path)
        return np.load(feats_path, mmap_mode="r")[:len(labels)], labels
    paths, targets = loaders.read_split(folder, split)
    dataset = loaders.FilesDataset(loaders.data_root(folder), paths, targets,
                                   loaders.transforms(cfg.model, cfg.train)[1], loaders.max_pixels(cfg.loader))
    loader = loaders.make_loader(dataset, loaders.ResumableSampler(len(dataset), 0, shuffle=False, pad=False),
                                 int(cfg.probe.batch_size), cfg.loader, drop_last=False, pin_memory=False)
    log.info("probe: features of %d %s images of %s, %d view(s)", len(dataset), split, folder, views)
    model.eval().to(device)
    kept: list[int] = []
    with store.atomic_path(feats_path) as tmp, torch.no_grad():
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16,
                                        shape=(len(dataset) * views, model.feature_dim))
        for images, labels, bad in loader:
            if bad:
                log.warning("probe: skipped %d unreadable images (first: %s)", len(bad), bad[0])
            for view in range(views):
                f = model.features(model.normalize((images.flip(-1) if view else images).to(device)))
                out[len(kept):len(kept) + len(f)] = f.float().cpu().numpy()
                kept += labels.tolist()
        out.flush()
        del out
    with store.atomic_path(labels_path) as tmp, open(tmp, "wb") as f:
        np.save(f, np.array(kept, dtype=np.int64))
    return np.load(feats_path, mmap_mode="r")[:len(kept)], np.array(kept, dtype=np.int64)


def standardisation(feats: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std of the training features (float64 sums over chunks of the memory map)."""
    total, squares = np.zeros(feats.shape[1]), np.zeros(feats.shape[1])
    for start in range(0, len(feats), CHUNK):
        x = feats[start:start + CHUNK].astype(np.float64)
        total += x.sum(0)
        squares += (x * x).sum(0)
    mean = total / len(feats)
    std = np.sqrt(np.maximum(squares / len(feats) - mean * mean, 0.0))
    return torch.from_numpy(mean).float(), torch.from_numpy(std).float().clamp(min=1e-6)


def rows(feats: np.ndarray, index: np.ndarray, mean: torch.Tensor, std: torch.Tensor, device: torch.device
         ) -> torch.Tensor:
    """Standardised float32 features of some rows, on the device."""
    return ((torch.from_numpy(feats[index].astype(np.float32)) - mean) / std).to(device)


# -- the linear layer ---------------------------------------------------------------------------------------------
def fit(p: DictConfig, feats: np.ndarray, labels: np.ndarray, num_classes: int, mean: torch.Tensor,
        std: torch.Tensor, st: store.Stage, device: torch.device) -> tuple[torch.nn.Linear, list[dict[str, Any]]]:
    """SGD on the cached features, ``p.epochs`` passes in an order fixed by (``p.seed``, epoch); a checkpoint after
    every epoch, so an interrupted probe resumes at its last finished epoch."""
    head = torch.nn.Linear(feats.shape[1], num_classes).to(device)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    opt = torch.optim.SGD(head.parameters(), lr=float(p.lr), momentum=float(p.momentum),
                          weight_decay=float(p.weight_decay))
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, list(p.steps), gamma=float(p.gamma))
    history: list[dict[str, Any]] = []
    path, what = st.path / "checkpoint.pt", "a probe checkpoint"
    ckpt = runtime.load_checkpoint(path, what, ("head", "optimizer", "scheduler", "history"))
    if ckpt is not None:
        with store.restoring(path, what, "delete it to start the probe over"):
            head.load_state_dict(ckpt["head"])
            opt.load_state_dict(ckpt["optimizer"])
            sched.load_state_dict(ckpt["scheduler"])
            history = list(ckpt["history"])
        log.info("probe: resuming after epoch %d", len(history))
    targets, batch = torch.from_numpy(labels), int(p.batch_size)
    for epoch in range(len(history), int(p.epochs)):
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(int(p.seed) * 1_000_003 + epoch))
        loss_sum, lr = 0.0, opt.param_groups[0]["lr"]
        for start in range(0, len(order), batch):
            index = np.sort(order[start:start + batch].numpy())  # sorted: sequential reads of the memory map
            loss = F.cross_entropy(head(rows(feats, index, mean, std, device)), targets[index].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.item() * len(index)
        sched.step()
        history.append({"epoch": epoch + 1, "lr": lr, "loss": round(loss_sum / len(labels), 6)})
        log.info("probe: epoch %d/%d loss %.4f lr %.3g", epoch + 1, int(p.epochs), history[-1]["loss"], lr)
        runtime.save_checkpoint(st.path / "checkpoint.pt", {"head": head.state_dict(), "optimizer": opt.state_dict(),
                                                            "scheduler": sched.state_dict(), "history": history})
    return head, history


@torch.no_grad()
def score(head: torch.nn.Linear, feats: np.ndarray, labels: np.ndarray, mean: torch.Tensor, std: torch.Tensor,
          device: torch.device) -> dict[str, float]:
    """Top-1 / top-5 (%) and mean loss of the new layer on the validation features."""
    hits1 = hits5 = 0
    loss = 0.0
    targets = torch.from_numpy(labels)
    for start in range(0, len(labels), CHUNK):
        index = np.arange(start, min(start + CHUNK, len(labels)))
        logits, y = head(rows(feats, index, mean, std, device)).float().cpu(), targets[index]
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices == y[:, None]
        hits1, hits5 = hits1 + int(top[:, 0].sum()), hits5 + int(top.any(1).sum())
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
    n = max(1, len(labels))
    return {"top1": round(100 * hits1 / n, 4), "top5": round(100 * hits5 / n, 4), "val_loss": round(loss / n, 6)}


def probe(cfg: DictConfig, st: store.Stage, pre_dir: Path, full: Path, device: torch.device) -> dict[str, Any]:
    """Features, the new 1000-way layer, its scores; ``metrics.csv`` (loss per epoch) and ``head.pt`` written."""
    p = cfg.probe
    model, pre_metrics = models.load_pretrained(pre_dir)
    num_classes = int(json.loads((full / "manifest.json").read_text())["num_classes"])
    train_x, train_y = features(cfg, model, full, "train", 2 if p.mirror else 1, st, device)
    val_x, val_y = features(cfg, model, full, "val", 1, st, device)
    mean, std = standardisation(train_x)
    log.info("probe: a new %d-way layer on %d x %d features of %s, %d epochs", num_classes, *train_x.shape,
             pre_dir.name, int(p.epochs))
    head, history = fit(p, train_x, train_y, num_classes, mean, std, st, device)
    scores = score(head, val_x, val_y, mean, std, device)
    log.info("probe: 1000-way top-1 %.2f%%, top-5 %.2f%% (the network's own top-1 on its %d classes: %s%%)",
             scores["top1"], scores["top5"], pre_metrics["num_classes"], pre_metrics.get("top1"))
    store.atomic_torch_save(st.path / "head.pt", {"weight": head.weight.cpu(), "bias": head.bias.cpu(),
                                                  "mean": mean, "std": std})
    pretrain.write_metrics_csv(st.path / "metrics.csv", history, ["epoch", "lr", "loss"])
    change = round(history[-2]["loss"] - history[-1]["loss"], 6) if len(history) > 1 else None
    return {**scores, "num_classes": num_classes, "train_rows": len(train_y), "val_images": len(val_y),
            "pretrain": st.spec["pretrain"], "pretrain_dir": str(pre_dir),
            "pretrain_classes": pre_metrics["num_classes"], "pretrain_top1": pre_metrics.get("top1"),
            "schedule": OmegaConf.to_container(p, resolve=True), "final_loss": history[-1]["loss"],
            "loss_change_last_epoch": change}
