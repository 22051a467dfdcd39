#!/usr/bin/env bash
# The whole GPU measurement in one script (one CUDA GPU; written to stay under 10 minutes
# on an H100 through per-step time limits; not yet run).
#
#   bash benchmarks/perf_gpu.sh            # results under $OUT (default benchmarks/runs/gpu)
#   LAYERS=16 E2E_T8=1 bash benchmarks/perf_gpu.sh   # bigger end-to-end run, with T = 8
#
# 1. kernel: every distinct Llama-3-8B shape at T = 3 and T = 8, ace vs the straightforward
#    formulation on cuda (time, peak torch.cuda.max_memory_allocated, speedup, rel. diff);
# 2. the out-of-memory fallback on a real GPU (a tensor forced to the CPU gives the same answer);
# 3. end to end through mergekit-yaml on synthetic checkpoints ($LAYERS layers, hidden 2048):
#    ace vs task_arithmetic with --cuda (wall-time ratio,
#    peak GPU memory polled from nvidia-smi, peak RSS), then --cuda --read-to-gpu,
#    --cuda --multi-gpu and --cuda --low-cpu-memory;
# and writes everything to $OUT/*.jsonl plus a summary in $OUT/summary.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/runs/gpu}"
mkdir -p "$OUT"
[ -d .venv ] && . .venv/bin/activate
export MALLOC_MMAP_THRESHOLD_=1048576  # freed host buffers go back to the OS (RSS is honest)
LAYERS="${LAYERS:-4}"

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
} > "$OUT/summary.txt" 2>&1
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "CUDA not available: nothing measured." | tee -a "$OUT/summary.txt"
  exit 1
fi

echo "== kernel (cuda)" | tee -a "$OUT/summary.txt"
timeout 240 python benchmarks/perf_kernel.py --suite full-cuda --device cuda --timeout 90 \
  --out "$OUT/kernel_cuda.jsonl" > "$OUT/kernel_cuda.log" 2>&1
echo "kernel rc=$?" >> "$OUT/summary.txt"

echo "== oom fallback (cuda)" | tee -a "$OUT/summary.txt"
timeout 60 python - >> "$OUT/summary.txt" 2>&1 <<'EOF'
import time, torch
from benchmarks.perf_kernel import make_inputs
from mergekit_ace.kernels.ace import ace_merge, estimate_ace_cost, cuda_free_bytes
base, experts = make_inputs((4096, 14336), 3, device="cuda")
print("free", cuda_free_bytes(base.device), "estimate", estimate_ace_cost((4096, 14336), 3)["bytes"])
t = time.perf_counter(); a, da = ace_merge(base, experts, out_dtype=torch.float32); torch.cuda.synchronize()
print("on gpu", da.device, round(time.perf_counter() - t, 2), "s")
t = time.perf_counter(); b, db = ace_merge(base, experts, out_dtype=torch.float32, free_device_bytes=2**30,
                                           tensor_name="down_proj"); torch.cuda.synchronize()
print("forced fallback", db.device, b.device, round(time.perf_counter() - t, 2), "s")
print("rel diff gpu vs cpu-fallback", float((a - b).norm() / (a - base.float()).norm()))
EOF

for T in 3 ${E2E_T8:+8}; do
  echo "== e2e --cuda, T=$T, $LAYERS layers" | tee -a "$OUT/summary.txt"
  timeout 150 python benchmarks/perf_e2e.py --preset small --layers "$LAYERS" --experts "$T" --keep \
    --flags="--cuda" --out "$OUT/e2e_cuda.jsonl" > "$OUT/e2e_cuda_T$T.log" 2>&1
  echo "e2e T=$T rc=$?" >> "$OUT/summary.txt"
done
echo "== e2e flags (T=3)" | tee -a "$OUT/summary.txt"
timeout 120 python benchmarks/perf_e2e.py --preset small --layers "$LAYERS" --experts 3 \
  --flags="--cuda --read-to-gpu;--cuda --multi-gpu;--cuda --low-cpu-memory" \
  --out "$OUT/e2e_cuda_flags.jsonl" > "$OUT/e2e_cuda_flags.log" 2>&1
echo "e2e flags rc=$?" >> "$OUT/summary.txt"
rm -rf benchmarks/cache/e2e

python - >> "$OUT/summary.txt" 2>&1 <<EOF
import json
for name in ["kernel_cuda", "e2e_cuda", "e2e_cuda_flags"]:
    try:
        lines = [json.loads(l) for l in open("$OUT/" + name + ".jsonl")]
    except FileNotFoundError:
        print(name, "missing"); continue
    for r in lines:
        print(name, json.dumps(r))
EOF
cat "$OUT/summary.txt"
