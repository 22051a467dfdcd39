"""ACE kernel benchmark on Llama-3-8B tensor shapes: time and peak memory per tensor.

Compares, side by side and interleaved, the package kernel (:func:`ace_merge`) with the
straightforward formulation (``naive_ace`` below: the ``T`` Gram matrices kept, an explicit
inverse, a full SVD), and reports the speedup and the relative difference of the outputs.

Every (shape, T, implementation, device) case runs in its own subprocess, so that peak memory
is that case's alone. Peak memory on CPU is the kernel's high-water mark above what the inputs
already occupy: the subprocess builds the inputs, resets the kernel's resident-set high-water
mark (``echo 5 > /proc/self/clear_refs``, Linux), runs the kernel and reads ``VmHWM`` from
``/proc/self/status``; the workspace is ``VmHWM`` minus the resident set just before the call.
(tracemalloc cannot see torch's allocations; ``ru_maxrss`` cannot be reset.) On CUDA it is
``torch.cuda.max_memory_allocated`` above the allocation before the call.

Inputs: a random base and ``T`` experts = base + low-rank-plus-noise task vectors of uneven
scale (so ACE takes its heterogeneous branch: both the solve and the spectral step run), stored
in bfloat16 like the checkpoints; results are compared in float32.

    python -m benchmarks.perf_kernel --suite scaled --out benchmarks/runs/kernel_scaled.jsonl
    python -m benchmarks.perf_kernel --case 4096x4096 --experts 3 --impl ace naive
    python -m benchmarks.perf_kernel --suite full --device cuda --out runs/kernel_cuda.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from mergekit_ace.kernels.ace import ace_merge, estimate_ace_cost

ROOT = Path(__file__).resolve().parents[1]

# Llama-3-8B per-layer 2-D tensors, as stored ([out, in]).
LLAMA3_8B = {
    "q_proj": (4096, 4096),
    "o_proj": (4096, 4096),
    "k_proj": (1024, 4096),
    "v_proj": (1024, 4096),
    "gate_proj": (14336, 4096),
    "up_proj": (14336, 4096),
    "down_proj": (4096, 14336),
    "embed_tokens": (128256, 4096),
    "lm_head": (128256, 4096),
}
DISTINCT = ["q_proj", "k_proj", "gate_proj", "down_proj", "embed_tokens"]
SCALES = (0.002, 0.02, 0.006, 0.05, 0.004, 0.01, 0.03, 0.008)  # uneven: heterogeneous branch


def make_inputs(shape, n_experts, seed=0, rank=16, dtype=torch.bfloat16, device="cpu"):
    """Base and experts, built in place one at a time (no large temporaries), on ``device``
    (the same seed gives different numbers on CPU and CUDA)."""
    m, n = shape
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*size):
        return torch.randn(*size, generator=g, device=device)

    base = randn(m, n).to(dtype)
    experts = []
    for t in range(n_experts):
        delta = randn(m, rank) @ randn(rank, n)
        delta.div_(math.sqrt(rank))
        noise = randn(m, n)
        delta.add_(noise, alpha=0.3)
        del noise
        delta.mul_(SCALES[t % len(SCALES)])
        delta.add_(base)
        experts.append(delta.to(dtype))
        del delta
    return base, experts


def naive_ace(base, experts, eps=1e-5, tau=0.3, k_frac=0.3, prior=True, lam=1.0, gate="auto"):
    """The straightforward formulation of docs/method.md in the compute dtype: every
    per-task ``S_t`` and ``R_t`` kept, ``A`` inverted explicitly, a full (thin) SVD."""
    W0 = base.float()
    taus = [e.float() - W0 for e in experts]
    T = len(taus)
    m, n = W0.shape
    e = [float((t.double() ** 2).sum()) for t in taus]
    logs = torch.log(torch.tensor(e, dtype=torch.float64) + 1e-12)
    het = T > 1 and float(logs.var(unbiased=True) / (logs.mean() ** 2 + 1e-12)) > tau
    het = {"on": True, "off": False}.get(gate, het)
    C = [t - t.mean(dim=0, keepdim=True) for t in taus]
    S = [c.T @ c for c in C]
    tr = [float(torch.trace(s)) + 1e-12 for s in S]
    Shat = [s / t for s, t in zip(S, tr)] if het else S
    eps_t = [eps / t for t in tr] if het else [eps] * T
    eye = torch.eye(n)
    R = [sh + et * eye for sh, et in zip(Shat, eps_t)]
    A = sum(R)
    if prior:
        c = sum(Shat).mean(dim=0, keepdim=True)
        if het:
            c = c / (sum(e) / T + 1e-12)
        A = A + c
    N = sum(ci @ r for ci, r in zip(C, R))
    W = N @ torch.linalg.inv(A)
    k = math.floor(min(m, n) * k_frac)
    if het and k > 0:
        Rbar = sum(R) / T
        D = sum(t @ (sh - Rbar) for t, sh in zip(taus, Shat))
        U, s, Vh = torch.linalg.svd(W + D, full_matrices=False)
        W = W + s[:k].mean() * U[:, :k] @ Vh[:k]
    return W0 + lam * W


def _rss_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _hwm_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def run_case(shape, n_experts, impl, device, save=None, threads=None, gate="auto"):
    """One measurement in this process; returns a result dict. With ``PERF_STREAM=1`` in the
    environment the kernel uses its streaming plan (no second ``[m, n]`` buffer, blocks of
    an eighth of the tensor) whatever the tensor's size, so that the plan the embeddings
    get can be measured on smaller shapes."""
    if threads:
        torch.set_num_threads(threads)
    stream = os.environ.get("PERF_STREAM") == "1"
    if stream:
        from mergekit_ace.kernels.ace import workspace

        workspace.KEEP_F_BYTES = 0
        workspace.STREAM_BLOCK_BYTES = shape[0] * shape[1] * 4 // 8
    base, experts = make_inputs(shape, n_experts, device=device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _rss_kib() * 1024
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    start = time.perf_counter()
    if impl == "ace":
        # the paper's settings, which naive_ace implements
        out, diag = ace_merge(
            base, experts, out_dtype=torch.float32, gate=gate, eps=1e-5, gate_statistic="gamma"
        )
        info = {
            "branch": diag.branch,
            "solver": diag.solver,
            "spectral": diag.spectral,
            "k": diag.k,
        }
    elif impl == "naive":
        out = naive_ace(base, experts, gate=gate)
        info = {}
    else:  # the kernel in float64, which the tests pin to the independent re-derivation
        out, _ = ace_merge(
            base.double(),
            [e.double() for e in experts],
            out_dtype=torch.float32,
            gate=gate,
            eps=1e-5,
            gate_statistic="gamma",
        )
        info = {}
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = _hwm_kib() * 1024 - before
    if save:
        torch.save(out.cpu(), save)
    refined = impl != "ace" or bool(info.get("k"))
    est = estimate_ace_cost(shape, n_experts, 4, out_bytes=4, refine=refined)
    return {
        "shape": list(shape),
        "experts": n_experts,
        "impl": impl,
        "device": device,
        "seconds": seconds,
        "peak_bytes": int(peak),
        "est_bytes": est["bytes"],
        "est_flops": est["flops"],
        "inputs_bytes": (n_experts + 1) * shape[0] * shape[1] * 2,
        "threads": torch.get_num_threads(),
        "gate": gate,
        "stream": stream,
        "plan": {"keep_f": est["plan"].keep_f, "block_rows": est["plan"].block_rows},
        "est_phase": est["phase"],
        **info,
    }


def rel_diff(a_path, b_path, device="cpu"):
    a, b = torch.load(a_path), torch.load(b_path)
    base, _ = make_inputs(tuple(a.shape), 0, device=device)
    base = base.float().cpu()
    da, db = a - base, b - base
    return float((da - db).double().norm() / db.double().norm())


def spawn(shape, n_experts, impl, device, save, timeout, gate="auto"):
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.perf_kernel",
        "--one",
        f"{shape[0]}x{shape[1]}",
        str(n_experts),
        impl,
        device,
        save or "",
        gate,
    ]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {
            "shape": list(shape),
            "experts": n_experts,
            "impl": impl,
            "device": device,
            "error": f"timeout after {timeout} s",
        }
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {
            "shape": list(shape),
            "experts": n_experts,
            "impl": impl,
            "device": device,
            "error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed",
        }
    return json.loads(lines[-1])


def spectral_benchmark(shapes=((2048, 2048), (4096, 1024), (1024, 4096)), reps=2, seed=0):
    """The spectral step alone (top 30 % of ``F``'s singular triplets): the full float32 SVD
    against the Gram-eigh route of the kernel, interleaved, with the error of each against a
    float64 SVD. Returns result dicts."""
    from mergekit_ace.kernels.linalg import top_k_isotropic_update

    results = []
    for m, n in shapes:
        g = torch.Generator().manual_seed(seed)
        low = torch.randn(m, 16, generator=g, dtype=torch.float64) @ torch.randn(
            16, n, generator=g, dtype=torch.float64
        )
        F64 = low / 4.0 + 0.3 * torch.randn(m, n, generator=g, dtype=torch.float64)
        k = math.floor(0.3 * min(m, n))
        U, s, Vh = torch.linalg.svd(F64, full_matrices=False)
        truth = float(s[:k].mean()) * (U[:, :k] @ Vh[:k])
        del U, s, Vh
        F = F64.float()
        times = {"svd": [], "gram-eigh": []}
        errors = {}
        for _ in range(reps):
            start = time.perf_counter()
            U, s, Vh = torch.linalg.svd(F, full_matrices=False)
            times["svd"].append(time.perf_counter() - start)
            errors["svd"] = float(
                (float(s[:k].mean()) * (U[:, :k] @ Vh[:k]).double() - truth).norm() / truth.norm()
            )
            del U, s, Vh
            start = time.perf_counter()
            M, sigma = top_k_isotropic_update(F, k)
            times["gram-eigh"].append(time.perf_counter() - start)
            errors["gram-eigh"] = float((sigma * M.double() - truth).norm() / truth.norm())
            del M
        results.append(
            {
                "spectral": [m, n],
                "k": k,
                "svd_s": min(times["svd"]),
                "gram_eigh_s": min(times["gram-eigh"]),
                "svd_err": errors["svd"],
                "gram_eigh_err": errors["gram-eigh"],
                "threads": torch.get_num_threads(),
            }
        )
    return results


def suite(name):
    """(name, shape, T, impls) in the order they run."""
    if name == "scaled":  # every dimension / 4: flops / 64 (all terms are cubic), memory / 16
        out = []
        for key in DISTINCT:
            m, n = LLAMA3_8B[key]
            shape = (m // 4, n // 4)
            small = key in ("q_proj", "k_proj")
            out.append((key + "/4", shape, 3, ["naive", "ace"] + ["float64"] * small))
            out.append((key + "/4", shape, 8, ["naive", "ace"]))
        return out
    if name == "full":  # what fits on a 2-core CPU, most informative first
        return [
            ("k_proj", (1024, 4096), 3, ["naive", "ace"]),
            ("k_proj", (1024, 4096), 8, ["ace"]),
            ("down_proj", (4096, 14336), 3, ["ace"]),
            ("q_proj", (4096, 4096), 3, ["naive", "ace"]),
            ("gate_proj", (14336, 4096), 3, ["ace"]),
            ("q_proj", (4096, 4096), 8, ["ace"]),
        ]
    if name == "full-cuda":
        return [(key, LLAMA3_8B[key], t, ["naive", "ace"]) for key in DISTINCT for t in (3, 8)]
    raise SystemExit(f"unknown suite {name!r}")


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--suite", choices=["scaled", "full", "full-cuda"])
    p.add_argument("--case", help="MxN")
    p.add_argument("--experts", type=int, default=3)
    p.add_argument("--impl", nargs="+", default=["naive", "ace"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--out", help="append JSON lines here")
    p.add_argument("--timeout", type=int, default=3600)
    p.add_argument("--spectral", action="store_true", help="time the spectral step alone")
    p.add_argument(
        "--gate",
        default="auto",
        choices=["auto", "on", "off"],
        help="ACE's branch gate for both formulations (on: heterogeneous everywhere)",
    )
    p.add_argument("--one", nargs=6, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.spectral:
        with open(args.out, "a") if args.out else open(os.devnull, "w") as out:
            for r in spectral_benchmark():
                print(json.dumps(r), flush=True)
                out.write(json.dumps(r) + "\n")
        return
    if args.one:
        shape = tuple(int(x) for x in args.one[0].split("x"))
        print(
            json.dumps(
                run_case(
                    shape,
                    int(args.one[1]),
                    args.one[2],
                    args.one[3],
                    args.one[4] or None,
                    gate=args.one[5],
                )
            ),
            flush=True,
        )
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        print("CUDA not available: skipping the GPU measurement.")
        return
    if args.suite:
        cases = suite(args.suite)
    else:
        shape = tuple(int(x) for x in args.case.split("x"))
        cases = [(args.case, shape, args.experts, args.impl)]
    tmp = Path(
        tempfile.mkdtemp(
            prefix="perf_kernel_",
            dir=ROOT / "benchmarks" / "cache" if (ROOT / "benchmarks" / "cache").is_dir() else None,
        )
    )
    out = open(args.out, "a") if args.out else None
    for name, shape, n_experts, impls in cases:
        results = {}
        for impl in impls:  # interleaved: the two formulations back to back on each case
            save = str(tmp / f"{impl}.pt")
            r = spawn(shape, n_experts, impl, args.device, save, args.timeout, args.gate)
            r["name"] = name
            results[impl] = r
        ok = {impl for impl, r in results.items() if "error" not in r}
        if {"naive", "ace"} <= ok:
            results["ace"]["speedup"] = results["naive"]["seconds"] / results["ace"]["seconds"]
            results["ace"]["rel_diff_vs_naive"] = rel_diff(
                tmp / "ace.pt", tmp / "naive.pt", args.device
            )
        if "float64" in ok:
            for impl in ok - {"float64"}:
                results[impl]["rel_diff_vs_float64"] = rel_diff(
                    tmp / f"{impl}.pt", tmp / "float64.pt", args.device
                )
        for impl, r in results.items():
            line = json.dumps(r)
            print(line, flush=True)
            if out:
                out.write(line + "\n")
                out.flush()
        for f in tmp.glob("*.pt"):
            f.unlink()
    tmp.rmdir()


if __name__ == "__main__":
    main()
