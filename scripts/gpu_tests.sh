#!/usr/bin/env bash
# Run the GPU-marked tests on a machine with an NVIDIA GPU, from the repository root:
#   bash scripts/gpu_tests.sh [pytest args...]
# Builds libeet_kernels.so for this GPU's architecture (EET_CUDA_ARCHITECTURES, default: the GPU's own),
# points eet at it, and runs `pytest -m gpu`. For TensorRT-RTX on an H100/H200, set EET_CC_SHIM to the
# test shim's folder first (tests/conftest.py loads it; the product never does).
set -euo pipefail
cd "$(dirname "$0")/.."
arch=${EET_CUDA_ARCHITECTURES:-$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)}
build=${EET_BUILD_DIR:-/tmp/eet-build}
nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv
cmake -S . -B "$build" -DEET_CUDA_ARCHITECTURES="$arch" -DCMAKE_BUILD_TYPE=Release > /dev/null
cmake --build "$build" -j "$(nproc)"
export EET_KERNELS_LIB="$build/libeet_kernels.so"
export PYTHONUNBUFFERED=1
python3 -c "import torch, transformers, onnx, onnxruntime; print('torch', torch.__version__, '| transformers', transformers.__version__, '| onnx', onnx.__version__, '| onnxruntime', onnxruntime.__version__)"
python3 -m pytest -m gpu -v -s -p no:cacheprovider "${@:-tests}"
