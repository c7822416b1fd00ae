#!/usr/bin/env bash
# The README's first command. Sets up .venv (scripts/setup.sh; skipped if STUDY_PYTHON names a python),
# then runs the ReGATE study's default run: generated picture/question data, a small LLaVA (CLIP tower +
# Llama) pretrained here, one seed of dense / ReGATE / random token dropping in lockstep, each to its
# plateau at the lrs the full study tuned, then the table, the plots and the Figure-5 view, in
# study-out/. Extra arguments go to `python -m examples.study` (--help). The full study (lr sweep,
# 3 seeds, every control) is scripts/study.sh; the mechanics demo is scripts/mechanics.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${STUDY_PYTHON:-}" ]; then bash scripts/setup.sh; fi
OMP_NUM_THREADS=1 exec "${STUDY_PYTHON:-.venv/bin/python}" -m examples.study "$@"
