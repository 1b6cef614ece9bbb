#!/usr/bin/env bash
# The GPU check: the whole suite with every test's Trainer on the GPU (LC_TEST_ACCELERATOR,
# see tests/conftest.py), then the device tests again on their own. Run it where a CUDA
# build of torch is installed: `make test-gpu` in a venv of ours, or `ci/gpu_check.sh` under
# another python (PY=...). A machine with no package index installs the wheels of what it
# lacks from $WHEELS first (pip download them elsewhere for its Python and platform).
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
