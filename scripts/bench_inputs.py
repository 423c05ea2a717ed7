"""What the input rules cost: the header check before each decode, the index-row check, and verifying a reused
stage's checksums.

    .venv/bin/python scripts/bench_inputs.py [--rows 1281167] [--model alexnet]

- header: ``inputs.jpeg_size`` + ``check_pixels`` per image, against ``loaders.decode`` of the same 500 x 375 JPEG;
- index rows: ``inputs.first_escaping`` over ImageNet-size ``train.tsv`` paths (what ``loaders.read_split`` adds);
- DONE: ``Stage.is_done()`` of a pre-training stage holding ``model.pt`` and ``checkpoint.pt`` of ``--model``
  (first call: every output hashed; second call in the same process: remembered, a ``stat`` per output).
"""
from __future__ import annotations

import argparse
import io
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from imnet_ablate import inputs, loaders, models, pretrain, store


def per_call(fn, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def header_cost() -> tuple[float, float]:
    pixels = np.random.default_rng(0).integers(0, 255, (375, 500, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    header = per_call(lambda: inputs.check_pixels(*inputs.jpeg_size(data), inputs.DEFAULT_MAX_PIXELS), 20000)
    return header, per_call(lambda: loaders.decode(data), 200)


def rows_cost(rows: int) -> float:
    paths = [f"train/n{k % 1000:08d}/n{k % 1000:08d}_{k}.JPEG" for k in range(rows)]
    t0 = time.perf_counter()
    assert inputs.first_escaping(paths) is None
    return time.perf_counter() - t0


def done_cost(model_name: str, folder: Path) -> tuple[float, float, float]:
    """(MB hashed, first is_done s, second is_done s) for a stage with the model's model.pt and checkpoint.pt."""
    stage = store.Stage(folder, "pretrain", "bench", {"model": model_name})
    stage.path.mkdir(parents=True)
    model = models.build({"name": model_name, "input_size": 224}, 1000)
    optimizer = pretrain.make_optimizer(model, type("O", (), {"lr": 0.01, "weight_decay": 5e-4, "bias_lr_mult": 2,
                                                               "bias_decay": False, "momentum": 0.9})())
    model(torch.zeros(2, 3, 224, 224)).sum().backward()
    optimizer.step()  # momentum buffers, as a real checkpoint holds them
    store.atomic_torch_save(stage.path / "model.pt", model.state_dict())
    store.atomic_torch_save(stage.path / "checkpoint.pt", {"model": model.state_dict(),
                                                          "optimizer": optimizer.state_dict()})
    outputs = ["model.pt", "checkpoint.pt"]
    size = sum((stage.path / o).stat().st_size for o in outputs) / 1e6
    stage.finish(outputs)
    store._HASHED.clear()  # as a fresh process finds it
    t0 = time.perf_counter()
    assert stage.is_done()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    assert stage.is_done()
    return size, first, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_281_167)
    parser.add_argument("--model", default="alexnet")
    args = parser.parse_args()
    torch.set_num_threads(1)
    header, decode = header_cost()
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread")
    print(f"header check {header * 1e6:.1f} us per image; decode {decode * 1e3:.2f} ms (500x375 JPEG): "
          f"{100 * header / decode:.2f}% more per image")
    print(f"index rows: {args.rows} paths checked in {rows_cost(args.rows):.2f} s")
    with tempfile.TemporaryDirectory() as tmp:
        size, first, again = done_cost(args.model, Path(tmp))
    print(f"DONE check of a {args.model} pre-training stage ({size:.0f} MB of outputs): {first:.2f} s first "
          f"({size / first:.0f} MB/s), {again * 1e3:.2f} ms again in the same process")


if __name__ == "__main__":
    main()
