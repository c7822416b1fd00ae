#!/usr/bin/env bash
# The README's first command. Sets up .venv (scripts/setup.sh), then runs the ReGATE study's default
# run: generated picture/question data, a small LLaVA (CLIP tower + Llama) pretrained here, one seed of
# dense / ReGATE / random token dropping in lockstep, the table, the plots and the Figure-5 view, in
# study-out/. Extra arguments go to `python -m examples.study` (--help). The full study (3 seeds, every
# run) is scripts/study.sh; the mechanics demo (rewrite report, oracle check) is scripts/mechanics.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m examples.study "$@"
