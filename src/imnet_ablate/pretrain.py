"""``ablate pretrain subset=<preset> [model=...] [train=...]``: train an AlexNet on a subset, resumably.

The folder ``<runs>/pretrain/<subset>-<model>-<hash>`` is keyed by the subset's content, the model, the recipe and
the seed. A finished folder is reused; an interrupted one resumes from ``checkpoint.pt`` (model, optimizer,
scheduler, scaler, every rank's RNG states, epoch and position in it). Image order and augmentation are functions of
(seed, epoch, index) (see ``loaders``), so with ``train.deterministic=true`` a resumed CPU run ends with exactly the
weights of an uninterrupted one. Ctrl-C, SIGTERM and SIGUSR1 (a scheduler's preemption warning) checkpoint the current
step and exit with status 130, saying where the rerun resumes (``interrupts``); rerunning the command resumes.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from . import loaders, models, pack, runtime, store
from .errors import UserError
from .interrupts import Interrupted, StopRequest, resume_note, resumes_with
from .progress import Progress

log = logging.getLogger(__name__)

OUTPUTS = ["config.yaml", "metrics.csv", "metrics.json", "checkpoint.pt", "model.pt", "log.txt"]
METRICS = ["epoch", "iteration", "loss", "top1", "top5", "val_loss", "lr", "images_per_s"]
# train.* keys that change how a run is operated, not what it computes: kept out of the folder hash.
OPERATIONAL = ("devices", "progress", "tensorboard", "log_every", "checkpoint_every", "compile", "max_evaluations")
STOP_POLL = 10  # with several processes, agree on a stop every this many steps (each agreement syncs the GPU)
CHECKPOINT_KEYS = ("stage_hash", "world", "model", "optimizer", "scheduler", "scaler", "rng", "epoch", "pos",
                   "iteration", "history", "stats")
RESTART = "delete it to start this run over"
V01_PROBE = {"enabled": False, "epochs": 1, "lr": 0.01}  # what 0.1's train.imagenet_1k_probe was: see _stage


# -- pure helpers -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """The schedule in iterations for this subset size and number of processes."""
    iters_per_epoch: int
    total_iters: int
    step_iters: int
    epochs: int


def make_plan(t: DictConfig, n_train: int, world: int) -> Plan:
    """``schedule`` is written for ``reference_images``; ``budget`` says whether a subset keeps its epochs or its
    iterations. E.g. the Caffe schedule (450k iterations) on a half-size subset: 225k iterations (same_epochs) or
    450k iterations, i.e. 180 epochs (same_iterations)."""
    batch = int(t.batch_size)
    if batch % world:
        raise UserError(f"train.batch_size={batch}: must be divisible by the number of processes ({world})")
    iters_per_epoch = math.ceil(n_train / world) // (batch // world)
    if iters_per_epoch == 0:
        raise UserError(f"train.batch_size={batch}: larger than the subset's {n_train} training images")
    s = t.schedule
    if s.unit not in ("epoch", "iteration"):
        raise UserError(f"train.schedule.unit={s.unit}: expected epoch or iteration")
    if t.budget not in ("same_epochs", "same_iterations"):
        raise UserError(f"train.budget={t.budget}: expected same_epochs or same_iterations")
    if s.unit == "epoch" and t.budget == "same_epochs":  # whole epochs of the subset itself
        per_unit, scale = float(iters_per_epoch), 1.0
    else:  # the reference set's iterations, scaled by the subset's share of its images for same_epochs
        per_unit = 1.0 if s.unit == "iteration" else int(t.reference_images) / batch
        scale = 1.0 if t.budget == "same_iterations" else n_train / int(t.reference_images)
    total = max(1, round(float(s.length) * per_unit * scale))
    step = max(1, round(float(s.step_every) * per_unit * scale))
    return Plan(iters_per_epoch, total, step, math.ceil(total / iters_per_epoch))


def eval_interval(t: DictConfig, epochs: int) -> int:
    """Epochs between validations: ``eval_every``, widened so that a pre-training validates at most
    ``max_evaluations`` times before its last step (after which it always does). Under same_iterations a small set
    runs many epochs (the demo's 50pc: 600; ImageNet's 50 images per class: about 2300), and validating each would
    cost as much as the training. Validation draws on no random stream the training uses (the loaders have their
    own generators), so how often it runs never changes the network: the key is operational, outside the hash."""
    every, most = int(t.eval_every), t.get("max_evaluations")
    return every if not most else max(every, math.ceil(epochs / int(most)))


def subset_folder(cfg: DictConfig) -> Path:
    """``subset_dir`` if given (a folder built elsewhere), else the subset stage, built if needed."""
    if cfg.get("subset_dir"):
        folder = Path(str(cfg.subset_dir)).expanduser().resolve()
        if not (folder / "manifest.json").is_file():
            raise UserError(f"subset_dir={cfg.subset_dir}: no manifest.json there; expected a subset folder")
        return folder
    from . import subsets

    return subsets.build(cfg)


def subset_key(folder: Path) -> tuple[str, str]:
    """(name, key) of a subset folder: its stage hash when ``ablate subset`` built it (known before it is built,
    so ``ablate run`` can plan), else a hash of its index files (a folder made elsewhere, ``subset_dir=``)."""
    stem, _, suffix = folder.name.rpartition("-")
    name = stem if len(suffix) == 12 and stem else folder.name
    try:
        return name, json.loads((folder / "stage.json").read_text())["hash"]
    except (OSError, ValueError, KeyError):
        pass
    h = hashlib.sha256()
    for index in ("train.tsv", "val.tsv", "classes.tsv"):
        try:
            h.update(store.file_sha256(folder / index).encode())
        except OSError as e:
            raise UserError(f"{folder / index}: cannot read ({e.strerror}); rebuild the subset") from e
    return name, h.hexdigest()[:12]


def _stage(cfg: DictConfig, subset_name: str, key: str) -> store.Stage:
    train = {k: v for k, v in OmegaConf.to_container(cfg.train, resolve=True).items() if k not in OPERATIONAL}
    # 0.1's recipes held the 1000-way probe's settings (off by default); the probe is its own stage now (probe.py).
    # Its 0.1 defaults stay in the spec so that every folder 0.1 trained with the probe off keeps its name.
    train["imagenet_1k_probe"] = V01_PROBE
    spec = {"subset": key, "model": OmegaConf.to_container(cfg.model, resolve=True), "train": train,
            "loader": cfg.loader.name, "seed": int(cfg.seed)}
    return store.Stage(cfg.paths.runs, "pretrain", f"{subset_name}-{cfg.model.name}", spec)


def stage(cfg: DictConfig) -> store.Stage:
    """The pre-training's folder (finished or not) without building or writing anything."""
    if cfg.get("subset_dir"):
        return _stage(cfg, *subset_key(subset_folder(cfg)))
    from . import subsets

    sub = subsets.stage(cfg)
    return _stage(cfg, sub.name.rpartition("-")[0], sub.hash)


