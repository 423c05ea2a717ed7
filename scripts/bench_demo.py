#!/usr/bin/env python3
"""Time ``demo.ensure`` at the default demo settings (conf/data/demo.yaml) into a fresh cache folder; with
``--voc2012`` the VOC 2012 action devkit (``demo_actions.ensure``, ``data.demo.voc2012``), with ``--sun397`` the
SUN397-like scenes (``demo_sun397.ensure``, ``data.demo.sun397``) instead.

    .venv/bin/python scripts/bench_demo.py [--voc2012 | --sun397] [--cache DIR] [--keep]

Prints wall seconds, CPU seconds (this process and its workers: on a busy machine wall time overstates the cost,
CPU time / cores does not), the load average, file count and disk size. The folder is removed unless ``--keep``.
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

from omegaconf import OmegaConf

from imnet_ablate import demo, demo_actions, demo_sun397

CONF = Path(__file__).resolve().parents[1] / "conf" / "data" / "demo.yaml"


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def disk_usage(folder: Path) -> tuple[int, int, int]:
    """(files, apparent bytes, allocated bytes)."""
    files = [p.stat() for p in folder.rglob("*") if p.is_file()]
    return len(files), sum(s.st_size for s in files), sum(s.st_blocks * 512 for s in files)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, help="cache folder (default: a new temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the generated folder")
    ap.add_argument("--voc2012", action="store_true", help="time the VOC 2012 action devkit instead of the pair")
    ap.add_argument("--sun397", action="store_true", help="the SUN397-like scenes (data.demo.sun397) instead")
    args = ap.parse_args()
    params = OmegaConf.load(CONF).demo
    generator = demo_actions if args.voc2012 else demo_sun397 if args.sun397 else demo
    cache = args.cache or Path(tempfile.mkdtemp(prefix="bench_demo_"))
    if generator.folder_for(params, cache).exists():
        raise SystemExit(f"{generator.folder_for(params, cache)} exists: pass an empty --cache to time generation")
    load_before = os.getloadavg()[0]
    wall, cpu = time.perf_counter(), cpu_seconds()
    folder = generator.ensure(params, cache)
    wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    files, apparent, allocated = disk_usage(folder)
    print(f"params: {OmegaConf.to_container(params)}")
    print(f"workers: {demo.worker_count()}  cpus: {os.cpu_count()}  load average before/after: "
          f"{load_before:.1f}/{os.getloadavg()[0]:.1f}")
    print(f"wall_s: {wall:.1f}  cpu_s: {cpu:.1f}")
    print(f"files: {files}  apparent_MB: {apparent / 1e6:.1f}  disk_MB: {allocated / 1e6:.1f}")
    if not args.keep:
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
