"""The machinery every transfer task shares: images in memory, frozen features and linear probes, and an
iteration-based SGD loop that resumes from its checkpoint.

Batches and augmentation depend only on ``(seed, iteration)`` (``batch_indices``, ``iteration_generator``), so a run
resumed from ``checkpoint.pt`` replays exactly the batches of an uninterrupted one. Ctrl-C or SIGTERM checkpoints the
current iteration and says where the rerun resumes (``interrupts``); every long step shows its progress.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torchvision.transforms.v2.functional as TF
from omegaconf import DictConfig
from torch import nn

from .. import runtime
from ..errors import UserError
from ..inputs import DEFAULT_MAX_PIXELS
from ..interrupts import Interrupted, StopRequest, resumes_with
from ..loaders import decode
from ..progress import Progress
from ..store import atomic_torch_save, load_torch, restoring
from . import TaskRun

log = logging.getLogger(__name__)

Step = Callable[[int], dict[str, torch.Tensor]]  # iteration -> named losses (summed for the update)


# -- images -------------------------------------------------------------------------------------------------------
def read_image(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """uint8 RGB CHW of one image file; an unreadable one, or one over ``max_pixels`` (``TaskRun.max_pixels``,
    from the header, before decoding), is a one-line error naming it."""
    try:
        return decode(path.read_bytes(), max_pixels=max_pixels)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read ({e})") from e


def load_resized(paths: Sequence[Path], size: int, max_pixels: int = DEFAULT_MAX_PIXELS, workers: int = 4
                 ) -> torch.Tensor:
    """All images squashed to ``size`` x ``size`` (whole image kept: objects near the border still count)."""
    def one(path: Path) -> torch.Tensor:
        return TF.resize(read_image(path, max_pixels), [size, size], antialias=True)

    images = []
    with ThreadPoolExecutor(workers) as pool, Progress(len(paths), "read images", "img") as bar:
        for image in pool.map(one, paths):
            images.append(image)
            bar.update()
    return torch.stack(images)


def random_crop_flip(img: torch.Tensor, size: int, g: torch.Generator) -> torch.Tensor:
    h, w = img.shape[-2:]
    top = int(torch.randint(0, h - size + 1, (1,), generator=g))
    left = int(torch.randint(0, w - size + 1, (1,), generator=g))
    out = img[:, top:top + size, left:left + size]
    return out.flip(-1) if torch.rand((), generator=g) < 0.5 else out


def batch_indices(n: int, batch: int, seed: int, iteration: int) -> torch.Tensor:
    """The images of one iteration: epoch-wise permutations seeded by (seed, epoch), so a resume replays them."""
    per_epoch = max(1, n // batch)
    epoch, step = divmod(iteration, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return perm[step * batch:(step + 1) * batch]


def iteration_generator(seed: int, iteration: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 7_919 + iteration * 2_654_435_761) % 2 ** 61)


# -- frozen features and linear probes -----------------------------------------------------------------------------
@torch.no_grad()
def extract_features(backbone: nn.Module, x: torch.Tensor, layer: str, device: torch.device, batch: int = 128
                     ) -> torch.Tensor:
    """Features of uint8 images at ``layer`` (``Backbone.features``), in eval mode, on the CPU as float32."""
    backbone.eval().to(device)
    out = []
    with Progress(len(x), f"{layer} features", "img") as bar:
        for chunk in x.split(batch):
            out.append(backbone.features(backbone.normalize(chunk.to(device)), layer).float().cpu())
            bar.update(len(chunk))
    return torch.cat(out)


def cached_features(run: TaskRun, split: str, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``features_<split>.pt`` in the stage folder, computed once: a resumed probe does not run the network again."""
    path = run.stage.path / f"features_{split}.pt"
    if path.exists():
        return load_torch(path, "cached features (a 2-D float tensor)", advice="delete it to compute them again",
                          valid=lambda t: isinstance(t, torch.Tensor) and t.ndim == 2 and t.is_floating_point())
    feats = compute()
    atomic_torch_save(path, feats)
    return feats


