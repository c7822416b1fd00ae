#!/usr/bin/env bash
# The mechanics demo (examples/demo.py): sparsify a tiny model, print the rewrite report, check sparse
# against the dense oracle, and run a few ReGATE training steps. Sets up .venv first.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python examples/demo.py "$@"
