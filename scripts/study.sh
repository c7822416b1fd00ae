#!/usr/bin/env bash
# The full ReGATE study, in study-full/ (OUT=... to change): an lr sweep on seed 100 (dense and ReGATE,
# lrs 3e-4 1e-3 3e-3 1e-2), then seeds 0 1 2, each with its own data, pretraining, splits and init, and every
# run (dense, regate, random, dense_masked, regate_lam0, regate_lam1, regate_pruned) at its tuned lr,
# each trained to its plateau. Resumable: finished runs (OUT/runs/**.json) are not redone.
# JOBS=3 (default) runs the sweep's 4 lrs and then the seeds as parallel processes (one core each is
# plenty; runs of one seed stay in lockstep, so their wall times compare); JOBS=1 runs one process.
# Sets up .venv first unless STUDY_PYTHON names a python. Extra arguments go to every invocation.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${STUDY_PYTHON:-}" ]; then bash scripts/setup.sh; fi
PY=${STUDY_PYTHON:-.venv/bin/python}
OUT=${OUT:-study-full}
JOBS=${JOBS:-3}
study() { OMP_NUM_THREADS=1 "$PY" -m examples.study --full --out "$OUT" "$@"; }
parallel() {  # parallel LABEL ARGS... : one process per value of $VALUES, logs in $OUT/logs/
    local label=$1; shift
    local pids=() v fail=0
    mkdir -p "$OUT/logs"
    for v in $VALUES; do
        (study "$@" "${v%%:*}" "${v#*:}" 2>&1 | sed -u "s/^/[$label ${v#*:}] /" | tee -a "$OUT/logs/$label-${v#*:}.log") &
        pids+=($!)
    done
    for p in "${pids[@]}"; do wait "$p" || fail=1; done
    return $fail
}
t0=$(date +%s)
if [ "$JOBS" -gt 1 ]; then
    VALUES="--sweep-lrs:0.0003 --sweep-lrs:0.001 --sweep-lrs:0.003 --sweep-lrs:0.01" parallel sweep --sweep-only --no-fig5 "$@"
    VALUES="--seeds:0 --seeds:1 --seeds:2" parallel seed --no-report "$@"
fi
study "$@"   # everything finished above is skipped: the tuned lrs, then the summary of all seeds
echo "study.sh: $(( $(date +%s) - t0 )) s end to end; results in $OUT/"
