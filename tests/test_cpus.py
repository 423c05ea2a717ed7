"""Every ``auto`` count of processes or threads follows the CPUs this process may use (a SLURM allocation, taskset),
not the machine's: a job given 1 CPU of a 64-core node must not start 64 stages."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from imnet_ablate import cpus, datacheck, demo, experiments, forked, loaders


@pytest.fixture
def one_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process may run on one CPU, whatever the machine has."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_auto_counts_follow_the_affinity_mask_not_the_machine(one_cpu: None) -> None:
    assert cpus.available() == 1
    assert experiments.worker_count(OmegaConf.create({"jobs": "auto"})) == 1
    assert experiments.worker_count(OmegaConf.create({"jobs": 3})) == 3  # a number is taken as given
    assert loaders.worker_count("auto") == 0
    assert demo.worker_count() == 1
    check = OmegaConf.create({"check": {"what": "imagenet", "workers": "auto", "max_show": 10, "min_side": 1},
                             "data": {}})
    assert datacheck.read_check(check).workers == 1
    # map_forked's default share: everything here, no child forked (a child would call os.fork)
    seen = []
    assert forked.map_forked(list(range(64)), lambda x: seen.append(x) or x, bytes, lambda x, data: x) == list(
        range(64))
    assert seen == list(range(64))


def test_without_an_affinity_mask_the_machines_count_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """macOS has no ``os.sched_getaffinity``: the loader's ``num_workers=auto`` must not fail there."""
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert cpus.available() == 8
    assert loaders.worker_count("auto") == 7
    assert loaders.worker_count("auto", processes=4) == 0


def test_the_cpu_module_does_not_load_torch() -> None:
    """Subset builds and the demo generators size their workers with it and must stay torch-free."""
    code = "import sys; from imnet_ablate import cpus; cpus.available(); cpus.model(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
