"""Stage folders: hashing, atomic writes, the DONE marker and the lock."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from imnet_ablate.errors import UserError
from imnet_ablate.store import LOCK, Stage, atomic_path, atomic_write_text, spec_hash


def test_spec_hash_ignores_key_order_and_sees_values():
    assert spec_hash({"a": 1, "b": [1, 2]}) == spec_hash({"b": [1, 2], "a": 1})
    assert spec_hash({"a": 1}) != spec_hash({"a": 2})


def test_atomic_write_keeps_the_old_file_on_error(tmp_path):
    target = tmp_path / "out.txt"
    atomic_write_text(target, "good")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]  # no temporary left behind


def test_atomic_write_uses_normal_permissions(tmp_path):
    atomic_write_text(tmp_path / "f", "x")
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "f").stat().st_mode & 0o777 == 0o666 & ~mask


def test_unwritable_output_is_a_user_error(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(UserError, match="cannot"):
        atomic_write_text(tmp_path / "file" / "out.txt", "x")
    with pytest.raises(UserError, match="cannot create"):
        with Stage(tmp_path / "file", "kind", "name", {}).lock():
            pass


def test_done_marker_checks_sizes_and_checksums(tmp_path):
    stage = Stage(tmp_path, "kind", "name", {"x": 1})
    assert stage.path.name == f"name-{stage.hash}"
    stage.path.mkdir(parents=True)
    (stage.path / "a.txt").write_text("hello")
    assert not stage.is_done()
    stage.finish(["a.txt"])
    assert stage.is_done() and stage.verify() == []
    (stage.path / "a.txt").write_text("HELLO")  # same size, other bytes: reusing it is an error naming the file
    assert stage.verify() == ["a.txt"]
    with pytest.raises(UserError, match=f"{stage.path / 'a.txt'}: changed since its stage finished.*delete "):
        stage.is_done()
    (stage.path / "a.txt").write_text("hello!")  # truncated/extended outputs are never trusted
    assert not stage.is_done()


HOLD = """
import sys, time
from imnet_ablate.store import Stage
stage = Stage(sys.argv[1], "kind", "name", {})
with stage.lock():
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _holder(root: Path, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(root), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_process_waits_for_a_live_holder(tmp_path):
    proc = _holder(tmp_path, 2.0)
    stage = Stage(tmp_path, "kind", "name", {})
    with pytest.raises(UserError, match="another process"):
        with stage.lock(wait=False):
            pass
    started = time.time()
    with stage.lock(poll_s=0.1):
        waited = time.time() - started  # we only got in once the holder's 2 s were over
    proc.wait()
    assert waited > 1.0
    assert not (stage.path / LOCK).exists()


def test_lock_of_a_killed_process_is_taken_over_at_once(tmp_path):
    proc = _holder(tmp_path, 60)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stage = Stage(tmp_path, "kind", "name", {})
    assert (stage.path / LOCK).exists()  # left behind by the dead holder
    started = time.time()
    with stage.lock(wait=False):
        pass
    assert time.time() - started < 1


def test_taking_the_lock_removes_temporaries_of_a_killed_writer(tmp_path):
    stage = Stage(tmp_path, "kind", "name", {})
    stage.path.mkdir(parents=True)
    (stage.path / ".checkpoint.pt.abc123.tmp").write_bytes(b"half a checkpoint")
    (stage.path / "checkpoint.pt").write_bytes(b"the last good one")
    with stage.lock(wait=False):
        assert [p.name for p in stage.path.iterdir() if p.name != LOCK] == ["checkpoint.pt"]


def test_lock_from_another_host_waits_until_its_heartbeat_stops(tmp_path):
    stage = Stage(tmp_path, "kind", "name", {})
    stage.path.mkdir(parents=True)
    lock = stage.path / LOCK
    lock.write_text(json.dumps({"pid": 1, "host": socket.gethostname() + "-other", "started": 0}))
    with pytest.raises(UserError):
        with stage.lock(wait=False):
            pass
    old = time.time() - 120
    os.utime(lock, (old, old))  # no heartbeat for two minutes
    with stage.lock(wait=False):
        pass


def test_a_folder_made_under_an_older_name_is_reused_by_its_hash(tmp_path):
    """Folder names before the hash are cosmetic and may improve between versions (250pc -> 250pc-ipc6): the
    hash finds the user's existing folder, finished ones before an unfinished one of the same hash."""
    old = Stage(tmp_path, "subset", "250pc", {"ipc": 6})
    old.path.mkdir(parents=True)
    (old.path / "a.txt").write_text("kept")
    old.finish(["a.txt"])
    unfinished = tmp_path / "subset" / f"0-older-{old.hash}"
    unfinished.mkdir()
    renamed = Stage(tmp_path, "subset", "250pc-ipc6", {"ipc": 6})
    assert renamed.path == old.path and renamed.name == old.name and renamed.is_done()
    assert Stage(tmp_path, "subset", "250pc-ipc7", {"ipc": 7}).path.name.startswith("250pc-ipc7-")
    (old.path / "DONE").unlink()
    assert Stage(tmp_path, "subset", "250pc-ipc6", {"ipc": 6}).path == unfinished  # resumed where it was left


def test_provenance_records_the_processor_its_kernels_and_the_threads_of_a_training_process():
    import torch

    from imnet_ablate import cpus, store

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        record = store.provenance()
    finally:
        torch.set_num_threads(before)
    assert (record["cpu"], record["cpu_capability"], record["threads"]) == (
        cpus.model(), torch.backends.cpu.get_cpu_capability(), 1)
    # a process that never loads torch (building subsets) records no numerics and still does not load it
    code = ("import sys; from imnet_ablate import store; "
            "print('cpu' in store.provenance(), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_a_stage_computed_on_a_gpu_records_the_gpu_and_its_libraries(tmp_path, monkeypatch):
    """A GPU's numbers depend on the GPU, CUDA and cuDNN, which the processor's name does not tell; a CPU stage
    records none of them. (scripts/gpu_check.sh shows what a real GPU transfer recorded.)"""
    import torch

    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: asked.append(device) or "NVIDIA H200")
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 91002)
    stage = Stage(tmp_path, "transfer", "voc-det", {"seed": 0})
    stage.path.mkdir(parents=True)
    stage.write_spec(device=torch.device("cuda", 1))
    record = json.loads((stage.path / "stage.json").read_text())["provenance"]
    assert (record["gpu"], record["cuda"], record["cudnn"]) == ("NVIDIA H200", "12.8", 91002)
    assert asked == [torch.device("cuda", 1)]  # the GPU this stage computes on, not the first one
    stage.write_spec(device=torch.device("cpu"))
    assert "gpu" not in json.loads((stage.path / "stage.json").read_text())["provenance"]
