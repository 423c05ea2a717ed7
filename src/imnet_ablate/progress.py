"""Progress of every long step, shown one way: a tqdm bar with rate and ETA when stderr is a terminal, else a plain
log line now and then (a log file or a scheduler's output gets lines, not carriage returns).

``configure`` sets the mode once per process from the ``progress`` key (auto, true, false) and, in the workers of
``ablate run``, the stage tag that starts each bar (their log lines carry it through the log format). Lines come
every 10 s at first, then every tenth of the time elapsed, at most every 5 minutes: a short step says how it goes
and a day-long one writes a few hundred lines. While a bar is drawn, log records are printed above it.
"""
from __future__ import annotations

import logging
import sys
import time
from contextlib import AbstractContextManager
from typing import Any

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

log = logging.getLogger(__name__)

FIRST_LINES_S = 10.0  # the interval between plain lines at first
MAX_LINE_S = 300.0  # and at most

_settings: dict[str, Any] = {"mode": "auto", "tag": ""}


def configure(mode: bool | str = "auto", tag: str = "") -> None:
    """``mode``: ``auto`` (bars on a terminal), True (bars), False (lines); ``tag``: a stage label for the bars."""
    _settings.update(mode=mode, tag=tag)


def bars() -> bool:
    mode = _settings["mode"]
    return mode is True or (mode == "auto" and sys.stderr.isatty())


def duration(seconds: float) -> str:
    """``0:42``, ``12:05``, ``3:02:07``."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress(AbstractContextManager):
    """``total`` units of work from ``initial`` (a resumed step), counted with ``update``; ``scale`` units shown per
    count (a pre-training step counts as its batch of images). ``enabled=False``: silent (other DDP ranks)."""

    def __init__(self, total: int, desc: str, unit: str = "it", initial: int = 0, scale: int = 1,
                 enabled: bool = True):
        self.total, self.desc, self.unit, self.scale = total, desc, unit, scale
        self.done = self.first = initial
        self.started = self.last_line = time.monotonic()
        self.values: dict[str, str] = {}
        self.lines = enabled and not bars()
        self.bar: tqdm | None = None
        self.redirect: Any = None
        if enabled and not self.lines:
            self.redirect = logging_redirect_tqdm()
            self.redirect.__enter__()
            tag = _settings["tag"]
            self.bar = tqdm(total=total, initial=initial, desc=f"[{tag}] {desc}" if tag else desc, unit=unit,
                            unit_scale=scale if scale != 1 else False, dynamic_ncols=True, mininterval=0.5,
                            leave=False)  # the step's own log line records how it ended

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.lines and time.monotonic() - self.last_line >= self.interval():
            self.line()

    def note(self, **values: Any) -> None:
        """Values shown beside the count (``loss=0.53``) until replaced."""
        self.values.update({k: str(v) for k, v in values.items()})
        if self.bar is not None:
            self.bar.set_postfix(self.values, refresh=False)

    def interval(self) -> float:
        return min(MAX_LINE_S, max(FIRST_LINES_S, (time.monotonic() - self.started) / 10))

    def line(self) -> None:
        now = time.monotonic()
        self.last_line = now
        elapsed = now - self.started
        rate = (self.done - self.first) / elapsed if elapsed > 0 else 0.0
        left = f", ETA {duration((self.total - self.done) / rate)}" if rate > 0 and self.done < self.total else ""
        shown = " ".join(f"{k} {v}" for k, v in self.values.items())
        speed = rate * self.scale
        log.info("%s: %d/%d %s (%.0f%%), %s %s/s%s%s", self.desc, self.done * self.scale, self.total * self.scale,
                 self.unit, 100 * self.done / max(1, self.total), f"{speed:.0f}" if speed >= 10 else f"{speed:.2f}",
                 self.unit, left, f"; {shown}" if shown else "")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.redirect.__exit__(None, None, None)
            self.bar = None
        elif self.lines and self.last_line > self.started:  # a step long enough to have had lines gets its last
            self.line()
            self.lines = False

    def __exit__(self, *exc: Any) -> None:
        self.close()
