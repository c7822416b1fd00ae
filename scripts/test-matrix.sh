#!/usr/bin/env bash
# Run the suite's fast subset against both ends of the dependency ranges in pyproject.toml.
#
#   bash scripts/test-matrix.sh [lowest|newest|both] [PYTEST ARGS...]
#
#   lowest  every requirement with a lower bound (>=) in [project.dependencies] and the test,
#           stacks and study extras is pinned to the lowest release within its range (read from
#           pyproject.toml here, so the script follows the file); the rest resolves as pip sees fit
#   newest  `pip install --upgrade`: what a fresh install resolves today (what CI runs)
#   both    lowest, then newest (the default); one end at a time
#
# Each end gets a throwaway venv in a temporary folder (removed at the end), torch==2.13.0 first
# (the CPU build; see scripts/setup.sh), then this checkout with its extras. Nothing touches
# .venv. PYTEST ARGS, when given, replace the fast subset below (e.g. `lowest tests/test_peft.py`).
# Exits non-zero if any end fails to install or to pass. The last recorded result: docs/versions.md.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

# The fast subset, in one place (92 tests, about 4 CPU-minutes per end; 9-10 min of wall time when
# others load this project's 2-core CPU, docs/versions.md): the sparse core and capture, gradient
# checkpointing and torch.compile, the version shims (test_compat.py), the runtime's selection and
# schedule (hypothesis), PEFT, the Trainer and TRL, checkpointing through the Trainer on a
# multimodal model, three multimodal families against the oracle, and the quick study (the study
# extra: pillow, matplotlib, tokenizers).
SUBSET=(
    tests/test_sparse.py
    --deselect "tests/test_sparse.py::test_no_recompilation_storm_with_varying_masks[llava-auto]"
    --deselect "tests/test_sparse.py::test_no_recompilation_storm_with_varying_masks[llava-packed]"
    --deselect "tests/test_sparse.py::test_no_recompilation_storm_with_varying_masks[llama-auto]"
    tests/test_capture.py
    tests/test_compile_ckpt.py
    tests/test_compat.py
    tests/runtime/test_selection.py
    tests/runtime/test_schedule.py
    tests/test_peft.py
    tests/stacks/test_trainer.py::test_gradient_accumulation_equals_one_double_batch
    tests/stacks/test_trainer.py::test_resume_equals_the_uninterrupted_run
    tests/stacks/test_trainer.py::test_logs_carry_token_statistics_and_evaluation_is_dense
    tests/stacks/test_trl.py
    "tests/stacks/test_checkpointing.py::test_checkpointed_sparse_steps_equal_the_same_steps_without[trainer-qwen2_vl]"
    "tests/test_mm_matrix.py::test_images_match_oracle[llava_next-sdpa]"
    "tests/test_mm_matrix.py::test_images_match_oracle[qwen2_vl-sdpa]"
    "tests/test_mm_matrix.py::test_images_match_oracle[gemma3-sdpa]"
    tests/examples/test_study.py::test_study_quick
)
# failures: short tracebacks without the captured output (torch logs pages of DEBUG lines)
PYTEST_COMMON=(-q -m "not slow" --timeout=600 -p no:cacheprovider --tb=short --show-capture=no --durations=8)
EXTRAS="test,stacks,study"
# the packages whose resolved versions are printed and recorded
KEY="torch transformers trl peft accelerate datasets huggingface_hub tokenizers kernels numpy rich pytest hypothesis pytest-timeout pytest-xdist pillow matplotlib"

ENDS=both
case "${1:-}" in
    lowest|newest|both) ENDS=$1; shift ;;
    -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
