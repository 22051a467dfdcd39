#!/usr/bin/env bash
# The whole GPU measurement in one script, written to stay under 9 minutes on an H100 through
# per-step time limits. Results: $OUT/results.jsonl (every measurement, one JSON line each),
# $OUT/log.txt, $OUT/pytest.txt; docs/performance.md's GPU tables come from results.jsonl
# (python -m benchmarks.perf_report --gpu $OUT/results.jsonl). Run from a checkout whose
# package is installed (pip install -e .).
#
#   OUT=benchmarks/runs/gpu bash benchmarks/perf_gpu.sh
#   OLD=/tmp/old bash benchmarks/perf_gpu.sh   # also an older kernel, side by side, where /tmp/old
#     holds that kernel's mergekit_ace and nothing else:
#     mkdir -p /tmp/old && git archive REV mergekit_ace | tar -x -C /tmp/old
#   STEPS="e2e eigh pytest" LAYERS_LIST=16 CAPPED_LAYERS=16 bash benchmarks/perf_gpu.sh  # a subset
#
# 1. tests/test_gpu.py (the CUDA tests, among them the accuracy guard of the tensor-core path)
# 2. accuracy against the kernel in float64, q_proj and k_proj shapes
# 3. the kernel per Llama-3-8B shape: T = 3 (three matmul precisions) and 8, both branches;
#    the older kernel beside it when $OLD is set; eigh float32 / float64
# 4. mergekit-yaml --cuda end to end, Llama-3-8B-shaped synthetic checkpoints, 4 layers (then
#    16), wall time and peak GPU memory (nvidia-smi), the methods of $E2E_METHODS interleaved
#    (default task_arithmetic and ace; perf_e2e.py's --methods says how to add environment
#    variables to a method's runs)
# 5. ace with the process capped at 16 GiB of GPU memory and oom_fallback: error (4 layers, or
#    $CAPPED_LAYERS)
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
OUT="${OUT:-benchmarks/runs/gpu}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
R="$OUT/results.jsonl"
L="$OUT/log.txt"
PY="${PY:-python3}"
# The older kernel: its directory first on the path (the working directory, which `-m` puts
# first), this checkout's benchmarks after it.
old() { (cd "$OLD" && env PYTHONPATH="$OLD:$ROOT" "$@"); }
export PYTHONUNBUFFERED=1
CACHE=benchmarks/cache/e2e
STEPS="${STEPS:-pytest accuracy kernel eigh e2e}"
E2E_METHODS="${E2E_METHODS:-task_arithmetic ace}"
step() { echo "== $(date +%T) $*" | tee -a "$L"; }
want() { [[ " $STEPS " == *" $1 "* ]]; }

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  $PY -c "from mergekit.merge_methods import registry; print('ace registered:', registry.get('ace') is not None)"
} >> "$L" 2>&1

if want pytest; then
step "pytest tests/test_gpu.py"
timeout 150 $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py > "$OUT/pytest.txt" 2>&1
echo "pytest rc=$?" | tee -a "$L"
fi

if want accuracy; then
step "accuracy"
timeout 60 $PY -m benchmarks.perf_gpu accuracy --shapes q_proj k_proj \
  --precisions auto float32 tf32 --out "$R" >> "$L" 2>&1
[ -n "${OLD:-}" ] && old timeout 30 $PY -m benchmarks.perf_gpu accuracy \
  --shapes q_proj k_proj --precisions default --label old --out "$R" >> "$L" 2>&1
fi

if want kernel; then
step "kernel"
timeout 150 $PY -m benchmarks.perf_gpu kernel --T 3 8 --precisions auto float32 tf32 \
  --out "$R" >> "$L" 2>&1
echo "kernel rc=$?" >> "$L"
if [ -n "${OLD:-}" ]; then
  step "kernel (older checkout)"
  old timeout 90 $PY -m benchmarks.perf_gpu kernel --T 3 --precisions default \
    --label old --out "$R" >> "$L" 2>&1
  echo "kernel old rc=$?" >> "$L"
fi
fi
if want eigh; then
step "eigh"
timeout 60 $PY -m benchmarks.perf_gpu eigh --out "$R" >> "$L" 2>&1
fi

want e2e && for LAYERS in ${LAYERS_LIST:-4 16}; do
  step "e2e --cuda, $LAYERS layers, T=3"
  # shellcheck disable=SC2086
  timeout 300 $PY -m benchmarks.perf_e2e --preset llama3-8b --layers "$LAYERS" --experts 3 --keep \
    --gen-device cuda --flags="--cuda" --methods $E2E_METHODS --out "$R" >> "$L" 2>&1
  echo "e2e rc=$?" >> "$L"
  if [ "$LAYERS" = "${CAPPED_LAYERS:-4}" ]; then
    step "ace capped at 16 GiB, oom_fallback: error"
    root="$CACHE/llama3-8b-L$LAYERS"
    { echo "merge_method: ace"; echo "base_model: $root/base"; echo "dtype: bfloat16"
      echo "parameters: {oom_fallback: error}"; echo "models:"
      for t in 0 1 2; do echo "  - model: $root/expert$t"; done; } > "$OUT/capped.yml"
    timeout 120 $PY -m benchmarks.perf_gpu capped --cap-gib 16 --out "$R" \
      --mergekit-args "$OUT/capped.yml /tmp/capped-out --cuda --no-copy-tokenizer --quiet" \
      >> "$L" 2>&1
    echo "capped rc=$?" >> "$L"
    rm -rf /tmp/capped-out
  fi
  rm -rf "$CACHE"
done
step "done"
