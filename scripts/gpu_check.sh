#!/usr/bin/env bash
# Input-pipeline check on a GPU machine (issue 7), under 8 minutes on one H100: generates ImageNet-size JPEGs,
# packs them, then times the reference recipe, the files path, the packed path (CPU decode and batched GPU decode),
# AlexNet alone (224 px, batch 256, bf16, channels_last), whole train steps fed by the packed loader, the same two
# for ResNet-50 (model alone and end to end, one run), and a few hundred voc-det steps; prints one table last,
# with the setup (GPU, CUDA, cuDNN) the voc-det transfer's stage.json recorded.
#
# On a bare device machine, from the repository root:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD/src
#   bash scripts/gpu_check.sh [out_dir]
# Options (environment): GPU_CHECK_TINY=1 runs tiny sizes on the CPU (checks the script itself);
# GPU_CHECK_COMPILE=1 adds torch.compile to the model runs; PYTHON (default python3).
set -euo pipefail
OUT=${1:-${OUT:-/tmp/gpu_check}}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export ABLATE_CACHE="$OUT/cache" PYTHONUNBUFFERED=1
COMPILE=$([ "${GPU_CHECK_COMPILE:-0}" = 1 ] && echo true || echo false)
CORES=$(nproc)
if [ "${GPU_CHECK_TINY:-0}" = 1 ]; then
  IMAGES=64 BATCH=16 WORKERS=2 REPEATS=1 STEPS=2 DEVICE=cpu DET_ITERS=4 GPU_DECODE=force
else
  IMAGES=10240 BATCH=256 WORKERS=$((CORES > 2 ? CORES - 2 : 1)) REPEATS=3 STEPS=50 DEVICE=auto DET_ITERS=300 GPU_DECODE=auto
fi
COMMON=(paths.runs="$OUT/runs" device=$DEVICE bench.record=false bench.litdata=false bench.images=$IMAGES
        bench.batch_size=$BATCH bench.workers=$WORKERS bench.repeats=$REPEATS bench.steps=$STEPS bench.compile=$COMPILE)
ablate() { "$PY" -m imnet_ablate.cli "$@"; }
last_dir() { tail -n 1 "$1" | sed -n 's/^run_dir: //p'; }
"$PY" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, \
'cuda', torch.cuda.is_available() and torch.cuda.get_device_name(0))"

t0=$(date +%s)
ablate bench what=loader bench.gpu_decode=$GPU_DECODE "${COMMON[@]}" | tee "$OUT/loader.txt"
ablate bench what=model bench.model=alexnet "${COMMON[@]}" | tee "$OUT/model.txt"
ablate bench what=train bench.model=alexnet "${COMMON[@]}" | tee "$OUT/train.txt"
ablate bench what=train bench.model=resnet50 "${COMMON[@]}" | tee "$OUT/train_resnet50.txt"  # model-only + train
echo "bench: $(( $(date +%s) - t0 )) s"

DET="skipped: no transfer module / voc-det task in this tree"
if "$PY" -c "import imnet_ablate.transfer" 2>/dev/null && [ -f conf/task/voc-det.yaml ]; then
  t1=$(date +%s)
  # Full-size detector steps (600 px, AlexNet trunk from scratch) on the demo's VOC-like scenes: step speed only.
  if timeout 240 "$PY" -m imnet_ablate.cli transfer task=voc-det pretrain=scratch model=alexnet device=$DEVICE \
       paths.runs="$OUT/runs" task.iterations=$DET_ITERS task.optimizer.steps="[$DET_ITERS]" \
       task.checkpoint_every=100000 data.demo.train_per_class=2 data.demo.val_per_class=1 \
       data.demo.voc_trainval=400 data.demo.voc_test=50 > "$OUT/voc_det.txt" 2>&1; then
    DET="$DET_ITERS iterations (incl. demo generation and test) in $(( $(date +%s) - t1 )) s"
  else
    DET="failed or timed out after $(( $(date +%s) - t1 )) s: see $OUT/voc_det.txt"
  fi
fi

"$PY" - "$OUT" "$DET" <<'PY'
import json, sys
from pathlib import Path
out, det = Path(sys.argv[1]), sys.argv[2]
rows = []
for what, runs in (("loader", 1), ("model", 1), ("train", 2)):  # train: alexnet's, then resnet50's
    for res in sorted((out / "runs" / "bench").glob(f"{what}-*/results.json"))[-runs:]:
        rows += json.loads(res.read_text())["rows"]
print("\n== gpu_check summary ==")
print(f"{'pipeline':36} {'img/s':>10} {'img/CPU-s':>10}")
for r in rows:
    print(f"{r['pipeline']:36} {r.get('img_per_s', '-'):>10} {r.get('img_per_cpu_s', '-'):>10}")
by = {r["pipeline"]: r for r in rows}
for net in ("alexnet", "resnet50"):  # each model's first model-only row against its end-to-end row
    model = next((r for r in rows if r["pipeline"].startswith(f"model-only {net} ")), None)
    train = next((r for r in rows if r["pipeline"].startswith(f"train packed {net} ")), None)
    if model and train:
        print(f"{net} end-to-end / model-only: {train['img_per_s'] / model['img_per_s']:.2f} (goal >= 0.8)")
    if net == "alexnet" and train and "reference" in by:
        print(f"alexnet end-to-end / reference loader: {train['img_per_s'] / by['reference']['img_per_s']:.2f} "
              "(goal >= 3)")
print(f"voc-det: {det}")
from imnet_ablate import report  # what its stage.json recorded: the GPU, CUDA and cuDNN on a GPU machine
for stage in sorted((out / "runs" / "transfer").glob("*/stage.json")):
    print(f"voc-det computed on: {report.machine(stage.parent)}")
PY
