"""Stage folders: content-hashed names, atomic writes, a checksummed DONE marker, and a lock.

Every stage (subset, pretrain, transfer, ...) writes one folder ``<runs>/<kind>/<name>-<hash>``. The hash covers
everything that determines the stage's outputs, so a rerun (or a requeued cluster job) finds the same folder:
a folder with a valid ``DONE`` marker is finished and reused; one without it is resumed or redone, never trusted.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from . import __version__
from .errors import UserError

log = logging.getLogger(__name__)

DONE = "DONE"
LOCK = "LOCK"
HEARTBEAT_S = 10.0
STALE_AFTER_S = 60.0


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def spec_hash(spec: Mapping[str, Any], length: int = 12) -> str:
    """Short SHA-256 of a JSON-serialisable spec, independent of key order."""
    return hashlib.sha256(canonical_json(spec).encode()).hexdigest()[:length]


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and rename it over ``path``.

    On any error the temporary file is removed and the previous ``path`` (if any) is left untouched.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror}") from e
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise UserError(f"cannot write {path}: {e.strerror or e}") from e
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path | str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path | str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def git_commit() -> str | None:
    """The commit of the source checkout this package runs from, with ``+dirty`` if it has local changes."""
    src = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def provenance() -> dict[str, Any]:
    """What produced a stage's outputs: package and library versions, code version, host, time."""
    import torch

    return {
        "package_version": __version__,
        "git_commit": git_commit(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "host": socket.gethostname(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Stage:
    """One stage folder. Use ``is_done()`` to skip finished work, ``lock()`` around the work, ``finish()`` last."""

    def __init__(self, root: Path | str, kind: str, name: str, spec: Mapping[str, Any]):
        self.kind = kind
        self.spec = dict(spec)
        self.hash = spec_hash({"kind": kind, **self.spec})
        self.name = f"{name}-{self.hash}"
        self.path = Path(root) / kind / self.name

    def __repr__(self) -> str:
        return f"Stage({self.path})"

    # -- completion -------------------------------------------------------------------------------------------
    def done_record(self) -> dict[str, Any] | None:
        """The DONE marker's content if it is present and every listed output exists with its recorded size."""
        try:
            record = json.loads((self.path / DONE).read_text())
            for rel, meta in record["outputs"].items():
                if (self.path / rel).stat().st_size != meta["size"]:
                    return None
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return record

    def is_done(self) -> bool:
        return self.done_record() is not None

    def verify(self) -> list[str]:
        """Outputs whose checksum no longer matches the DONE marker (empty list: all intact)."""
        record = self.done_record()
        if record is None:
            return [DONE]
        return [rel for rel, meta in record["outputs"].items() if file_sha256(self.path / rel) != meta["sha256"]]

    def finish(self, outputs: list[str]) -> None:
        """Write the DONE marker, last, with the size and SHA-256 of each output (paths relative to the folder)."""
        record = {
            "stage": self.kind,
            "hash": self.hash,
            "outputs": {rel: {"size": (self.path / rel).stat().st_size, "sha256": file_sha256(self.path / rel)}
                        for rel in sorted(outputs)},
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        atomic_write_json(self.path / DONE, record)

    def write_spec(self, extra: Mapping[str, Any] | None = None) -> None:
        """``stage.json``: the spec the hash was computed from, plus provenance. Written before the work starts."""
        atomic_write_json(self.path / "stage.json", {"kind": self.kind, "hash": self.hash, "spec": self.spec,
                                                     "provenance": provenance(), **(extra or {})})

    # -- locking ----------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, wait: bool = True, poll_s: float = 2.0, stale_after_s: float = STALE_AFTER_S) -> Iterator[None]:
        """Hold ``LOCK`` (pid, host, heartbeat) while the body runs.

        A live holder on another process makes this wait (``wait=True``) or raise ``UserError``. A stale lock
        (holder dead on this host, or no heartbeat for ``stale_after_s``) is taken over with a warning.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        lock_path = self.path / LOCK
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        warned = False
        while True:
            try:
                fd = os.open(lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read_lock(lock_path)
                if self._is_stale(lock_path, holder, stale_after_s):
                    log.warning("taking over stale lock %s (holder %s)", lock_path, holder)
                    with contextlib.suppress(OSError):  # only one taker wins the rename
                        os.replace(lock_path, lock_path.with_name(f"{LOCK}.stale.{os.getpid()}"))
                        os.unlink(lock_path.with_name(f"{LOCK}.stale.{os.getpid()}"))
                    continue
                if not wait:
                    raise UserError(f"{self.path} is being written by another process ({holder}); rerun later")
                if not warned:
                    log.warning("waiting for %s, held by %s", self.path, holder)
                    warned = True
                time.sleep(poll_s)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            break
        stop = threading.Event()

        def heartbeat() -> None:
            while not stop.wait(HEARTBEAT_S):
                with contextlib.suppress(OSError):
                    os.utime(lock_path)

        beat = threading.Thread(target=heartbeat, daemon=True)
        beat.start()
        try:
            yield
        finally:
            stop.set()
            beat.join()
            with contextlib.suppress(OSError):
                if self._read_lock(lock_path).get("pid") == me["pid"]:
                    os.unlink(lock_path)

    @staticmethod
    def _read_lock(lock_path: Path) -> dict[str, Any]:
        try:
            return json.loads(lock_path.read_text())
        except (OSError, ValueError):
            return {}

    @staticmethod
    def _is_stale(lock_path: Path, holder: Mapping[str, Any], stale_after_s: float) -> bool:
        try:
            age = time.time() - lock_path.stat().st_mtime
        except OSError:
            return False  # vanished: the next O_EXCL attempt decides
        if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
            return not _pid_alive(holder["pid"])
        return age > stale_after_s
