#!/usr/bin/env bash
# The full ReGATE study: 3 seeds x every run (dense, regate, regate_lam0, regate_lam1, random,
# regate_context), in study-full/. Sets up .venv first. Extra arguments go to `python -m examples.study`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m examples.study --full --out study-full "$@"