def make_stage(cfg: DictConfig, folder: Path) -> tuple[store.Stage, int]:
    """The pre-training's folder for a built subset folder, and the subset's number of classes."""
    try:
        num_classes = int(json.loads((folder / "manifest.json").read_text())["num_classes"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{folder / 'manifest.json'}: cannot read num_classes ({e}); rebuild the subset") from e
    return _stage(cfg, *subset_key(folder)), num_classes


def lr_factor(step_iters: int, gamma: float):
    """Step decay: lr x gamma every ``step_iters`` iterations (a module-level closure keeps the scheduler's
    state_dict free of code)."""
    return lambda it: gamma ** (it // step_iters)


def make_optimizer(model: torch.nn.Module, o: DictConfig) -> torch.optim.SGD:
    """SGD with Caffe's per-blob multipliers: biases get ``bias_lr_mult`` x lr and decay only if ``bias_decay``."""
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    weights = [p for n, p in model.named_parameters() if not n.endswith("bias")]
    return torch.optim.SGD([
        {"params": weights, "lr": o.lr, "weight_decay": o.weight_decay},
        {"params": biases, "lr": o.lr * o.bias_lr_mult, "weight_decay": o.weight_decay if o.bias_decay else 0.0},
    ], lr=o.lr, momentum=o.momentum)


# -- processes, devices, signals ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Context:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(cfg: DictConfig) -> Context:
    """Device, process group (under torchrun), determinism and speed switches."""
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    device = runtime.pick_device(cfg.device, int(os.environ.get("LOCAL_RANK", 0)))
    use_cuda = device.type == "cuda"
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    if cfg.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=use_cuda)  # CUDA max-pool backward has no such kernel
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Context(rank, world, device)


def flag(value: bool, ctx: Context) -> bool:
    """True on every rank if it is true on any (all ranks must agree to stop at the same step)."""
    if ctx.world == 1:
        return value
    t = torch.tensor([float(value)], device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_sum(values: list[float], ctx: Context) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    if ctx.world > 1:
        dist.all_reduce(t)
    return t.tolist()


# -- outputs ----------------------------------------------------------------------------------------------------
def write_metrics_csv(path: Path, history: list[dict[str, Any]], fields: list[str] = METRICS) -> None:
    """One row per epoch (pre-training: ``METRICS``; the probe: its own columns)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    store.atomic_write_text(path, buf.getvalue())


def load_checkpoint(stage: store.Stage, ctx: Context) -> dict[str, Any] | None:
    """The run's checkpoint, if any, after checking it belongs to this config and this number of processes."""
    path = stage.path / "checkpoint.pt"
    ckpt = runtime.load_checkpoint(path, "a pre-training checkpoint", CHECKPOINT_KEYS, RESTART)
    if ckpt is None:
        return None
    if ckpt.get("stage_hash") != stage.hash:
        raise UserError(f"{path}: written for a different config (hash {ckpt.get('stage_hash')}, this run "
                        f"{stage.hash}); delete the folder or rerun with the config recorded in its config.yaml")
    if ckpt["world"] != ctx.world:
        raise UserError(f"{path}: written by {ckpt['world']} processes, this run has {ctx.world}; "
                        f"resume with train.devices={ckpt['world']}")
    return ckpt


def build_datasets(subset_dir: Path, model_cfg: DictConfig, train_cfg: DictConfig, loader_cfg: DictConfig
                   ) -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset]:
    """(train, val) datasets of a subset folder through the configured input pipeline (``loader=files|packed``)."""
    builders = {"files": loaders.files_datasets, "packed": pack.build_datasets}
    if loader_cfg.name not in builders:
        raise UserError(f"loader={loader_cfg.name}: unknown loader; expected one of {', '.join(builders)}")
    return builders[loader_cfg.name](subset_dir, model_cfg, train_cfg, loader_cfg)


# -- the command ------------------------------------------------------------------------------------------------
def run(cfg: DictConfig) -> Path:
    """Build the subset if needed, then train (or resume, or find the finished run)."""
    folder = subset_folder(cfg)
    stage, num_classes = make_stage(cfg, folder)
    if stage.is_done():
        log.info("already trained: %s", stage.path)
        return stage.path
    if int(cfg.train.devices) > 1 and "LOCAL_RANK" not in os.environ:
        return relaunch(cfg, stage)
    ctx = setup(cfg)
    try:
        with stage.lock() if ctx.main else contextlib.nullcontext():
            if not flag(ctx.main and stage.is_done(), ctx):  # someone else finished while we waited
                if ctx.main:
                    stage.write_spec({"subset_dir": str(folder)}, ctx.device)
                    store.atomic_write_text(stage.path / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
                with runtime.log_to(stage.path / "log.txt", ctx.main):
                    train(cfg, stage, folder, num_classes, ctx)
                if ctx.main:
                    stage.finish(OUTPUTS)
            if ctx.world > 1:
                dist.barrier()
    except torch.cuda.OutOfMemoryError as e:
        b = int(cfg.train.batch_size)
        raise UserError(f"train.batch_size={b}: out of GPU memory; try train.batch_size={max(1, b // 2)} "
                        f"(and scale train.optimizer.lr with it)") from e
    finally:
        if ctx.world > 1 and dist.is_initialized():
            dist.destroy_process_group()
    return stage.path


def relaunch(cfg: DictConfig, stage: store.Stage) -> Path:
    """``train.devices=N``: rerun this command under torchrun with N processes; forward preemption signals."""
    from hydra.core.hydra_config import HydraConfig

    n = int(cfg.train.devices)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           "-m", "imnet_ablate.cli", "pretrain", *HydraConfig.get().overrides.task]
    log.info("launching %d processes: %s", n, " ".join(cmd))
    proc = subprocess.Popen(cmd)
    forwarded = False
    with StopRequest() as stop:
        while proc.poll() is None:
            if stop.signum is not None:
                proc.send_signal(signal.SIGTERM)  # torchrun passes SIGTERM on to every worker
                stop.signum, forwarded = None, True
            time.sleep(0.2)
    if proc.returncode == 0:
        return stage.path
    if forwarded or proc.returncode == 130:
        raise Interrupted(resume_note(stage.path))
    raise UserError(f"train.devices={n}: torchrun exited with status {proc.returncode}; see the errors above and "
                    f"{stage.path / 'log.txt'}")


@dataclass
class Training:
    """Everything the loop carries from step to step; ``epoch``/``pos``/``it``/``history``/``stats`` are what a
    checkpoint saves besides the model, optimizer, schedules and random streams."""

    cfg: DictConfig
    stage: store.Stage
    subset_dir: Path
    ctx: Context
    plan: Plan
    num_classes: int
    model: models.Backbone
    net: torch.nn.Module  # the model as trained: compiled and/or wrapped in DDP
    optimizer: torch.optim.SGD
    scheduler: Any
    scaler: Any
    sampler: loaders.ResumableSampler
    loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader
    autocast: Any
    batch: int  # per process
    max_bad: float  # unreadable images allowed per process
    tb: Any
    show: bool  # this process shows progress (rank 0)
    pin: bool  # pinned host memory for batches
    epoch: int = 0
    pos: int = 0  # steps done in the current epoch
    it: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=lambda: {"loss_sum": 0.0, "images": 0, "bad": 0})

    def save(self, loss_sum: float | None = None) -> None:
        """Checkpoint the current step (mid-epoch: with the epoch's loss sum so far); every rank's random streams,
        rank 0 writes."""
        stats = self.stats if loss_sum is None else {**self.stats, "loss_sum": loss_sum}
        rng = [runtime.rng_state(self.ctx.device)]
        if self.ctx.world > 1:
            rng = [None] * self.ctx.world
            dist.all_gather_object(rng, runtime.rng_state(self.ctx.device))
        if self.ctx.main:
            store.atomic_torch_save(self.stage.path / "checkpoint.pt", {
                "stage_hash": self.stage.hash, "world": self.ctx.world, "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "rng": rng, "epoch": self.epoch, "pos": self.pos,
                "iteration": self.it, "history": self.history, "stats": stats})


def setup_training(cfg: DictConfig, stage: store.Stage, folder: Path, num_classes: int, ctx: Context) -> Training:
    """Data, schedule, network, optimizer and loaders of a run; its state from ``checkpoint.pt`` if there is one."""
    t, dev = cfg.train, ctx.device
    train_ds, val_ds = build_datasets(folder, cfg.model, t, cfg.loader)
    plan = make_plan(t, len(train_ds), ctx.world)
    batch = int(t.batch_size) // ctx.world
    amp = {"auto": "bf16" if dev.type == "cuda" else "off"}.get(str(t.amp), str(t.amp))
    compile_ = t.compile is True or (t.compile == "auto" and dev.type == "cuda")
    fmt = torch.channels_last if t.channels_last else torch.contiguous_format
    pin = cfg.loader.pin_memory is True or (cfg.loader.pin_memory == "auto" and dev.type == "cuda")

    torch.manual_seed(int(cfg.seed))  # same initial weights on every rank
    model = models.build(cfg.model, num_classes).to(dev, memory_format=fmt)
    optimizer = make_optimizer(model, t.optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(plan.step_iters, float(t.schedule.gamma)))
    scaler = torch.amp.GradScaler(dev.type, enabled=amp == "fp16")
    net = torch.compile(model) if compile_ else model
    if ctx.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=[dev.index] if dev.type == "cuda" else None)
    sampler = loaders.ResumableSampler(len(train_ds), int(cfg.seed), True, ctx.rank, ctx.world)
    val_sampler = loaders.ResumableSampler(len(val_ds), 0, False, ctx.rank, ctx.world, pad=False)
    tr = Training(
        cfg, stage, folder, ctx, plan, num_classes, model, net, optimizer, scheduler, scaler, sampler,
        loaders.make_loader(train_ds, sampler, batch, cfg.loader, drop_last=True, pin_memory=pin),
        loaders.make_loader(val_ds, val_sampler, batch, cfg.loader, False, pin),
        torch.autocast(dev.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16, enabled=amp != "off"),
        batch, float(cfg.loader.max_bad_fraction) * len(train_ds) / ctx.world,
        tensorboard(stage.path) if t.tensorboard and ctx.main else None,
        ctx.main, pin)
    ckpt = load_checkpoint(stage, ctx)
    if ckpt is not None:
        with store.restoring(stage.path / "checkpoint.pt", "a pre-training checkpoint", RESTART):
            for part in ("model", "optimizer", "scheduler", "scaler"):
                getattr(tr, part).load_state_dict(ckpt[part])
            tr.epoch, tr.pos, tr.it, tr.history, tr.stats = (ckpt[k] for k in ("epoch", "pos", "iteration",
                                                                                 "history", "stats"))
            runtime.set_rng_state(ckpt["rng"][ctx.rank], dev)
        epochs_done, steps_done = divmod(tr.it, plan.iters_per_epoch)  # a checkpoint at an epoch's last step
        log.info("resuming %s with iteration %d of %d (epoch %d of %d, step %d of %d)", stage.path, tr.it + 1,
                 plan.total_iters, epochs_done + 1, plan.epochs, steps_done + 1, plan.iters_per_epoch)
    else:
        torch.manual_seed(int(cfg.seed) + ctx.rank)  # ranks draw different dropout masks
        log.info("training %s: %d images, %d classes, %s; %d iterations (%d epochs of %d), lr /%g every %d",
                 stage.path, len(train_ds), num_classes, cfg.model.name, plan.total_iters, plan.epochs,
                 plan.iters_per_epoch, 1 / float(t.schedule.gamma), plan.step_iters)
    return tr


