"""Image pipelines for pre-training: decode, uint8 augmentation, a resumable deterministic sampler, DataLoaders.

Batches are uint8 NCHW (a quarter of the bytes of float32 through the worker pipes); normalisation happens on the
device (``Backbone.normalize``). The sampler yields ``(index, aug_seed)`` keys: every image's crop and flip depend
only on ``(seed, epoch, index)``, never on which worker loaded it or whether the epoch was resumed midway, which is
what makes an interrupted run bitwise identical to an uninterrupted one.

Another backend (the packed store) plugs in by providing a Dataset whose ``__getitem__((index, aug_seed))`` returns
``(image uint8 CHW | None, label, path)`` built from :func:`decode`, :func:`train_augment` and :func:`val_transform`.
"""
from __future__ import annotations

import io
import json
import logging
import math
import os
import random
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info
from torchvision.io import ImageReadMode, decode_jpeg

from . import cpus, inputs
from .errors import UserError

try:  # libjpeg-turbo without torch's per-call overhead; optional (extra "fast")
    import simplejpeg
except ImportError:
    simplejpeg = None

log = logging.getLogger(__name__)
# torchvision 0.29 deprecates torchvision.io decoding in favour of torchcodec; it is the fallback decoder here and
# still present, so keep the per-image warning out of training logs.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)

Key = tuple[int, int]  # (dataset index, augmentation seed)


