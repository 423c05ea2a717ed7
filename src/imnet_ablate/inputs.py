"""One rule per class of untrusted input, applied where that input enters, so every reader refuses the same things
the same way (and ``ablate data check`` can report exactly what they will refuse).

- **Text files** (split lists, listings, label files, results files, index files): regular files only (a FIFO, a
  folder or a device is refused before it is opened for reading, so nothing blocks), decoded as UTF-8; bad bytes
  are one error naming the file, the line and the column, never the line's content. :func:`read_text`.
- **Names** (files found in a folder, ids read from a split file): a name holding a control character (tab, newline,
  escape, ...) or bytes that are not UTF-8 is never used. Folder listings skip such files (``ablate data check``
  reports them as ``bad-name``); a text file naming one is refused at its line. Messages show names through
  :func:`shown`, which escapes those characters, so one error stays one line and no terminal sequence is printed.
  :func:`name_problem`, :func:`plain_name`.
- **Paths built from data or config** (split ids and split names, listing entries, index rows, experiment and
  output names): relative, without ``..``, so ``root / path`` stays under ``root``; anything else is refused
  naming the key or the file and line. :func:`relative_path`, :func:`inside`, :func:`first_escaping`.
- **Symbolic links** inside a data root are followed wherever they point: the data's owner made them (symlinked
  class folders are the usual way to build a subset of a dataset). ``ablate data check`` reports every link whose
  target lies outside its root (``symlink-outside``, a warning) and every broken one (``unreadable``, an error).
  :func:`leaves_root`. Paths from data or config text are not links and get the rule above.
- **Images**: the width and height are read from the header (the JPEG frame header, or PIL's lazy open for other
  formats) and an image over ``data.max_pixels`` is refused before anything is decoded or allocated.
  :func:`jpeg_size`, :func:`check_pixels`, :func:`open_image`.
"""
from __future__ import annotations

import contextlib
import os
import re
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from .errors import UserError

# Control characters (C0, DEL, C1) and lone surrogates: what os.listdir returns for bytes that are not UTF-8.
BAD_CHARS = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
# PIL's own default limit (about 9459 x 9459): the default of data.max_pixels.
DEFAULT_MAX_PIXELS = 89_478_485
SHOWN_LENGTH = 60  # characters of a name or token quoted in a message
_ESCAPES = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}
# Markers whose segment is a JPEG frame header (SOF0-3, 5-7, 9-11, 13-15): it holds the height and width.
_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})


# -- names --------------------------------------------------------------------------------------------------------
def _escape(char: str) -> str:
    if "\udc80" <= char <= "\udcff":  # surrogateescape: the original byte
        return f"\\x{ord(char) - 0xDC00:02x}"
    return _ESCAPES.get(char) or (f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}")


def shown(text: object, limit: int = SHOWN_LENGTH) -> str:
    """``text`` safe to print on one line: control characters and undecodable bytes escaped (``\\t``, ``\\x1b``,
    ``\\xff``), cut to ``limit`` characters."""
    text = str(text)
    cut = text if len(text) <= limit else text[:limit] + "..."
    return BAD_CHARS.sub(lambda m: _escape(m.group()), cut)


def quoted(text: object, limit: int = SHOWN_LENGTH) -> str:
    """:func:`shown` between single quotes: how a message quotes a name or a token."""
    return f"'{shown(text, limit)}'"


def name_problem(name: str) -> str | None:
    """Why a file or folder name (or an id) cannot be used, or None when it can."""
    m = BAD_CHARS.search(name)
    if m is None:
        return None
    if "\ud800" <= m.group() <= "\udfff":
        return "has bytes that are not UTF-8"
    return f"has the control character {_escape(m.group())}"


def plain_name(value: object, key: str) -> str:
    """``value`` if it can name one file or folder inside another (a split name, an image id, an experiment or
    stage name): a non-empty string without '/', '\\', control characters or undecodable bytes, and not '.' or
    '..'. Otherwise one ``UserError`` naming ``key``."""
    if not isinstance(value, str) or not value:
        problem = "is empty" if value in ("", None) else f"is a {type(value).__name__}"
    elif "/" in value or "\\" in value or value in (".", ".."):
        problem = "is a path"
    else:
        problem = name_problem(value)
    if problem:
        raise UserError(f"{key}={quoted(value)} {problem}; expected a plain name (no '/', '..' or control "
                        "characters)")
    return value


# -- paths built from data or config ------------------------------------------------------------------------------
def path_problem(rel: str) -> str | None:
    """Why a path read from data or config could leave its root (or cannot be used), or None."""
    if not rel:
        return "is empty"
    if rel.startswith("/"):
        return "is absolute"
    if ".." in rel.split("/"):
        return "has a '..' component"
    return name_problem(rel)


def relative_path(rel: str, key: str) -> str:
    """``rel`` if it is a path relative to its root that cannot leave it; else one ``UserError`` naming ``key``."""
    problem = path_problem(rel)
    if problem:
        raise UserError(f"{key}: path {quoted(rel)} {problem}; expected a path relative to its root, without '..'")
    return rel


