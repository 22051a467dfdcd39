"""What ``inspect`` predicts a tensor costs: the device's measured flop rate and, per tensor,
flops, time, kernel workspace and peak memory (from :func:`~mergekit_ace.kernels.ace.
estimate_ace_cost`)."""

from __future__ import annotations

import math
import time
from typing import Dict, Sequence

import torch

from mergekit_ace.kernels.ace import ace_merge, estimate_ace_cost
from mergekit_ace.kernels.ace.parameters import ACE_PARAMETERS


def calibrate_flop_rate(
    device: str = "cpu", size: int = 512, experts: int = 3, repeats: int = 3
) -> float:
    """Effective floating-point rate (flop/s) of the ACE kernel itself on ``device``: one
    merge of ``[size, size]`` tensors (Gram products, solve and spectral step in the
    proportions of a real tensor), after a small warm-up, timed best of ``repeats`` and divided
    into :func:`estimate_ace_cost`'s count. On a machine shared with other jobs the rate is
    only as good as the moment it is measured; ``--flop-rate`` overrides it."""
    gen = torch.Generator().manual_seed(0)
    kwargs = dict(tau=0.0, gate="on")  # heterogeneous: the branch with the spectral step
    best = math.inf
    for n, runs in ((64, 1), (size, repeats)):
        base = torch.randn(n, n, generator=gen)
        tensors = [base + s * torch.randn(n, n, generator=gen) for s in (0.01, 0.1, 1.0)[:experts]]
        base, tensors = base.to(device), [t.to(device) for t in tensors]
        for _ in range(runs):
            sync(device)
            start = time.perf_counter()
            ace_merge(base, tensors, **kwargs)
            sync(device)
            if n == size:
                best = min(best, time.perf_counter() - start)
    return estimate_ace_cost((size, size), experts)["flops"] / max(best, 1e-9)


def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def tensor_cost(
    shape: Sequence[int],
    n_experts: int,
    load_bytes: int,
    compute_bytes: int,
    flop_rate: float,
    refine: bool = True,
    k_frac: float = ACE_PARAMETERS.default("k_frac"),
    matmul: str = "float32",
) -> Dict[str, float]:
    """Flops (and the float64 part of them), estimated seconds, kernel workspace and predicted
    peak memory of one tensor.

    ``refine``: whether the spectral step runs (heterogeneous branch with ``refine: true``),
    on ``floor(k_frac * min(m, n))`` directions; ``matmul``: the resolved product precision
    (``resolve_matmul_precision``). Peak = the ``T + 1`` loaded inputs + the
    kernel's workspace of :func:`estimate_ace_cost` (which includes the merged tensor, returned
    in the inputs' dtype).
    """
    cost = estimate_ace_cost(
        tuple(shape),
        n_experts,
        compute_bytes,
        refine=refine,
        k_frac=k_frac,
        out_bytes=load_bytes,
        matmul=matmul,
    )
    peak = (n_experts + 1) * math.prod(shape) * load_bytes + cost["bytes"]
    return {
        "flops": float(cost["flops"]),
        "flops_float64": float(cost["flops_float64"]),
        "est_seconds": float(cost["flops"]) / flop_rate if flop_rate > 0 else float("nan"),
        "workspace_bytes": int(cost["bytes"]),
        "peak_bytes": int(peak),
    }
