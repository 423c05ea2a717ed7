"""Stage folders: content-hashed names, atomic writes, a checksummed DONE marker, and a lock.

Every stage (subset, pretrain, transfer, ...) writes one folder ``<runs>/<kind>/<name>-<hash>``. The hash covers
everything that determines the stage's outputs, so a rerun (or a requeued cluster job) finds the same folder:
a folder with a valid ``DONE`` marker is finished and reused; one without it is resumed or redone, never trusted.
"""
from __future__ import annotations

import contextlib
import contextvars
import fcntl
import functools
import importlib.metadata
import hashlib
import json
import logging
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from . import __version__, cpus, inputs
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


_READ_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("read_only", default=False)


@contextlib.contextmanager
def read_only() -> Iterator[None]:
    """Inside, nothing may be written (``ablate run plan=true`` plans with the same stage lookups that run uses):
    caches are not updated, and a write that would happen anyway is a bug, refused loudly."""
    token = _READ_ONLY.set(True)
    try:
        yield
    finally:
        _READ_ONLY.reset(token)


def writes_allowed() -> bool:
    return not _READ_ONLY.get()


def _refuse_in_read_only(path: Path) -> None:
    if not writes_allowed():
        raise RuntimeError(f"{path}: a write while planning (store.read_only); planning must write nothing")
# (path, size, mtime, ctime, inode, device) -> SHA-256 computed by this process. A file changed in any way gets a
# new ctime (which no user can set back), so a hit is a file already hashed unchanged: each output is hashed once
# per process however often its stage is looked up (``ablate run`` plans, runs and reports the same stages).
_HASHED: dict[tuple[str, int, int, int, int, int], str] = {}


