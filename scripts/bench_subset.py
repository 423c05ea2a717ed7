#!/usr/bin/env python3
"""Benchmark of the subset builder on a generated ImageNet-size tree of empty files (the builder never opens one).

    .venv/bin/python scripts/bench_subset.py [--files 1281167] [--tmp /tmp]

Generates ``train/<wnid>/*.JPEG`` for the 1000 classes (1300 files per class, fewer for one class in eight, as in
ILSVRC-2012) and ``val/<wnid>/`` (50 each) under a temporary folder, then times, each in a fresh process so that peak
memory (``ru_maxrss``) is per step: ``torchvision.datasets.ImageFolder`` construction, the first (uncached) listing,
the cached listing, and every preset in ``conf/subset/`` built from the cached listing. Deletes the tree afterwards.
Prints a Markdown table for docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def generate(root: Path, total: int) -> int:
    from imnet_ablate import wordnet

    classes = wordnet.load().classes
    rng = random.Random(0)
    counts = [1300 if i % 8 else rng.randint(732, 1299) for i in range(len(classes))]
    scale = total / sum(counts)
    counts = [max(1, round(c * scale)) for c in counts]
    for wnid, n in zip(classes, counts):
        for split, k in (("train", n), ("val", 50)):
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for i in range(k):
                os.close(os.open(folder / f"{wnid}_{i}.JPEG", os.O_CREAT | os.O_WRONLY, 0o644))
    return sum(counts)


def peak_mib() -> float:
    """Peak resident memory of this process or of its largest child (forked children share its pages), MiB."""
    return max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)) / 1024


def cpu_s() -> float:
    """User + system CPU time of this process and its finished children (the forked listers and samplers): less
    noisy than wall time on a shared machine."""
    return sum(r.ru_utime + r.ru_stime for r in map(resource.getrusage, (resource.RUSAGE_SELF,
                                                                          resource.RUSAGE_CHILDREN)))


def timed(fn):
    """(result, wall seconds, CPU seconds) of ``fn()``."""
    t, c = time.perf_counter(), cpu_s()
    out = fn()
    return out, time.perf_counter() - t, cpu_s() - c


def step(name: str, root: Path, cache: Path, runs: Path) -> dict:
    """One measurement, run in its own process."""
    if name == "imagefolder":
        from torchvision.datasets import ImageFolder

        dataset, wall, cpu = timed(lambda: ImageFolder(str(root / "train")))
        return {"seconds": wall, "cpu": cpu, "images": len(dataset.samples), "peak_mib": peak_mib()}
    if name in ("scan", "cached"):
        from imnet_ablate.imagenet import list_imagenet

        listing, wall, cpu = timed(lambda: list_imagenet(root, cache))
        return {"seconds": wall, "cpu": cpu, "images": sum(map(len, listing.train.values())), "peak_mib": peak_mib()}
    from hydra import compose, initialize_config_dir

    from imnet_ablate import subsets
    from imnet_ablate.config import conf_dir

    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        cfg = compose("subset", [f"subset={name}", "data=imagenet", f"data.root={root}", f"data.voc_root={root}",
                                 f"paths.runs={runs}", f"paths.cache={cache}"])
    out, wall, cpu = timed(lambda: subsets.build(cfg))
    manifest = json.loads((out / "manifest.json").read_text())
    return {"seconds": wall, "cpu": cpu, "images": manifest["num_train"], "classes": manifest["num_classes"],
            "peak_mib": peak_mib()}


def run_step(name: str, root: Path, cache: Path, runs: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--step", name, "--root", str(root), "--cache", str(cache),
                          "--runs", str(runs)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=1_281_167, help="train files in all (ILSVRC-2012: 1281167)")
    ap.add_argument("--tmp", default=tempfile.gettempdir(), help="where the tree is generated (then deleted)")
    ap.add_argument("--presets", nargs="*", help="default: every conf/subset/*.yaml")
    ap.add_argument("--step", help=argparse.SUPPRESS)
    ap.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--runs", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.step:
        print(json.dumps(step(args.step, args.root, args.cache, args.runs)))
        return

    presets = args.presets or sorted(p.stem for p in (REPO / "conf" / "subset").glob("*.yaml"))
    work = Path(tempfile.mkdtemp(prefix="bench_subset.", dir=args.tmp))
    root, cache, runs = work / "imagenet", work / "cache", work / "runs"
    try:
        t = time.perf_counter()
        n = generate(root, args.files)
        print(f"generated {n} train files in {time.perf_counter() - t:.0f} s under {root}", file=sys.stderr)
        rows = [("torchvision ImageFolder(train)", run_step("imagefolder", root, cache, runs)),
                ("listing, first scan (+ cache write)", run_step("scan", root, cache, runs)),
                ("listing, cached", run_step("cached", root, cache, runs))]
        rows += [(f"build `{p}` from the cached listing", run_step(p, root, cache, runs)) for p in presets]
        t = time.perf_counter()
        cli = subprocess.run([sys.executable, "-m", "imnet_ablate.cli", "subset", "subset=full", "subset.seed=1",
                              "data=imagenet", f"data.root={root}", f"data.voc_root={root}", f"paths.runs={runs}",
                              f"paths.cache={cache}"], capture_output=True, text=True)
        cli_s = time.perf_counter() - t
        assert cli.returncode == 0, cli.stderr
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print("| step | wall s | CPU s | train images | classes | peak RSS (MiB) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for label, r in rows:
        print(f"| {label} | {r['seconds']:.2f} | {r['cpu']:.2f} | {r['images']} | {r.get('classes', '')} "
              f"| {r['peak_mib']:.0f} |")
    imagefolder, scan = rows[0][1], rows[1][1]
    print(f"\nfirst scan vs ImageFolder: {imagefolder['seconds'] / scan['seconds']:.1f}x faster (wall), "
          f"{imagefolder['cpu'] / scan['cpu']:.1f}x (CPU); "
          f"slowest preset: {max(r['seconds'] for _, r in rows[3:]):.2f} s; "
          f"peak RSS: {max(r['peak_mib'] for _, r in rows[1:]):.0f} MiB (builder), {rows[0][1]['peak_mib']:.0f} MiB "
          f"(ImageFolder); `ablate subset subset=full` end to end (new process, cached listing): {cli_s:.1f} s")


if __name__ == "__main__":
    main()
