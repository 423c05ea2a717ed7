"""The packed store: same pixels as the files path, subset indices, resume after a kill, bad sources, same crops."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from imnet_ablate import loaders, pack
from imnet_ablate.errors import UserError

from conftest import REPO, run_ablate, run_dir_of


def pack_cfg(**kw) -> OmegaConf:
    return OmegaConf.create({"short_side": 128, "quality": 95, "workers": 1, "chunk_size": 4,
                             "max_bad_fraction": 0.5, "progress": False, **kw})


def photo(seed: int, w: int, h: int) -> Image.Image:
    """Smooth colours plus mild noise: JPEG-friendly, so decode differences stay small."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
    arr = np.asarray(img, dtype=np.int16) + rng.integers(-4, 5, (h, w, 1), dtype=np.int16)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def save(img: Image.Image, path: Path, fmt: str = "JPEG", **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    path.write_bytes(buf.getvalue())


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """train/<wnid>/: big RGB JPEGs, one already small enough, a CMYK JPEG, a greyscale one, a PNG named .JPEG."""
    root = tmp_path / "imnet"
    for i in range(6):
        save(photo(i, 320 + 40 * i, 240), root / "train" / f"n0000000{i % 2}" / f"img_{i}.JPEG", quality=95)
    save(photo(10, 150, 100), root / "train" / "n00000002" / "small.JPEG", quality=95)
    save(photo(11, 300, 200).convert("CMYK"), root / "train" / "n00000002" / "cmyk.JPEG", quality=95)
    save(photo(12, 200, 300).convert("L"), root / "train" / "n00000003" / "grey.JPEG", quality=95)
    save(photo(13, 256, 256), root / "train" / "n00000003" / "png.JPEG", fmt="PNG")
    return root


def build(root: Path, out: Path, cache: Path, **kw) -> pack.PackedStore:
    return pack.PackedStore(pack.ensure(root, pack.train_listing(root, cache), out, pack_cfg(**kw)))


def test_store_round_trips_to_the_files_path_pixels(tree: Path, tmp_path: Path):
    store = build(tree, tmp_path / "runs", tmp_path / "cache")
    paths = store.paths()
    assert len(store) == 10 and paths == sorted(paths, key=lambda p: (p.split("/")[1], p))
    for i, rel in enumerate(paths):
        packed = loaders.decode(store.read(i), planar=False)
        files = loaders.decode((tree / rel).read_bytes())
        if min(files.shape[1:]) > 128:
            files = loaders.resize_short(files, 128)
        assert packed.shape == files.shape, rel
        assert (packed.float() - files.float()).abs().mean() < 3.0, rel
    small = paths.index("train/n00000002/small.JPEG")
    assert store.read(small) == (tree / paths[small]).read_bytes()  # kept byte for byte, no second lossy pass
    manifest = json.loads((store.folder / "manifest.json").read_text())
    assert manifest["images"] == 10 and manifest["bad"] == 0 and manifest["short_side"] == 128
    assert not (store.folder / "chunks").exists()


def test_subset_indices_map_paths_to_their_images(tree: Path, tmp_path: Path):
    store = build(tree, tmp_path / "runs", tmp_path / "cache")
    paths = store.paths()
    subset = [paths[7], paths[2], paths[5]]
    idx = store.indices_for(subset)
    assert [paths[i] for i in idx] == subset
    assert [store.read(i) for i in idx] == [store.read(paths.index(p)) for p in subset]
    with pytest.raises(UserError, match="1 paths not in the store.*train/nope.JPEG"):
        store.indices_for([paths[0], "train/nope.JPEG"])
    assert store.indices_for([paths[0], "train/nope.JPEG"], strict=False).tolist() == [0, -1]


def test_bad_sources_are_reported_and_skipped(tree: Path, tmp_path: Path):
    good = (tree / "train/n00000000/img_0.JPEG").read_bytes()
    (tree / "train/n00000001/truncated.JPEG").write_bytes(good[: len(good) // 2])
    (tree / "train/n00000001/text.JPEG").write_text("not an image")
    (tree / "train/n00000001/empty.JPEG").write_bytes(b"")
    store = build(tree, tmp_path / "runs", tmp_path / "cache")
    manifest = json.loads((store.folder / "manifest.json").read_text())
    bad = sorted(p for p, _ in manifest["bad_first"])
    assert manifest["bad"] == 3 and manifest["images"] == 10 and len(store) == 10
    assert bad == [f"train/n00000001/{n}.JPEG" for n in ("empty", "text", "truncated")]
    ds = pack.PackedDataset(store, store.indices_for(bad + store.paths()[:1], strict=False), [0, 1, 2, 3],
                            bad + store.paths()[:1], loaders.Transform(64, 64, "crop"))
    assert [ds[(i, 0)][0] is None for i in range(4)] == [True, True, True, False]
    with pytest.raises(UserError, match="3 of 13 images unreadable"):
        build(tree, tmp_path / "runs2", tmp_path / "cache", max_bad_fraction=0.1)


def test_packed_dataset_gives_the_files_crops(tmp_path: Path):
    """Sources already at the store's size are stored as is, so the two backends must agree pixel for pixel."""
    root = tmp_path / "imnet"
    for i in range(3):
        save(photo(i, 170 + 10 * i, 128), root / "train" / "n00000000" / f"img_{i}.JPEG", quality=90)
    store = build(root, tmp_path / "runs", tmp_path / "cache")
    paths = store.paths()
    for mode in ("crop", "resized_crop"):
        tf = loaders.Transform(96, 128, mode)
        files = loaders.FilesDataset(root, paths, [0, 1, 2], tf)
        packed = pack.PackedDataset(store, store.indices_for(paths), [0, 1, 2], paths, tf)
        for key in [(0, 11), (1, 12), (2, 13), (2, 14)]:
            a, b = files[key], packed[key]
            assert a[1:] == b[1:] and a[0].shape == b[0].shape == (3, 96, 96)
            assert (a[0].int() - b[0].int()).abs().max() <= 1, (mode, key)
        assert not torch.equal(packed[(0, 11)][0], packed[(0, 12)][0])  # the seed does pick the crop


def test_interrupted_pack_resumes(tmp_path: Path, monkeypatch):
    """kill -9 in the middle of a chunk (the 11th image of 24, chunks of 2), then the same call again."""
    root = tmp_path / "imnet"
    for i in range(24):
        save(photo(i, 300, 200), root / "train" / f"n0000000{i % 3}" / f"img_{i:02d}.JPEG", quality=95)
    cache = tmp_path / "cache"
    script = ("import os, signal, sys; from pathlib import Path; from omegaconf import OmegaConf;"
              "from imnet_ablate import pack;"
              "root, runs, cache = map(Path, sys.argv[1:4]); real, calls = pack.encode, [];"
              "pack.encode = lambda *a: (calls.append(1), len(calls) == 11 and os.kill(os.getpid(), signal.SIGKILL),"
              " real(*a))[2];"
              "cfg = OmegaConf.create({'short_side': 128, 'quality': 95, 'workers': 1, 'chunk_size': 2,"
              " 'max_bad_fraction': 0.0, 'progress': False});"
              "pack.ensure(root, pack.train_listing(root, cache), runs, cfg)")
    child = subprocess.run([sys.executable, "-c", script, str(root), str(tmp_path / "runs"), str(cache)],
                           env={**os.environ, "PYTHONPATH": str(REPO / "src")}, timeout=120)
    assert child.returncode == -signal.SIGKILL
    (folder,) = (tmp_path / "runs" / "pack").iterdir()
    assert len(list((folder / "chunks").glob("*.json"))) == 5 and (folder / "LOCK").exists()
    assert not (folder / "DONE").exists()

    calls = []
    real = pack.pack_chunk
    monkeypatch.setattr(pack, "pack_chunk", lambda job: calls.append(job[2]) or real(job))
    resumed = build(root, tmp_path / "runs", cache, chunk_size=2, max_bad_fraction=0.0)
    assert resumed.folder == folder and sorted(calls) == list(range(5, 12))  # finished chunks were kept
    fresh = build(root, tmp_path / "fresh", cache, chunk_size=2, max_bad_fraction=0.0)
    assert (resumed.folder / "images.bin").read_bytes() == (fresh.folder / "images.bin").read_bytes()
    assert np.array_equal(resumed.offsets, fresh.offsets) and len(resumed) == 24
    assert not (folder / "LOCK").exists() and not list(folder.glob(".*.tmp"))


def test_ablate_pack_cli_packs_once(tree: Path, tmp_path: Path):
    args = ["pack", "data=imagenet", f"data.root={tree}", f"paths.runs={tmp_path / 'runs'}",
            f"paths.cache={tmp_path / 'cache'}", "pack.short_side=100", "pack.workers=2", "pack.chunk_size=3"]
    first = run_ablate(*args, timeout=120)
    assert first.returncode == 0, first.stderr
    folder = run_dir_of(first)
    assert folder.name.startswith("imnet-100px-q90-") and (folder / "DONE").is_file()
    store = pack.PackedStore(folder)
    assert len(store) == 10 and max(min(loaders.decode(store.read(i)).shape[1:]) for i in range(10)) == 100
    stamp = (folder / "DONE").stat().st_mtime_ns
    again = run_ablate(*args, timeout=120)
    assert run_dir_of(again) == folder and (folder / "DONE").stat().st_mtime_ns == stamp


def test_loader_packed_config_builds_the_subset_datasets(demo_cache: Path, tmp_path: Path):
    """``loader=packed`` as pretrain composes it: the store is packed on first use and gives the files crops."""
    from hydra import compose, initialize_config_dir

    from conftest import tiny_demo_overrides
    from imnet_ablate import subsets
    from imnet_ablate.config import conf_dir

    overrides = tiny_demo_overrides(demo_cache, tmp_path / "runs") + ["loader=packed", "loader.pack.workers=1",
                                                                       "subset=wordnet-9"]
    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        cfg = compose(config_name="pretrain", overrides=overrides)
    folder = subsets.build(cfg)
    train, val = pack.build_datasets(folder, cfg.model, cfg.train, cfg.loader)
    files = loaders.FilesDataset(loaders.data_root(folder), *loaders.read_split(folder, "train"), train.transform)
    assert isinstance(train, pack.PackedDataset) and len(train) == len(files) > 0
    assert (train.store.folder / "DONE").is_file() and str(train.store.folder).startswith(str(tmp_path / "runs"))
    for key in [(0, 1), (len(train) - 1, 2)]:
        a, b = files[key], train[key]
        assert a[1:] == b[1:] and (a[0].int() - b[0].int()).abs().max() <= 1
    assert isinstance(val, loaders.FilesDataset)  # validation stays on the files path


def test_a_bad_subset_spec_fails_before_anything_is_packed(tree: Path, tmp_path: Path):
    from hydra import compose, initialize_config_dir

    from imnet_ablate.cli import conf_dir

    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        cfg = compose(config_name="pack", overrides=[
            "data=imagenet", f"data.root={tree}", "data.voc_root=unused", f"paths.runs={tmp_path / 'runs'}",
            f"paths.cache={tmp_path / 'cache'}", "subset=wordnet-127", "subset.num_classes=5"])
    with pytest.raises(UserError, match="subset.num_classes=5: the spec gives 127 classes"):
        pack.run(cfg)
    assert not (tmp_path / "runs").exists()
