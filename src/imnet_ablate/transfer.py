"""``ablate transfer task=voc-cls|voc-det pretrain=<run_dir | subset | scratch | torchvision>``.

One stage folder per (pre-trained network, task config, seed): ``<runs>/transfer/<task>-<pretrain folder>-<hash>``
holding ``config.yaml``, ``metrics.json``, ``detections/`` (devkit results files, so ``ablate evaluate`` rescores
them), ``checkpoint.pt``, ``log.txt`` and ``DONE``.

- voc-cls ``protocol: linear``: frozen fc7 or conv5 features (cached in the folder), a logistic regression per
  class trained with L-BFGS. ``protocol: finetune``: the whole network with a new 20-way head and BCE.
- voc-det: Faster R-CNN assembled from torchvision's parts on the pre-trained trunk (last max-pool dropped: stride
  16 for AlexNet, as Fast R-CNN did), RoIAlign to the fc6 grid, the pre-trained fc6/fc7 as the box head.

Training is iteration-based; batches and augmentation depend only on ``(seed, iteration)``, so a run resumed from
``checkpoint.pt`` replays the same batches as an uninterrupted one.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign, box_iou

from . import datasets, evaluate, models, store, voc
from .errors import UserError
from .loaders import decode
from .store import Stage, atomic_torch_save, atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

TORCHVISION_ALEXNET = "alexnet-owt-7be5be79.pth"  # torchvision's IMAGENET1K_V1 AlexNet weights file
TORCHVISION_MODEL = {"name": "alexnet", "input_size": 224, "resize": 256, "dropout": 0.5, "init": "default"}


# -- the network to transfer ------------------------------------------------------------------------------------
class Source(NamedTuple):
    """Which network a transfer starts from; known without loading (or training) it."""

    key: str  # the pretrain stage hash, or "scratch" / "torchvision"
    name: str  # the pretrain folder name, or "scratch" / "torchvision"
    folder: Path | None  # the pretrain folder (it may not be trained yet for pretrain=subset)


def pretrain_cfg(cfg: DictConfig) -> DictConfig:
    """The pre-training config of ``pretrain=subset``: this config with ``seed = pretrain_seed``."""
    pre = cfg.copy()
    pre.seed = cfg.pretrain_seed
    return pre


def source_of(cfg: DictConfig) -> Source:
    """``cfg.pretrain``: a pre-training folder, ``subset`` (the pre-training of cfg.subset/model/train),
    ``scratch`` (the architecture of ``cfg.model``, random weights) or ``torchvision`` (its ImageNet AlexNet)."""
    choice = str(cfg.pretrain)
    if choice in ("scratch", "torchvision"):
        return Source(choice, choice, None)
    if choice == "subset":
        from . import pretrain

        pre = pretrain_cfg(cfg)
        stage, _ = pretrain.make_stage(pre, pretrain.subset_folder(pre))
        return Source(stage.hash, stage.path.name, stage.path)
    folder = Path(choice).expanduser().resolve()
    key = str(store.finished(folder, f"pretrain={choice}", "pre-training folder", "a run_dir printed by `ablate "
                             "pretrain`, or subset / scratch / torchvision").get("hash"))
    return Source(key, folder.name, folder)


def load_network(cfg: DictConfig, source: Source) -> models.AlexNetLike:
    """The network ``source`` names; ``pretrain=subset`` trains it first unless its folder is finished."""
    if source.key == "scratch":
        torch.manual_seed(int(cfg.seed))  # the random initialisation is part of what the seed picks
        return models.build(cfg.model, len(voc.CLASSES))
    if source.key == "torchvision":
        return torchvision_alexnet()
    if str(cfg.pretrain) == "subset":
        from . import pretrain

        pretrain.run(pretrain_cfg(cfg))
    return models.load_pretrained(source.folder)[0]


def torchvision_alexnet() -> models.AlexNetLike:
    """torchvision's ImageNet AlexNet (same layout as ``model=alexnet``), read from the torch hub cache only."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / TORCHVISION_ALEXNET
    if not path.is_file():
        raise UserError(f"pretrain=torchvision: {path} not found; download it where there is network access "
                        "(torchvision.models.alexnet(weights='IMAGENET1K_V1')) and copy it there")
    state = store.load_torch(path, "torchvision's AlexNet weights", valid=lambda s: isinstance(s, dict))
    rename = {"features": "trunk", "classifier.1": "fc6.1", "classifier.4": "fc7.1", "classifier.6": "head"}
    model = models.build(TORCHVISION_MODEL, 1000)
    with store.restoring(path, "torchvision's AlexNet weights"):
        model.load_state_dict({_renamed(k, rename): v for k, v in state.items()})
    return model