# -- decode and augment (shared by every backend) ---------------------------------------------------------------
def decode(data: bytes, planar: bool = True, max_pixels: int = inputs.DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """JPEG/PNG/... bytes -> uint8 RGB CHW. JPEG: libjpeg-turbo (simplejpeg if installed, else torchvision);
    anything else, and JPEGs those refuse, through PIL (ImageNet has PNGs named .JPEG and CMYK JPEGs).
    Raises ValueError on undecodable bytes, and ``inputs.TooLarge`` (a ValueError) for an image over
    ``max_pixels``, read from its header before anything is decoded or allocated (a 645-byte JPEG can ask for
    20000 x 20000 pixels). ``planar=False`` keeps simplejpeg's HWC memory as a CHW view instead of copying it: the
    packed path's crops, resizes and ``collate`` work on that layout directly."""
    size = inputs.jpeg_size(data) if data[:3] == b"\xff\xd8\xff" else None
    if size is not None:  # a well-formed JPEG header: the fast decoders see the size checked here
        inputs.check_pixels(*size, max_pixels)
        try:
            if simplejpeg is not None:
                img = torch.from_numpy(simplejpeg.decode_jpeg(data, colorspace="RGB")).permute(2, 0, 1)
                return img.contiguous() if planar else img
            return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except (RuntimeError, ValueError):
            pass  # CMYK / truncated / unusual JPEG: let PIL try
    try:
        with inputs.open_image(io.BytesIO(data), max_pixels) as im:
            arr = np.asarray(im.convert("RGB"))
    except (OSError, SyntaxError) as e:  # ValueError (TooLarge included) goes up as it is
        raise ValueError(f"cannot decode image: {e}") from e
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def resize_short(img: torch.Tensor, size: int) -> torch.Tensor:
    """Shorter side to ``size`` (antialiased bilinear), aspect kept; no-op if already there."""
    h, w = img.shape[-2:]
    if min(h, w) == size:
        return img
    return TF.resize(img, [size], antialias=True)


def rescale(img: torch.Tensor, size: int, squash: bool) -> torch.Tensor:
    """The image a crop is taken from: shorter side ``size`` (aspect kept), or ``size`` x ``size`` with ``squash``
    (Caffe's convert_imageset: every image stretched to 256 x 256, as the paper's networks were trained)."""
    if not squash:
        return resize_short(img, size)
    return img if tuple(img.shape[-2:]) == (size, size) else _resize_square(img, size)


def _random_crop_flip(img: torch.Tensor, size: int, rng: random.Random) -> torch.Tensor:
    """Caffe's augmentation: a random ``size`` x ``size`` window, flipped with probability 1/2."""
    h, w = img.shape[-2:]
    if h < size or w < size:
        img = TF.resize(img, [max(size, math.ceil(size * h / min(h, w)))], antialias=True)
        h, w = img.shape[-2:]
    top, left = rng.randrange(h - size + 1), rng.randrange(w - size + 1)
    out = img[:, top:top + size, left:left + size]
    return out.flip(-1) if rng.random() < 0.5 else out


def _resize_square(img: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 CHW -> ``size`` x ``size``, antialiased bilinear: ``TF.resize``'s result without its per-call checks.

    A crop of a channel-last image (simplejpeg's HWC output seen as CHW) is first copied into its own dense
    channel-last tensor: torch's vectorised uint8 kernel then works on packed pixels and returns channel-last too
    (0.30 instead of 0.45 ms for a 224 px output here, same pixels)."""
    if img.stride(0) == 1:
        hwc = img.permute(1, 2, 0).contiguous()
        x = hwc.as_strided((1, *img.shape), (hwc.numel(), 1, hwc.stride(0), hwc.stride(1)))  # 1CHW channels_last
    else:
        x = img.unsqueeze(0)
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]


def _random_resized_crop(img: torch.Tensor, size: int, rng: random.Random,
                         scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3)
                         ) -> torch.Tensor:
    """torchvision's RandomResizedCrop + flip, drawn from ``rng`` (one per image and epoch: reproducible whatever
    the worker; Python's generator costs microseconds where a torch.Generator op costs tens)."""
    h, w = img.shape[-2:]
    area = h * w
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            top, left = rng.randrange(h - ch + 1), rng.randrange(w - cw + 1)
            break
    else:  # fall back to a centre crop at the clamped aspect ratio, as torchvision does
        in_ratio = w / h
        cw, ch = (w, round(w / ratio[0])) if in_ratio < ratio[0] else \
            (round(h * ratio[1]), h) if in_ratio > ratio[1] else (w, h)
        top, left = (h - ch) // 2, (w - cw) // 2
    out = _resize_square(img[:, top:top + ch, left:left + cw], size)
    return out.flip(-1) if rng.random() < 0.5 else out


def train_augment(img: torch.Tensor, size: int, resize: int, mode: str, rng: random.Random, squash: bool = False
                  ) -> torch.Tensor:
    """uint8 CHW -> uint8 ``size`` x ``size`` training crop. ``mode``: ``crop`` (``rescale`` to ``resize``, random
    crop + flip: the Caffe recipe) or ``resized_crop`` (RandomResizedCrop + flip, which picks its own aspect)."""
    if mode == "crop":
        return _random_crop_flip(rescale(img, resize, squash), size, rng)
    if mode == "resized_crop":
        return _random_resized_crop(img, size, rng)
    raise UserError(f"train.augment={mode}: expected crop or resized_crop")


def val_transform(img: torch.Tensor, size: int, resize: int, squash: bool = False) -> torch.Tensor:
    """uint8 CHW -> the centre ``size`` crop of the image ``rescale``d to ``resize``."""
    return TF.center_crop(rescale(img, resize, squash), [size, size])


def aug_seed(seed: int, epoch: int, index: int) -> int:
    """A per-image, per-epoch seed (63 bits) independent of the order images are loaded in."""
    return (seed * 1_000_003 + epoch * 7_919 + index * 2_654_435_761) % (2 ** 63 - 1)


# -- dataset over a subset's TSV files --------------------------------------------------------------------------
@dataclass(frozen=True)
class Transform:
    """What a dataset applies after decoding: a training augmentation or the validation centre crop."""
    size: int
    resize: int
    mode: str  # crop | resized_crop | val
    squash: bool = False  # resize x resize instead of the shorter side (the model config's ``squash``)

    def __call__(self, img: torch.Tensor, seed: int) -> torch.Tensor:
        if self.mode == "val":
            return val_transform(img, self.size, self.resize, self.squash)
        return train_augment(img, self.size, self.resize, self.mode, random.Random(seed), self.squash)


def transforms(model_cfg: DictConfig, train_cfg: DictConfig) -> tuple[Transform, Transform]:
    """(train, val) transforms of a model config (input size, resize, squash) and a recipe (augmentation): the one
    place every backend takes them from."""
    size, resize, squash = int(model_cfg.input_size), int(model_cfg.resize), bool(model_cfg.get("squash", False))
    return Transform(size, resize, str(train_cfg.augment), squash), Transform(size, resize, "val", squash)


def read_split(subset_dir: Path, split: str) -> tuple[list[str], list[int]]:
    """``path`` and ``label`` columns of a subset's ``train.tsv`` / ``val.tsv``; every path must stay inside the
    data root (``inputs.first_escaping``): a subset folder may come from elsewhere (``subset_dir=``)."""
    tsv = Path(subset_dir) / f"{split}.tsv"
    lines = inputs.read_text(tsv, "a subset index file in UTF-8; rebuild the subset with `ablate subset`").splitlines()
    if not lines or lines[0].split("\t")[:2] != ["path", "label"]:
        raise UserError(f"{tsv}: expected a header 'path<TAB>label<TAB>wnid'")
    paths, labels = [], []
    for n, line in enumerate(lines[1:], 2):
        cols = line.split("\t")
        try:
            paths.append(cols[0])
            labels.append(int(cols[1]))
        except (IndexError, ValueError) as e:
            raise UserError(f"{tsv}:{n}: {len(cols)} field(s) or a label that is not an integer; expected "
                            "'path<TAB>label<TAB>wnid'") from e
    if (bad := inputs.first_escaping(paths)) is not None:
        inputs.relative_path(paths[bad], f"{tsv}:{bad + 2}")
    return paths, labels


def data_root(subset_dir: Path) -> Path:
    """The ImageNet root the subset's paths are relative to (``manifest.json``'s ``data_root``)."""
    manifest = Path(subset_dir) / "manifest.json"
    try:
        return Path(json.loads(inputs.read_text(manifest))["data_root"])
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{manifest}: no data_root ({type(e).__name__}); rebuild the subset with `ablate subset`"
                        ) from e


class FilesDataset(Dataset):
    """The reference path: one image file per sample, read and decoded in the worker. An image over
    ``max_pixels`` is unreadable like a corrupt one (None), found from its header without decoding it."""

    def __init__(self, root: Path, paths: list[str], labels: list[int], transform: Transform,
                 max_pixels: int = inputs.DEFAULT_MAX_PIXELS):
        self.root, self.paths, self.labels, self.transform = Path(root), paths, labels, transform
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: Key) -> tuple[torch.Tensor | None, int, str]:
        index, seed = key
        path = self.paths[index]
        try:
            img = self.transform(decode((self.root / path).read_bytes(), max_pixels=self.max_pixels), seed)
        except (OSError, ValueError):
            img = None  # counted and reported by the training loop
        return img, self.labels[index], path


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``torch.stack``, written straight into shared memory in a DataLoader worker (as ``default_collate`` does), so
    the batch reaches the main process without another copy of its bytes."""
    out = None
    if get_worker_info() is not None:
        elem = tensors[0]
        storage = elem._typed_storage()._new_shared(len(tensors) * elem.numel(), device=elem.device)
        out = elem.new(storage).resize_(len(tensors), *elem.shape)
    return torch.stack(tensors, out=out)


def collate(samples: list[tuple[torch.Tensor | None, int, str]]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Stack the good images into a uint8 NCHW batch; return the paths of the unreadable ones beside it.

    Crops of a channel-last decode (simplejpeg's HWC output, seen as CHW) are stacked as NHWC and returned as a
    channels_last NCHW view: each copy is then whole rows of pixels, not a gather of single bytes, and the model
    wants channels_last anyway (``Backbone.normalize``). With shared memory, about 30% more images per CPU-second."""
    good = [(img, label) for img, label, _ in samples if img is not None]
    bad = [path for img, _, path in samples if img is None]
    if not good:
        return torch.empty(0, 3, 0, 0, dtype=torch.uint8), torch.empty(0, dtype=torch.int64), bad
    labels = torch.tensor([label for _, label in good])
    if good[0][0].stride(0) == 1:
        return _stack([img.permute(1, 2, 0) for img, _ in good]).permute(0, 3, 1, 2), labels, bad
    return _stack([img for img, _ in good]), labels, bad


# -- sampler ----------------------------------------------------------------------------------------------------
class ResumableSampler(Sampler[Key]):
    """Epoch order = permutation(seed, epoch); rank r of w takes every w-th entry (padded like DistributedSampler
    so every rank gets the same count) and starts at ``start`` of its share. ``set_epoch`` between epochs."""

    def __init__(self, n: int, seed: int, shuffle: bool = True, rank: int = 0, world: int = 1, pad: bool = True):
        self.n, self.seed, self.shuffle, self.rank, self.world, self.pad = n, seed, shuffle, rank, world, pad
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def shard(self) -> list[int]:
        """This rank's indices for the current epoch, before skipping ``start``."""
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))
            order = order.tolist()
        else:
            order = list(range(self.n))
        if self.pad and self.n % self.world:
            order += order[: self.world - self.n % self.world]
        return order[self.rank::self.world]

    def __len__(self) -> int:
        per_rank = math.ceil(self.n / self.world) if self.pad else len(range(self.rank, self.n, self.world))
        return max(0, per_rank - self.start)

    def __iter__(self) -> Iterator[Key]:
        for index in self.shard()[self.start:]:
            yield index, aug_seed(self.seed, self.epoch, index)


