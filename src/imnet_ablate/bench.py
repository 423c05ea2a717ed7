"""``ablate bench what=loader|model|train``: where the time goes (input pipeline, network, whole step).

Every loader variant reads the same generated ImageNet-size JPEGs and yields the same output size in one run.
The primary figure is images per CPU-second (main process plus every worker, from /proc), which stays comparable
on a shared machine where wall-clock images/s swings with the neighbours; wall images/s is reported beside it.
Results go to ``<runs>/bench/<what>-<time>/`` and are appended to ``docs/benchmarks.md``.
"""
from __future__ import annotations

import functools
import io
import json
import logging
import multiprocessing
import multiprocessing.pool
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset

from . import cpus, loaders, pack, runtime
from .errors import UserError
from .store import atomic_write_json, atomic_write_text, spec_hash

log = logging.getLogger(__name__)

SECTION = "## Loader benchmark runs"


# -- data -------------------------------------------------------------------------------------------------------
def synthetic_jpeg(rng: np.random.Generator, width: int, height: int, quality: int) -> bytes:
    """A photo-like JPEG: smooth colour field, flat shapes with sharp edges, sensor-like noise (~75 KB at
    500x375 q90, near ImageNet's size per pixel; pure noise would be 3x bigger, flat colour 10x smaller)."""
    base = rng.integers(0, 256, (int(rng.integers(3, 8)), int(rng.integers(3, 8)), 3), dtype=np.uint8)
    img = Image.fromarray(base).resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(5, 20))):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        box = [x, y, x + int(rng.integers(10, 200)), y + int(rng.integers(10, 200))]
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    s = int(rng.integers(10, 24))
    arr = np.asarray(img, dtype=np.int16) + rng.integers(-s, s + 1, (height, width, 1), dtype=np.int16)
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def make_jpegs(folder: Path, n: int, width: int = 500, height: int = 375, quality: int = 90, classes: int = 10,
               seed: int = 0, workers: int = 1) -> Path:
    """``folder/train/<wnid>/<wnid>_<i>.JPEG`` (ImageFolder layout), generated once; returns ``folder``.
    Image i depends only on (seed, i), so the parallel split does not change the files."""
    if (folder / "DONE").is_file():
        return folder
    jobs = [(str(folder), i, min(i + 256, n), width, height, quality, classes, seed) for i in range(0, n, 256)]
    if workers > 1 and len(jobs) > 1:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])
        with ctx.Pool(min(workers, len(jobs))) as pool:
            pool.map(_make_range, jobs)
    else:
        for job in jobs:
            _make_range(job)
    atomic_write_text(folder / "DONE", f"{n}\n")
    return folder


def _make_range(job: tuple[str, int, int, int, int, int, int, int]) -> None:
    folder, start, stop, width, height, quality, classes, seed = job
    for i in range(start, stop):
        wnid = f"n{i % classes:08d}"
        path = Path(folder) / "train" / wnid / f"{wnid}_{i}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(synthetic_jpeg(np.random.default_rng([seed, i]), width, height, quality))


