"""Packed store: a training set as one file of pre-resized JPEG bytes, memory-mapped by every loader worker.

Reading one small file per image (open, stat, read) and decoding a full-size JPEG cost more CPU than the GPU
spends on AlexNet. Packing once per dataset and resolution turns that into a slice of a memory map and a decode of
a ~28 KB JPEG. The store always holds the FULL training listing; subsets are index lists into it
(``PackedStore.indices_for``), so twelve subsets share one pack.

Folder (a ``store.Stage`` of kind ``pack``): ``images.bin`` (concatenated JPEG bytes), ``offsets.npy`` (int64,
n + 1), ``index.tsv`` (``path<TAB>wnid<TAB>sha256_16`` of the stored bytes), ``manifest.json`` (listing checksum,
parameters, counts, the sources that could not be read). Packing runs in chunks, each written atomically to
``chunks/`` so an interrupted pack resumes where it stopped; the chunks are concatenated at the end.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing as mp
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image
from torch.utils.data import Dataset

from . import cpus, inputs, loaders
from .errors import UserError
from .progress import Progress
from .store import Stage, atomic_path, atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

FORMAT = 1  # bump when the stored bytes change for the same parameters
SHOW_BAD = 20  # how many unreadable sources the log and the manifest name


# -- listing ----------------------------------------------------------------------------------------------------
def train_listing(root: Path, cache_dir: Path, listing_file: str | None = None) -> list[tuple[str, str]]:
    """``(path, wnid)`` of every training image (paths relative to ``root``), in wnid then file order, from
    imagenet.py's cached listing."""
    from . import imagenet

    train = imagenet.list_imagenet(Path(root), Path(cache_dir), listing_file).train
    out = [(p, wnid) for wnid in sorted(train) for p in train[wnid].paths()]
    if not out:
        raise UserError(f"{root}: no training images found; expected train/<wnid>/*.JPEG")
    return out


def listing_sha256(listing: Sequence[tuple[str, str]]) -> str:
    return hashlib.sha256("".join(f"{p}\t{w}\n" for p, w in listing).encode()).hexdigest()


# -- one image --------------------------------------------------------------------------------------------------
def encode(data: bytes, short_side: int, quality: int, max_pixels: int = inputs.DEFAULT_MAX_PIXELS) -> bytes:
    """Source bytes -> RGB JPEG bytes with the shorter side at most ``short_side``.

    A baseline RGB JPEG already small enough is kept byte for byte (no second lossy pass); anything else is
    decoded (with libjpeg's DCT scaling first for big originals: ``draft``), resized with LANCZOS and
    re-encoded. Raises ValueError for anything that does not fully decode (truncated, not an image, ...) and for
    an image over ``max_pixels`` (from its header, before decoding: the loaders' rule).
    """
    try:
        with inputs.open_image(io.BytesIO(data), max_pixels) as im:
            w, h = im.size
            scale = short_side / min(w, h)
            if scale >= 1 and im.format == "JPEG" and im.mode == "RGB":
                im.load()  # prove it decodes; a truncated file raises here
                return data
            # the longer side truncated, as torchvision's resize (loaders.resize_short) computes it
            size = (w, h) if scale >= 1 else \
                (short_side, int(short_side * h / w)) if w <= h else (int(short_side * w / h), short_side)
            if im.format == "JPEG" and scale < 1:
                im.draft("RGB", size)  # decode at 1/2, 1/4 or 1/8 scale when that still covers ``size``
            rgb = im.convert("RGB")
            if rgb.size != size:
                rgb = rgb.resize(size, Image.Resampling.LANCZOS)
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"{type(e).__name__}: {e}") from e
    buf = io.BytesIO()
    rgb.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


# -- chunks -----------------------------------------------------------------------------------------------------
def _chunk_paths(chunks: Path, k: int) -> tuple[Path, Path]:
    return chunks / f"{k:06d}.bin", chunks / f"{k:06d}.json"


