#!/usr/bin/env bash
# One-go GPU check (under 8 minutes on a machine with an NVIDIA GPU): installs what it needs,
# verifies which ONNX Runtime execution provider really runs, checks parity on the GPU and
# prints the scorer speed table.  Results land in $OUT (default out/gpu_check).
#
#   bash benchmarks/gpu_check.sh
#
# Offline machines: put wheels in .whl/ (e.g. transformers, onnxruntime-gpu); they are
# installed with --no-index into /tmp/site first.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
elif ! $PY -c "import detectors" 2>/dev/null; then
    $PY -m pip install -q -e .
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.csv" || true
$PY -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())"
$PY benchmarks/gpu_check.py | tee "$OUT/gpu_check.json"
$PY benchmarks/scorer_speed.py --device cuda --threads 4 --json-out "$OUT/scorer_speed_cuda.json" \
    | tee "$OUT/scorer_speed_cuda.txt"
