"""ablate bench: CPU accounting of live workers, the docs section it appends to, a tiny loader run end to end."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

from imnet_ablate import bench
from imnet_ablate.config import conf_dir


def test_cpu_seconds_counts_live_children():
    burn = ("import time\nt = time.process_time()\nwhile time.process_time() - t < 0.5: pass\n"
            "print('burnt', flush=True)\ntime.sleep(60)")
    before = bench.cpu_seconds()
    child = subprocess.Popen([sys.executable, "-c", burn], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "burnt"
        # rusage would see nothing until the child exits; /proc counts in sampled 10 ms ticks, so allow a few
        assert bench.cpu_seconds() - before >= 0.45
    finally:
        child.kill()
        child.wait()


def test_round_ratio_is_the_median_of_within_round_ratios():
    base = [(100, 1.0, 1.0), (100, 2.0, 2.0), (100, 1.0, 4.0)]  # the machine slows down, then recovers
    fast = [(100, 0.5, 0.25), (100, 1.0, 0.5), (100, 0.5, 1.0)]  # always 4x the images per CPU-second
    assert bench.round_ratio(fast, base) == 4.0 and bench.round_ratio(fast, base, column=1) == 2.0
    assert bench.summary(base)["img_per_cpu_s"] == 50.0


def test_append_doc_writes_only_its_section(tmp_path: Path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n## Pre-training\n\nkeep me\n")
    bench.append_doc(doc, "first run")
    assert doc.read_text().startswith("# Benchmarks\n\n## Pre-training\n\nkeep me\n")
    doc.write_text(doc.read_text() + "\n## Subsets\n\nmine too\n")
    bench.append_doc(doc, "second run")
    text = doc.read_text()
    section = text.split(bench.SECTION)[1].split("\n## ")[0]
    assert section.index("first run") < section.index("second run")
    assert text.endswith("## Subsets\n\nmine too\n") and text.count(bench.SECTION) == 1


def test_loader_bench_runs_every_pipeline(tmp_path: Path, capsys):
    doc = tmp_path / "benchmarks.md"
    overrides = [f"paths.runs={tmp_path / 'runs'}", f"paths.cache={tmp_path / 'cache'}", "bench.images=6",
                 "bench.width=80", "bench.height=60", "bench.size=32", "bench.batch_size=3", "bench.workers=0",
                 "bench.repeats=1", "bench.litdata=false", "bench.gpu_decode=force", "pack.short_side=48",
                 "pack.workers=1", f"bench.doc={doc}"]
    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        cfg = compose(config_name="bench", overrides=overrides)
    out = bench.run(cfg)
    lines = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(r"packed/reference images/s ratio: \d+\.\d\d", lines[-1])
    rows = {r.split(" | ")[0].strip("| "): r for r in lines if r.startswith("| ")}
    for name in ("reference", "files", "packed (resized_crop)", "packed (crop)", "decode+crop alone",
                 "packed-cpu-decode"):
        assert re.search(rf"^\| {re.escape(name)} \| 6 \|", rows.get(name, ""), re.M), name
    assert (out / "results.json").is_file() and bench.SECTION in doc.read_text()