esac
if [ $# -gt 0 ]; then TESTS=("$@"); else TESTS=("${SUBSET[@]}"); fi
[ "$ENDS" = both ] && ENDS="lowest newest"

TMP=$(mktemp -d "${TMPDIR:-/tmp}/regate-matrix.XXXXXX")
trap 'rm -rf "$TMP"' EXIT

# `name==V` for every requirement of the project and the extras above that has a `>=` bound, V the
# lowest release that satisfies the requirement (`>=2.3` when 2.3.0 was never released: 2.3.1), found
# with `pip index versions`. Argument: the venv's python (its pip's vendored packaging parses them).
lower_bounds() {
    "$1" - "$ROOT/pyproject.toml" "$EXTRAS" <<'EOF'
import re, subprocess, sys
try:
    import tomllib
except ImportError:                       # Python 3.10: pip vendors a TOML reader
    from pip._vendor import tomli as tomllib
from pip._vendor.packaging.requirements import Requirement
from pip._vendor.packaging.utils import canonicalize_name
from pip._vendor.packaging.version import Version
with open(sys.argv[1], "rb") as f:
    project = tomllib.load(f)["project"]
reqs = list(project["dependencies"])
for extra in sys.argv[2].split(","):
    reqs += project["optional-dependencies"][extra]
bounds = {}
for line in reqs:
    req = Requirement(line)
    low = [s.version for s in req.specifier if s.operator == ">="]
    if low:
        name = canonicalize_name(req.name)
        if bounds.setdefault(name, (low[0], req.specifier))[0] != low[0]:
            sys.exit(f"{name}: two different lower bounds in pyproject.toml")
for name, (low, spec) in sorted(bounds.items()):
    out = subprocess.run([sys.executable, "-m", "pip", "index", "versions", name],
                         capture_output=True, text=True).stdout
    m = re.search(r"Available versions: (.*)", out)
    if not m:
        sys.exit(f"{name}: `pip index versions` found no releases")
    ok = [v for v in map(Version, m.group(1).split(", ")) if v in spec and not v.is_prerelease]
    if not ok:
        sys.exit(f"{name}: no release satisfies {spec}")
    print(f"{name}=={min(ok)}")
EOF
}

versions() {
    "$1" - $KEY <<'EOF'
import sys
from importlib.metadata import version, PackageNotFoundError
out = []
for name in sys.argv[1:]:
    try:
        out.append(f"{name} {version(name)}")
    except PackageNotFoundError:
        out.append(f"{name} -")
print(", ".join(out))
EOF
}

declare -A RESULT VERS SUMMARY SECS
STATUS=0
for END in $ENDS; do
    echo "=== $END: setting up a venv in $TMP/$END"
    VENV=$TMP/$END
    LOG=$TMP/$END.log
    "$PY" -m venv "$VENV"
    PIP=("$VENV/bin/python" -m pip install -q)
    echo "torch==2.13.0" > "$TMP/$END.constraints"
    if [ "$END" = lowest ]; then
        lower_bounds "$VENV/bin/python" | grep -v '^torch==' >> "$TMP/$END.constraints" || { STATUS=1; RESULT[$END]="FAIL (pyproject)"; continue; }
    fi
    echo "--- constraints:"; sed 's/^/    /' "$TMP/$END.constraints"
    if ! "${PIP[@]}" "torch==2.13.0" >"$TMP/$END.pip" 2>&1 \
        || ! "${PIP[@]}" --upgrade -c "$TMP/$END.constraints" -e "$ROOT[$EXTRAS]" >>"$TMP/$END.pip" 2>&1; then
        grep -v "is ignored: it is neither" "$TMP/$END.pip" | tail -25   # (that: a local pip.conf's extra indexes)
        echo "=== $END: FAIL (install)"
        RESULT[$END]="FAIL (install)"; VERS[$END]=$(versions "$VENV/bin/python"); SUMMARY[$END]="-"; SECS[$END]=0
        STATUS=1; rm -rf "$VENV"; continue
    fi
    VERS[$END]=$(versions "$VENV/bin/python")
    echo "--- resolved: ${VERS[$END]}"
    "$VENV/bin/python" -m pip check || echo "(pip check reports conflicts above)"
    echo "--- pytest ${PYTEST_COMMON[*]} ${TESTS[*]}"
    START=$(date +%s)
    "$VENV/bin/python" -m pytest "${PYTEST_COMMON[@]}" "${TESTS[@]}" 2>&1 | tee "$LOG"
    RC=${PIPESTATUS[0]}
    SECS[$END]=$(( $(date +%s) - START ))
    SUMMARY[$END]=$(grep -E '^=*.*(passed|failed|error|no tests ran).* in [0-9.]+s' "$LOG" | tail -1 | sed 's/=//g; s/^ *//; s/ *$//')
    if [ "$RC" -eq 0 ]; then RESULT[$END]=PASS; else RESULT[$END]="FAIL (pytest exit $RC)"; STATUS=1; fi
    echo "=== $END: ${RESULT[$END]}"
    rm -rf "$VENV"
done

echo
echo "=== test-matrix $(date -u '+%Y-%m-%d %H:%M UTC'), $("$PY" --version), $(nproc) CPU cores"
echo "tests: ${TESTS[*]}"
echo "| end | result | tests | wall | versions |"
echo "|---|---|---|---|---|"
for END in $ENDS; do
    echo "| $END | ${RESULT[$END]} | ${SUMMARY[$END]:-} | ${SECS[$END]:-0} s | ${VERS[$END]:-} |"
done
exit $STATUS
