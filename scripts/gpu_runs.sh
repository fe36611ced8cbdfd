#!/usr/bin/env bash
# The GPU runs behind results/gpu and reports/gpu, one phase per call (each fits in 10 minutes on an H100).
#
#   scripts/gpu_runs.sh speed      # the speed suite (issue 5) + ToMe r=13 fused vs eager (issue 3) + repeatability
#   scripts/gpu_runs.sh accuracy   # the gpu suite: reference models, full test split, DiffRate's paper recipe
#
# Data: HARNESS_DATA_ROOT, else carry/data when present (scripts/pack_data.py makes it), else the
# harness's own lookup. Wheels in carry/whl (fvcore) are installed to /tmp/site first when present.
# Environment: MODELS (comma list) narrows a phase's models, RESULTS / REPORTS move the output
# (default results/gpu, reports/gpu), DEADLINE_S stops the sweeps cleanly before a hard time limit
# (default 540; a stopped sweep resumes on the next call), EXTRA adds flags to every `run`
# (a CPU dry run: EXTRA="--device cpu --throughput-batch-size 2 --repeats 2 --limit 20").
# With OUT set, results and reports are also packed into $OUT/<phase>.tar.gz. A copy of the tree
# without .git names its commit in HARNESS_GIT_SHA, so records keep their provenance.
set -uo pipefail
cd "$(dirname "$0")/.."
phase=${1:?usage: scripts/gpu_runs.sh speed|accuracy}
RESULTS=${RESULTS:-results/gpu}
REPORTS=${REPORTS:-reports/gpu}
DEADLINE_S=${DEADLINE_S:-540}
EXTRA=${EXTRA:-}
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}   # the interpreter that holds torch (plain python3 on the GPU image)
start=$(date +%s)

if [ -z "${HARNESS_DATA_ROOT:-}" ] && [ -d carry/data ]; then export HARNESS_DATA_ROOT=$PWD/carry/data; fi
if compgen -G "carry/whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site carry/whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
FLOPS=""
$PY -c "import fvcore" 2>/dev/null || { echo "fvcore missing: measured GMACs skipped"; FLOPS="--no-flops"; }
$PY - <<'EOF'
import torch, timm
print("torch", torch.__version__, "timm", timm.__version__, "cuda", torch.cuda.is_available() and torch.cuda.get_device_name(0))
EOF

left() { echo $(( DEADLINE_S - ($(date +%s) - start) )); }
# one sweep, stopped (SIGINT, so the cell in flight is lost but every stored one kept) when time runs out
sweep() {
  local t; t=$(left)
  if [ "$t" -le 20 ]; then echo "skipped (deadline): run $*"; return 0; fi
  echo "== run $* ($t s left)"
  timeout -s INT -k 20 "$t" $PY -m harness run --results "$RESULTS" --no-report $FLOPS $EXTRA "$@"
  echo "== exit $?"
}
models() { echo "${MODELS:-$1}"; }

case "$phase" in
  speed)
    SPEED_MODELS=deit_tiny_patch16_224.random,deit_small_patch16_224.random,deit_base_patch16_224.random,vit_large_patch16_224.random,vit_huge_patch14_224.random
    SB=deit_small_patch16_224.random,deit_base_patch16_224.random
    # ToMe at the paper's r=13 on DeiT-S/B, fused SDPA and eager attention, with the end-to-end figure
    sweep --suite speed --models "$(models $SB)" --methods none,tome --budgets r=13 --e2e
    sweep --suite speed --models "$(models $SB)" --methods none,tome --budgets r=13 --attention eager
    # where proportional attention's mask sends SDPA: the same cells with the kernel pinned
    sweep --suite speed --models "$(models $SB)" --methods none,tome --budgets r=13 --sdpa-backend efficient
    # every method at the papers' budgets on five architectures
    sweep --suite speed --models "$(models $SPEED_MODELS)"
    # repeatability: the DeiT-B r=13 cells again, in fresh processes, into side folders
    for i in 1 2 3; do
      RESULTS_MAIN=$RESULTS; RESULTS=$RESULTS-repeat/run$i
      sweep --suite speed --models "$(models deit_base_patch16_224.random)" --methods none,tome --budgets r=13 --no-flops
      RESULTS=$RESULTS_MAIN
    done
    $PY scripts/compare_runs.py "$RESULTS-repeat"/run* | tee "$RESULTS-repeat/repeatability.md"
    ;;
  accuracy)
    # --calib-limit 10000: the train images pack_data.py carries (1000 a class)
    sweep --suite gpu --models "$(models deit_tiny_cifar10,deit_small_cifar10)" --calib-limit "${CALIB_LIMIT:-10000}"
    ;;
  *) echo "unknown phase $phase; use speed or accuracy" >&2; exit 2 ;;
esac

$PY -m harness report --results "$RESULTS" --out "$REPORTS" >/dev/null && echo "report: $REPORTS/results.md"
if [ -n "${OUT:-}" ]; then
  tar czf "$OUT/$phase.tar.gz" "$RESULTS"* "$REPORTS" && echo "packed $OUT/$phase.tar.gz"
fi
echo "phase $phase took $(( $(date +%s) - start )) s"