def train_one_epoch(tr: Training, stop: StopRequest) -> tuple[torch.Tensor, list[str], float, int]:
    """Steps until the epoch (or the schedule) ends, from ``tr.pos``; a stop signal checkpoints at the current step
    and raises KeyboardInterrupt. Returns the epoch's loss sum (on the device), its unreadable images, its start time
    and the images seen before it."""
    t, ctx, dev = tr.cfg.train, tr.ctx, tr.ctx.device
    tr.sampler.set_epoch(tr.epoch, tr.pos * tr.batch)
    tr.net.train()
    t0, seen0, bad_paths = time.perf_counter(), tr.stats["images"], []
    loss_sum = torch.tensor(tr.stats["loss_sum"], dtype=torch.float64, device=dev)  # no per-step GPU sync
    bar = Progress(tr.plan.iters_per_epoch, f"epoch {tr.epoch + 1}/{tr.plan.epochs}", "img", tr.pos,
                   tr.batch * ctx.world, tr.show)  # counts steps, shows images and images/s
    size = int(tr.cfg.model.input_size)
    for images, labels, bad in tr.loader:
        if tr.it >= tr.plan.total_iters:
            break
        tr.stats["bad"] += len(bad)
        bad_paths += bad
        if tr.stats["bad"] > tr.max_bad:
            raise UserError(f"{tr.stats['bad']} unreadable images in {tr.subset_dir} (first: "
                            f"{', '.join(bad_paths[:3])}), more than loader.max_bad_fraction="
                            f"{tr.cfg.loader.max_bad_fraction}; fix the data (ablate data check) or raise the fraction")
        if not len(labels):  # every image of the batch unreadable: a zero-size step keeps ranks in step
            images = torch.zeros(0, 3, size, size, dtype=torch.uint8)
        x = tr.model.normalize(images.to(dev, non_blocking=True))
        y = labels.to(dev, non_blocking=True)
        with tr.autocast:
            loss = F.cross_entropy(tr.net(x).float(), y, reduction="sum") / max(1, len(y))
        tr.optimizer.zero_grad(set_to_none=True)
        tr.scaler.scale(loss).backward()
        tr.scaler.step(tr.optimizer)
        tr.scaler.update()
        tr.scheduler.step()
        tr.it, tr.pos = tr.it + 1, tr.pos + 1
        loss_sum += loss.detach() * len(y)
        tr.stats["images"] += len(y)
        bar.update()
        if tr.it % int(t.log_every) == 0:
            rate = (tr.stats["images"] - seen0) * ctx.world / (time.perf_counter() - t0)
            bar.note(loss=f"{loss.item():.3f}")
            log.info("it %d/%d epoch %d loss %.4f lr %.3g %.0f img/s", tr.it, tr.plan.total_iters, tr.epoch + 1,
                     loss.item(), tr.scheduler.get_last_lr()[0], rate)
            if tr.tb:
                tr.tb.add_scalar("train/loss", loss.item(), tr.it)
        if (ctx.world == 1 or tr.it % STOP_POLL == 0) and flag(stop.signum is not None, ctx):
            tr.save(float(loss_sum))
            bar.close()
            note = (f"{stop.name or 'stop signal'}: checkpointed {tr.stage.path} after iteration {tr.it} (epoch "
                    f"{tr.epoch + 1} of {tr.plan.epochs}, step {tr.pos} of {tr.plan.iters_per_epoch}); "
                    f"{resumes_with(tr.it, tr.plan.total_iters)}")
            log.warning(note)
            if ctx.main:  # e.g. submitit's requeue; rank 0 only, once per job
                stop.pass_on()
            raise Interrupted(note)
        if tr.it % int(t.checkpoint_every) == 0:
            tr.save(float(loss_sum))
    bar.close()
    return loss_sum, bad_paths, t0, seen0