def _seed_worker(worker_id: int) -> None:
    """Workers get distinct numpy/random seeds derived from torch's per-worker seed (set by the DataLoader)."""
    seed = torch.initial_seed() % 2 ** 32
    np.random.seed(seed)
    random.seed(seed)
    torch.set_num_threads(1)


def worker_count(value: int | str, processes: int = 1) -> int:
    """``loader.num_workers``: a number, or ``auto``: the CPUs this process may use, shared by the local training
    processes, less one for the process itself; none with 2 CPUs or fewer, where a worker only competes with the
    training threads (alexnet_small on 2 cores: 1,052 img/s without a worker, 749 with one)."""
    if value != "auto":
        return int(value)
    per_process = cpus.available() // processes
    return 0 if per_process <= 2 else per_process - 1


def make_loader(dataset: Dataset, sampler: ResumableSampler, batch_size: int, loader_cfg: DictConfig,
                drop_last: bool, pin_memory: bool) -> DataLoader:
    """A DataLoader over ``(index, aug_seed)`` keys. Its own generator keeps it from drawing on the global RNG
    (which dropout uses), so creating an iterator mid-run does not change the training's random stream."""
    workers = worker_count(loader_cfg.num_workers, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate,
                      pin_memory=pin_memory, drop_last=drop_last, worker_init_fn=_seed_worker,
                      persistent_workers=bool(loader_cfg.persistent_workers) and workers > 0,
                      prefetch_factor=int(loader_cfg.prefetch_factor) if workers > 0 else None,
                      generator=torch.Generator().manual_seed(sampler.seed))


def files_datasets(subset_dir: Path, model_cfg: DictConfig, train_cfg: DictConfig, loader_cfg: DictConfig
                   ) -> tuple[Dataset, Dataset]:
    """(train, val) for ``loader=files``: every image decoded from its own file."""
    root = data_root(subset_dir)
    train_t, val_t = transforms(model_cfg, train_cfg)
    limit = max_pixels(loader_cfg)
    return (FilesDataset(root, *read_split(subset_dir, "train"), train_t, limit),
            FilesDataset(root, *read_split(subset_dir, "val"), val_t, limit))


def max_pixels(section: DictConfig) -> int:
    """``loader.max_pixels`` or ``pack.max_pixels``: both follow ``data.max_pixels``, the limit ``ablate data
    check`` applies, so an image it calls too large is one every reader refuses."""
    value = OmegaConf.select(section, "max_pixels", default=None, throw_on_resolution_failure=False)
    return int(value or inputs.DEFAULT_MAX_PIXELS)  # a section read on its own (no data.*): the default limit
