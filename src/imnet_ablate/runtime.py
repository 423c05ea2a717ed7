"""What every training stage needs around its loop: the device, a per-stage log file, checkpoints with every random
stream, and how many CPUs it may use. One copy each, for pre-training and for every transfer task."""
from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import UserError
from .interrupts import working
from .store import atomic_torch_save, load_torch

log = logging.getLogger(__name__)


def pick_device(choice: str, local_rank: int = 0) -> torch.device:
    """``device``: ``auto`` (CUDA when visible, else CPU), ``cpu``, ``cuda`` or ``cuda:<index>``; under torchrun
    ``cuda`` means this process's local GPU."""
    choice = str(choice)
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={choice}: no CUDA device visible; use device=auto or device=cpu")
    if choice == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(choice)


@contextlib.contextmanager
def log_to(path: Path, enabled: bool = True) -> Iterator[None]:
    """Append this process's log records to a stage's ``log.txt`` (kept across resumes) while the stage runs; the
    stage counts as at work (an interrupt's message says where its rerun resumes)."""
    if not enabled:
        with working(path.parent):
            yield
        return
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S"))
    root = logging.getLogger()
    root.addHandler(handler)
    if root.level > logging.INFO:
        root.setLevel(logging.INFO)
    try:
        with working(path.parent):
            yield
    finally:
        root.removeHandler(handler)
        handler.close()


def rng_state(device: torch.device) -> dict[str, Any]:
    """Every random stream a loop draws on, in a form ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "python": list(random.getstate())}


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Atomically write a checkpoint (tensors, numbers, strings and containers of them only)."""
    atomic_torch_save(path, state)


def load_checkpoint(path: Path, what: str, keys: tuple[str, ...] = (),
                    advice: str = "delete it to start this stage over") -> dict[str, Any] | None:
    """A checkpoint written by ``save_checkpoint``, or None when there is none yet: ``store.load_torch`` (tensors
    only: a crafted file cannot run code; a torn, foreign or incomplete one is a one-line error naming it). Apply
    it inside ``store.restoring(path, what, advice)``, so a checkpoint that does not fit is one line too."""
    if not path.exists():
        return None
    return load_torch(path, what, keys, advice, valid=lambda obj: isinstance(obj, dict))
