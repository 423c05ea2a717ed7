"""The input rules (``inputs.py``) and the one torch.load (``store.load_torch``) on generated hostile inputs."""
from __future__ import annotations

import io
import os
import random
import resource
from pathlib import Path

import pytest
import torch
from PIL import Image

from hostile import (BAD_SEQUENCES, SEED, bad_names, bomb_jpeg, bomb_png, corrupt_text, crafted_files,
                     escaping_names, escaping_paths, jpeg_bytes, utf16)
from imnet_ablate import inputs, store
from imnet_ablate.errors import UserError
from imnet_ablate.loaders import decode

TEXT = "".join(f"{i:06d} some words\n" for i in range(1, 40))


def one_line(e: pytest.ExceptionInfo) -> str:
    message = str(e.value)
    assert "\n" not in message and "\r" not in message and "\x1b" not in message
    return message


# -- text files ---------------------------------------------------------------------------------------------------
def test_bad_bytes_are_named_by_file_line_and_column_never_by_content(tmp_path):
    rng = random.Random(SEED)
    for k in range(40):
        data, line = corrupt_text(TEXT, rng)
        path = tmp_path / f"split{k}.txt"
        path.write_bytes(data)
        with pytest.raises(UserError) as e:
            inputs.read_text(path)
        message = one_line(e)
        assert message.startswith(f"{path}:{line}: byte 0x") and "is not UTF-8" in message
        assert "some words" not in message
    for seq in BAD_SEQUENCES:  # each bad sequence at the very start
        (tmp_path / "first.txt").write_bytes(seq + b" rest\n")
        with pytest.raises(UserError, match=r"first\.txt:1: byte 0x[0-9a-f]{2} at column [1-4] "):
            inputs.read_text(tmp_path / "first.txt")
    (tmp_path / "utf16.txt").write_bytes(utf16(TEXT))
    with pytest.raises(UserError, match=r"utf16\.txt:1: byte 0xff at column 1 is not UTF-8"):
        inputs.read_text(tmp_path / "utf16.txt", key="data.train_listing")


def test_good_text_and_a_byte_order_mark(tmp_path):
    (tmp_path / "a.txt").write_bytes("\ufeffcafé\n".encode())
    assert inputs.read_text(tmp_path / "a.txt") == "café\n"


def test_only_regular_files_are_read_and_nothing_blocks(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "folder").mkdir()
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "device").symlink_to("/dev/zero")  # would read forever
    (tmp_path / "file").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "file")
    expected = {"fifo": "cannot read: it is a FIFO", "folder": "cannot read: it is a folder",
                "device": "cannot read: it is a character device",
                "dangling": "cannot read", "missing": "cannot read"}
    for name, words in expected.items():
        with pytest.raises(UserError, match=f"{tmp_path / name}: {words}"):
            inputs.read_text(tmp_path / name)
    assert inputs.read_text(tmp_path / "link") == "x"  # links are followed
    assert inputs.is_present(tmp_path / "link") and not inputs.is_present(tmp_path / "missing")
    for name, words in {"fifo": "is a FIFO", "folder": "is a folder", "dangling": "broken symbolic link"}.items():
        with pytest.raises(UserError, match=f"{tmp_path / name}: {words}"):
            inputs.is_present(tmp_path / name)


# -- names and paths ----------------------------------------------------------------------------------------------
def test_bad_names_are_found_and_shown_escaped(tmp_path):
    for raw in bad_names(random.Random(SEED), 30):
        name = os.fsdecode(raw)
        assert inputs.name_problem(name), raw
        shown = inputs.shown(name)
        assert not inputs.BAD_CHARS.search(shown) and shown.isprintable(), shown
    assert inputs.shown("a\tb\udcffc\x1b") == "a\\tb\\xffc\\x1b"
    assert inputs.name_problem("café.JPEG") is None and inputs.name_problem("n01440764_1 (copy).JPEG") is None


def test_plain_names_refuse_paths_and_control_characters():
    for value in escaping_names(random.Random(SEED), 20):
        with pytest.raises(UserError) as e:
            inputs.plain_name(value, "split")
        assert one_line(e).startswith("split=") and "expected a plain name" in str(e.value)
    for value in ("test", "trainval", "2008_000001", "demo-1", "a b"):
        assert inputs.plain_name(value, "split") == value