def checked_sha256(path: Path) -> str:
    """``file_sha256``, remembered for the file as it is now (see ``_HASHED``)."""
    st = os.stat(path)
    key = (str(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)
    if key not in _HASHED:
        _HASHED[key] = file_sha256(path)
    return _HASHED[key]


def _refusal(path: Path | str, reason: str, what: str, advice: str) -> UserError:
    return UserError(f"{path}: {reason}; expected {what}" + (f"; {advice}" if advice else ""))


def load_torch(path: Path | str, what: str, keys: tuple[str, ...] = (), advice: str = "",
               valid: Callable[[Any], bool] | None = None) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU: the one way this package reads a checkpoint, a model or a
    cached tensor. A file that is missing, truncated, not a torch file, refused by ``weights_only`` (it holds
    objects other than tensors and plain containers: a crafted pickle never runs), lacking ``keys`` or failing
    ``valid`` is one ``UserError`` naming it, what it should be and ``advice``."""
    import warnings

    import torch

    def refuse(reason: str) -> UserError:
        return _refusal(path, reason, what, advice)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols before refusing a file
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise refuse("missing") from e
    except OSError as e:
        raise refuse(f"cannot read ({e.strerror or e})") from e
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ValueError, ... for bad files
        unsafe = re.search(r"GLOBAL (\S+)", str(e))
        raise refuse(f"refused: it holds {inputs.shown(unsafe.group(1))}, not only tensors" if unsafe
                     else f"not a readable torch file ({type(e).__name__}, truncated or corrupted)") from e
    missing = [k for k in keys if not isinstance(obj, dict) or k not in obj]
    if missing:
        raise refuse(f"no {inputs.quoted(missing[0])} entry")
    if valid is not None and not valid(obj):
        raise refuse(f"a {type(obj).__name__} of another shape or type")
    return obj


@contextlib.contextmanager
def restoring(path: Path | str, what: str, advice: str = "") -> Iterator[None]:
    """Around the code that applies what ``load_torch`` read (``load_state_dict``, RNG states): a file that loads
    but does not fit (other layers or shapes, entries of the wrong type) is one ``UserError`` naming it."""
    try:
        yield
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as e:
        detail = inputs.shown(str(e).split("\n")[0], 120)
        raise _refusal(path, f"does not fit ({type(e).__name__}: {detail})", what, advice) from e


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and rename it over ``path``.

    On any error the temporary file is removed and the previous ``path`` (if any) is left untouched.
    """
    path = Path(path)
    _refuse_in_read_only(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror}") from e
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs are shared like any other file
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise UserError(f"cannot write {path}: {e.strerror or e}") from e
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable: the new directory entry survives a power cut, not only the file's bytes."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path | str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(path: Path | str, obj: Any) -> None:
    """``torch.save`` made atomic. Serialised in memory first: torch turns a failed write (disk full) into an
    opaque RuntimeError, while a plain write names the file and the reason."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getbuffer())


def atomic_write_json(path: Path | str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


@functools.cache
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


def provenance(device: Any = None) -> dict[str, Any]:
    """What produced a stage's outputs: package and library versions, code version, host, time, and what its
    floating-point results depend on beyond its inputs (``numerics``; ``device``: the torch device it computes on)."""
    return {
        "package_version": __version__,
        "git_commit": git_commit(),
        "python": sys.version.split()[0],
        "torch": importlib.metadata.version("torch"),  # without importing it: subsets never need torch
        "host": socket.gethostname(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **numerics(device),
    }


def numerics(device: Any = None) -> dict[str, Any]:
    """The processor, the instruction set torch's CPU kernels use on it, and the intra-op thread count, and on a
    CUDA ``device`` the GPU's name and the CUDA and cuDNN versions: a training stage's weights are bitwise the same
    only where these (and the library versions) are. They are not part of the hash: a network trained elsewhere is
    as valid, though its scores differ, sometimes by more than one machine's spread between seeds
    (docs/benchmarks.md, "Why a rerun can differ in the last digits"). Empty where torch is not loaded (subsets)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return {}
    found = {"cpu": cpus.model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
             "threads": torch.get_num_threads()}
    if device is not None and torch.device(device).type == "cuda":
        found |= {"gpu": torch.cuda.get_device_name(device), "cuda": torch.version.cuda,
                  "cudnn": torch.backends.cudnn.version()}
    return found


def same_hash_folder(folder: Path, stage_hash: str) -> Path | None:
    """A stage folder of this hash under another name, finished ones first: the name before the hash is cosmetic
    (it changes when a newer version names folders better), the hash is the identity, so users' folders are kept."""
    try:
        found = sorted(p for p in folder.glob(f"*-{stage_hash}") if p.is_dir())
    except OSError:
        return None
    return next((p for p in found if (p / DONE).is_file()), found[0] if found else None)


def done_record(folder: Path) -> dict[str, Any] | None:
    """``folder``'s DONE marker if it is valid (each output a path inside the folder, with a size and a SHA-256)
    and every listed output exists with its recorded size; else None."""
    try:
        record = json.loads((folder / DONE).read_text())
        for rel, meta in record["outputs"].items():
            if (inputs.path_problem(rel) or not isinstance(meta["sha256"], str)
                    or (folder / rel).stat().st_size != meta["size"]):
                return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return record


def changed_outputs(folder: Path, record: Mapping[str, Any]) -> list[str]:
    """Outputs of a DONE record whose SHA-256 differs from the one recorded."""
    return [rel for rel, meta in record["outputs"].items() if checked_sha256(folder / rel) != meta["sha256"]]


def check_intact(folder: Path, record: Mapping[str, Any]) -> None:
    """One ``UserError`` naming the first output of ``record`` changed since the stage finished."""
    changed = changed_outputs(folder, record)
    if changed:
        raise UserError(f"{folder / changed[0]}: changed since its stage finished (SHA-256 differs from "
                        f"{folder / DONE}); restore it, or delete {folder} to recompute the stage")


def finished(folder: Path, key: str, what: str = "stage folder",
             expected: str = "a run_dir printed by an ablate command") -> dict[str, Any]:
    """The DONE record of a stage folder named in the config (``pretrain=<run_dir>``), checked as a reused stage
    is: finished, and every output intact."""
    record = done_record(folder)
    if record is None:
        raise UserError(f"{key}: not a finished {what} (no valid DONE in {folder}); expected {expected}")
    check_intact(folder, record)
    return record


class Stage:
    """One stage folder. Use ``is_done()`` to skip finished work, ``lock()`` around the work, ``finish()`` last."""

    def __init__(self, root: Path | str, kind: str, name: str, spec: Mapping[str, Any]):
        self.kind = inputs.plain_name(kind, "stage kind")
        self.spec = dict(spec)
        self.hash = spec_hash({"kind": kind, **self.spec})
        self.name = inputs.plain_name(f"{name}-{self.hash}", f"{kind} stage name")  # names come from config values
        self.path = Path(root) / kind / self.name
        if not self.path.exists() and (known := same_hash_folder(self.path.parent, self.hash)) is not None:
            self.name, self.path = known.name, known

    def __repr__(self) -> str:
        return f"Stage({self.path})"

    # -- completion -------------------------------------------------------------------------------------------
    def done_record(self) -> dict[str, Any] | None:
        """The DONE marker's content if it is present and every listed output exists with its recorded size."""
        return done_record(self.path)

    def is_done(self) -> bool:
        """Finished and intact: a valid DONE marker whose outputs still have their recorded size and SHA-256.
        An output changed since (same size or not: a size change alone makes the folder unfinished, which is
        resumed or redone) is a ``UserError`` naming it: a finished stage is never silently reused or redone
        over outputs someone altered. Each output is hashed once per process (``checked_sha256``)."""
        record = self.done_record()
        if record is None:
            return False
        check_intact(self.path, record)
        return True

    def verify(self) -> list[str]:
        """Outputs whose checksum no longer matches the DONE marker (empty list: all intact)."""
        record = self.done_record()
        return [DONE] if record is None else changed_outputs(self.path, record)

    def finish(self, outputs: list[str]) -> None:
        """Write the DONE marker, last, with the size and SHA-256 of each output (paths relative to the folder)."""
        record = {
            "stage": self.kind,
            "hash": self.hash,
            "outputs": {rel: {"size": (self.path / rel).stat().st_size, "sha256": checked_sha256(self.path / rel)}
                        for rel in sorted(outputs)},
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        atomic_write_json(self.path / DONE, record)

    def write_spec(self, extra: Mapping[str, Any] | None = None, device: Any = None) -> None:
        """``stage.json``: the spec the hash was computed from, plus provenance (``device``: the torch device the
        stage computes on, where it uses one). Written before the work starts."""
        atomic_write_json(self.path / "stage.json", {"kind": self.kind, "hash": self.hash, "spec": self.spec,
                                                     "provenance": provenance(device), **(extra or {})})

    # -- locking ----------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, wait: bool = True, poll_s: float = 2.0, stale_after_s: float = STALE_AFTER_S) -> Iterator[None]:
        """Hold ``LOCK`` while the body runs, so two processes never run one stage at once.

        On one host the lock is an ``flock`` on ``LOCK``, released by the kernel when its holder dies, so a
        killed run never blocks its rerun. The file also records pid, host and a heartbeat (its mtime, touched
        every ``HEARTBEAT_S``) for holders on other hosts sharing the folder (a cluster file system): a live one
        makes this wait (``wait=True``) or raise ``UserError``; one silent for ``stale_after_s`` is taken over
        with a warning.
        """
        _refuse_in_read_only(self.path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create {self.path}: {e.strerror or e}") from e
        lock_path = self.path / LOCK
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        warned = False
        while (fd := self._try_lock(lock_path, stale_after_s)) is None:
            holder = self._read_lock(lock_path)
            if not wait:
                raise UserError(f"{self.path} is being written by another process ({holder}); rerun later")
            if not warned:
                log.warning("waiting for %s, held by %s", self.path, holder)
                warned = True
            time.sleep(poll_s)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(me).encode())
        for orphan in self.path.glob(".*.tmp"):  # left by a writer killed mid-write; nobody else writes here now
            with contextlib.suppress(OSError):
                orphan.unlink()
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
                os.unlink(lock_path)  # while still holding the flock: a waiter re-checks the inode
            os.close(fd)

    def _try_lock(self, lock_path: Path, stale_after_s: float) -> int | None:
        """An fd holding the flock on the current ``LOCK`` file, or None if a live process holds it."""
        fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return None
        try:
            same_file = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
        except OSError:
            same_file = False
        if not same_file:  # the previous holder unlinked it after we opened it: start over on the new file
            os.close(fd)
            return self._try_lock(lock_path, stale_after_s)
        holder = self._read_lock(lock_path)
        if holder and holder.get("host") != socket.gethostname():
            age = time.time() - os.fstat(fd).st_mtime
            if age < stale_after_s:
                os.close(fd)
                return None
            log.warning("taking over stale lock %s (holder %s, silent for %.0f s)", lock_path, holder, age)
        elif holder:
            log.warning("taking over the lock of a dead process: %s (holder %s)", lock_path, holder)
        return fd

    @staticmethod
    def _read_lock(lock_path: Path) -> dict[str, Any]:
        try:
            return json.loads(lock_path.read_text())
        except (OSError, ValueError):
            return {}
