#!/usr/bin/env bash
# GPU check for a machine with an NVIDIA GPU: installs the `gpu` extra (from local wheels in
# $WHEELS when given, else from the index), then checks ONNX Runtime's CUDA provider, FAISS GPU
# and a JAX GPU training step, printing throughput against the CPU in the same run.
#
#   WHEELS=.whl bash benchmarks/gpu_check.sh [--arch resnet50 --batch 128 --gallery 1000000]
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "nvidia-smi not found"

python3 - <<'PY' || NEED_INSTALL=1
import onnxruntime, faiss, jax
assert "CUDAExecutionProvider" in onnxruntime.get_available_providers()
assert faiss.get_num_gpus() > 0
assert jax.default_backend() == "gpu"
PY
if [ "${NEED_INSTALL:-0}" = 1 ]; then
  if [ -n "${WHEELS:-}" ]; then
    python3 -m pip install -q --no-index --find-links "$WHEELS" -e ".[gpu,all]"
  else
    python3 -m pip install -q -e ".[gpu,all]"
  fi
fi
python3 benchmarks/gpu_check.py "$@"
