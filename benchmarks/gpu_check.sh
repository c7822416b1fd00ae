#!/usr/bin/env bash
# The CUDA checks of one session, on the GPU machine, from the repository root (about 5 minutes):
#   bash benchmarks/gpu_check.sh
# With wheels carried in .whl/ (transformers and what it needs that the image lacks) they are
# installed first under /tmp/site. Writes $OUT (default ./gpu-out): env.txt, cuda.txt (tests/test_cuda.py),
# ckpt.txt (checkpointing tests on CUDA), log.txt.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}; mkdir -p "$OUT"
PY=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" REGATE_FX_SKIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
{
    nvidia-smi -L
    $PY -c "import torch, transformers, importlib.util as u; print('torch', torch.__version__, 'transformers', transformers.__version__, 'kernels', u.find_spec('kernels') is not None, 'flash_attn', u.find_spec('flash_attn') is not None)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
T0=$(date +%s)
timeout 240 $PY -m pytest -q -p no:cacheprovider -o addopts="" tests/test_cuda.py -x --durations=5 > "$OUT/cuda.txt" 2>&1
echo "test_cuda rc=$? $(( $(date +%s) - T0 ))s"; tail -n 12 "$OUT/cuda.txt"
T0=$(date +%s)
timeout 150 $PY -m pytest -q -p no:cacheprovider -o addopts="" tests/test_compat.py -k "not metadata and not installed_environment and not outside_the_range" \
    "tests/test_compile_ckpt.py::test_checkpointing_of_forward_wrappers_that_set_python_state" > "$OUT/ckpt.txt" 2>&1
echo "compat+ckpt (CPU tensors, GPU machine's stack) rc=$? $(( $(date +%s) - T0 ))s"; tail -n 5 "$OUT/ckpt.txt"
