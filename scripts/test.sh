#!/usr/bin/env bash
# Set up (scripts/setup.sh), lint and type check (scripts/lint.sh), and run the test suite. Extra arguments go to pytest.
# Two pytest-xdist workers by default (CI's machine has 2 cores; tests/conftest.py gives each one
# intra-op thread); REGATE_TEST_WORKERS=0 runs in one process (or pass your own -n / -p no:xdist).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/lint.sh
workers=${REGATE_TEST_WORKERS:-2}
xdist=()
if [ "$workers" != "0" ] && [[ " $* " != *" -n "* ]] && [[ " $* " != *"no:xdist"* ]]; then
    xdist=(-n "$workers" --dist worksteal)
fi
exec .venv/bin/python -m pytest -q "${xdist[@]}" "$@"