def test_paths_from_data_cannot_leave_their_root():
    rng = random.Random(SEED)
    good = [f"train/n01440764/n01440764_{i}.JPEG" for i in range(200)]
    assert inputs.first_escaping(good) is None
    for bad in escaping_paths(rng, 40) + ["", "train/a\tb.JPEG", "train/\x1b[2J.JPEG", "train/x\n.JPEG"]:
        with pytest.raises(UserError):
            inputs.relative_path(bad, "listing:3")
        at = rng.randrange(len(good) + 1)
        assert inputs.first_escaping(good[:at] + [bad] + good[at:]) == at, bad
    assert inputs.inside("/data", "train/x.JPEG", "k") == Path("/data/train/x.JPEG")
    assert inputs.relative_path("./train/x..JPEG", "k") == "./train/x..JPEG"  # dots inside a name are fine


def test_links_leaving_the_root_are_recognised(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "a").mkdir(parents=True)
    outside.mkdir()
    (root / "in").symlink_to(root / "a")
    (root / "out").symlink_to(outside)
    assert not inputs.leaves_root(root / "in", root) and inputs.leaves_root(root / "out", root)
    assert inputs.leaves_root(root / "out" / "x.JPEG", root)


# -- images -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("save", [{}, {"progressive": True}, {"optimize": True}, {"quality": 3},
                                  {"exif": b"Exif\0\0" + bytes(60000)}, {"subsampling": 0}])
def test_jpeg_size_reads_the_frame_header_as_pil_does(save):
    rng = random.Random(SEED)
    for _ in range(5):
        size = (rng.randrange(1, 300), rng.randrange(1, 300))
        data = jpeg_bytes(size, seed=rng.randrange(100), **save)
        assert inputs.jpeg_size(data) == Image.open(io.BytesIO(data)).size == size


def test_jpeg_size_gives_up_on_malformed_headers():
    good = jpeg_bytes()
    assert inputs.jpeg_size(good[:20]) is None  # cut before the frame header
    assert inputs.jpeg_size(b"\xff\xd8\xff\xda" + good[4:]) is None  # a scan before any frame header
    assert inputs.jpeg_size(b"\xff\xd8\x00\x00garbage") is None


def test_images_over_the_limit_are_refused_from_the_header():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for bomb in (bomb_jpeg(), bomb_jpeg(65535, 65535, progressive=True), bomb_png()):
        assert len(bomb) < 5000
        with pytest.raises(inputs.TooLarge, match="over data.max_pixels=89478485"):
            decode(bomb)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 200  # decoding the first would have taken 1.2 GB
    small = jpeg_bytes((64, 48))
    assert decode(small, max_pixels=64 * 48).shape == (3, 48, 64)
    with pytest.raises(inputs.TooLarge, match="64x48 is 3072 pixels"):
        decode(small, max_pixels=64 * 48 - 1)  # the limit is configurable
    buf = io.BytesIO()
    Image.new("RGB", (64, 48)).save(buf, "PNG")
    with pytest.raises(inputs.TooLarge):
        decode(buf.getvalue(), max_pixels=100)  # other formats: PIL's header


# -- torch files --------------------------------------------------------------------------------------------------
def test_load_torch_refuses_every_crafted_file_in_one_line(tmp_path):
    for name, (path, words) in crafted_files(tmp_path).items():
        with pytest.raises(UserError) as e:
            store.load_torch(path, "a checkpoint", advice="delete it to start over",
                             valid=lambda c: isinstance(c, dict))
        message = one_line(e)
        assert message.startswith(f"{path}: ") and words in message and message.endswith("delete it to start over")
    assert not (tmp_path / "PWNED").exists()
    with pytest.raises(UserError, match="tensor.pt: no 'model' entry; expected a checkpoint$"):
        store.load_torch(tmp_path / "tensor.pt", "a checkpoint", ("model",))


def test_load_torch_checks_shape_and_restoring_names_the_file(tmp_path):
    path = tmp_path / "feats.pt"
    torch.save(torch.zeros(3, 5), path)
    assert store.load_torch(path, "features", valid=lambda t: t.shape == (3, 5)).shape == (3, 5)
    with pytest.raises(UserError, match="a Tensor of another shape or type; expected 4 features"):
        store.load_torch(path, "4 features", valid=lambda t: len(t) == 4)
    model = torch.nn.Linear(2, 2)
    with pytest.raises(UserError) as e:
        with store.restoring(path, "a linear layer's weights"):
            model.load_state_dict({"weight": torch.zeros(3, 3)})
    assert one_line(e).startswith(f"{path}: does not fit (RuntimeError: Error(s) in loading state_dict")
