"""Decode, uint8 augmentation, the resumable sampler and the files dataset: what makes resumes exact."""
from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from omegaconf import OmegaConf
from PIL import Image

from imnet_ablate import loaders


def jpeg(array: np.ndarray, mode: str = "RGB", fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).convert(mode).save(buf, format=fmt, quality=95)
    return buf.getvalue()


@pytest.fixture
def picture() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)


@pytest.mark.parametrize("mode,fmt", [("RGB", "JPEG"), ("L", "JPEG"), ("CMYK", "JPEG"), ("RGB", "PNG")])
def test_decode_gives_rgb_chw_for_every_kind_imagenet_has(picture: np.ndarray, mode: str, fmt: str) -> None:
    img = loaders.decode(jpeg(picture, mode, fmt))
    assert img.dtype == torch.uint8 and img.shape == (3, 30, 40)
    if (mode, fmt) == ("RGB", "PNG"):
        assert torch.equal(img, torch.from_numpy(picture).permute(2, 0, 1))


@pytest.mark.parametrize("data", [b"", b"\xff\xd8\xff\xe0 truncated", b"not an image at all"])
def test_decode_rejects_garbage_with_valueerror(data: bytes) -> None:
    with pytest.raises(ValueError):
        loaders.decode(data)


def test_augmentation_is_a_function_of_the_seed(picture: np.ndarray) -> None:
    img = torch.from_numpy(picture).permute(2, 0, 1).contiguous()
    for mode in ("crop", "resized_crop"):
        t = loaders.Transform(24, 32, mode)
        a, b = t(img, 1), t(img, 1)
        assert a.shape == (3, 24, 24) and a.dtype == torch.uint8 and torch.equal(a, b)
        assert any(not torch.equal(a, t(img, s)) for s in range(2, 6))
    val = loaders.Transform(24, 32, "val")(img, 0)
    resized = loaders.resize_short(img, 32)
    top, left = round((resized.shape[1] - 24) / 2), round((resized.shape[2] - 24) / 2)
    assert resized.shape[1] == 32 and torch.equal(val, resized[:, top:top + 24, left:left + 24])


def test_caffe_crop_is_a_window_of_the_resized_image_or_its_mirror(picture: np.ndarray) -> None:
    img = torch.from_numpy(picture).permute(2, 0, 1).contiguous()
    out = loaders.train_augment(img, 20, 30, "crop", random.Random(3))
    windows = [img[:, t:t + 20, l:l + 20] for t in range(11) for l in range(21)]
    assert any(torch.equal(out, w) or torch.equal(out, w.flip(-1)) for w in windows)


def test_sampler_resumes_mid_epoch_and_changes_order_per_epoch() -> None:
    s = loaders.ResumableSampler(50, seed=7)
    s.set_epoch(3)
    full = list(s)
    assert sorted(i for i, _ in full) == list(range(50)) and len(s) == 50
    s.set_epoch(3, start=20)
    assert list(s) == full[20:] and len(s) == 30
    s.set_epoch(4)
    assert [i for i, _ in s] != [i for i, _ in full]


def test_sampler_shards_like_distributed_sampler() -> None:
    shards = [loaders.ResumableSampler(11, seed=1, rank=r, world=3) for r in range(3)]
    parts = [[i for i, _ in s] for s in shards]
    assert [len(p) for p in parts] == [4, 4, 4] and set(sum(parts, [])) == set(range(11))
    single = [i for i, _ in loaders.ResumableSampler(11, seed=1)]
    assert parts[0] == single[0::3]
    val = [loaders.ResumableSampler(11, seed=0, shuffle=False, rank=r, world=3, pad=False) for r in range(3)]
    assert sorted(i for s in val for i, _ in s) == list(range(11)) and sum(len(s) for s in val) == 11


def test_files_dataset_skips_and_reports_unreadable_images(tmp_path, picture: np.ndarray) -> None:
    (tmp_path / "good.JPEG").write_bytes(jpeg(picture))
    (tmp_path / "bad.JPEG").write_bytes(b"\xff\xd8\xff broken")
    ds = loaders.FilesDataset(tmp_path, ["good.JPEG", "bad.JPEG", "missing.JPEG"], [0, 1, 2],
                              loaders.Transform(24, 32, "crop"))
    images, labels, bad = loaders.collate([ds[(i, 5)] for i in range(3)])
    assert images.shape == (1, 3, 24, 24) and labels.tolist() == [0] and bad == ["bad.JPEG", "missing.JPEG"]