# -- measuring --------------------------------------------------------------------------------------------------
def _proc_cpu(pid: int) -> tuple[int, float]:
    """(parent pid, user+system CPU seconds) of a live process, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds() -> float:
    """CPU time of this process and all its live descendants (DataLoader workers, forkserver children).

    rusage would only count children after they exit; persistent workers are measured while alive instead."""
    procs = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                procs[int(entry)] = _proc_cpu(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    mine, frontier = {os.getpid()}, [os.getpid()]
    while frontier:
        parent = frontier.pop()
        kids = [pid for pid, (ppid, _) in procs.items() if ppid == parent and pid not in mine]
        mine.update(kids)
        frontier += kids
    return sum(procs[pid][1] for pid in mine if pid in procs)


def count_images(batch: object) -> int:
    """Images in a batch, whatever the loader yields (tensor first, or a list of encoded images)."""
    first = batch[0] if isinstance(batch, (tuple, list)) else batch
    return len(first)


Pipeline = tuple[Callable[[], Iterable], Callable]  # (a new epoch's iterator, batch -> images in it)
Run = tuple[int, float, float]  # images, wall seconds, CPU seconds of one epoch


def time_rounds(pipelines: dict[str, Pipeline], repeats: int) -> dict[str, list[Run]]:
    """One warm-up epoch of each pipeline (workers start, page cache fills), then ``repeats`` rounds that time one
    epoch of each in turn. On a shared machine whose speed drifts, every pipeline of a round sees the same drift,
    so ratios are taken within rounds (:func:`round_ratio`)."""
    for make_iter, consume in pipelines.values():
        for batch in make_iter():
            consume(batch)
    runs: dict[str, list[Run]] = {name: [] for name in pipelines}
    for _ in range(repeats):
        for name, (make_iter, consume) in pipelines.items():
            c0, t0 = cpu_seconds(), time.perf_counter()
            n = sum(consume(batch) for batch in make_iter())
            runs[name].append((n, time.perf_counter() - t0, cpu_seconds() - c0))
    return runs


def summary(runs: list[Run]) -> dict:
    """Medians over the timed epochs."""
    n = runs[0][0]
    wall, cpu = statistics.median(r[1] for r in runs), statistics.median(r[2] for r in runs)
    return {"images": n, "wall_s": round(wall, 3), "cpu_s": round(cpu, 3), "img_per_s": round(n / wall, 1),
            "img_per_cpu_s": round(n / max(cpu, 1e-9), 1)}


def round_ratio(runs: list[Run], base: list[Run], column: int = 2) -> float:
    """Median over rounds of images per CPU-second (``column=2``; 1: per wall second) of ``runs`` over ``base``."""
    def rate(run: Run) -> float:
        return run[0] / max(run[column], 1e-9)  # a tiny run can take less than a clock tick of CPU

    return round(statistics.median(rate(a) / rate(b) for a, b in zip(runs, base)), 2)


def time_epochs(make_iter: Callable[[], Iterable], repeats: int, consume: Callable = count_images) -> dict:
    """:func:`summary` of one pipeline timed alone."""
    return summary(time_rounds({"": (make_iter, consume)}, repeats)[""])


# -- loader variants --------------------------------------------------------------------------------------------
def reference_loader(root: Path, n: int, size: int, batch: int, workers: int) -> DataLoader:
    """torchvision's ImageNet recipe: ImageFolder + PIL + RandomResizedCrop + flip + ToTensor + Normalize."""
    from torchvision import datasets, transforms

    from .models import MEAN, STD

    tf = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
                             transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    folder = datasets.ImageFolder(str(root / "train"), tf)
    return _loader(torch.utils.data.Subset(folder, range(min(n, len(folder)))), None, batch, workers, shuffle=True)


def _loader(dataset: Dataset, sampler: object, batch: int, workers: int, collate: Callable | None = None,
            shuffle: bool = False) -> DataLoader:
    return DataLoader(dataset, batch_size=batch, sampler=sampler, shuffle=shuffle, num_workers=workers,
                      collate_fn=collate, persistent_workers=workers > 0, prefetch_factor=4 if workers else None,
                      worker_init_fn=loaders._seed_worker if workers else None)


def _keyed(dataset: Dataset, batch: int, workers: int, collate: Callable = loaders.collate) -> DataLoader:
    return _loader(dataset, loaders.ResumableSampler(len(dataset), seed=0), batch, workers, collate)


class PackedBytes(Dataset):
    """Stored JPEG bytes plus the augmentation key, for decoding the whole batch on the GPU in the main process."""

    def __init__(self, store: pack.PackedStore, indices: np.ndarray):
        self.store, self.indices = store, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: loaders.Key) -> tuple[torch.Tensor, int]:
        index, seed = key
        return torch.frombuffer(bytearray(self.store.read(int(self.indices[index]))), dtype=torch.uint8), seed


def gpu_decode_consumer(transform: loaders.Transform, device: str) -> Callable:
    """Batched ``torchvision.io.decode_jpeg(device=...)`` then the same per-image augmentation, on the device."""
    from torchvision.io import ImageReadMode, decode_jpeg

    def consume(batch: list[tuple[torch.Tensor, int]]) -> int:
        data, seeds = [b for b, _ in batch], [s for _, s in batch]
        images = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        out = torch.stack([transform(img, seed) for img, seed in zip(images, seeds)])
        if out.is_cuda:
            torch.cuda.synchronize()
        return len(out)

    return consume


