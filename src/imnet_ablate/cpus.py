"""The CPUs a process may use and the processor they are. Torch-free, so subset builds, the demo generators and
the data check can size their workers without loading torch."""
from __future__ import annotations

import functools
import os
import platform
from pathlib import Path


def available() -> int:
    """CPUs this process may run on: its affinity mask (a SLURM allocation, ``taskset``), not the machine's count,
    so ``auto`` worker counts do not start more processes than the allocation holds. Where the platform has no
    affinity (macOS), the machine's count."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


@functools.cache
def model() -> str:
    """The processor's model name (``/proc/cpuinfo`` on Linux), else what the platform reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"
