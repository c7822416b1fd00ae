#!/usr/bin/env bash
# Issue 8, target 6: the sparse step on a GPU. One command, about 6 minutes wall-clock at most:
#
#   bash benchmarks/gpu_run.sh            # on the GPU machine, from the repository root
#   bash benchmarks/gpu_run.sh --tiny     # rehearsal with tiny sizes (CPU or GPU), same stages
#
# Runs against the Python packages already installed (torch, transformers, rich, pytest); this
# checkout's regate_fx is imported through PYTHONPATH, nothing is installed. Writes under $OUT
# (default ./gpu-out):
#   env.txt        versions, GPU, whether flash-attn is importable
#   preflight.txt  pytest tests/test_cuda.py: the sparse step against the oracle on CUDA
#   results.jsonl  one JSON line per benchmark cell (benchmarks/bench_step.py)
#   log.txt        everything printed, with each stage's wall time
#
# Stages, each under its own time limit, all under one deadline (a stage that would start with
# less than a minute left is skipped; a stage that fails does not stop the next):
#   1. preflight   tests/test_cuda.py (tiny models, fp32 / bf16, eager backend)
#   2. A           bf16, T = 4096, Llama-3.2-1B shape (1.24 B parameters, random weights), SDPA,
#                  B = 2, eager backend: dense vs sparse vs oracle at rho 0.4 and 1, with and
#                  without an attention_mask; peak memory via torch.cuda.max_memory_allocated
#   3. B           the same model, LLaVA-like mixed lengths (25-100% of T, image block + text),
#                  B = 4, rho 0.4: the default layout ("auto": packed, varlen attention) against
#                  layout="padded" and the oracle; padding waste of the (B, K) layout
#   4. C           stage A with the inductor backend (rho 0.4), compiles included in its limit:
#                  last, because its compile time is the least predictable. No attention_mask and
#                  --plain-use-cache, so plain torch.compile's dense and oracle steps get SDPA's
#                  is_causal path too (with use_cache=False or a mask they build a (B,1,T,T) mask)
set -u
cd "$(dirname "$0")/.."

TINY=0
[ "${1:-}" = "--tiny" ] && TINY=1
OUT=${OUT:-$PWD/gpu-out}
PY=${PYTHON:-python3}
DEADLINE_S=${DEADLINE_S:-345}   # the whole script; the lead's budget is about 6 minutes
STAGES=${STAGES:-"preflight A B C"}   # a subset, e.g. STAGES="preflight B"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
export KINETO_LOG_LEVEL=5
LOG="$OUT/log.txt"
RES="$OUT/results.jsonl"
START=$(date +%s)

if [ "$TINY" = 1 ]; then
    MODEL=(--preset tiny --dtype bf16)
    SEQ=256
    ROUNDS=(--rounds 2 --warmup 1)
else
    MODEL=(--preset 1b --dtype bf16)
    SEQ=4096
    ROUNDS=(--rounds 5 --warmup 2)
fi

log() { echo "[$(date +%H:%M:%S) +$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }

# stage NAME CAP_SECONDS COMMAND...: run under min(CAP, time left before the deadline)
stage() {
    local name=$1 cap=$2
    shift 2
    case " $STAGES " in *" $name "*) ;; *) log "stage $name: not in STAGES"; return 0 ;; esac
    local left=$(( DEADLINE_S - ($(date +%s) - START) ))
    local limit=$(( cap < left ? cap : left ))
    if [ "$limit" -lt 60 ]; then
        log "stage $name: skipped (${left}s left before the deadline)"
        return 0
    fi
    log "stage $name: start (limit ${limit}s): $*"
    local t0=$(date +%s)
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    log "stage $name: rc=$rc after $(( $(date +%s) - t0 ))s$([ "$rc" = 124 ] && echo ' (time limit)')"
}

log "gpu_run.sh: tiny=$TINY OUT=$OUT deadline ${DEADLINE_S}s"
{
    echo "date: $(date -Is)"
    echo "git: $(git rev-parse --short HEAD 2>/dev/null)$(git status --porcelain --untracked-files=no 2>/dev/null | grep -q . && echo +dirty)"
    nvidia-smi -L 2>&1 || true
    "$PY" - <<'EOF' 2>&1
import importlib.util, platform, torch, transformers
print("python", platform.python_version(), "torch", torch.__version__, "transformers", transformers.__version__)
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
print("flash_attn importable:", importlib.util.find_spec("flash_attn") is not None)
import regate_fx
print("regate_fx from", regate_fx.__file__)
EOF
} > "$OUT/env.txt"
tee -a "$LOG" < "$OUT/env.txt"

stage preflight 90 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py -o addopts="" \
    > "$OUT/preflight.txt" 2>&1
tail -n 5 "$OUT/preflight.txt" | tee -a "$LOG"

BENCH=("$PY" benchmarks/bench_step.py "${MODEL[@]}" --seqs "$SEQ" --attn sdpa --out "$RES")
stage A 120 "${BENCH[@]}" --backends eager --batch 2 --rhos 0.4 1 --attention-mask both "${ROUNDS[@]}"
stage B 120 "${BENCH[@]}" --backends eager --batch 4 --rhos 0.4 --lengths mixed --padded-variant "${ROUNDS[@]}"
stage C 240 "${BENCH[@]}" --backends inductor --batch 2 --rhos 0.4 --attention-mask none --plain-use-cache "${ROUNDS[@]}"

log "done in $(( $(date +%s) - START ))s; results: $RES ($(wc -l < "$RES" 2>/dev/null || echo 0) lines)"
"$PY" - "$RES" <<'EOF' 2>&1 | tee -a "$LOG"
import json, sys
try:
    rows = [json.loads(l) for l in open(sys.argv[1])]
except OSError:
    rows = []
for r in rows:
    med, peak = r["median_s"], r.get("peak_mib", {})
    print(f"{r['backend']:9} T={r['seq']} B={r['batch']} mask={r['attention_mask']:7} {r['lengths']:5} "
          + "  ".join(f"{k} {v * 1000:.1f}ms" + (f"/{peak[k]:.0f}MiB" if k in peak else "") for k, v in med.items()))
    print("          ratios: " + ", ".join(f"{k} {v:.3f}" for k, v in r["ratios"].items())
          + f"; rewrite: {r.get('rewrite')}; check: {r['check']}")
EOF