def _decode_share(job: tuple[pack.PackedStore, loaders.Transform, range]) -> int:
    """One process's share of the floor: decode + augment with one thread, no loader around it."""
    store, transform, indices = job
    torch.set_num_threads(1)
    for i in indices:
        transform(loaders.decode(store.read(i), planar=False), loaders.aug_seed(0, 0, i))
    return len(indices)


def decode_crop_alone(store: pack.PackedStore, transform: loaders.Transform, n: int,
                      pool: multiprocessing.pool.Pool | None, processes: int) -> Callable[[], Iterable]:
    """The floor of a loader: the same decode + augment, without the loader, in as many processes at once as the
    loader has workers (``pool`` of ``processes``; None: in this process, for ``bench.workers=0``). Equal process
    counts keep the comparison fair on SMT machines, where two busy hardware threads of a core each run slower than
    one alone."""
    jobs = [(store, transform, range(k, n, processes)) for k in range(processes)]

    def epoch() -> Iterable[int]:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield sum(pool.map(_decode_share, jobs)) if pool is not None else _decode_share(jobs[0])
        finally:
            torch.set_num_threads(threads)

    return epoch


def litdata_loader(store: pack.PackedStore, out: Path, transform: loaders.Transform, batch: int, workers: int
                   ) -> DataLoader | None:
    """litdata over the same stored JPEG bytes, decoded and augmented the same way; None if not installed."""
    try:
        import litdata
    except ImportError:
        return None
    if not (out / "index.json").is_file():
        litdata.optimize(fn=_litdata_item, inputs=[(str(store.folder), i) for i in range(len(store))],
                         output_dir=str(out), chunk_bytes="64MB", num_workers=1)
    dataset = litdata.StreamingDataset(str(out), shuffle=True, transform=functools.partial(_litdata_sample, transform))
    return litdata.StreamingDataLoader(dataset, batch_size=batch, num_workers=workers,
                                       persistent_workers=workers > 0)


def _litdata_item(job: tuple[str, int]) -> dict:
    folder, i = job
    return {"image": pack.PackedStore(folder).read(i), "i": i}


def _litdata_sample(transform: loaders.Transform, item: dict) -> tuple[torch.Tensor, int]:
    return transform(loaders.decode(item["image"], planar=False), loaders.aug_seed(0, 0, item["i"])), item["i"]


