"""Stopping a training stage without losing work, and saying where the rerun picks it up.

Ctrl-C (SIGINT), SIGTERM and SIGUSR1 (a scheduler's preemption warning) and SIGUSR2 (submitit's time-limit warning)
become a flag (``StopRequest``) that every training loop (pre-training, and the SGD loop every transfer task shares)
checks after each step: it checkpoints that step and raises ``Interrupted``, whose message names the stage and the
iteration the rerun resumes with. A second Ctrl-C stops at once, losing the steps since the last checkpoint. An
interrupt anywhere else in a stage's work (``working``) becomes ``Interrupted`` too, its message read from the stage's
last checkpoint. Iterations and epochs are counted from 1 in every message.
"""
from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import UserError

log = logging.getLogger(__name__)

# SIGTERM: preemption / scontrol requeue / Ctrl-C of a launcher; SIGUSR1: a plain sbatch --signal; SIGUSR2:
# submitit's time-limit warning (its own handler, called after our checkpoint, requeues the job).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)

class Interrupted(KeyboardInterrupt):
    """A training loop stopped by a signal after checkpointing; the message says where the rerun resumes."""


class StopRequest:
    """Inside, the stop signals set ``signum`` instead of ending the process (outside the main thread: no change)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self.previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: now, without the checkpoint
        if self.signum is None:
            self.signum = signum
            log.warning("%s: stopping after this step, which is checkpointed first%s", self.name,
                        " (Ctrl-C again: stop now, losing the steps since the last checkpoint)"
                        if signum == signal.SIGINT else "")

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def pass_on(self) -> None:
        """Call the handler the stop signal had before (e.g. submitit's requeue on SIGUSR2); not for Ctrl-C."""
        previous = self.previous.get(self.signum) if self.signum is not None else None
        if self.signum != signal.SIGINT and callable(previous) and previous is not signal.default_int_handler:
            previous(self.signum, None)

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def resumes_with(done: int, total: int) -> str:
    """``the rerun resumes with iteration 121 of 400`` after ``done`` of ``total`` iterations."""
    if done >= total:
        return f"all {total} iterations are done; the rerun goes on from there"
    return f"the rerun resumes with iteration {done + 1} of {total}"


@contextlib.contextmanager
def working(folder: Path) -> Iterator[None]:
    """A stage's work: an interrupt that no loop turned into ``Interrupted`` gets the stage's resume point."""
    try:
        yield
    except Interrupted:
        raise
    except KeyboardInterrupt as e:
        note = resume_note(folder)
        log.warning("interrupted: %s", note)
        raise Interrupted(note) from e


def resume_note(folder: Path) -> str:
    """Where a rerun picks a stage up, from its ``checkpoint.pt`` (iteration and, for pre-training, epoch)."""
    path = folder / "checkpoint.pt"
    if not path.is_file():
        return f"{folder} starts over (no checkpoint yet)"
    from .store import load_torch

    try:
        ckpt = load_torch(path, "a checkpoint", valid=lambda obj: isinstance(obj, dict))
    except UserError:  # a torn file: the rerun says so itself
        return f"{folder} starts over (its checkpoint is unreadable)"
    if "optimizer" not in ckpt:  # e.g. a fitted probe: no iterations to count
        return f"{folder} resumes from its checkpoint"
    done = int(ckpt["iteration"])
    epoch = f", in epoch {int(ckpt['epoch']) + 1}" if "epoch" in ckpt else ""
    return f"{folder} resumes from its checkpoint after iteration {done}{epoch}"


def message(exc: KeyboardInterrupt) -> str:
    """What a command says when interrupted: where its stage resumes, when it was inside one."""
    if isinstance(exc, Interrupted) and str(exc):
        return str(exc)
    return "rerun the same command to resume (finished stages are reused)"
