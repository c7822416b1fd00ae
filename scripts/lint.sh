#!/usr/bin/env bash
# Lint, format check and type check the package: ruff (default rules plus import sorting), ruff format, mypy
# (check_untyped_defs). The configuration is in pyproject.toml; scripts/test.sh (hence CI) runs this first.
# Uses the venv's tools when there is one (scripts/setup.sh installs the `lint` extra), else those on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=""
if [ -x .venv/bin/ruff ]; then
    bin=.venv/bin/
fi
"${bin}ruff" check regate_fx
"${bin}ruff" format --check regate_fx
"${bin}mypy"
