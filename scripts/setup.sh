#!/usr/bin/env bash
# Create .venv (if needed) and install regate_fx with its test, study and lint extras. Safe to run repeatedly.
# torch is installed first and pinned to the CPU build available on this machine, so that the
# `torch>=2.13,<2.14` requirement is already satisfied and pip never pulls a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test,study,lint]"