def inside(root: Path | str, rel: str, key: str) -> Path:
    """``root / rel`` for a path ``rel`` taken from data or config, refused (naming ``key``) if it could leave
    ``root``."""
    return Path(root) / relative_path(rel, key)


# Lines of a NUL-free text that could leave their root: absolute, a '..' component, or a bad character.
_ESCAPING_LINE = re.compile("(?m)^/|(?:^|/)\\.\\.(?:/|$)|^$|[\x00-\x09\x0b-\x1f\x7f-\x9f\ud800-\udfff]")


def first_escaping(paths: Sequence[str]) -> int | None:
    """Index of a path that :func:`path_problem` refuses (the first one, unless a path holds a newline), or None.
    One regex pass over the joined paths, so a 1.28M-row index is checked in a fraction of a second."""
    if not paths:
        return None
    joined = "\n".join(paths)
    if joined.count("\n") != len(paths) - 1:  # a path holding a newline itself
        return next(i for i, p in enumerate(paths) if "\n" in p)
    suspect = (".." in joined or "\n/" in joined or "\n\n" in joined or not paths[0] or not paths[-1]
               or paths[0][0] == "/" or not joined.replace("\n", " ").isprintable())  # fast scans first
    m = _ESCAPING_LINE.search(joined) if suspect else None
    return None if m is None else joined.count("\n", 0, m.start())


def leaves_root(path: Path | str, root: Path | str) -> bool:
    """True when ``path`` (a link, or under one) resolves outside ``root``: the case ``ablate data check``
    reports (links are followed; see the module docstring)."""
    return not Path(os.path.realpath(path)).is_relative_to(os.path.realpath(root))


# -- text files ---------------------------------------------------------------------------------------------------
def _kind(mode: int) -> str:
    for test, word in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return word
    return "not a regular file"


def is_present(path: Path | str, expected: str = "a regular file") -> bool:
    """True if ``path`` is a regular file (or a link to one), False if nothing is there. Anything else (a folder,
    FIFO, device, socket, broken link) is one ``UserError`` naming it: a results file that is a FIFO is not "no
    detections"."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.lexists(path):
            raise UserError(f"{path}: broken symbolic link; expected {expected}") from None
        return False
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror}); expected {expected}") from e
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"{path}: is {_kind(st.st_mode)}; expected {expected}")
    return True


def read_bytes(path: Path | str, expected: str = "a regular file", key: str | None = None) -> bytes:
    """The bytes of a regular file. Opened without blocking and checked on the open descriptor, so a FIFO (or a
    link to a device) is refused instead of hanging or reading forever. Errors name ``key=path`` (or the path)."""
    where = f"{key}={path}" if key else str(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise UserError(f"{where}: cannot read ({e.strerror}); expected {expected}") from e
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise UserError(f"{where}: cannot read: it is {_kind(mode)}; expected {expected}")
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read()
    except OSError as e:
        raise UserError(f"{where}: cannot read ({e.strerror}); expected {expected}") from e
    finally:
        os.close(fd)


def read_text(path: Path | str, expected: str = "a UTF-8 text file", key: str | None = None) -> str:
    """A text file's content. Bytes that are not UTF-8 are one error naming the file, line and column (and the
    byte, never the line). A leading byte-order mark is dropped."""
    data = read_bytes(path, expected, key)
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - data.rfind(b"\n", 0, e.start)
        raise UserError(f"{f'{key}=' if key else ''}{path}:{line}: byte 0x{data[e.start]:02x} at column {column} "
                        f"is not UTF-8; expected {expected}") from None


# -- images -------------------------------------------------------------------------------------------------------
class TooLarge(ValueError):
    """An image whose header asks for more pixels than the limit; raised before any pixel is decoded."""


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's frame header, walking the marker segments as libjpeg does; None when the
    markers before it are not well formed (the caller then lets PIL open it, which checks its own header)."""
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # segments without a length
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image or start of scan before any frame header
            return None
        if marker in _SOF:
            if i + 9 > n:
                return None
            height, width = int.from_bytes(data[i + 5:i + 7], "big"), int.from_bytes(data[i + 7:i + 9], "big")
            return (width, height) if height else None  # height 0: defined later by a DNL marker
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def check_pixels(width: int, height: int, max_pixels: int) -> None:
    """Raise :class:`TooLarge` for an image over ``max_pixels`` (``data.max_pixels``)."""
    if width * height > max_pixels:
        raise TooLarge(f"{width}x{height} is {width * height} pixels, over data.max_pixels={max_pixels}")


@contextlib.contextmanager
def open_image(fp: str | Path | IO[bytes], max_pixels: int) -> Iterator[Any]:
    """``PIL.Image.open`` (lazy: only the header is read) refused with :class:`TooLarge` above ``max_pixels``.
    PIL's own global limit is switched off: this check, with the configured limit, replaces it for every image
    this package opens."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None
    with Image.open(fp) as im:
        check_pixels(*im.size, max_pixels)
        yield im
