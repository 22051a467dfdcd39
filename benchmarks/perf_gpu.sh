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
#   STEPS=overlap bash benchmarks/perf_gpu.sh    # the overlapped executor alone (about 7 minutes)
#   STEPS="pytest overlap" bash benchmarks/perf_gpu.sh  # every CUDA test first (8 minutes on an H200)
#   bash benchmarks/perf_gpu.sh wheels           # on a machine with pip and a network: the wheels
#
# A machine without mergekit (the device machines here) installs the wheels in .whl first:
# `bash benchmarks/perf_gpu.sh wheels` where pip reaches the index puts mergekit, pydantic,
# pydantic-core, annotated-types, typing-inspection, typing-extensions, immutables and this
# package there (for Python $WHEEL_PYTHON, default 3.12: the device's); this script installs
# them when .whl exists and mergekit_ace does not import. .whl is not tracked: it travels with
# the working tree as an untracked folder (name it in `carry` where a checkout ignores it).
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
# overlap (not in the default STEPS; STEPS=overlap runs it alone): the overlapped executor's
#    CUDA tests, then mergekit-yaml --cuda on Llama-3-8B-shaped checkpoints, interleaved:
#    $OVERLAP_LAYERS (16) layers at T=3: task_arithmetic, ace on mergekit's serial executor and
#    overlapped (heterogeneous on these experts; outputs hashed and compared), ace with gate: off
#    (homogeneous) on both; then 2 layers at T=8: task_arithmetic and ace overlapped.
#    $OVERLAP_METHODS and $OVERLAP_T8_METHODS replace the two lists of methods (perf_e2e.py's
#    --methods: e.g. ace:MERGEKIT_ACE_LOOKAHEAD=3G for a larger look-ahead).
#    Wall time, peak GPU memory (nvidia-smi) and peak RSS per run, per-tensor timelines
#    ($OUT/timelines.tar.gz; perf_report.py --timeline draws them).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
if [ "${1:-}" = wheels ]; then
  # here, with pip and a network: every wheel the device machine lacks, for its Python
  WHEEL_PYTHON="${WHEEL_PYTHON:-3.12}"
  mkdir -p .whl && rm -f .whl/*.whl
  PLAT=""
  for n in 28 27 17; do PLAT="$PLAT --platform manylinux_2_${n}_x86_64"; done
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$WHEEL_PYTHON" \
    --implementation cp $PLAT --platform manylinux2014_x86_64 -d .whl \
    "mergekit==$(python3 -c 'import importlib.metadata as m; print(m.version("mergekit"))')" \
    "$(python3 -c 'import importlib.metadata as m; print("pydantic==" + m.version("pydantic"))')" \
    "$(python3 -c 'import importlib.metadata as m; print("pydantic-core==" + m.version("pydantic-core"))')" \
    "$(python3 -c 'import importlib.metadata as m; print("annotated-types==" + m.version("annotated-types"))')" \
    "$(python3 -c 'import importlib.metadata as m; print("typing-inspection==" + m.version("typing-inspection"))')" \
    "$(python3 -c 'import importlib.metadata as m; print("typing-extensions==" + m.version("typing-extensions"))')" \
    "$(python3 -c 'import importlib.metadata as m; print("immutables==" + m.version("immutables"))')" \
    || exit 1
  python3 -m pip wheel -q --no-deps -w .whl . || exit 1
  ls -l .whl
  exit 0
fi
PY="${PY:-python3}"
WHEELS="${WHEELS:-.whl}"
if [ -d "$WHEELS" ] && ! $PY -c "import mergekit, mergekit_ace" 2>/dev/null; then
  # into the interpreter's own site-packages, so that the start-up hook (.pth) and the
  # mergekit-yaml command are found as after a user's pip install
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir "$WHEELS"/*.whl || exit 1
fi
OUT="${OUT:-benchmarks/runs/gpu}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
R="$OUT/results.jsonl"
L="$OUT/log.txt"
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
if want overlap; then
  # OVERLAP_PRESET / OVERLAP_GEN / OVERLAP_FLAGS: a dry run on a CPU (tiny preset, no --cuda)
  PRESET="${OVERLAP_PRESET:-llama3-8b}"
  E2E=(timeout 420 $PY -m benchmarks.perf_e2e --preset "$PRESET" --gen-device "${OVERLAP_GEN:-cuda}"
       --flags="${OVERLAP_FLAGS---cuda}" --timeline "$OUT/timelines" --out "$R")
  if ! want pytest; then  # the pytest step runs these among the others
    step "overlap: CUDA tests"
    timeout 120 $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "staging or overlapped" \
      > "$OUT/pytest_overlap.txt" 2>&1
    echo "pytest overlap rc=$?" | tee -a "$L"
  fi
  step "overlap: ${OVERLAP_LAYERS:-16} layers, T=3"
  # shellcheck disable=SC2086
  "${E2E[@]}" --layers "${OVERLAP_LAYERS:-16}" --experts 3 --digest --methods \
    ${OVERLAP_METHODS:-task_arithmetic ace ace:MERGEKIT_ACE_OVERLAP=0 ace/gate=off \
      ace/gate=off:MERGEKIT_ACE_OVERLAP=0} >> "$L" 2>&1
  echo "overlap T=3 rc=$?" | tee -a "$L"
  rm -rf "$CACHE"
  step "overlap: 2 layers, T=8"
  # shellcheck disable=SC2086
  "${E2E[@]}" --layers 2 --experts 8 --methods ${OVERLAP_T8_METHODS:-task_arithmetic ace} \
    >> "$L" 2>&1
  echo "overlap T=8 rc=$?" | tee -a "$L"
  rm -rf "$CACHE"
  tar -czf "$OUT/timelines.tar.gz" -C "$OUT" timelines && rm -rf "$OUT/timelines"
  $PY -m benchmarks.perf_report "$R" | tail -25 | tee -a "$L"
  grep identical_outputs "$R" | tee -a "$L"
fi
step "done"
