"""The ACE kernel on a GPU, in one process: time, peak memory and accuracy per tensor.

Subcommands (each appends JSON lines to ``--out``):

- ``kernel``: every distinct Llama-3-8B shape, ``T`` experts, both branches (``--gates on
  off``), each ``matmul_precision``; best of ``--reps`` timed calls after a warm-up, and
  ``torch.cuda.max_memory_allocated`` above the inputs. ``--label`` names the kernel
  measured: run it once with this checkout and once with an older kernel first on the path
  (``--precisions default``; ``benchmarks/perf_gpu.sh`` shows how) to compare the two on the
  same GPU.
- ``accuracy``: against the kernel in float64 on the same GPU (which the tests pin to the
  independent float64 re-derivation), for the shapes it can afford.
- ``eigh``: ``torch.linalg.eigh`` in float32 and float64 (the spectral step's one call), with
  cuSOLVER and with MAGMA on CUDA.
- ``capped``: ``mergekit-yaml`` (``--mergekit-args``) in a process whose GPU memory is capped by
  ``torch.cuda.set_per_process_memory_fraction`` (e.g. a 16 GB card on an 80 GB one).

    python -m benchmarks.perf_gpu kernel --T 3 8 --out runs/gpu/kernel.jsonl
    python -m benchmarks.perf_gpu capped --cap-gib 16 --mergekit-args "ace.yml out --cuda"
"""

from __future__ import annotations

import argparse
import inspect
import json
import shlex
import sys
import time

import torch