def chunk_done(chunks: Path, k: int, items: Sequence[tuple[str, str]]) -> bool:
    """A chunk counts when its record exists, covers exactly ``items`` (a rerun with another chunk_size lays
    chunks out differently) and its bytes have the recorded size."""
    bin_path, rec_path = _chunk_paths(chunks, k)
    try:
        rec = json.loads(rec_path.read_text())
        covered = sorted([p for p, _ in rec["items"]] + [p for p, _ in rec["bad"]])
        return covered == sorted(p for p, _ in items) and bin_path.stat().st_size == sum(rec["sizes"])
    except (OSError, ValueError, KeyError, TypeError):
        return False


def pack_chunk(job: tuple[str, str, int, list[tuple[str, str]], int, int, int]) -> int:
    """Encode one chunk of sources into ``chunks/<k>.bin`` + ``<k>.json`` (bytes first, record last, both
    atomic). Returns the number of sources handled (for the progress bar)."""
    root, chunks, k, items, short_side, quality, max_pixels = job
    bin_path, rec_path = _chunk_paths(Path(chunks), k)
    sizes, shas, kept, bad = [], [], [], []
    with atomic_path(bin_path) as tmp, open(tmp, "wb") as f:
        for rel, wnid in items:
            try:
                data = encode((Path(root) / rel).read_bytes(), short_side, quality, max_pixels)
            except (OSError, ValueError) as e:
                bad.append([rel, str(e)[:200]])
                continue
            f.write(data)
            sizes.append(len(data))
            shas.append(hashlib.sha256(data).hexdigest()[:16])
            kept.append([rel, wnid])
    atomic_write_json(rec_path, {"items": kept, "sizes": sizes, "sha256_16": shas, "bad": bad})
    return len(items)


def concatenate(chunks: Path, n_chunks: int, out: Path) -> dict:
    """Join the chunks in order into ``images.bin``, ``offsets.npy`` and ``index.tsv``; return the counts."""
    sizes, rows, bad = [], ["path\twnid\tsha256_16"], []
    with atomic_path(out / "images.bin") as tmp, open(tmp, "wb") as f:
        for k in range(n_chunks):
            bin_path, rec_path = _chunk_paths(chunks, k)
            rec = json.loads(rec_path.read_text())
            with open(bin_path, "rb") as src:
                shutil.copyfileobj(src, f, 1 << 24)
            sizes += rec["sizes"]
            rows += [f"{p}\t{w}\t{s}" for (p, w), s in zip(rec["items"], rec["sha256_16"])]
            bad += rec["bad"]
    offsets = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    with atomic_path(out / "offsets.npy") as tmp, open(tmp, "wb") as f:
        np.save(f, offsets)
    atomic_write_text(out / "index.tsv", "\n".join(rows) + "\n")
    return {"images": len(sizes), "bytes": int(offsets[-1]), "bad": len(bad), "bad_first": bad[:SHOW_BAD]}


def pack(root: Path, listing: Sequence[tuple[str, str]], out: Path, short_side: int, quality: int,
         workers: int, chunk_size: int = 1024, progress: bool = True,
         max_pixels: int = inputs.DEFAULT_MAX_PIXELS) -> dict:
    """Encode ``listing`` (paths relative to ``root``) into the store files in ``out``; resumes from finished
    chunks. Returns the counts written to the manifest."""
    chunks = out / "chunks"
    chunks.mkdir(parents=True, exist_ok=True)
    parts = [list(listing[i:i + chunk_size]) for i in range(0, len(listing), chunk_size)]
    todo = [k for k, items in enumerate(parts) if not chunk_done(chunks, k, items)]
    if len(todo) < len(parts):
        log.info("resuming %s: %d of %d chunks already packed", out, len(parts) - len(todo), len(parts))
    jobs = [(str(root), str(chunks), k, parts[k], short_side, quality, max_pixels) for k in todo]
    bar = Progress(len(listing), "pack", "img", len(listing) - sum(len(parts[k]) for k in todo), enabled=progress)
    if workers > 1 and len(jobs) > 1:
        ctx = mp.get_context("forkserver")  # no fork of a threaded parent (the stage lock's heartbeat)
        ctx.set_forkserver_preload([__name__])  # import torch & co once in the server, not in every worker
        with ctx.Pool(min(workers, len(jobs))) as pool:
            for n in pool.imap_unordered(pack_chunk, jobs):
                bar.update(n)
    else:
        for job in jobs:
            bar.update(pack_chunk(job))
    bar.close()
    counts = concatenate(chunks, len(parts), out)
    counts["sources"] = len(listing)
    return counts


