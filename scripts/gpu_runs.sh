#!/usr/bin/env bash
# The GPU runs behind results/gpu and reports/gpu, one phase per call (each meant to fit in 10 minutes).
#
#   scripts/gpu_runs.sh speed      # ToMe r=13 on DeiT-S/B, fused vs eager attention (issue 3), mask vs
                                   # fold proportional attention (issue 17); the speed
#                                  # suite, every registered method (issue 5); official code vs the project
#                                  # (issue 26); repeatability; region profiles; SDPA pinned to efficient
#   scripts/gpu_runs.sh accuracy   # the gpu suite: reference models, full test split, DiffRate's paper recipe
#
# Data: HARNESS_DATA_ROOT, else carry/data when present (scripts/pack_data.py makes it), else the
# harness's own lookup. Wheels in carry/whl (fvcore) are installed to /tmp/site first when present.
# Environment:
#   MODELS          comma list narrowing a phase's models
#   RESULTS/REPORTS where results and reports go (default results/gpu, reports/gpu)
#   DEADLINE_S      seconds after which sweeps stop cleanly (default 540); a stopped sweep resumes next call
#   EXTRA           flags added to every `run` (a CPU dry run: EXTRA="--device cpu --throughput-batch-size 2
#                   --repeats 2 --limit 20")
#   PROFILE_MODELS / PROFILE_ARGS   the region profiles of the speed phase (scripts/profile_regions.py)
#   CALIB_LIMIT     train images of DiffRate's search in the accuracy phase (default 9000: what
#                   pack_data.py packs by default; 0 for the whole train split where it is there)
#   OUT             when set, results and reports are also packed into $OUT/<phase>.tar.gz
#   HARNESS_GIT_SHA the commit, for a copy of the tree without .git (records keep their provenance)
#   PYTHON          the interpreter that holds torch (default python3)
#   OFFICIAL_ROOT   the official checkouts for the official-vs-project table (default carry/official; the
#                   speed phase skips the table without them). Untested on a GPU: none was lent since it was added
set -uo pipefail
cd "$(dirname "$0")/.."
phase=${1:?usage: scripts/gpu_runs.sh speed|accuracy}
RESULTS=${RESULTS:-results/gpu}
REPORTS=${REPORTS:-reports/gpu}
DEADLINE_S=${DEADLINE_S:-540}
EXTRA=${EXTRA:-}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
start=$(date +%s)

if [ -z "${HARNESS_DATA_ROOT:-}" ] && [ -d carry/data ]; then export HARNESS_DATA_ROOT=$PWD/carry/data; fi
if compgen -G "carry/whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site carry/whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
FLOPS=""
$PY -c "import fvcore" 2>/dev/null || { echo "fvcore missing: measured GMACs skipped"; FLOPS="--no-flops"; }
$PY -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, 'gpu', torch.cuda.is_available() and torch.cuda.get_device_name(0))"

left() { echo $(( DEADLINE_S - ($(date +%s) - start) )); }
# one sweep, stopped by SIGINT when time runs out (the cell in flight is lost, every stored one kept)
sweep() {
  local t; t=$(left)
  if [ "$t" -le 20 ]; then echo "skipped (deadline): run $*"; return 0; fi
  echo "== run $* ($t s left)"
  timeout -s INT -k 20 "$t" $PY -m harness run --results "$RESULTS" --no-report $FLOPS $EXTRA "$@"
  echo "== exit $?"
}
profile() {
  local t; t=$(left)
  if [ "$t" -le 30 ]; then echo "skipped (deadline): profile $*"; return 0; fi
  echo "== profile $*"
  timeout -k 10 "$t" $PY scripts/profile_regions.py ${PROFILE_ARGS:-} "$@"
}
models() { echo "${MODELS:-$1}"; }

case "$phase" in
  speed)
    ALL=deit_tiny_patch16_224.random,deit_small_patch16_224.random,deit_base_patch16_224.random,vit_large_patch16_224.random,vit_huge_patch14_224.random
    SB=deit_small_patch16_224.random,deit_base_patch16_224.random
    # ToMe at the paper's r=13 on DeiT-S/B under fused SDPA (with the end-to-end figure) and eager attention
    sweep --suite speed --models "$(models $SB)" --methods none,tome --budgets r=13 --e2e
    sweep --suite speed --models "$(models $SB)" --methods none,tome --budgets r=13 --attention eager
    # proportional attention folded into q/k (no mask: flash stays eligible) against the mask above (issue 17)
    sweep --suite speed --models "$(models $SB)" --methods none,tome --budgets r=13 --prop-attn fold
    sweep --suite speed --models "$(models $SB)" --methods none,tome,diffrate --prop-attn fold
    # every method at the papers' budgets on five architectures
    sweep --suite speed --models "$(models $ALL)"
    # each method's official code against the project's, same weights and batch, interleaved (issue 26): needs
    # the official checkouts (one folder per repository, as scripts/official_speed.py lists) at OFFICIAL_ROOT
    if [ -d "${OFFICIAL_ROOT:-carry/official}" ]; then
      mkdir -p "$REPORTS"
      for dt in fp32 bf16; do
        t=$(left)
        if [ "$t" -le 60 ]; then echo "skipped (deadline): official_speed $dt"; continue; fi
        timeout -k 10 "$t" $PY scripts/official_speed.py --official-root "${OFFICIAL_ROOT:-carry/official}" \
          --device cuda --dtype $dt --batch 64 --rounds 7 | tee "$REPORTS/official_speed_$dt.md"
      done
    else
      echo "no official checkouts at ${OFFICIAL_ROOT:-carry/official}: the official-vs-project table is skipped"
    fi
    # repeatability: the DeiT-B r=13 cells again, in fresh processes, into side folders
    main_results=$RESULTS
    for i in 1 2 3; do
      RESULTS=$main_results-repeat/run$i
      sweep --suite speed --models "$(models deit_base_patch16_224.random)" --methods none,tome --budgets r=13 --no-flops
    done
    RESULTS=$main_results
    $PY scripts/compare_runs.py "$RESULTS-repeat"/run* | tee "$RESULTS-repeat/repeatability.md"
    # where the time goes, region by region
    mkdir -p "$REPORTS"
    for m in ${PROFILE_MODELS:-deit_small_patch16_224 deit_base_patch16_224}; do
      for att in fused eager; do
        profile --model "$m" --methods none,tome --budget r=13 --attention $att --out "$REPORTS/profile_${m}_r13_$att.md"
      done
    done
    # what proportional attention's mask costs: the same cells with SDPA pinned to the kernel the mask needs
    sweep --suite speed --models "$(models $SB)" --methods none,tome --budgets r=13 --sdpa-backend efficient
    ;;
  accuracy)
    sweep --suite gpu --models "$(models deit_tiny_cifar10,deit_small_cifar10)" --calib-limit "${CALIB_LIMIT:-9000}"
    ;;
  *) echo "unknown phase $phase; use speed or accuracy" >&2; exit 2 ;;
esac

$PY -m harness report --results "$RESULTS" --out "$REPORTS" >/dev/null && echo "report: $REPORTS/results.md"
if [ -n "${OUT:-}" ]; then
  tar czf "$OUT/$phase.tar.gz" "$RESULTS"* "$REPORTS" && echo "packed $OUT/$phase.tar.gz"
fi
echo "phase $phase took $(( $(date +%s) - start )) s"
