#!/usr/bin/env bash
# The GPU check: the whole suite with every test's Trainer on the GPU (LC_TEST_ACCELERATOR,
# see tests/conftest.py), then the device tests again on their own. Run it where a CUDA
# build of torch is installed: `make test-gpu` in a venv of ours, or `ci/gpu_check.sh` under
# another python (PY=...). A machine with no package index installs the wheels of what it
# lacks from $WHEELS first. For a CUDA image with torch, Lightning, transformers, peft and
# onnxruntime but no index (Python 3.12 there), these were enough on 2026-11-30, fetched here:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --abi cp312 --abi abi3 --abi none --platform manylinux_2_28_x86_64 \
#     --platform manylinux2014_x86_64 --platform any -d .devwheels torchao==0.18.0 \
#     omegaconf wandb gguf compressed-tensors jsonargparse docstring-parser typeshed-client \
#     pydantic pydantic-core annotated-types typing-inspection loguru platformdirs distro \
#     sniffio cwevals googleapis-common-protos opentelemetry-api opentelemetry-sdk \
#     opentelemetry-proto opentelemetry-semantic-conventions opentelemetry-exporter-otlp-proto-http \
#     opentelemetry-exporter-otlp-proto-common opentelemetry-exporter-otlp-common \
#     opentelemetry-exporter-http-transport
# (pin each to the version `pip list` shows in .venv).
# Writes the log and junit report to $OUT (default: gpu-check/).
set -uo pipefail
PY=${PY:-python3}
OUT=${OUT:-gpu-check}
WORKERS=${WORKERS:-8}
mkdir -p "$OUT"
if [ -n "${WHEELS:-}" ]; then
    "$PY" -m pip install -q --no-deps --no-index "$WHEELS"/*.whl || exit 1
fi
"$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" - <<'PY' || exit 1
import torch, lightning, transformers, peft, torchao, onnxruntime
assert torch.cuda.is_available(), "no CUDA device: the GPU check needs one"
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(),
      "| lightning", lightning.__version__, "| transformers", transformers.__version__,
      "| peft", peft.__version__, "| torchao", torchao.__version__, "| onnxruntime", onnxruntime.__version__)
PY
export LC_TEST_ACCELERATOR=gpu CUBLAS_WORKSPACE_CONFIG=:4096:8 OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
"$PY" -m pytest -p no:cacheprovider -q -n "$WORKERS" --dist load -rfE --tb=short \
    --junitxml="$OUT/junit.xml" "$@" 2>&1 | tee "$OUT/log.txt"
