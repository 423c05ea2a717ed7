"""Generated hostile inputs, one family per input class, shared by the tests of the input rules (test_inputs,
test_datacheck) and the fault-injection suite (test_hostile). Seeded: the same inputs every run."""
from __future__ import annotations

import io
import os
import pickle
import random
import struct
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

SEED = 20261201


def jpeg_bytes(size: tuple[int, int] = (64, 48), seed: int = 0, **save: object) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", **save)
    return buf.getvalue()


def bomb_jpeg(width: int = 20000, height: int = 20000, progressive: bool = False) -> bytes:
    """A few hundred bytes whose frame header asks for ``width`` x ``height`` pixels: an 8x8 JPEG with its SOF
    patched. libjpeg decodes it to a full-size image (the missing data is grey): 1.2 GB at 20000 x 20000."""
    data = bytearray(jpeg_bytes((8, 8), progressive=progressive))
    i = 2
    while data[i + 1] not in (0xC0, 0xC1, 0xC2):
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    data[i + 5:i + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A valid PNG header asking for ``width`` x ``height`` RGB pixels, with a few compressed rows of zeros."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    rows = zlib.compress(b"\0" * (1 + 3 * width) * 4)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", rows) + chunk(b"IEND", b""))


# -- text that is not UTF-8 ---------------------------------------------------------------------------------------
BAD_SEQUENCES = [b"\xff", b"\xfe\xff", b"\xc3\x28", b"\xe2\x82", b"\xf0\x28\x8c\xbc", b"caf\xe9", b"\x80",
                 b"\xed\xa0\x80"]  # lone bytes, bad continuations, truncated sequences, latin-1, a UTF-16 surrogate


def corrupt_text(text: str, rng: random.Random) -> tuple[bytes, int]:
    """``text`` as UTF-8 with one bad sequence spliced into a random line; (bytes, 1-based line of the damage)."""
    lines = text.splitlines(keepends=True)
    k = rng.randrange(len(lines))
    line = lines[k].encode()
    cut = rng.randrange(len(line.rstrip(b"\n")) + 1)
    lines_b = [x.encode() for x in lines]
    lines_b[k] = line[:cut] + rng.choice(BAD_SEQUENCES) + line[cut:]
    return b"".join(lines_b), k + 1


def utf16(text: str) -> bytes:
    return text.encode("utf-16")  # a BOM and NUL bytes: what a Windows editor may save


# -- names --------------------------------------------------------------------------------------------------------
CONTROL = ["\t", "\n", "\r", "\x00", "\x01", "\x08", "\x1b[31m", "\x1b]0;title\x07", "\x7f", "\x85", "\x9b"]
UNDECODABLE = [b"\xff", b"\xc3", b"\xe9", b"\x80\x80"]


def bad_names(rng: random.Random, n: int, suffix: str = ".JPEG") -> list[bytes]:
    """File names (bytes, as the file system holds them) each with a control character or bytes that are not
    UTF-8 at a random place; NUL is left out (no file system name can hold it)."""
    out = []
    for i in range(n):
        stem = f"img{i:03d}"
        cut = rng.randrange(len(stem) + 1)
        bad = (rng.choice(CONTROL[:3] + CONTROL[4:]).encode() if i % 2 == 0 else rng.choice(UNDECODABLE))
        out.append(stem[:cut].encode() + bad + stem[cut:].encode() + suffix.encode())
    return out


def make_file(folder: Path, name: bytes, data: bytes) -> None:
    with open(os.path.join(os.fsencode(folder), name), "wb") as f:
        f.write(data)


# -- paths that would leave their root ----------------------------------------------------------------------------
def escaping_paths(rng: random.Random, n: int) -> list[str]:
    """Relative-looking paths that leave their root, or absolute ones, in random shapes."""
    shapes = ["../{x}", "../../{x}", "{x}/../../../{y}", "/{x}/{y}", "/etc/passwd", "..", "{x}/..", "./../{x}",
              "{x}/./../../{y}", "//{x}"]
    out = []
    for _ in range(n):
        x, y = rng.choice(["train", "val", "etc", "a"]), rng.choice(["passwd", "x.JPEG", "n01440764"])
        out.append(rng.choice(shapes).format(x=x, y=y))
    return out


def escaping_names(rng: random.Random, n: int) -> list[str]:
    """Values for keys that name one file or folder (split, experiment and subset names): paths, dots, and
    names with control characters."""
    fixed = ["..", ".", "../..", "../../etc/passwd", "/etc/passwd", "a/b", "a\\b", "x\n", "\x1b[2J"]
    return fixed + escaping_paths(rng, n)


# -- torch files ------------------------------------------------------------------------------------------------
class Payload:
    """Unpickling this would create the file named ``path``: the proof that no pickle runs."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def crafted(marker: Path) -> dict[str, tuple[Callable[[Path], object], str]]:
    """Files to put in place of a checkpoint, a model or a cached tensor: kind -> (writer of such a file at a path,
    words of its refusal). None may run code: unpickling ``Payload`` would create ``marker``."""
    good = io.BytesIO()
    torch.save({"model": {"w": torch.ones(3)}}, good)
    return {
        "zip-pickle": (lambda p: torch.save({"model": Payload(str(marker))}, p), "refused: it holds io.open"),
        "legacy-pickle": (lambda p: p.write_bytes(pickle.dumps({"x": Payload(str(marker))}, protocol=2)),
                          "refused: it holds"),
        "empty": (lambda p: p.write_bytes(b""), "not a readable torch file"),
        "random": (lambda p: p.write_bytes(random.Random(SEED).randbytes(4096)), "not a readable torch file"),
        "truncated": (lambda p: p.write_bytes(good.getvalue()[:300]), "not a readable torch file"),
        "zip-not-torch": (lambda p: zipfile.ZipFile(p, "w").writestr("a.txt", "hello"), "not a readable torch"),
        "folder": (lambda p: p.mkdir(), "cannot read"),
        "tensor": (lambda p: torch.save(torch.zeros(2), p), "another shape or type"),
    }


def crafted_files(folder: Path) -> dict[str, tuple[Path, str]]:
    """Each crafted kind as ``folder/<kind>.pt`` (and a missing one): name -> (file, words of the refusal)."""
    out = {"missing": (folder / "missing.pt", "missing")}
    for kind, (write, words) in crafted(folder / "PWNED").items():
        write(folder / f"{kind}.pt")
        out[kind] = (folder / f"{kind}.pt", words)
    return out
