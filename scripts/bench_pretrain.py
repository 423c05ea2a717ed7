"""Images/s of the pre-training step: model only (synthetic uint8 batch already in memory) and end to end (the
``files`` loader over generated JPEGs), per model; on a GPU also torchvision's reference recipe (ImageFolder + PIL
transforms + fp32) on the same images.

CPU (what docs/benchmarks.md records):   python scripts/bench_pretrain.py
GPU (alexnet 224 px, batch 256, bf16, channels_last, compile):   python scripts/bench_pretrain.py --gpu
Prints one Markdown table row per measurement.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image

from imnet_ablate import cpus, loaders, models

CONF = Path(__file__).resolve().parents[1] / "conf"


def write_images(folder: Path, n: int, size: tuple[int, int], classes: int = 10) -> tuple[list[str], list[int]]:
    """``n`` smooth random JPEGs (q90) of ``size`` (w, h) in ImageFolder layout: compress like photos, not noise."""
    rng = np.random.default_rng(0)
    paths, labels = [], []
    for i in range(n):
        small = rng.integers(0, 256, (size[1] // 16 + 1, size[0] // 16 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize(size, Image.BILINEAR)
        rel = f"c{i % classes}/{i}.JPEG"
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        img.save(folder / rel, quality=90)
        paths.append(rel)
        labels.append(i % classes)
    return paths, labels


def make_step(model: torch.nn.Module, dev: torch.device, amp: bool, compile_: bool, normalise: bool = True):
    net = torch.compile(model) if compile_ else model
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        x = x.to(dev, non_blocking=True)
        x = model.normalize(x) if normalise else x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(net(x).float(), y.to(dev, non_blocking=True))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def timed(step, batches, warmup: int, dev: torch.device) -> tuple[float, float]:
    """Images per wall second and per CPU second of this process, over the batches after ``warmup`` (compile,
    cudnn autotune, worker start-up excluded). On a shared machine the CPU figure is the steadier one."""
    n, t0, c0 = 0, 0.0, 0.0
    for i, (x, y) in enumerate(batches):
        if i == warmup:
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0, c0 = time.perf_counter(), time.process_time()
        step(x, y)
        n += len(y) if i >= warmup else 0
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0), n / (time.process_time() - c0)


def bench_model(name: str, args, dev: torch.device, folder: Path, paths, labels) -> None:
    mcfg = OmegaConf.load(CONF / "model" / f"{name}.yaml")
    size = int(mcfg.input_size)
    model = models.build(mcfg, 1000).to(dev, memory_format=torch.channels_last)
    step = make_step(model, dev, args.amp, args.compile)
    x = torch.randint(0, 256, (args.batch, 3, size, size), dtype=torch.uint8)
    y = torch.randint(0, 1000, (args.batch,))
    if dev.type == "cuda":
        x = x.pin_memory()
    model_only, model_cpu = timed(step, [(x, y)] * (args.warmup + args.steps), args.warmup, dev)
    ds = loaders.FilesDataset(folder, paths, labels, loaders.Transform(size, int(mcfg.resize), "crop"))
    lcfg = OmegaConf.create({"num_workers": args.workers, "persistent_workers": False, "prefetch_factor": 4})
    sampler = loaders.ResumableSampler(len(ds), seed=0)
    loader = loaders.make_loader(ds, sampler, args.batch, lcfg, drop_last=True, pin_memory=dev.type == "cuda")
    batches = ((b[0], b[1]) for _, b in zip(range(args.warmup + args.steps), loader))
    end_to_end, _ = timed(step, batches, args.warmup, dev)
    print(f"| {name} | {size} | {args.batch} | {dev.type}{' bf16' if args.amp else ''}"
          f"{' compile' if args.compile else ''} | files, {args.workers} workers | {model_only:,.0f} | "
          f"{model_cpu:,.0f} | {end_to_end:,.0f} | {end_to_end / model_only:.0%} |", flush=True)


def bench_reference(args, dev: torch.device, folder: Path) -> None:
    """torchvision's reference recipe: ImageFolder + PIL RandomResizedCrop/flip/ToTensor/Normalize, fp32."""
    import torchvision
    from torchvision import transforms as T

    tf = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(),
                    T.Normalize(models.MEAN, models.STD)])
    ds = torchvision.datasets.ImageFolder(str(folder), tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch, shuffle=True, num_workers=args.workers,
                                         drop_last=True, pin_memory=dev.type == "cuda")
    model = models.build(OmegaConf.load(CONF / "model" / "alexnet.yaml"), 1000).to(dev)
    step = make_step(model, dev, amp=False, compile_=False, normalise=False)
    rate, _ = timed(step, (b for _, b in zip(range(args.warmup + args.steps), loader)), args.warmup, dev)
    print(f"| alexnet (torchvision reference recipe) | 224 | {args.batch} | {dev.type} fp32 | ImageFolder + PIL, "
          f"{args.workers} workers | | | {rate:,.0f} | |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true", help="alexnet, 224 px, batch 256, bf16, channels_last, compile")
    p.add_argument("--models", nargs="+", default=["alexnet_small", "alexnet", "alexnet_caffe"])
    p.add_argument("--batch", type=int, default=None, help="default: 256 with --gpu; 64 (small) / 16 on CPU")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 50 GPU, 10 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 10 GPU, 2 CPU)")
    p.add_argument("--workers", type=int, default=None, help="loader workers (default: loader.num_workers=auto)")
    p.add_argument("--threads", type=int, default=None, help="torch threads in the main process")
    args = p.parse_args()
    dev = torch.device("cuda" if args.gpu else "cpu")
    if args.gpu:
        args.models = ["alexnet"] if args.models == p.get_default("models") else args.models
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    args.amp = args.compile = args.gpu
    args.steps = args.steps or (50 if args.gpu else 10)
    args.warmup = args.warmup if args.warmup is not None else (10 if args.gpu else 2)
    args.workers = args.workers if args.workers is not None else loaders.worker_count("auto")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {cpus.available()} CPUs, {torch.get_num_threads()} threads, "
          f"{torch.cuda.get_device_name() if args.gpu else 'CPU only'}")
    print("| model | px | batch | device | input | model only img/s | model only img/CPU-s | end to end img/s "
          "| e2e / model |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        written: dict[Path, tuple[list[str], list[int]]] = {}
        for name in args.models:
            big = name != "alexnet_small"
            batch = args.batch or (256 if args.gpu else (16 if big else 64))
            n = batch * (args.warmup + args.steps)
            folder = Path(tmp) / f"{'big' if big else 'small'}-{n}"
            if folder not in written:  # ImageNet-size photos for the 224/227 models, demo-size for the small one
                written[folder] = write_images(folder, n, (500, 375) if big else (32, 32))
            bench_model(name, argparse.Namespace(**{**vars(args), "batch": batch}), dev, folder, *written[folder])
        if args.gpu:
            batch = args.batch or 256
            folder = Path(tmp) / f"big-{batch * (args.warmup + args.steps)}"
            if folder not in written:
                written[folder] = write_images(folder, batch * (args.warmup + args.steps), (500, 375))
            bench_reference(argparse.Namespace(**{**vars(args), "batch": batch}), dev, folder)


if __name__ == "__main__":
    main()