# -- stage ------------------------------------------------------------------------------------------------------
def pack_params(cfg_pack: DictConfig) -> dict:
    return {"short_side": int(cfg_pack.short_side), "quality": int(cfg_pack.quality)}


def ensure(root: Path, listing: Sequence[tuple[str, str]], stage_root: Path, cfg_pack: DictConfig,
           composed: DictConfig | None = None) -> Path:
    """The store folder for ``listing`` under ``root`` at ``cfg_pack``'s resolution; packs it on first use.
    Named after the data root's folder; the hash (data root, listing, parameters) tells stores apart."""
    params = pack_params(cfg_pack)
    name = Path(root).resolve().name
    spec = {"data_root": str(Path(root).resolve()), "listing_sha256": listing_sha256(listing),
            "sources": len(listing), "format": FORMAT, **params}
    stage = Stage(stage_root, "pack", f"{name}-{params['short_side']}px-q{params['quality']}", spec)
    if stage.is_done():
        return stage.path
    with stage.lock():
        if stage.is_done():
            return stage.path
        stage.write_spec()
        if composed is not None:
            from omegaconf import OmegaConf

            atomic_write_text(stage.path / "config.yaml", OmegaConf.to_yaml(composed, resolve=True))
        counts = pack(Path(root), listing, stage.path, params["short_side"], params["quality"],
                      workers=int(cfg_pack.workers) or cpus.available(),
                      chunk_size=int(cfg_pack.chunk_size), progress=bool(cfg_pack.get("progress", True)),
                      max_pixels=loaders.max_pixels(cfg_pack))
        if counts["bad"]:
            log.warning("%d of %d sources could not be read and were skipped; first: %s", counts["bad"],
                        counts["sources"], ", ".join(p for p, _ in counts["bad_first"][:5]))
        if counts["bad"] > float(cfg_pack.max_bad_fraction) * counts["sources"]:
            raise UserError(f"{root}: {counts['bad']} of {counts['sources']} images unreadable (more than "
                            f"pack.max_bad_fraction={cfg_pack.max_bad_fraction}); first: "
                            f"{', '.join(p for p, _ in counts['bad_first'][:5])}")
        atomic_write_json(stage.path / "manifest.json", {**spec, **counts})
        stage.finish(["images.bin", "offsets.npy", "index.tsv", "manifest.json"])
    shutil.rmtree(stage.path / "chunks", ignore_errors=True)
    log.info("packed %d images, %.1f KB/img: %s", counts["images"], counts["bytes"] / max(counts["images"], 1) / 1e3,
             stage.path)
    return stage.path


def run(cfg: DictConfig) -> Path:
    """``ablate pack``: pack the full training listing of ``data``; with a ``subset``, also map it onto the store."""
    from . import subsets
    from .datasets import root as dataset_root

    root = dataset_root(cfg, "imagenet")
    with_subset = cfg.get("subset") is not None and cfg.subset.get("name", "full") != "full"
    if with_subset:
        subsets.stage(cfg)  # a mistake in the subset spec fails now, not after packing the whole training set
    listing = train_listing(root, Path(cfg.paths.cache), cfg.data.get("train_listing"))
    path = ensure(root, listing, Path(cfg.pack.root), cfg.pack, cfg)
    if with_subset:
        paths, _ = loaders.read_split(subsets.build(cfg), "train")
        idx = PackedStore(path).indices_for(paths, strict=False)
        log.info("subset %s: %d of %d training images in the store", cfg.subset.name, int((idx >= 0).sum()),
                 len(paths))
    return path