def test_collate_stacks_channel_last_crops_as_channels_last() -> None:
    hwc = torch.randint(0, 256, (2, 40, 50, 3), dtype=torch.uint8)
    crops = [(hwc[i].permute(2, 0, 1)[:, 3:27, 5:29], i, f"{i}") for i in range(2)]  # views, as the packed path
    images, labels, bad = loaders.collate(crops)
    assert torch.equal(images, torch.stack([c.contiguous() for c, _, _ in crops])) and labels.tolist() == [0, 1]
    assert images.is_contiguous(memory_format=torch.channels_last) and bad == []
    planar = loaders.collate([(c.contiguous(), i, p) for c, i, p in crops])[0]  # the files path's CHW decode
    assert torch.equal(planar, images) and planar.is_contiguous()


@pytest.mark.parametrize("box", [(10, 20, 180, 200), (0, 0, 256, 341), (5, 7, 50, 40)])
def test_resize_matches_torchvision_for_both_layouts(box: tuple[int, int, int, int]) -> None:
    hwc = torch.randint(0, 256, (256, 341, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    top, left, h, w = box
    expected = TF.resized_crop(hwc.permute(2, 0, 1).contiguous(), top, left, h, w, [224, 224], antialias=True)
    for img in (hwc.permute(2, 0, 1), hwc.permute(2, 0, 1).contiguous()):  # simplejpeg's layout, planar
        assert torch.equal(loaders._resize_square(img[:, top:top + h, left:left + w], 224), expected)


class ChannelLast(loaders.FilesDataset):
    """Images laid out as simplejpeg decodes them (HWC memory seen as CHW), which collate stacks as NHWC."""

    def __getitem__(self, key: loaders.Key) -> tuple[torch.Tensor | None, int, str]:
        img, label, path = super().__getitem__(key)
        return img.permute(1, 2, 0).contiguous().permute(2, 0, 1), label, path


@pytest.mark.parametrize("dataset", [loaders.FilesDataset, ChannelLast])
def test_batches_do_not_depend_on_worker_count(tmp_path, picture: np.ndarray, dataset: type) -> None:
    paths = []
    for i in range(12):
        (tmp_path / f"{i}.JPEG").write_bytes(jpeg(np.roll(picture, i, axis=1)))
        paths.append(f"{i}.JPEG")
    ds = dataset(tmp_path, paths, list(range(12)), loaders.Transform(24, 32, "crop"))

    def batches(workers: int) -> list[torch.Tensor]:
        cfg = OmegaConf.create({"num_workers": workers, "persistent_workers": False, "prefetch_factor": 2})
        sampler = loaders.ResumableSampler(12, seed=3)
        sampler.set_epoch(1, start=4)
        return [b[0] for b in loaders.make_loader(ds, sampler, 4, cfg, drop_last=True, pin_memory=False)]

    zero, one = batches(0), batches(1)
    assert len(zero) == 2 and all(torch.equal(a, b) for a, b in zip(zero, one))


def test_files_dataset_drops_images_over_the_limit_and_subset_rows_stay_in_the_root(tmp_path, picture) -> None:
    from hostile import bomb_jpeg

    from imnet_ablate.errors import UserError

    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "ok.JPEG").write_bytes(jpeg(picture))
    (tmp_path / "train" / "bomb.JPEG").write_bytes(bomb_jpeg())
    (tmp_path / "train.tsv").write_text("path\tlabel\twnid\ntrain/ok.JPEG\t0\tn1\ntrain/bomb.JPEG\t1\tn2\n")
    (tmp_path / "val.tsv").write_text("path\tlabel\twnid\ntrain/ok.JPEG\t0\tn1\n")
    (tmp_path / "manifest.json").write_text(f'{{"data_root": "{tmp_path}"}}')
    model, train = OmegaConf.create({"input_size": 24, "resize": 32}), OmegaConf.create({"augment": "crop"})
    loader = OmegaConf.create({"name": "files", "max_pixels": 30 * 40})
    ds, _ = loaders.files_datasets(tmp_path, model, train, loader)
    assert ds[(0, 1)][0].shape == (3, 24, 24) and ds[(1, 1)][0] is None  # the bomb: None, never decoded
    loader.max_pixels = 30 * 40 - 1  # the configured limit is the one applied
    ds, _ = loaders.files_datasets(tmp_path, model, train, loader)
    assert ds[(0, 1)][0] is None
    (tmp_path / "train.tsv").write_text("path\tlabel\twnid\ntrain/ok.JPEG\t0\tn1\n../../etc/passwd\t0\tn1\n")
    with pytest.raises(UserError, match=r"train\.tsv:3: path '\.\./\.\./etc/passwd' has a '\.\.' component"):
        loaders.read_split(tmp_path, "train")