def _renamed(key: str, rename: dict[str, str]) -> str:
    for old, new in rename.items():
        if key.startswith(old + "."):
            return new + key[len(old):]
    return key


# -- VOC images ---------------------------------------------------------------------------------------------------
def read_image(voc_root: Path, image_id: str) -> torch.Tensor:
    """uint8 RGB CHW of one VOC image."""
    path = voc.image_path(voc_root, image_id)
    try:
        return decode(path.read_bytes())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read ({e})") from e


def load_resized(voc_root: Path, images: Sequence[voc.VocImage], size: int, workers: int = 4) -> torch.Tensor:
    """All images squashed to ``size`` x ``size`` (whole image kept: objects near the border still count)."""
    def one(img: voc.VocImage) -> torch.Tensor:
        return TF.resize(read_image(voc_root, img.id), [size, size], antialias=True)

    with ThreadPoolExecutor(workers) as pool:
        return torch.stack(list(pool.map(one, images)))


def cls_targets(images: Sequence[voc.VocImage]) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets, weights) N x 20 from the evaluator's ground truth: an image whose objects of a class are all
    difficult gets weight 0 for that class, left out of the loss as the devkit leaves it out of AP."""
    gt = torch.from_numpy(evaluate.cls_ground_truth(images))
    return (gt == 1).float(), (gt != 0).float()


def masked_bce(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    loss = F.binary_cross_entropy_with_logits(logits, targets, weight=weights, reduction="sum")
    return loss / weights.sum().clamp(min=1.0)


def batch_indices(n: int, batch: int, seed: int, iteration: int) -> torch.Tensor:
    """The images of one iteration: epoch-wise permutations seeded by (seed, epoch), so a resume replays them."""
    per_epoch = max(1, n // batch)
    epoch, step = divmod(iteration, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return perm[step * batch:(step + 1) * batch]


def iteration_generator(seed: int, iteration: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 7_919 + iteration * 2_654_435_761) % 2 ** 61)


# -- checkpoints --------------------------------------------------------------------------------------------------
def save_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer, sched: Any, iteration: int) -> None:
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
             "iteration": iteration, "rng": torch.get_rng_state(),
             "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    atomic_torch_save(path, state)


def load_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer, sched: Any) -> int:
    """Restore a run interrupted mid-training; returns the iteration to continue from (0 if none)."""
    if not path.is_file():
        return 0
    what, advice = "a transfer checkpoint", "delete it to start this transfer over"
    state = store.load_torch(path, what, ("model", "optimizer", "scheduler", "rng", "cuda_rng", "iteration"), advice)
    with store.restoring(path, what, advice):
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        iteration = int(state["iteration"])
    log.info("resuming from %s at iteration %d", path, iteration)
    return iteration


def sgd(groups: list[dict[str, Any]], opt_cfg: DictConfig) -> tuple[torch.optim.Optimizer, Any]:
    opt = torch.optim.SGD(groups, lr=opt_cfg.lr, momentum=opt_cfg.momentum, weight_decay=opt_cfg.weight_decay)
    return opt, torch.optim.lr_scheduler.MultiStepLR(opt, list(opt_cfg.steps), gamma=opt_cfg.gamma)


# -- voc-cls ------------------------------------------------------------------------------------------------------
@torch.no_grad()
def extract_features(model: models.AlexNetLike, x: torch.Tensor, feature: str, device: torch.device,
                     batch: int = 128) -> torch.Tensor:
    """fc7 (after ReLU) or conv5 (the pooled trunk output, flattened) of uint8 images, in eval mode."""
    model.eval().to(device)
    out = []
    for chunk in x.split(batch):
        t = model.pool(model.trunk(models.normalize(chunk.to(device))))
        t = torch.flatten(t, 1)
        out.append((model.fc7(model.fc6(t)) if feature == "fc7" else t).float().cpu())
    return torch.cat(out)


def train_linear(feats: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, lin: DictConfig
                 ) -> nn.Linear:
    """20 L2-regularised logistic regressions on standardised features, full batch L-BFGS (deterministic)."""
    clf = nn.Linear(feats.shape[1], targets.shape[1])
    nn.init.zeros_(clf.weight)
    nn.init.zeros_(clf.bias)
    opt = torch.optim.LBFGS(clf.parameters(), lr=1.0, max_iter=lin.iterations, history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-6)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = masked_bce(clf(feats), targets, weights) + 0.5 * lin.weight_decay * clf.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return clf


def feature_stats(train: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std of the training features: standardising makes one L2 penalty fit fc7 and conv5."""
    return train.mean(0), train.std(0).clamp(min=1e-6)


