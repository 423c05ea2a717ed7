"""A parallel map over forked processes, for the CPU loops over the 1000 classes of a subset (listing the class
folders, ranking their images): one process per core, results sent back as bytes through a pipe.

Forking is used only while this process has a single thread (a forked copy of another thread's held lock never
unlocks), so under threaded hosts (pytest-xdist, notebooks with worker threads) everything runs here instead.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import NoReturn, TypeVar

from . import cpus
from .errors import UserError

T = TypeVar("T")
R = TypeVar("R")
MAX_WORKERS = 16


def can_fork() -> bool:
    """Whether this process may fork: a POSIX system and one thread (``/proc/self/task`` counts the threads that
    libraries start, not only Python's)."""
    try:
        return hasattr(os, "fork") and len(os.listdir("/proc/self/task")) == 1
    except OSError:
        return False


def _child(items: Sequence[T], encode: Callable[[T], bytes], write_fd: int) -> NoReturn:
    """Writes ``O`` and each ``encode(item)`` with its 8-byte length, or ``E`` and a UserError's message; then
    exits without running atexit handlers or flushing the buffers inherited from the parent."""
    status = 1
    try:
        try:
            parts = [b"O"]
            for item in items:
                data = encode(item)
                parts += [len(data).to_bytes(8, "little"), data]
            out = b"".join(parts)
        except UserError as e:
            out = b"E" + str(e).encode("utf-8", "surrogateescape")
        with os.fdopen(write_fd, "wb") as pipe:
            pipe.write(out)
        status = 0
    finally:
        os._exit(status)


def _frames(out: bytes, n: int) -> list[bytes] | None:
    """The ``n`` payloads of a child's output, or None when it is cut short (the child died)."""
    frames, pos = [], 1
    for _ in range(n):
        size = int.from_bytes(out[pos:pos + 8], "little")
        if pos + 8 + size > len(out):
            return None
        frames.append(out[pos + 8:pos + 8 + size])
        pos += 8 + size
    return frames if pos == len(out) else None


def _collect(pid: int, read_fd: int, items: Sequence[T], here: Callable[[T], R],
             decode: Callable[[T, bytes], R]) -> list[R]:
    with os.fdopen(read_fd, "rb") as pipe:
        out = pipe.read()
    _, status = os.waitpid(pid, 0)
    if out[:1] == b"E":
        raise UserError(out[1:].decode("utf-8", "surrogateescape"))
    frames = _frames(out, len(items)) if status == 0 and out[:1] == b"O" else None
    if frames is None:  # the child died: do its share here, which raises the real error if there is one
        return [here(x) for x in items]
    return [decode(x, data) for x, data in zip(items, frames)]


def map_forked(items: Sequence[T], here: Callable[[T], R], encode: Callable[[T], bytes],
               decode: Callable[[T, bytes], R], workers: int | None = None, min_items: int = 32) -> list[R]:
    """``[here(x) for x in items]``, with the items dealt round-robin (big and small ones mix) over this process and
    ``workers - 1`` forked children (default: one per CPU this process may use). A child computes ``encode(x)``,
    and this process turns it back with ``decode(x, data)``, which must equal ``here(x)``. A UserError in any share
    is raised here."""
    workers = min(workers or cpus.available(), MAX_WORKERS, len(items))
    if workers < 2 or len(items) < min_items or not can_fork():
        return [here(x) for x in items]
    chunks = [items[i::workers] for i in range(workers)]
    children = []
    for chunk in chunks[1:]:
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            _child(chunk, encode, write_fd)
        os.close(write_fd)
        children.append((pid, read_fd, chunk))
    results: list[list[R] | UserError] = []
    try:
        results.append([here(x) for x in chunks[0]])
    finally:  # collect every child, even after an error here, so none is left blocked on a full pipe
        for pid, read_fd, chunk in children:
            try:
                results.append(_collect(pid, read_fd, chunk, here, decode))
            except UserError as e:
                results.append(e)
    out: list[R] = [None] * len(items)  # type: ignore[list-item]
    for i, r in enumerate(results):
        if isinstance(r, UserError):
            raise r
        out[i::workers] = r
    return out
