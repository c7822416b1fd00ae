#!/usr/bin/env bash
# Compile-time matrix of docs/benchmarks.md ("Compile time"): bench_step.py --compile-time for the
# eager and inductor backends at 4 and 24 layers on the CPU (inductor: plain torch.compile, the
# default sparse step and SparsifyConfig(dynamic=True); then the same with a second step at a new
# length), then inductor on CUDA when there is a GPU. Each stage has its own time limit; JSON lines
# and logs go under ${OUT:-.}. STAGES="cpu4 cpu24" runs some stages only.
set -u
OUT=${OUT:-.}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python -c "import torch, transformers, sys; print(sys.version.split()[0], torch.__version__, transformers.__version__, torch.cuda.is_available())" | tee "$OUT/env.txt"
nproc >> "$OUT/env.txt"
STAGES=${STAGES:-"eager eager24 cpu4 cpu24 two4 two24 cuda4"}
V="--compile-variants dense sparse sparse_dynamic --repeat ${REPEAT:-1}"  # REPEAT=5: warm medians
stage() {  # name, limit (s), bench arguments...
  local name=$1 limit=$2; shift 2
  case " $STAGES " in *" $name "*) ;; *) return 0 ;; esac
  timeout "$limit" python benchmarks/bench_step.py --compile-time --seqs 512 --threads 1 --out "$OUT/results.jsonl" "$@" \
    > "$OUT/$name.txt" 2>&1
  echo "$name rc=$? $(date +%s)" >> "$OUT/stages.txt"
}
stage eager 90 --backends eager --layers 4 && stage eager24 90 --backends eager --layers 24
stage cpu4 ${CPU4_S:-300} --backends inductor --layers 4 $V
stage cpu24 ${CPU24_S:-600} --backends inductor --layers 24 $V
stage two4 ${CPU4_S:-300} --backends inductor --layers 4 $V --second-seq 448
stage two24 ${CPU24_S:-600} --backends inductor --layers 24 $V --second-seq 448
if python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  stage cuda4 ${CUDA4_S:-150} --backends inductor --layers 4 --device cuda
fi