def end_of_epoch(tr: Training, loss_sum: torch.Tensor, bad_paths: list[str], t0: float, seen0: int) -> bool:
    """Epoch summary (validation when due), metrics.csv and a checkpoint; True when the schedule is done."""
    t, ctx = tr.cfg.train, tr.ctx
    if bad_paths:
        log.warning("epoch %d: skipped %d unreadable images (first: %s)", tr.epoch + 1, len(bad_paths),
                    ", ".join(bad_paths[:5]))
    loss_total, images = all_sum([float(loss_sum), tr.stats["images"]], ctx)
    rate = (tr.stats["images"] - seen0) * ctx.world / (time.perf_counter() - t0)
    tr.epoch, tr.pos = tr.epoch + 1, 0
    last = tr.it >= tr.plan.total_iters
    row = {"epoch": tr.epoch, "iteration": tr.it, "loss": round(loss_total / max(1, images), 6), "top1": "",
           "top5": "", "val_loss": "", "lr": float(f"{tr.scheduler.get_last_lr()[0]:.6g}"),
           "images_per_s": round(rate, 1)}
    if tr.epoch % eval_interval(t, tr.plan.epochs) == 0 or last:
        row.update(evaluate(tr.net, tr.model, tr.val_loader, tr.autocast, tr.num_classes, ctx))
    tr.history.append(row)
    tr.stats = {"loss_sum": 0.0, "images": 0, "bad": 0}
    log.info("epoch %d/%d: %s", tr.epoch, tr.plan.epochs, " ".join(f"{k} {v}" for k, v in row.items()))
    if tr.tb:
        for k in ("loss", "top1", "top5", "val_loss"):
            if row[k] != "":
                tr.tb.add_scalar(f"epoch/{k}", row[k], tr.epoch)
    if ctx.main:
        write_metrics_csv(tr.stage.path / "metrics.csv", tr.history)
    tr.save()
    return last


