"""Ctrl-C as a user presses it: on a terminal (a pseudo-terminal), pre-training draws a progress bar, and Ctrl-C
checkpoints the step it arrived at and says so; the rerun resumes with the next one. A transfer task's SGD loop
does the same on SIGINT and ends with the weights of an uninterrupted run."""
from __future__ import annotations

import fcntl
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, run_ablate, run_dir_of
from imnet_ablate import transfer
from imnet_ablate.interrupts import Interrupted
from test_pretrain import overrides as pretrain_overrides
from test_pretrain import tiny_subset  # noqa: F401  (a fixture)
from test_transfer import config as transfer_config
from test_transfer import pretrained  # noqa: F401  (a fixture)

STOPPED = re.compile(r"SIGINT: checkpointed (\S+) after iteration (\d+) \(epoch (\d+) of 20, step (\d+) of 16\); "
                     r"the rerun resumes with iteration (\d+) of 320")


def on_a_terminal(args: list[str]) -> tuple[subprocess.Popen, int]:
    """``ablate <args>`` with a 40 x 120 pseudo-terminal as its controlling terminal (so Ctrl-C typed into it is a
    SIGINT to the command, as in a shell); returns the process and the terminal's master side."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "imnet_ablate.cli", *args], cwd=REPO, stdin=slave, stdout=slave,
                            stderr=slave, start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
    os.close(slave)
    return proc, master


def read_all(master: int, into: bytearray) -> None:
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the command exited and closed the terminal
            return
        if not chunk:
            return
        into.extend(chunk)


def test_terminal_bar_then_ctrl_c_checkpoints_that_step_and_the_rerun_resumes_there(tiny_subset,  # noqa: F811
                                                                                     tmp_path):
    # 20 epochs of 16 steps, no periodic checkpoint inside an epoch: only Ctrl-C can checkpoint mid-epoch
    args = pretrain_overrides(tiny_subset, tmp_path, "train.batch_size=4", "train.schedule.length=20",
                              "train.schedule.step_every=15", "train.checkpoint_every=1000", "train.log_every=1000")
    proc, master = on_a_terminal(["pretrain", *args])
    seen = bytearray()
    reader = threading.Thread(target=read_all, args=(master, seen), daemon=True)
    reader.start()
    try:
        deadline = time.time() + 240
        while b"epoch 2/20:" not in seen and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        os.write(master, b"\x03")  # Ctrl-C, typed
        assert proc.wait(timeout=120) == 130
    finally:
        proc.kill()
        reader.join(5)
        os.close(master)
    screen = seen.decode(errors="replace")
    assert re.search(r"epoch 1/20: +\d+%\|.*\| \d+/64 \[.*img/s", screen), screen[-2000:]  # a bar: rate and ETA
    stopped = STOPPED.search(screen)
    assert stopped, screen[-2000:]
    folder, done, epoch, step, resume = stopped[1], *map(int, stopped.groups()[1:])
    assert done == (epoch - 1) * 16 + step and resume == done + 1 and 16 <= done < 320
    assert torch.load(Path(folder) / "checkpoint.pt", weights_only=True)["iteration"] == done
    assert f"ablate pretrain: interrupted: {stopped[0]}" in screen

    again = run_ablate("pretrain", *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert run_dir_of(again) == Path(folder)
    next_epoch, next_step = divmod(done, 16)
    assert f"resuming {folder} with iteration {done + 1} of 320 (epoch {next_epoch + 1} of 20, step {next_step + 1} " \
        "of 16)" in again.stderr
    assert "%|" not in again.stderr  # not a terminal: no bar


def test_sigint_in_a_transfer_checkpoints_that_iteration_and_resumes_to_the_same_weights(demo_cache, tmp_path,
                                                                                          pretrained):  # noqa: F811
    task = [f"pretrain={pretrained}", "task=voc-cls-demo", "task.protocol=finetune", "task.finetune.iterations=60",
            "task.finetune.batch_size=8", "task.finetune.checkpoint_every=1000", "task.finetune.log_every=1"]
    cfg = transfer_config(demo_cache, tmp_path / "interrupted", *task)
    log = transfer.stage(cfg).path / "log.txt"

    def press_ctrl_c() -> None:  # once the loop is under way
        while not (log.is_file() and "iter 3/60" in log.read_text()):
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)

    def too_late(signum, frame):  # a SIGINT after the loop would otherwise stop the test session
        raise AssertionError("SIGINT arrived after the training loop had finished")

    previous = signal.signal(signal.SIGINT, too_late)
    threading.Thread(target=press_ctrl_c, daemon=True).start()
    try:
        with pytest.raises(Interrupted, match=r"SIGINT: checkpointed .* after iteration \d+; the rerun resumes with "
                                              r"iteration \d+ of 60") as stopped:
            transfer.run(cfg)
    finally:
        signal.signal(signal.SIGINT, previous)
    done = int(re.search(r"after iteration (\d+)", str(stopped.value))[1])
    folder = transfer.stage(cfg).path
    assert 3 <= done < 60 and torch.load(folder / "checkpoint.pt", weights_only=True)["iteration"] == done
    assert not (folder / "DONE").exists()

    assert transfer.run(cfg) == folder
    assert f"with iteration {done + 1} of 60" in log.read_text()
    straight = transfer.run(transfer_config(demo_cache, tmp_path / "straight", *task))
    a = torch.load(folder / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(straight / "checkpoint.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