# -- reading ----------------------------------------------------------------------------------------------------
class PackedStore:
    """Random access to a pack folder. The memory map opens on first ``read`` in each process (so DataLoader
    workers each map the file themselves instead of inheriting or pickling a map)."""

    def __init__(self, folder: Path | str):
        self.folder = Path(folder)
        try:
            self.offsets = np.load(self.folder / "offsets.npy")
        except (OSError, ValueError) as e:
            raise UserError(f"{self.folder}: not a packed store ({e}); run `ablate pack`") from e
        self._data: np.memmap | None = None

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_data": None}

    def read(self, i: int) -> bytes:
        if self._data is None:
            self._data = np.memmap(self.folder / "images.bin", dtype=np.uint8, mode="r")
        return self._data[self.offsets[i]:self.offsets[i + 1]].tobytes()

    def paths(self) -> list[str]:
        """The stored images' source paths (relative to the data root), in store order."""
        lines = (self.folder / "index.tsv").read_text().splitlines()[1:]
        return [line.split("\t", 1)[0] for line in lines]

    def indices_for(self, paths: Iterable[str], strict: bool = True) -> np.ndarray:
        """Store index of each path (int64). Paths not in the store (skipped as unreadable when packing) raise
        a UserError naming them, or map to -1 with ``strict=False``."""
        paths = list(paths)
        where = {p: i for i, p in enumerate(self.paths())}
        idx = np.array([where.get(p, -1) for p in paths], dtype=np.int64)
        if strict and (idx < 0).any():
            missing = [p for p, i in zip(paths, idx) if i < 0]
            raise UserError(f"{self.folder}: {int((idx < 0).sum())} paths not in the store, first: "
                            f"{', '.join(missing[:5])}; was it packed from the same data root?")
        return idx


class PackedDataset(Dataset):
    """The packed backend of ``loaders``: ``__getitem__((index, aug_seed)) -> (uint8 CHW | None, label, path)``,
    with the files backend's ``loaders.Transform`` so crops and flips are the same for the same key."""

    def __init__(self, store: PackedStore, indices: np.ndarray, labels: Sequence[int], paths: Sequence[str],
                 transform: loaders.Transform):
        self.store, self.indices, self.labels, self.paths, self.transform = store, indices, labels, paths, transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: loaders.Key) -> tuple[torch.Tensor | None, int, str]:
        index, seed = key
        i = int(self.indices[index])
        try:
            img = None if i < 0 else self.transform(loaders.decode(self.store.read(i), planar=False), seed)
        except ValueError:
            img = None  # counted and reported by the training loop, as for the files backend
        return img, self.labels[index], self.paths[index]


def build_datasets(subset_dir: Path, model_cfg: DictConfig, train_cfg: DictConfig, loader_cfg: DictConfig
                   ) -> tuple[Dataset, Dataset]:
    """(train, val) for ``loader=packed``: training images from the store of the subset's data root (packed on
    first use), validation images from their files (a single centre crop per epoch gains little from packing)."""
    root = loaders.data_root(subset_dir)
    p = loader_cfg.pack
    folder = loader_cfg.get("store") or ensure(root, train_listing(root, Path(p.cache), p.get("train_listing")),
                                               Path(p.root), p)
    store = PackedStore(folder)
    paths, labels = loaders.read_split(subset_dir, "train")
    indices = store.indices_for(paths, strict=False)
    if (indices < 0).any():
        log.warning("%d training images of %s are not in %s (unreadable when packed); they are skipped",
                    int((indices < 0).sum()), subset_dir, folder)
    train_t, val_t = loaders.transforms(model_cfg, train_cfg)  # squash: the stored image, stretched to a square
    return (PackedDataset(store, indices, labels, paths, train_t),
            loaders.FilesDataset(root, *loaders.read_split(subset_dir, "val"), val_t, loaders.max_pixels(loader_cfg)))