from benchmarks.perf_kernel import DISTINCT, LLAMA3_8B, make_inputs
from mergekit_ace.kernels.ace import ace_merge, estimate_ace_cost


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _emit(out, row):
    line = json.dumps(row)
    print(line, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")


def _call(base, experts, gate, precision, **extra):
    kwargs = dict(gate=gate, **extra)
    if precision != "default":
        kwargs["matmul_precision"] = precision
    return ace_merge(base, experts, **kwargs)


def kernel(args):
    takes_precision = "matmul_precision" in inspect.signature(ace_merge).parameters
    precisions = [p for p in args.precisions if p == "default" or takes_precision]
    for name in args.shapes:
        shape = LLAMA3_8B[name]
        if args.scale > 1:
            shape = (shape[0] // args.scale, shape[1] // args.scale)
        for T in args.T:
            base, experts = make_inputs(shape, T, device=args.device)
            _sync(args.device)
            for gate in args.gates:
                for precision in precisions if T == args.T[0] else precisions[:1]:
                    _call(base, experts, gate, precision)  # warm-up
                    best, peak = float("inf"), 0
                    for _ in range(args.reps):
                        _sync(args.device)
                        if args.device == "cuda":
                            torch.cuda.reset_peak_memory_stats()
                            before = torch.cuda.memory_allocated()
                        start = time.perf_counter()
                        out, diag = _call(base, experts, gate, precision)
                        _sync(args.device)
                        best = min(best, time.perf_counter() - start)
                        if args.device == "cuda":
                            peak = max(peak, torch.cuda.max_memory_allocated() - before)
                        del out
                    est = _estimate(shape, T, diag)
                    _emit(
                        args.out,
                        {
                            "kind": "kernel",
                            "label": args.label,
                            "tensor": name,
                            "est_bytes": est,
                            "shape": list(shape),
                            "T": T,
                            "gate": gate,
                            "precision": precision,
                            "matmul": getattr(diag, "matmul", None),
                            "branch": diag.branch,
                            "spectral": diag.spectral,
                            "seconds": best,
                            "peak_bytes": peak,
                            "device": torch.cuda.get_device_name()
                            if args.device == "cuda"
                            else "cpu",
                            # whether the condition number was measured (spread > 41 at eps: auto)
                            "condition": getattr(diag, "condition", None),
                            "boost_ratio": getattr(
                                diag, "boost_ratio", getattr(diag, "spread", None)
                            ),
                        },
                    )
            del base, experts


def _estimate(shape, T, diag):
    """This checkout's estimate for the plan the call took (None for an older kernel)."""
    try:
        return estimate_ace_cost(
            shape, T, 4, refine=bool(diag.k), matmul=getattr(diag, "matmul", None) or "float32"
        )["bytes"]
    except TypeError:
        return None


def rel_err(a, b):
    """``||a - b||_F / ||b||_F`` in float64."""
    return float((a.double() - b.double()).norm() / b.double().norm())


def accuracy(args):
    for name in args.shapes:
        shape = LLAMA3_8B[name]
        if args.scale > 1:
            shape = (shape[0] // args.scale, shape[1] // args.scale)
        base, experts = make_inputs(shape, 3, device=args.device)
        for gate in args.gates:
            ref, ref_diag = ace_merge(base.double(), [e.double() for e in experts], gate=gate)
            branch = ref_diag.branch
            ref_delta = ref - base.double()
            for precision in args.precisions:
                out, diag = _call(base, experts, gate, precision, out_dtype=torch.float32)
                _emit(
                    args.out,
                    {
                        "kind": "accuracy",
                        "label": args.label,
                        "tensor": name,
                        "shape": list(shape),
                        "gate": gate,
                        "precision": precision,
                        "matmul": getattr(diag, "matmul", None),
                        "branch": diag.branch,
                        "reference_branch": branch,
                        "rel_err_vs_float64": rel_err(out - base.float(), ref_delta),
                    },
                )
            del ref, ref_delta


def eigh(args):
    backends = ["cusolver", "magma"] if torch.device(args.device).type == "cuda" else ["default"]
    for backend in backends:
        if backend != "default":
            torch.backends.cuda.preferred_linalg_library(backend)
        for n in (1024, 4096):
            for dtype in (torch.float32, torch.float64):
                x = torch.randn(n, n, device=args.device, dtype=dtype)
                G = x @ x.T
                try:
                    torch.linalg.eigh(G)
                except RuntimeError as error:  # a backend this build lacks
                    _emit(args.out, {"kind": "eigh", "backend": backend, "error": str(error)[:200]})
                    break
                _sync(args.device)
                best = float("inf")
                for _ in range(args.reps):
                    start = time.perf_counter()
                    torch.linalg.eigh(G)
                    _sync(args.device)
                    best = min(best, time.perf_counter() - start)
                _emit(
                    args.out,
                    {
                        "kind": "eigh",
                        "backend": backend,
                        "n": n,
                        "dtype": str(dtype),
                        "seconds": best,
                    },
                )
    if backends[0] != "default":
        torch.backends.cuda.preferred_linalg_library("default")
        _eigh_beside_products(args)


def _eigh_beside_products(args):
    """Whether a float64 eigh of 4096 (memory-bound tridiagonalization) leaves the GPU free for
    another merge's products: eigh alone, 40 float32 products of 4096 alone, and the two on
    two streams from two threads."""
    import threading

    x = torch.randn(4096, 4096, device=args.device, dtype=torch.float64)
    G = x @ x.T
    a = torch.randn(4096, 4096, device=args.device)

    def eig():
        torch.linalg.eigh(G)

    def gemms():
        for _ in range(40):
            a @ a

    def timed(fns):
        streams = [torch.cuda.Stream() for _ in fns]
        torch.cuda.synchronize()

        def body(fn, stream):
            with torch.cuda.stream(stream):
                fn()
            stream.synchronize()

        threads = [threading.Thread(target=body, args=(f, s)) for f, s in zip(fns, streams)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        torch.cuda.synchronize()
        return time.perf_counter() - start

    timed([eig, gemms])  # warm-up
    result = {
        k: min(timed(f) for _ in range(3))
        for k, f in (("eigh", [eig]), ("products", [gemms]), ("both", [eig, gemms]))
    }
    _emit(args.out, {"kind": "eigh_beside_products", **result})


def capped(args):
    """Run mergekit-yaml with the GPU memory capped at ``--cap-gib``."""
    free, total = torch.cuda.mem_get_info()
    torch.cuda.set_per_process_memory_fraction(args.cap_gib * 2**30 / total)
    from mergekit.scripts.run_yaml import main as mergekit_yaml

    start = time.perf_counter()
    try:
        mergekit_yaml.main(args.rest, standalone_mode=False)
        rc = 0
    except Exception as error:  # reported, not raised: the measurement is the outcome
        print(f"{type(error).__name__}: {error}", file=sys.stderr)
        rc = 1
    _emit(
        args.out,
        {
            "kind": "capped",
            "cap_gib": args.cap_gib,
            "rc": rc,
            "seconds": time.perf_counter() - start,
            "peak_allocated_bytes": torch.cuda.max_memory_allocated(),
            "peak_reserved_bytes": torch.cuda.max_memory_reserved(),
        },
    )
    sys.exit(rc)


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("what", choices=["kernel", "accuracy", "eigh", "capped"])
    p.add_argument("--shapes", nargs="+", default=DISTINCT, choices=list(LLAMA3_8B))
    p.add_argument("--T", nargs="+", type=int, default=[3])
    p.add_argument("--gates", nargs="+", default=["auto", "off"])
    p.add_argument(
        "--precisions",
        nargs="+",
        default=["auto", "float32"],
        help="matmul_precision values; 'default': the kernel's own default",
    )
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--label", default="this checkout")
    p.add_argument("--device", default="cuda")
    p.add_argument("--scale", type=int, default=1, help="divide every dimension (dry runs)")
    p.add_argument("--cap-gib", type=float, default=16.0)
    p.add_argument("--out")
    p.add_argument("--mergekit-args", default="", help="capped: mergekit-yaml's arguments")
    args = p.parse_args(argv)
    args.rest = shlex.split(args.mergekit_args)
    {"kernel": kernel, "accuracy": accuracy, "eigh": eigh, "capped": capped}[args.what](args)


if __name__ == "__main__":
    main()