def feature_stats(train: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std of the training features: standardising makes one L2 penalty fit any layer."""
    return train.mean(0), train.std(0).clamp(min=1e-6)


def fit_linear(feats: torch.Tensor, outputs: int, loss: Callable[[torch.Tensor], torch.Tensor], lin: DictConfig
               ) -> nn.Linear:
    """An L2-regularised linear classifier on (standardised) features, full-batch L-BFGS: deterministic, and
    cheap at any scale. ``loss(logits)`` is the task's data term (per-class BCE, softmax cross-entropy, ...)."""
    clf = nn.Linear(feats.shape[1], outputs)
    nn.init.zeros_(clf.weight)
    nn.init.zeros_(clf.bias)
    opt = torch.optim.LBFGS(clf.parameters(), lr=1.0, max_iter=lin.iterations, history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-6)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        value = loss(clf(feats)) + 0.5 * lin.weight_decay * clf.weight.pow(2).sum()
        value.backward()
        return value

    opt.step(closure)
    return clf


def linear_probe(run: TaskRun, train: torch.Tensor, test: torch.Tensor, outputs: int,
                 loss: Callable[[torch.Tensor], torch.Tensor], lin: DictConfig) -> torch.Tensor:
    """Test-set logits of a linear classifier on standardised frozen features (the classifier and the
    standardisation are kept in ``checkpoint.pt``)."""
    mean, std = feature_stats(train)
    clf = fit_linear((train - mean) / std, outputs, loss, lin)
    atomic_torch_save(run.stage.path / "checkpoint.pt",
                      {"linear": clf.state_dict(), "mean": mean, "std": std, "iteration": lin.iterations})
    with torch.no_grad():
        return clf((test - mean) / std)


# -- fine-tuning a classifier --------------------------------------------------------------------------------------
def test_views(x: torch.Tensor, size: int, crops: int) -> list[torch.Tensor]:
    """Test crops of images at the training scale: the centre crop and its mirror (2), or the four corner crops and
    the centre crop, each with its mirror (10: Caffe's oversample, the era's test)."""
    h, w = x.shape[-2:]
    offsets = [((h - size) // 2, (w - size) // 2)]
    if crops == 10:
        offsets += [(0, 0), (0, w - size), (h - size, 0), (h - size, w - size)]
    views = [x[..., top:top + size, left:left + size] for top, left in offsets]
    return views + [v.flip(-1) for v in views]


def finetune(run: TaskRun, x_train: torch.Tensor, x_test: torch.Tensor, outputs: int,
             loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], ft: DictConfig, size: int) -> torch.Tensor:
    """The whole network with a new ``outputs``-way head (``head_lr_mult`` x lr) on random ``size`` crops + flips
    of ``x_train``, ``loss(logits, batch indices)`` the task's data term; a pre-trained network's batch norm keeps
    its statistics. Returns the test logits: the mean over ``test_views`` of ``x_test`` (at the training scale)."""
    model, device = run.backbone, run.device
    if run.pretrained:
        model.freeze_batchnorm()
    head = model.replace_head(outputs)
    model.to(device).train()
    head_params = set(head.parameters())
    groups = [{"params": [p for p in model.parameters() if p not in head_params]},
              {"params": list(head_params), "lr": ft.optimizer.lr * ft.head_lr_mult}]
    opt, sched = sgd(groups, ft.optimizer)

    def step(it: int) -> dict[str, torch.Tensor]:
        idx = batch_indices(len(x_train), ft.batch_size, run.seed, it)
        g = iteration_generator(run.seed, it)
        xb = torch.stack([random_crop_flip(x_train[i], size, g) for i in idx.tolist()]).to(device)
        return {"loss": loss(model(model.normalize(xb)), idx)}

    train_steps(run, model, opt, sched, ft.iterations, step, ft)
    model.eval()
    with torch.no_grad():
        return torch.cat([torch.stack([model(model.normalize(v.to(device))).cpu()
                                       for v in test_views(chunk, size, int(ft.test_crops))]).mean(0)
                          for chunk in x_test.split(128)])


# -- SGD over iterations -------------------------------------------------------------------------------------------
def sgd(groups: list[dict[str, Any]], opt_cfg: DictConfig) -> tuple[torch.optim.Optimizer, Any]:
    """SGD with momentum and weight decay; the lr times ``gamma`` at each of ``steps`` (iterations)."""
    opt = torch.optim.SGD(groups, lr=opt_cfg.lr, momentum=opt_cfg.momentum, weight_decay=opt_cfg.weight_decay)
    return opt, torch.optim.lr_scheduler.MultiStepLR(opt, list(opt_cfg.steps), gamma=opt_cfg.gamma)


def train_steps(run: TaskRun, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, iterations: int,
                step: Step, every: DictConfig) -> None:
    """``iterations`` SGD updates of ``model`` on the summed losses of ``step(iteration)``, resuming from (and
    writing every ``every.checkpoint_every`` iterations, at the end, and on Ctrl-C / SIGTERM) ``checkpoint.pt``:
    model, optimizer, schedule, iteration and every random stream."""
    path = run.stage.path / "checkpoint.pt"
    start = _resume(path, model, optimizer, scheduler, run.device, iterations)

    def save(done: int) -> None:
        runtime.save_checkpoint(path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                       "scheduler": scheduler.state_dict(), "iteration": done,
                                       "rng": runtime.rng_state(run.device)})

    with StopRequest() as stop, Progress(iterations, "train", "it", start) as bar:
        for it in range(start, iterations):
            losses = step(it)
            loss = sum(losses.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            bar.update()
            if (it + 1) % every.log_every == 0 or it + 1 == iterations:
                diverged(run, loss, it + 1, every)
                parts = f" ({' '.join(f'{k} {v.item():.3f}' for k, v in losses.items())})" if len(losses) > 1 else ""
                bar.note(loss=f"{loss.item():.3f}")
                log.info("iter %d/%d loss %.4f%s lr %.2g", it + 1, iterations, loss.item(), parts,
                         scheduler.get_last_lr()[0])
            if (it + 1) % every.checkpoint_every == 0 or it + 1 == iterations or stop.signum is not None:
                save(it + 1)
            if stop.signum is not None:
                bar.close()
                note = f"{stop.name}: checkpointed {run.stage.path} after iteration {it + 1}; " \
                       f"{resumes_with(it + 1, iterations)}"
                log.warning(note)
                raise Interrupted(note)


def diverged(run: TaskRun, loss: torch.Tensor, iteration: int, every: DictConfig) -> None:
    """A loss that is no longer finite is a training that diverged: its scores would measure nothing, so the stage
    stops with one line instead of reporting them (checked where the loss is logged, so no extra device sync)."""
    if not torch.isfinite(loss):
        lr = every.get("optimizer", {}).get("lr", "?")
        raise UserError(f"{run.stage.path}: the training diverged (loss {loss.item()} at iteration {iteration}, "
                        f"lr {lr}); lower the task's optimizer.lr and rerun")


def _resume(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, device: torch.device,
            iterations: int) -> int:
    """Restore a run interrupted mid-training; returns the number of iterations already done (0 if none)."""
    what = "a transfer checkpoint"
    state = runtime.load_checkpoint(path, what, ("model", "optimizer", "scheduler", "iteration", "rng"))
    if state is None:
        return 0
    with restoring(path, what, "delete it to start this stage over"):
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        runtime.set_rng_state(state["rng"], device)
        done = int(state["iteration"])
    log.info("resuming from %s with iteration %d of %d", path, done + 1, iterations)
    return done
