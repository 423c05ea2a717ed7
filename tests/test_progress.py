"""Progress of long steps: plain log lines when stderr is not a terminal (the bar on a terminal is seen through a
pseudo-terminal in test_interrupts.py)."""
from __future__ import annotations

import logging

from imnet_ablate import progress


def test_lines_when_not_a_terminal_with_rate_eta_and_values(monkeypatch, caplog):
    monkeypatch.setattr(progress, "FIRST_LINES_S", 0.0)  # a line at every update, instead of every 10 s
    progress.configure(False)
    caplog.set_level(logging.INFO, logger="imnet_ablate.progress")
    try:
        with progress.Progress(4, "epoch 1/2", "img", initial=1, scale=8) as bar:
            bar.note(loss="0.693")
            for _ in range(3):
                bar.update()
    finally:
        progress.configure()
    lines = [r.getMessage() for r in caplog.records if r.name == "imnet_ablate.progress"]
    assert lines[0].startswith("epoch 1/2: 16/32 img (50%), ") and " img/s, ETA " in lines[0], lines
    assert lines[0].endswith("; loss 0.693"), lines
    assert lines[-1].startswith("epoch 1/2: 32/32 img (100%)") and "ETA" not in lines[-1], lines


def test_no_lines_for_a_short_step_or_a_silent_rank(caplog):
    progress.configure(False)
    caplog.set_level(logging.INFO, logger="imnet_ablate.progress")
    try:
        with progress.Progress(3, "test", "img") as bar:  # done long before the first line is due
            bar.update(3)
        with progress.Progress(3, "test", "img", enabled=False) as bar:
            bar.update(3)
    finally:
        progress.configure()
    assert not [r for r in caplog.records if r.name == "imnet_ablate.progress"]


def test_durations_read_as_clock_times():
    assert [progress.duration(s) for s in (4.4, 62, 3725)] == ["0:04", "1:02", "1:02:05"]
