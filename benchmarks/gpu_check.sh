#!/usr/bin/env bash
# One command for a lent H100/H200 without internet, spending its budget on what matters first:
#   1. install (pip -e, offline; when that fails, mmfast is imported from the source tree instead), info;
#   2. the headline benchmarks (`bench --headline`: attention fwd / fwd+bwd at the FlashAttention-3 paper's
#      shapes vs SDPA's flash / cuDNN / efficient backends and FlexAttention, the CLIP loss at 32k, EMA on
#      the ViT-L parameter list, ViT-L/14 patch embedding, a gated GEMM and block, CLIP's training step
#      before / after mmfast.patch);
#   3. the attention tuner with what its share leaves (tables in OUT_DIR/tuned/, used by every later step);
#   4. `python -m mmfast check` and the CUDA tests (`pytest -m cuda`);
#   5. the other benchmarks (the swap suite's Hugging Face models last), the whole test suite, and the compile
#      report last (CI runs the gate anyway).
# Each step's output goes to OUT_DIR/<step>.log and its exit status to OUT_DIR/summary.md; a failing step
# never stops the next one. The run ends within BUDGET_S seconds (default 450, under 8 minutes): every step
# runs under `timeout`, and the benchmarks and the tuner stop at their own --budget-s.
#
#   bash benchmarks/gpu_check.sh OUT_DIR             # exit status: 0 when every step passed
#   bash benchmarks/gpu_check.sh --dry-run OUT_DIR   # every step at smoke size on the CPU (interpreter); CI
#
# The device tool returns at most 8 files from $OUT, so there run it into a scratch folder and copy back:
#   bash benchmarks/gpu_check.sh /tmp/gc; cp /tmp/gc/{summary.md,report.md,report.json,tune-attention.md,logs.tar.gz} "$OUT"/
#   (tar -czf "$OUT"/tuned.tar.gz -C /tmp/gc tuned: the tables to commit under kernels/<family>/tuned/)
# (no .git travels there: set BENCH_GIT_COMMIT=<sha> to record the commit).
# MMFAST_GPU_CHECK_SKIP_INSTALL=1 skips pip (CI proves the source-tree import this way).
set -u
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT_DIR=${1:?usage: bash benchmarks/gpu_check.sh [--dry-run] OUT_DIR}
mkdir -p "$OUT_DIR" && OUT_DIR=$(cd "$OUT_DIR" && pwd)
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
DRY=${DRY:-0}
BUDGET_S=${BUDGET_S:-$(( DRY ? 900 : 450 ))}  # the interpreter on two CPU cores is slower than a GPU
END=$(( $(date +%s) + BUDGET_S ))
SUMMARY=$OUT_DIR/summary.md
FAILED=0
ROWS=""
TAILS=""
# offline: pip must never wait on an index
export PYTHONUNBUFFERED=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
if (( DRY )); then
  export TRITON_INTERPRET=1  # the CPU runs the Triton kernels through the interpreter
  export MMFAST_NO_JIT=1  # no C++ extension build (a minute or more): CI's own test run builds it
  SIZE=(--smoke --device cpu)
else
  SIZE=(--quick)
fi

summary() {
  {
    echo "# GPU check$( (( DRY )) && echo ' (dry run: CPU, smoke size)')"
    echo
    echo "$ENV_LINES"
    echo "- budget: ${BUDGET_S} s; mmfast imported via: ${IMPORT_WAY:-?}"
    echo
    echo "| step | exit status | seconds | log |"
    echo "|---|---|---:|---|"
    printf '%s' "$ROWS"
    echo "(pytest exit 5: no tests collected; 124/137: killed by timeout)"
    echo "$TAILS"
    echo "failed steps: $FAILED; total $(( BUDGET_S - (END - $(date +%s)) )) s"
  } >"$SUMMARY"
}

# secs N: N seconds of the default 450 s budget, scaled to BUDGET_S (a short rerun still runs every step)
secs() { echo $(( $1 * BUDGET_S / 450 )); }

# step NAME CAP_S RESERVE_S CMD...: run CMD for at most CAP_S seconds, keeping RESERVE_S for later steps (both
# of the default 450 s budget: scaled to BUDGET_S)
step() {
  local name=$1 cap reserve; cap=$(secs "$2"); reserve=$(secs "$3"); shift 3
  local left=$(( END - reserve - $(date +%s) ))
  local limit=$(( cap < left ? cap : left ))
  if (( limit < 5 )); then
    ROWS+="| $name | skipped: time budget | 0 | |"$'\n'; FAILED=$((FAILED + 1)); summary; return
  fi
  echo "=== $name (limit ${limit}s): $*"
  local t0; t0=$(date +%s)
  timeout -k 10 "$limit" "$@" 2>&1 | tee "$OUT_DIR/$name.log"
  local rc=${PIPESTATUS[0]} status
  status=$rc
  (( rc == 124 || rc == 137 )) && status="$rc (timed out at ${limit}s)"
  (( rc != 0 )) && FAILED=$((FAILED + 1))
  ROWS+="| $name | $status | $(( $(date +%s) - t0 )) | $name.log |"$'\n'
  if (( rc != 0 )); then  # keep the evidence next to the status, so summary.md stands on its own
    TAILS+=$'\n'"### $name (exit $rc): last lines"$'\n\n```\n'"$(tail -n 25 "$OUT_DIR/$name.log")"$'\n```\n'
  fi
  summary
}

