"""The forked parallel map: same results as a loop, errors and dead children handled, no fork under threads.

Forking happens only in a single-threaded process, and pytest-xdist's workers run threads, so the forked paths run
in a fresh interpreter (``_in_fresh_process``)."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import threading

import pytest

from imnet_ablate import forked
from imnet_ablate.errors import UserError

PRELUDE = """
import os, sys
from imnet_ablate import forked
from imnet_ablate.errors import UserError
assert forked.can_fork(), "expected a single-threaded process"
"""


def _in_fresh_process(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(code)], capture_output=True, text=True)


def test_forked_map_matches_a_loop():
    run = _in_fresh_process("""
        items = list(range(100))
        pids = set()
        def encode(x):
            pids.add(os.getpid())
            return str(x * x).encode() + b"|" + str(os.getpid()).encode()
        def decode(x, data):
            square, pid = data.split(b"|")
            pids.add(int(pid))
            return int(square)
        out = forked.map_forked(items, lambda x: x * x, encode, decode, workers=3)
        assert out == [x * x for x in items], out
        assert len(pids) == 2 and os.getpid() not in pids, pids  # two children did their shares
        print("ok")
    """)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr


def test_user_error_in_a_child_is_raised_here():
    run = _in_fresh_process("""
        def encode(x):
            if x == 40:
                raise UserError("item 40: bad")
            return b""
        try:
            forked.map_forked(list(range(100)), lambda x: None, encode, lambda x, d: None, workers=3)
        except UserError as e:
            print(e)
    """)
    assert run.returncode == 0 and run.stdout.strip() == "item 40: bad", run.stderr


def test_a_dead_childs_share_is_done_here():
    run = _in_fresh_process("""
        def encode(x):
            if x == 41:
                os._exit(3)  # as if killed
            return str(x).encode()
        out = forked.map_forked(list(range(100)), lambda x: -x, encode, lambda x, d: int(d), workers=3)
        # dealt round-robin: this process does x % 3 == 0 with here(), so does it for the dead child's x % 3 == 2
        assert out == [x if x % 3 == 1 else -x for x in range(100)], out
        print("ok")
    """)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr


def test_with_threads_everything_runs_here():
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        assert not forked.can_fork()

        def encode(x: int) -> bytes:
            raise AssertionError("no child expected")

        assert forked.map_forked(list(range(100)), lambda x: x + 1, encode, lambda x, d: 0) == list(range(1, 101))
        with pytest.raises(UserError, match="here"):
            forked.map_forked([1], lambda x: (_ for _ in ()).throw(UserError("here")), encode, lambda x, d: 0)
    finally:
        stop.set()
        thread.join()


def test_forked_sampling_matches_one_process():
    run = _in_fresh_process("""
        from pathlib import Path
        from imnet_ablate import imagenet, subsets
        train = {f"n{c:08d}": imagenet.Files(f"train/n{c:08d}/", [f"n{c:08d}_{i}.JPEG" for i in range(20 + c)])
                 for c in range(64)}
        listing = imagenet.Listing(Path("/x"), train, {}, "", Path("/x"))
        for n in (5, 30, None):
            forked_result = subsets.sample_classes(listing, list(train), n, seed=3)
            assert forked_result == {c: subsets.sample(f, n, 3) for c, f in train.items()}, n
        print("ok")
    """)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr
