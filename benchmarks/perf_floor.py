"""ACE's compute against the machine's floor, on real checkpoints, in one process.

Loads a base and its experts (safetensors), merges every tensor with the package kernel as
``mergekit-yaml`` would (``dtype`` float32 by default), and reports per branch and in total:
the kernel's seconds, the floating-point work :func:`estimate_ace_cost` counts for the plan
each tensor took, the rate that gives, and the float32 matrix-product rate measured in the
same process with the same threads (so the fraction of it the kernel reaches, and the floor:
the work at that rate).

    python -m benchmarks.perf_floor BASE EXPERT [EXPERT ...] [--threads 2] [--out f.jsonl]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors import safe_open

from mergekit_ace.kernels.ace import ace_merge, estimate_ace_cost


def load(path: Path, dtype) -> dict:
    tensors = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), "pt") as handle:
            for key in handle.keys():
                tensors[key] = handle.get_tensor(key).to(dtype)
    return tensors


def gemm_rate(size: int = 1024, reps: int = 5) -> float:
    """Best float32 ``size^3`` product rate (FLOP/s)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("base")
    p.add_argument("experts", nargs="+")
    p.add_argument("--threads", type=int)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--out")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    base = load(args.base, dtype)
    experts = [load(e, dtype) for e in args.experts]
    rate_before = gemm_rate()
    per_branch = {}
    for key, w0 in base.items():
        if w0.dim() != 2 or any(key not in e for e in experts):
            continue
        start = time.perf_counter()
        _, diag = ace_merge(w0, [e[key] for e in experts])
        seconds = time.perf_counter() - start
        flops = (
            estimate_ace_cost(tuple(w0.shape), len(diag.participants), refine=bool(diag.k))["flops"]
            if diag.participants
            else 0.0
        )
        row = per_branch.setdefault(diag.branch, {"tensors": 0, "seconds": 0.0, "flops": 0.0})
        row["tensors"] += 1
        row["seconds"] += seconds
        row["flops"] += flops
    rate = max(rate_before, gemm_rate())
    total_s = sum(r["seconds"] for r in per_branch.values())
    total_f = sum(r["flops"] for r in per_branch.values())
    result = {
        "experts": len(experts),
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "branches": per_branch,
        "kernel_seconds": total_s,
        "flops": total_f,
        "kernel_gflops": total_f / total_s / 1e9,
        "gemm_gflops": rate / 1e9,
        "fraction_of_gemm_rate": total_f / total_s / rate,
        "floor_seconds": total_f / rate,
    }
    line = json.dumps(result)
    print(line)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
