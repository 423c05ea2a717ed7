#!/usr/bin/env python3
"""Build the packaged list of the 397 SUN397 scene categories (``src/imnet_ablate/sun397_categories.txt``).

The runtime never downloads anything: it reads the packaged file, which this script writes from the label list
that the ``tensorflow-datasets`` wheel ships for its SUN397 builder
(``tensorflow_datasets/image_classification/sun397_labels.txt``). The wheel is only opened as a zip file, never
installed. The output has the format of the dataset's own ``SUN397/ClassName.txt`` (one ``/a/abbey`` line per
category, sorted), so the generated demo tree can ship it as its ``ClassName.txt``. Rerun it to regenerate the
file; the output is deterministic.

    pip download tensorflow-datasets==4.9.10 --no-deps -d /tmp/tfds
    python scripts/build_sun397.py --wheel /tmp/tfds/tensorflow_datasets-4.9.10-py3-none-any.whl

Without ``--wheel`` the script runs that ``pip download`` itself into a temporary folder.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "src" / "imnet_ablate" / "sun397_categories.txt"
WHEEL = "tensorflow-datasets==4.9.10"
MEMBER = "tensorflow_datasets/image_classification/sun397_labels.txt"
CATEGORY = re.compile(r"/([a-z])/\1[a-z_]*(/[a-z_]+)?")  # /a/abbey, /a/apartment_building/outdoor


def download_wheel(folder: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", WHEEL, "--no-deps", "--quiet", "-d", str(folder)],
                   check=True)
    return next(folder.glob("tensorflow_datasets-*.whl"))


def read_categories(wheel: Path) -> list[str]:
    """The 397 category lines of the wheel's SUN397 label list, validated and sorted."""
    with zipfile.ZipFile(wheel) as z:
        text = z.read(MEMBER).decode("ascii")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    bad = [line for line in lines if not CATEGORY.fullmatch(line)]
    if bad or len(set(lines)) != 397:
        sys.exit(f"build_sun397: {wheel}:{MEMBER}: expected 397 distinct /<letter>/<name> lines, "
                 f"found {len(set(lines))} ({len(bad)} malformed)")
    return sorted(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wheel", help=f"a downloaded {WHEEL} wheel (default: pip download it)")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        wheel = Path(args.wheel) if args.wheel else download_wheel(Path(tmp))
        categories = read_categories(wheel)
    out = Path(args.out)
    fd, tmp_out = tempfile.mkstemp(dir=out.parent, prefix=out.name, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write("".join(f"{c}\n" for c in categories))
    os.replace(tmp_out, out)
    print(f"wrote {out}: {len(categories)} categories")


if __name__ == "__main__":
    main()
