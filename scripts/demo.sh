#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the main demo: sparsify a tiny model, print the rewrite report,
# check sparse against the dense oracle, and run a few ReGATE training steps.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python examples/demo.py "$@"