def linear_probe(stage: Stage, model: models.AlexNetLike, x_train: torch.Tensor, x_test: torch.Tensor,
                 targets: torch.Tensor, weights: torch.Tensor, task: DictConfig, device: torch.device
                 ) -> torch.Tensor:
    """Test-set scores of a linear classifier on frozen features; the features are cached in the stage folder."""
    feats = {}
    for split, x in (("trainval", x_train), ("test", x_test)):
        path = stage.path / f"features_{split}.pt"
        if path.is_file():
            feats[split] = store.load_torch(path, f"{len(x)} cached feature vectors", advice="delete it to recompute",
                                            valid=lambda t, n=len(x): isinstance(t, torch.Tensor) and t.ndim == 2
                                            and len(t) == n and t.is_floating_point())
        else:
            feats[split] = extract_features(model, x, task.feature, device)
            atomic_torch_save(path, feats[split])
    mean, std = feature_stats(feats["trainval"])
    clf = train_linear((feats["trainval"] - mean) / std, targets, weights, task.linear)
    atomic_torch_save(stage.path / "checkpoint.pt",
                      {"linear": clf.state_dict(), "mean": mean, "std": std, "iteration": task.linear.iterations})
    with torch.no_grad():
        return clf((feats["test"] - mean) / std)


def finetune(stage: Stage, model: models.AlexNetLike, x_train: torch.Tensor, x_test: torch.Tensor,
             targets: torch.Tensor, weights: torch.Tensor, task: DictConfig, seed: int, device: torch.device
             ) -> torch.Tensor:
    """The whole network with a new 20-way head (``head_lr_mult`` x lr): random crops + flips, masked BCE.
    Test score: mean logit of the image and its mirror."""
    ft, size = task.finetune, x_test.shape[-1]
    model.head = nn.Linear(model.feature_dim, len(voc.CLASSES))
    model.to(device).train()
    head = set(model.head.parameters())
    groups = [{"params": [p for p in model.parameters() if p not in head]},
              {"params": list(head), "lr": ft.optimizer.lr * ft.head_lr_mult}]
    opt, sched = sgd(groups, ft.optimizer)
    ckpt = stage.path / "checkpoint.pt"
    start = load_checkpoint(ckpt, model, opt, sched)
    for it in range(start, ft.iterations):
        idx = batch_indices(len(x_train), ft.batch_size, seed, it)
        g = iteration_generator(seed, it)
        xb = torch.stack([random_crop_flip(x_train[i], size, g) for i in idx.tolist()]).to(device)
        loss = masked_bce(model(models.normalize(xb)), targets[idx].to(device), weights[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (it + 1) % ft.log_every == 0:
            log.info("iter %d/%d loss %.4f lr %.2g", it + 1, ft.iterations, loss.item(), sched.get_last_lr()[0])
        if (it + 1) % ft.checkpoint_every == 0 or it + 1 == ft.iterations:
            save_checkpoint(ckpt, model, opt, sched, it + 1)
    model.eval()
    with torch.no_grad():
        return torch.cat([(model(models.normalize(c.to(device))) + model(models.normalize(c.flip(-1).to(device))))
                          .cpu() / 2 for c in x_test.split(128)])


def random_crop_flip(img: torch.Tensor, size: int, g: torch.Generator) -> torch.Tensor:
    h, w = img.shape[-2:]
    top = int(torch.randint(0, h - size + 1, (1,), generator=g))
    left = int(torch.randint(0, w - size + 1, (1,), generator=g))
    out = img[:, top:top + size, left:left + size]
    return out.flip(-1) if torch.rand((), generator=g) < 0.5 else out


def run_cls(stage: Stage, model: models.AlexNetLike, roots: datasets.DataRoots, task: DictConfig, seed: int,
            device: torch.device) -> dict[str, Any]:
    train_imgs = voc.load_split(roots.voc, task.train_split)
    test_imgs = voc.load_split(roots.voc, task.test_split)
    size = int(task.image_size or model.input_size)
    train_size = size if task.protocol == "linear" else round(size * task.finetune.train_resize)
    x_train, x_test = load_resized(roots.voc, train_imgs, train_size), load_resized(roots.voc, test_imgs, size)
    targets, weights = cls_targets(train_imgs)
    if task.protocol == "linear":
        scores = linear_probe(stage, model, x_train, x_test, targets, weights, task, device)
    elif task.protocol == "finetune":
        scores = finetune(stage, model, x_train, x_test, targets, weights, task, seed, device)
    else:
        raise UserError(f"task.protocol={task.protocol}: expected linear or finetune")
    ids = np.array([img.id for img in test_imgs], dtype=str)
    results = {c: voc.ClassScores(ids, scores[:, k].double().numpy()) for k, c in enumerate(voc.CLASSES)}
    voc.write_cls_results(stage.path / "detections", task.test_split, results)
    return {"protocol": task.protocol, "ap": evaluate.voc_cls_ap(test_imgs, scores.double().numpy(), task.metric),
            "n_images": len(test_imgs)}


# -- voc-det ------------------------------------------------------------------------------------------------------
class BoxHead(nn.Module):
    """TwoMLPHead over the pre-trained fc6 / fc7 (dropout included, as in Fast R-CNN's training)."""

    def __init__(self, fc6: nn.Module, fc7: nn.Module):
        super().__init__()
        self.fc6, self.fc7 = fc6, fc7

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc7(self.fc6(torch.flatten(x, 1)))


class FastRCNNRoIHeads(RoIHeads):
    """torchvision's RoIHeads with Fast R-CNN's background range [bg_lo, bg_iou_thresh): a proposal that overlaps
    no object by ``bg_lo`` is ignored rather than sampled as background (torchvision has no lower bound)."""

    bg_lo: float = 0.0

    def assign_targets_to_proposals(self, proposals, gt_boxes, gt_labels):  # type: ignore[override]
        matched, labels = super().assign_targets_to_proposals(proposals, gt_boxes, gt_labels)
        for props, gts, lab in zip(proposals, gt_boxes, labels):
            if gts.numel():
                lab[box_iou(gts, props).max(0).values < self.bg_lo] = -1
        return matched, labels


def build_detector(model: models.AlexNetLike, det: DictConfig) -> GeneralizedRCNN:
    """Faster R-CNN on ``model``: trunk (minus its last max-pool if ``drop_last_pool``) -> RPN -> RoIAlign to the
    fc6 grid -> fc6/fc7 -> 21-way classifier + class-specific box regressor."""
    layers = list(model.trunk)
    if det.drop_last_pool and isinstance(layers[-1], nn.MaxPool2d):
        layers = layers[:-1]
    backbone = nn.Sequential(*layers)
    backbone.out_channels = model.trunk_channels
    anchors = AnchorGenerator((tuple(det.anchor_sizes),), (tuple(det.aspect_ratios),))
    rpn = RegionProposalNetwork(
        anchors, RPNHead(model.trunk_channels, anchors.num_anchors_per_location()[0]),
        fg_iou_thresh=0.7, bg_iou_thresh=0.3, batch_size_per_image=det.rpn_batch_size_per_image,
        positive_fraction=0.5, pre_nms_top_n=dict(training=det.rpn_pre_nms_top_n_train,
                                                  testing=det.rpn_pre_nms_top_n_test),
        post_nms_top_n=dict(training=det.rpn_post_nms_top_n_train, testing=det.rpn_post_nms_top_n_test),
        nms_thresh=det.rpn_nms_thresh)
    grid = fc6_grid(model)
    heads = FastRCNNRoIHeads(
        MultiScaleRoIAlign(["0"], grid, sampling_ratio=2), BoxHead(model.fc6, model.fc7),
        FastRCNNPredictor(model.feature_dim, len(voc.CLASSES) + 1),
        fg_iou_thresh=det.fg_iou_thresh, bg_iou_thresh=det.bg_iou_thresh,
        batch_size_per_image=det.box_batch_size_per_image, positive_fraction=det.box_positive_fraction,
        bbox_reg_weights=None, score_thresh=det.box_score_thresh, nms_thresh=det.box_nms_thresh,
        detections_per_img=det.detections_per_img)
    heads.bg_lo = det.bg_iou_lo
    transform = GeneralizedRCNNTransform(det.min_size, det.max_size, list(models.MEAN), list(models.STD))
    return GeneralizedRCNN(backbone, rpn, heads, transform)


def fc6_grid(model: models.AlexNetLike) -> int:
    """Side of the square grid fc6 reads (6 for AlexNet): what RoIAlign must pool each proposal to."""
    fc = next(m for m in model.fc6 if isinstance(m, nn.Linear))
    return math.isqrt(fc.in_features // model.trunk_channels)


def freeze_convs(model: models.AlexNetLike, n: int) -> None:
    """Fast R-CNN kept conv1 of the small networks fixed: generic, and fewer parameters to fit on 5k images."""
    for conv in [m for m in model.trunk if isinstance(m, nn.Conv2d)][:n]:
        conv.requires_grad_(False)


def det_sample(voc_root: Path, img: voc.VocImage, flip: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Image as float 0..1 and its non-difficult objects in torchvision's 0-based continuous coordinates."""
    x = read_image(voc_root, img.id).float() / 255
    keep = ~img.difficult
    boxes = torch.from_numpy(img.boxes[keep]).float() - torch.tensor([1.0, 1.0, 0.0, 0.0])
    if flip:
        x = x.flip(-1)
        boxes = torch.stack([x.shape[-1] - boxes[:, 2], boxes[:, 1], x.shape[-1] - boxes[:, 0], boxes[:, 3]], 1)
    return x, {"boxes": boxes, "labels": torch.from_numpy(img.labels[keep]) + 1}


def train_detector(stage: Stage, detector: GeneralizedRCNN, voc_root: Path, images: Sequence[voc.VocImage],
                   det: DictConfig, seed: int, device: torch.device) -> None:
    """SGD over batches of ``images_per_batch`` images, each flipped with probability 1/2."""
    images = [img for img in images if (~img.difficult).any()]  # nothing to learn from the rest
    detector.to(device).train()
    opt, sched = sgd([{"params": [p for p in detector.parameters() if p.requires_grad]}], det.optimizer)
    ckpt = stage.path / "checkpoint.pt"
    start = load_checkpoint(ckpt, detector, opt, sched)
    for it in range(start, det.iterations):
        g = iteration_generator(seed, it)
        batch = [det_sample(voc_root, images[i], bool(torch.rand((), generator=g) < 0.5))
                 for i in batch_indices(len(images), det.images_per_batch, seed, it).tolist()]
        losses = detector([x.to(device) for x, _ in batch],
                          [{k: v.to(device) for k, v in t.items()} for _, t in batch])
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (it + 1) % det.log_every == 0:
            log.info("iter %d/%d loss %.4f (%s) lr %.2g", it + 1, det.iterations, loss.item(),
                     " ".join(f"{k[5:]} {v.item():.3f}" for k, v in losses.items()), sched.get_last_lr()[0])
        if (it + 1) % det.checkpoint_every == 0 or it + 1 == det.iterations:
            save_checkpoint(ckpt, detector, opt, sched, it + 1)


@torch.no_grad()
def detect(detector: GeneralizedRCNN, voc_root: Path, images: Sequence[voc.VocImage], device: torch.device,
           batch: int = 8) -> dict[str, voc.ClassDets]:
    """Detections per class in VOC's 1-based pixel coordinates, images in split order."""
    detector.to(device).eval()
    rows: list[tuple[str, int, float, list[float]]] = []
    for start in range(0, len(images), batch):
        chunk = images[start:start + batch]
        outs = detector([(read_image(voc_root, img.id).float() / 255).to(device) for img in chunk])
        for img, out in zip(chunk, outs):
            boxes = (out["boxes"].cpu().double() + torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64))
            rows += [(img.id, lab - 1, s, b) for lab, s, b in
                     zip(out["labels"].tolist(), out["scores"].double().tolist(), boxes.tolist())]
    return {c: voc.ClassDets(np.array([r[0] for r in rows if r[1] == k], dtype=str),
                             np.array([r[2] for r in rows if r[1] == k], np.float64),
                             np.array([r[3] for r in rows if r[1] == k], np.float64).reshape(-1, 4))
            for k, c in enumerate(voc.CLASSES)}


def run_det(stage: Stage, model: models.AlexNetLike, pretrained: bool, roots: datasets.DataRoots,
            task: DictConfig, seed: int, device: torch.device) -> dict[str, Any]:
    if pretrained:
        freeze_convs(model, task.freeze_convs)
    detector = build_detector(model, task)
    train_detector(stage, detector, roots.voc, voc.load_split(roots.voc, task.train_split), task, seed, device)
    test_imgs = voc.load_split(roots.voc, task.test_split)
    dets = detect(detector, roots.voc, test_imgs, device)
    voc.write_det_results(stage.path / "detections", task.test_split, dets)
    coco = {k: json_number(v) for k, v in evaluate.coco_det_ap(test_imgs, dets).items()}
    return {"ap": evaluate.voc_det_ap(test_imgs, dets, task.metric), "coco": coco,
            "n_images": len(test_imgs), "n_detections": int(sum(len(d.ids) for d in dets.values()))}


# -- the stage ----------------------------------------------------------------------------------------------------
def device_of(cfg: DictConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def voc_identity(cfg: DictConfig) -> Any:
    """What picks the VOC data: the demo's generation settings, or the folder of a real copy."""
    if cfg.data.get("demo") is not None and cfg.data.get("root") is None:
        return OmegaConf.to_container(cfg.data.demo, resolve=True)
    return str(Path(str(cfg.data.voc_root)).expanduser().resolve())


@contextmanager
def log_to(path: Path) -> Iterator[None]:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


def task_spec(task: DictConfig) -> dict[str, Any]:
    """The task config without the settings of the voc-cls protocol not in use (they change nothing)."""
    spec = OmegaConf.to_container(task, resolve=True)
    if task.name == "voc-cls":
        spec.pop("finetune" if task.protocol == "linear" else "linear", None)
    return spec


def stage(cfg: DictConfig) -> Stage:
    """The folder ``run(cfg)`` writes, found without training anything (``ablate run`` plans with it)."""
    return stage_for(cfg, source_of(cfg))


def stage_for(cfg: DictConfig, source: Source) -> Stage:
    task = cfg.task
    if task.name not in ("voc-cls", "voc-det"):
        raise UserError(f"task.name={task.name}: expected voc-cls or voc-det")
    spec = {"pretrain": source.key, "task": task_spec(task), "seed": int(cfg.seed), "voc": voc_identity(cfg),
            "model": OmegaConf.to_container(cfg.model, resolve=True) if source.key == "scratch" else None}
    return Stage(cfg.paths.runs, "transfer", f"{task.name}-{source.name}", spec)


def run(cfg: DictConfig) -> Path:
    """``ablate transfer``: train and score one (pre-trained network, task, seed); reuse a finished folder."""
    source, task, seed = source_of(cfg), cfg.task, int(cfg.seed)
    st = stage_for(cfg, source)
    if st.is_done():
        return st.path
    model = load_network(cfg, source)
    roots = datasets.resolve(cfg, need_voc=True)
    with st.lock():
        if st.is_done():
            return st.path
        st.write_spec()
        atomic_write_text(st.path / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        with log_to(st.path / "log.txt"):
            device = device_of(cfg)
            log.info("transfer %s from %s (seed %d) on %s -> %s", task.name, source.name, seed, device, st.path)
            started = time.perf_counter()
            torch.manual_seed(seed)  # new layers, dropout, proposal sampling: the seed picks them all
            if task.name == "voc-cls":
                result = run_cls(st, model, roots, task, seed, device)
            else:
                result = run_det(st, model, source.key != "scratch", roots, task, seed, device)
            ap = result.pop("ap")
            metrics = {"task": task.name, "metric": task.metric, "map": json_number(evaluate.mean_ap(ap)),
                       "ap": {c: json_number(v) for c, v in ap.items()}, "pretrain": source.key, "seed": seed,
                       "seconds": round(time.perf_counter() - started, 1), **result}
            log.info("%s mAP %.4f (%s) in %.0f s", task.name, evaluate.mean_ap(ap), task.metric, metrics["seconds"])
        atomic_write_json(st.path / "metrics.json", metrics)
        outputs = ["config.yaml", "metrics.json", "checkpoint.pt", "log.txt"]
        outputs += [str(p.relative_to(st.path)) for p in sorted((st.path / "detections").iterdir())]
        st.finish(outputs)
    return st.path


def json_number(v: float) -> float | None:
    """JSON has no NaN: a class without positives in the test split scores null."""
    return None if math.isnan(v) else float(v)