# left_for RESERVE: seconds left before the reserve (of 450) that later steps keep
left_for() { echo $(( END - $(secs "$1") - $(date +%s) )); }

importable() { python -c "import mmfast.kernels, mmfast.benchmarks" >/dev/null 2>&1; }

ENV_LINES="- (environment not read yet)"
nvidia-smi >"$OUT_DIR/nvidia-smi.log" 2>&1
if [ -n "${MMFAST_GPU_CHECK_SKIP_INSTALL:-}" ]; then
  ROWS+="| pip | skipped: MMFAST_GPU_CHECK_SKIP_INSTALL | 0 | |"$'\n'
elif (( DRY )) && importable; then
  ROWS+="| pip | skipped: dry run, mmfast already importable | 0 | |"$'\n'
else
  step pip 60 400 python -m pip install -q -e . --no-deps --no-build-isolation
fi
PIP_FAILED=$FAILED
IMPORT_WAY="the installed package"
if ! importable; then
  # the install failed (or was skipped): import mmfast from this source tree (benchmarks/srcpath)
  export PYTHONPATH="$ROOT/benchmarks/srcpath:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
  IMPORT_WAY="the source tree (PYTHONPATH=benchmarks/srcpath:.; the install did not give an importable mmfast)"
  if importable; then
    FAILED=0  # a failed install that the source tree stands in for fails nothing that follows
    (( PIP_FAILED )) && IMPORT_WAY+="; pip failed, see pip.log"
  else
    IMPORT_WAY="nothing: mmfast.kernels does not import (see python_import.log)"
    FAILED=$((FAILED + 1))
  fi
  python -c "import mmfast.kernels, mmfast.benchmarks" >"$OUT_DIR/python_import.log" 2>&1
fi
ENV_LINES=$(python - <<'EOF' 2>&1 || nvidia-smi -L 2>&1 || echo "- (no environment: python or nvidia-smi failed)"
import torch
from mmfast.benchmarks.common import environment
env = environment("cuda" if torch.cuda.is_available() else "cpu")
for key in ("card", "driver", "capability", "gpu_memory_GiB", "cuda_runtime", "torch", "triton", "python", "git_commit", "date"):
    print(f"- {key}: {env.get(key)}")
EOF
)
summary

step info 30 390 python -m mmfast info
# The headline numbers first: GPU time is short (the first run, 2026-11-27, left the benchmarks 70 of its 450 s)
left=$(left_for 250); cap=$(( left < $(secs 200) ? left : $(secs 200) ))
step bench_headline 450 250 python -m mmfast bench --suite all "${SIZE[@]}" --headline --out "$OUT_DIR" \
  --budget-s $(( cap > 60 ? cap - 30 : cap * 2 / 3 ))
# The tuner with its share; the tables it writes serve every later step (tests included: a tuned tile that
# computes wrong shows up there), and go back in OUT_DIR/tuned/ to be committed.
left=$(left_for 160); cap=$(( left < $(secs 150) ? left : $(secs 150) ))
# the headline shapes only: more candidates within a short share (`bench tune --shapes all` when time allows)
TUNE=(--budget-s $(( cap > 60 ? cap - 40 : cap / 2 )) --shapes headline)
(( DRY )) && TUNE=(--dry-run)
step tune 150 160 python -m mmfast bench tune --family attention "${TUNE[@]}" --tables-dir "$OUT_DIR/tuned" --out "$OUT_DIR"
export MMFAST_TUNED_DIR=$OUT_DIR/tuned
if (( DRY )); then
  step check 120 90 python -m mmfast check --only attention  # ema's rows need the C++ extension
else
  step check 120 90 python -m mmfast check
fi
# faulthandler_timeout: a hung test dumps its traceback into the log before `timeout` kills the run
step pytest_cuda 90 60 python -m pytest tests -x -q -m cuda -p no:cacheprovider -o faulthandler_timeout=60
if (( DRY )); then
  step bench_rest 60 40 python -m mmfast bench --suite ema "${SIZE[@]}" --rest --out "$OUT_DIR/rest"
  # pytest_cuda collected the whole suite; here the full run's command on one small file
  step pytest_all 90 0 python -m pytest tests/benchmarks/test_gpu_check.py -q -p no:cacheprovider
  step compile_report 60 0 python -m mmfast compile-report --arch 90 --no-nvcc --plain \
    --specs mmfast.kernels.ema._configs:compile_specs
else
  step bench_rest 450 60 python -m mmfast bench --suite all "${SIZE[@]}" --rest --out "$OUT_DIR/rest" \
    --budget-s $(( $(left_for 60) > 60 ? $(left_for 60) - 30 : 20 ))
  step pytest_all 300 0 python -m pytest tests -q -p no:cacheprovider -o faulthandler_timeout=60
  step compile_report 170 0 python -m mmfast compile-report
fi
summary
tar -czf "$OUT_DIR/logs.tar.gz" -C "$OUT_DIR" $(cd "$OUT_DIR" && ls ./*.log) 2>/dev/null
echo; cat "$SUMMARY"
exit $(( FAILED > 0 ))
