#!/usr/bin/env bash
# One lent-GPU session for issue 3 (and the GPU figures of issue 7), prepared and tried on the CPU first.
#
#   device run (command): bash experiments/device_run.sh        carry: [".whl"]
#
# The GPU box has torch, numpy, scipy, pandas, pyarrow, scikit-learn and matplotlib but no SimpleITK;
# its wheel travels in .whl/ (git-ignored):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl SimpleITK==2.5.7
#
# 1. the detection experiment (phantoms → cache → GLOW trained on the GPU under a wall-clock budget →
#    voxel map tuned on validation → test once); a larger model than the CPU run, same splits and seeds;
# 2. with the time that is left, bench/gpu_flow.py --quick at width 256 (fast-path exactness on the GPU
#    and eager vs optimised throughput).
# Everything lands in $OUT (≤ 8 files): logs, gpu.txt, detection.tgz, model.tgz, gpu_flow.{json,md}.
# CPU rehearsal (small splits, one thread):
#   OUT=/tmp/out DEVICE=cpu TRAIN_MIN=0.2 THREADS=1 PY=.venv/bin/python BENCH=--cpu-smoke \
#   EXTRA="--train-normal 4 --val-normal 3 --val-abnormal 5 --test-normal 3 --test-abnormal 5" \
#   bash experiments/device_run.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONUTF8=1
OUT=${OUT:?set OUT}
DEVICE=${DEVICE:-cuda}
TRAIN_MIN=${TRAIN_MIN:-3.5}
TOTAL_S=${TOTAL_S:-570}
BENCH=${BENCH:---quick --widths 256}
W=${WORKDIR:-/tmp/det-gpu}
t0=$(date +%s)
PY=${PY:-python3}

if [ -d .whl ] && ! $PY -c "import SimpleITK" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
  $PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__)"
  lscpu 2>/dev/null | grep -m1 'Model name' || true; date -u; } > "$OUT/gpu.txt"

# 1. detection, voxel map only (the paper-map stages are CPU-bound tuning; the CPU run reports them)
set -o pipefail
timeout $((TOTAL_S - 150)) $PY experiments/detection.py --out "$W" --device "$DEVICE" --threads "${THREADS:-8}" \
  --levels 3 --steps 8 --width 64 --batch-size 128 --train-minutes "$TRAIN_MIN" --val-every 250 \
  --skip-paper-map ${EXTRA:-} 2>&1 | tee "$OUT/detection.log"
echo "detection exit $? after $(( $(date +%s) - t0 )) s" | tee -a "$OUT/detection.log"
( cd "$W" && tar czf "$OUT/model.tgz" model 2>/dev/null
  tar czf "$OUT/detection.tgz" args.json voxel/trials.csv voxel/operating_point.json voxel/test/evaluation.json \
    voxel/test/test_studies.csv voxel/test/voxel_analysis.md \
    $(ls -d voxel/test/maps/*/preview.png 2>/dev/null | head -12) 2>/dev/null ) || true

# 2. the GPU benchmark with what is left (it rewrites its JSON after every cell)
left=$(( TOTAL_S - ($(date +%s) - t0) - 20 ))
if [ "$left" -gt 60 ]; then
  timeout "$left" $PY bench/gpu_flow.py $BENCH --budget-s $((left - 40)) --out "$OUT/gpu_flow.json" \
    --md "$OUT/gpu_flow.md" > "$OUT/bench.log" 2>&1
  echo "bench exit $? after $(( $(date +%s) - t0 )) s" | tee -a "$OUT/bench.log"
fi
tail -3 "$OUT/bench.log" 2>/dev/null
echo "total $(( $(date +%s) - t0 )) s"