# -- model ------------------------------------------------------------------------------------------------------
def train_step_fn(cfg: DictConfig, device: torch.device) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """One SGD step of ``bench.model`` on a uint8 batch: normalise on the device, bf16 autocast + channels_last
    on CUDA, ``torch.compile`` when ``bench.compile``."""
    from . import models

    model_cfg = OmegaConf.create({"name": cfg.bench.model, "input_size": cfg.bench.size, "resize": 256})
    model = models.build(model_cfg, 1000).to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    net = torch.compile(model) if cfg.bench.compile else model
    amp = device.type == "cuda"

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = torch.nn.functional.cross_entropy(net(model.normalize(x)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_model(cfg: DictConfig, device: torch.device) -> dict:
    """Train steps on one synthetic uint8 batch: what the network costs with no input pipeline."""
    b, s = int(cfg.bench.batch_size), int(cfg.bench.size)
    x = torch.randint(0, 256, (b, 3, s, s), dtype=torch.uint8, device=device)
    y = torch.randint(0, 1000, (b,), device=device)
    step = train_step_fn(cfg, device)

    def epoch() -> Iterable[int]:
        for _ in range(int(cfg.bench.steps)):
            step(x, y)
            yield b
        _sync(device)

    return time_epochs(lambda: [sum(epoch())], 1, consume=lambda k: k)


def bench_train(cfg: DictConfig, device: torch.device, loader: DataLoader) -> dict:
    """Whole train steps fed by ``loader`` (``bench.steps`` batches per epoch)."""
    step = train_step_fn(cfg, device)

    def epoch() -> Iterable[int]:
        k = 0
        while k < int(cfg.bench.steps):
            for x, y, _ in loader:
                step(x.contiguous(memory_format=torch.channels_last), y)
                yield len(x)
                k += 1
                if k == int(cfg.bench.steps):
                    break
        _sync(device)

    return time_epochs(lambda: [sum(epoch())], 1, consume=lambda k: k)


# -- the command ------------------------------------------------------------------------------------------------
def prepare(cfg: DictConfig) -> tuple[Path, pack.PackedStore]:
    """The benchmark JPEGs (generated, or ``data.root`` with ``bench.data=dataset``) and their packed store."""
    b = cfg.bench
    if b.data == "dataset":
        from .datasets import root as dataset_root

        root = dataset_root(cfg, "imagenet")
    else:
        params = {"n": int(b.images), "w": int(b.width), "h": int(b.height), "q": int(b.quality), "gen": 2}
        root = make_jpegs(Path(cfg.paths.cache) / "bench" / f"jpegs-{spec_hash(params)}", params["n"],
                          params["w"], params["h"], params["q"], workers=int(cfg.pack.workers) or cpus.available())
    listing = pack.train_listing(root, Path(cfg.paths.cache), cfg.data.get("train_listing"))[: int(b.images)]
    return root, pack.PackedStore(pack.ensure(root, listing, Path(cfg.pack.root), cfg.pack))


def bench_loaders(cfg: DictConfig, root: Path, store: pack.PackedStore
                  ) -> tuple[list[dict], dict[str, list[Run]]]:
    """Every input pipeline on the same images and output size, timed in interleaved rounds (:func:`time_rounds`);
    each row's ``vs_reference`` is the median within-round ratio of images per CPU-second to the reference."""
    b = cfg.bench
    size, batch, workers = int(b.size), int(b.batch_size), int(b.workers)
    paths = store.paths()
    labels = [0] * len(paths)
    idx = np.arange(len(store))
    rrc, crop = loaders.Transform(size, size, "resized_crop"), loaders.Transform(size, 256, "crop")
    pipelines: dict[str, Pipeline] = {}
    notes: dict[str, str] = {}

    def add(name: str, loader: Iterable | Callable[[], Iterable], note: str, consume: Callable = count_images) -> None:
        pipelines[name] = (loader if callable(loader) else (lambda: loader), consume)
        notes[name] = note

    add("reference", reference_loader(root, len(store), size, batch, workers),
        "ImageFolder+PIL+RandomResizedCrop+flip+ToTensor+Normalize, float32")
    add("files", _keyed(loaders.FilesDataset(root, paths, labels, rrc), batch, workers),
        "original files, loaders.decode + RandomResizedCrop on uint8")
    # The floors' processes, started like DataLoader workers (the default start method) and before the clock.
    pool = multiprocessing.get_context().Pool(workers) if workers else None
    for tf, what in ((rrc, "RandomResizedCrop"), (crop, "Caffe random crop")):
        add(f"packed ({tf.mode})", _keyed(pack.PackedDataset(store, idx, labels, paths, tf), batch, workers),
            f"store at {store_side(store)}px, {what} on uint8")
        add(f"decode+{tf.mode} alone", decode_crop_alone(store, tf, len(store), pool, max(workers, 1)),
            f"{max(workers, 1)} process(es) at once, no DataLoader", consume=lambda k: k)
    lit = litdata_loader(store, Path(cfg.paths.cache) / "bench" / f"litdata-{store.folder.name}", rrc, batch,
                         workers) if b.litdata else None
    if lit is not None:
        add("litdata (resized_crop)", lit, "same stored bytes, same decode + crop")
    device = runtime.pick_device(cfg.device)
    if b.gpu_decode == "force" or (b.gpu_decode == "auto" and device.type == "cuda"):
        add(f"packed-{device.type}-decode", _keyed(PackedBytes(store, idx), batch, workers, collate=list),
            "batched decode_jpeg(device) + RandomResizedCrop", consume=gpu_decode_consumer(rrc, device.type))
    try:
        runs = time_rounds(pipelines, int(b.repeats))
    finally:
        if pool is not None:
            pool.terminate()
    rows = [{"pipeline": name, **summary(r), "vs_reference": round_ratio(r, runs["reference"]), "note": notes[name]}
            for name, r in runs.items()]
    if lit is None:
        rows.append({"pipeline": "litdata (resized_crop)", "note": "off or not installed (pip install litdata)"})
    for row in rows:
        log.info("%s", row)
    return rows, runs


def store_side(store: pack.PackedStore) -> int:
    return int(json.loads((store.folder / "manifest.json").read_text())["short_side"])


def table(rows: list[dict]) -> str:
    cols = ["pipeline", "images", "wall_s", "cpu_s", "img_per_s", "img_per_cpu_s", "vs_reference", "note"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def machine() -> str:
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    import torchvision

    try:
        import simplejpeg

        sj = simplejpeg.__version__
    except ImportError:
        sj = "absent"
    return (f"{platform.node()}, {os.cpu_count()} CPU cores, {cuda}; Python {platform.python_version()}, "
            f"torch {torch.__version__}, torchvision {torchvision.__version__}, simplejpeg {sj}")


def append_doc(doc: Path, entry: str) -> None:
    """Append ``entry`` at the end of the ``Loader benchmark runs`` section (created at the end if missing)."""
    text = doc.read_text() if doc.is_file() else "# Benchmarks\n"
    if SECTION not in text:
        text = text.rstrip("\n") + f"\n\n{SECTION}\n\nAppended by `ablate bench`.\n"
    head, tail = text.split(SECTION, 1)
    nxt = tail.find("\n## ")
    body, rest = (tail, "") if nxt < 0 else (tail[:nxt], tail[nxt:])
    atomic_write_text(doc, head + SECTION + body.rstrip("\n") + "\n\n" + entry.strip("\n") + "\n" + rest)


def run(cfg: DictConfig) -> Path:
    """``ablate bench what=loader|model|train``: time it, print a table, record it."""
    what = str(cfg.what)
    if what not in ("loader", "model", "train"):
        raise UserError(f"what={what}: expected loader, model or train")
    torch.set_num_threads(max(1, int(cfg.bench.threads) or cpus.available()))
    device = runtime.pick_device(cfg.device)
    rows: list[dict] = []
    runs: dict[str, list[Run]] = {}  # per-round (images, wall s, CPU s) of the loader pipelines
    ratio = None
    if what == "loader":
        root, store = prepare(cfg)
        rows, runs = bench_loaders(cfg, root, store)
        packed = runs[f"packed ({cfg.bench.augment})"]
        ratio, wall = round_ratio(packed, runs["reference"]), round_ratio(packed, runs["reference"], column=1)
    else:
        rows.append({"pipeline": f"model-only {cfg.bench.model} {device.type}", **bench_model(cfg, device),
                     "note": f"batch {cfg.bench.batch_size}, {cfg.bench.size}px, synthetic uint8"})
    if what == "train":
        root, store = prepare(cfg)
        ds = pack.PackedDataset(store, np.arange(len(store)), [0] * len(store), store.paths(),
                                loaders.Transform(int(cfg.bench.size), 256, "crop"))
        loader = DataLoader(ds, batch_size=int(cfg.bench.batch_size), num_workers=int(cfg.bench.workers),
                            sampler=loaders.ResumableSampler(len(ds), 0), collate_fn=loaders.collate,
                            pin_memory=device.type == "cuda", persistent_workers=int(cfg.bench.workers) > 0,
                            drop_last=True)
        rows.append({"pipeline": f"train packed {cfg.bench.model} {device.type}", **bench_train(cfg, device, loader),
                     "note": "packed loader + step, Caffe crop"})
    out = Path(cfg.paths.runs) / "bench" / f"{what}-{time.strftime('%Y%m%d-%H%M%S')}"
    command = "ablate bench " + " ".join(sys.argv[1:])
    atomic_write_json(out / "results.json", {"what": what, "rows": rows, "rounds": runs, "machine": machine(),
                                             "command": command, "config": OmegaConf.to_container(cfg, resolve=True)})
    text = table(rows)
    atomic_write_text(out / "table.md", text + "\n")
    if cfg.bench.record:
        append_doc(Path(cfg.bench.doc), f"### {time.strftime('%Y-%m-%d %H:%M')} `{command}`\n\n{machine()}\n\n"
                   + text + ("" if ratio is None else
                             f"\n\npacked ({cfg.bench.augment})/reference images per CPU-second: {ratio:.2f}"))
    print(text)
    if ratio is not None:
        print(f"(packed ({cfg.bench.augment}) vs reference, images per CPU-second; wall-clock ratio {wall:.2f})")
        print(f"packed/reference images/s ratio: {ratio:.2f}")
    return out
