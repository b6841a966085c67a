#!/usr/bin/env bash
# GPU benchmark: EfficientNet-Lite0 on one NVIDIA GPU through Triton (from the nvidia-pytriton wheel),
# as ratios to the GPU model-only ceiling measured in the same run, next to the CPU numbers.
#
# STATUS: PREPARED BUT NOT YET RUN. Written in a session without a GPU; the first session that has
# the H100 should run it, fix what breaks and record the numbers in docs/BENCHMARKS.md ("GPU").
#
# Here (CPU machine):   .venv/bin/python -m bench.gpu.prepare     # -> .cache/gpu-bundle (~50 MB)
# There (GPU machine):  bash bench/gpu_bench.sh                   # with .cache/gpu-bundle carried along
#                       (run tool: carry [".cache/gpu-bundle"], timeout_s ~420; results land in $OUT)
#
# What runs where: the network runs on the GPU in torch (fp32 and fp16, channels_last) inside Triton's
# Python backend (instance_group KIND_GPU, dynamic batching); Triton itself, the Python backend stub,
# the HTTP client threads and the uint8 tensors' preparation run on the CPU. The GPU machine's
# onnxruntime is CPU-only, so the ONNX file is not used there; the same weights are (bench/gpu/lite0.py).
set -euo pipefail
cd "$(dirname "$0")/.."
BUNDLE="$(realpath "${BUNDLE:-.cache/gpu-bundle}")"
OUT="${OUT:-/tmp/gpu-bench-out}"
PY="${PY:-python3}"
HTTP_PORT="${HTTP_PORT:-18000}"
mkdir -p "$OUT"
[ -f "$BUNDLE/triton.tar.gz" ] || { echo "no bundle at $BUNDLE: run python -m bench.gpu.prepare first" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia-smi.csv" || true

WORK="$(mktemp -d /tmp/gpu-bench.XXXXXX)"
TRITON_PID=""
cleanup() { [ -n "$TRITON_PID" ] && kill "$TRITON_PID" 2>/dev/null && wait "$TRITON_PID" 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT
tar -xzf "$BUNDLE/triton.tar.gz" -C "$WORK"
STUB_VERSION="$($PY -c 'import sys; print(f"{sys.version_info.major}.{sys.version_info.minor}")')"
mkdir -p "$WORK/backends/python"
cp "$WORK"/pytriton/tritonserver/backends/python/* "$WORK/backends/python/"
cp "$WORK/pytriton/tritonserver/python_backend_stubs/$STUB_VERSION/triton_python_backend_stub" "$WORK/backends/python/"

for precision in fp32 fp16; do
  model="$WORK/models/lite0_gpu_$precision"
  mkdir -p "$model/1"
  cp bench/gpu/model.py "$model/1/model.py"
  cat > "$model/config.pbtxt" <<PBTXT
name: "lite0_gpu_$precision"
backend: "python"
max_batch_size: 256
input [ { name: "image" data_type: TYPE_UINT8 dims: [ 224, 224, 3 ] } ]
output [ { name: "probabilities" data_type: TYPE_FP32 dims: [ 1000 ] } ]
dynamic_batching { max_queue_delay_microseconds: 1000 }
instance_group [ { count: 1 kind: KIND_GPU gpus: [ 0 ] } ]
parameters { key: "precision" value: { string_value: "$precision" } }
PBTXT
done

TORCH_SITE="$($PY -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))')"
export LD_LIBRARY_PATH="$WORK/nvidia_pytriton.libs:${LD_LIBRARY_PATH:-}"
export PYTHONPATH="$BUNDLE/py:$TORCH_SITE:${PYTHONPATH:-}"
export SHOPVISION_GPU_BUNDLE="$BUNDLE"
"$WORK/pytriton/tritonserver/bin/tritonserver" --model-repository="$WORK/models" \
  --backend-directory="$WORK/backends" --http-address=127.0.0.1 --http-port="$HTTP_PORT" \
  --grpc-address=127.0.0.1 --grpc-port=$((HTTP_PORT + 1)) --metrics-port=$((HTTP_PORT + 2)) \
  --strict-readiness=true > "$OUT/triton.log" 2>&1 &
TRITON_PID=$!
for _ in $(seq 1 180); do
  if $PY -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:$HTTP_PORT/v2/health/ready', timeout=1).status != 200)" 2>/dev/null; then
    break
  fi
  kill -0 "$TRITON_PID" 2>/dev/null || { echo "tritonserver exited; see $OUT/triton.log" >&2; tail -30 "$OUT/triton.log" >&2; exit 1; }
  sleep 1
done
curl_ready="import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:$HTTP_PORT/v2/health/ready', timeout=1).status != 200)"
$PY -c "$curl_ready" 2>/dev/null || { echo "Triton not ready after 180 s; see $OUT/triton.log" >&2; exit 1; }
timeout 420 $PY bench/gpu/measure.py --bundle "$BUNDLE" --triton "127.0.0.1:$HTTP_PORT" --out "$OUT/gpu_results.json" \
  | tee "$OUT/gpu_bench.txt"