def train(cfg: DictConfig, stage: store.Stage, folder: Path, num_classes: int, ctx: Context) -> None:
    """The whole schedule (or its remainder after a resume), then the final network and its metrics."""
    tr = setup_training(cfg, stage, folder, num_classes, ctx)
    with StopRequest() as stop:
        while tr.epoch < tr.plan.epochs:
            if end_of_epoch(tr, *train_one_epoch(tr, stop)):
                break
    if tr.tb:
        tr.tb.close()
    if ctx.main:
        store.atomic_torch_save(stage.path / "model.pt", tr.model.state_dict())
        final = next(r for r in reversed(tr.history) if r["top1"] != "")
        store.atomic_write_json(stage.path / "metrics.json", {
            "num_classes": num_classes, "train_images": len(tr.loader.dataset), "val_images": len(tr.val_loader.dataset),
            "model": cfg.model.name, "recipe": cfg.train.name, "budget": cfg.train.budget, "plan": asdict(tr.plan),
            "world": ctx.world, "subset_dir": str(folder), "top1": final["top1"], "top5": final["top5"],
            "val_loss": final["val_loss"], "loss": tr.history[-1]["loss"], "iterations": tr.it,
            "epochs": tr.history[-1]["epoch"]})


@torch.no_grad()
def evaluate(net: torch.nn.Module, model: models.Backbone, loader: torch.utils.data.DataLoader, autocast: Any,
             num_classes: int, ctx: Context) -> dict[str, float]:
    """Top-1 / top-5 (%) and mean loss of ``net`` (``model`` as trained) on a val set (centre crops), summed over
    ranks."""
    net.eval()
    k = min(5, num_classes)
    totals = [0.0, 0.0, 0.0, 0.0]  # loss sum, top-1 hits, top-k hits, images
    bad: list[str] = []
    bar = Progress(len(loader), "validation", "batch", enabled=ctx.main)
    for images, labels, bad_batch in loader:
        bar.update()
        bad += bad_batch
        if not len(labels):
            continue
        x = model.normalize(images.to(ctx.device, non_blocking=True))
        y = labels.to(ctx.device, non_blocking=True)
        with autocast:
            logits = net(x).float()
        hits = logits.topk(k, dim=1).indices == y[:, None]
        totals = [a + b for a, b in zip(totals, [F.cross_entropy(logits, y, reduction="sum").item(),
                                                 hits[:, 0].sum().item(), hits.any(1).sum().item(), len(y)])]
    bar.close()
    if bad:
        log.warning("validation: skipped %d unreadable images (first: %s)", len(bad), ", ".join(bad[:5]))
    loss, top1, topk, n = all_sum(totals, ctx)
    n = max(n, 1)
    return {"top1": round(100 * top1 / n, 4), "top5": round(100 * topk / n, 4), "val_loss": round(loss / n, 6)}


def tensorboard(folder: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise UserError("train.tensorboard=true needs the tensorboard package (pip install tensorboard)") from e
    return SummaryWriter(str(folder / "tb"))
