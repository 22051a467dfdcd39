"""What ``ace_merge`` costs on one tensor before it runs: the peak of its own workspace and its
floating-point work, phase by phase, under the :class:`~mergekit_ace.kernels.ace.workspace.
WorkspacePlan` the kernel will follow. The out-of-memory fallback and ``inspect`` read it."""

from __future__ import annotations

import math
from typing import Dict, Sequence

from mergekit_ace.kernels.ace.workspace import WorkspacePlan, plan_workspace
from mergekit_ace.kernels.linalg import SPLIT_BLOCK_BYTES, symmetric_product_flops

# float64 eigh of an [r, r] Gram holds the Gram, the eigenvectors, LAPACK's 2 r^2 workspace and
# the projector; the linear-algebra libraries' own buffers add about 8 MiB whatever the size.
EIGH = 5 * 8
LIBRARY_BYTES = 8 * 2**20
# Work of an eigh with eigenvectors of an [r, r] matrix, per r^3: 4/3 to tridiagonalize and 2 to
# transform the eigenvectors back (the divide-and-conquer step between usually costs less).
EIGH_FLOPS = 10 / 3


def estimate_ace_cost(
    shape: Sequence[int],
    n_experts: int,
    bytes_per_element: int = 4,
    *,
    refine: bool = True,
    k_frac: float = 0.3,
    out_bytes: int = 2,
    matmul: str = "float32",
) -> dict:
    """Peak extra memory (bytes) and floating-point work of ``ace_merge`` on one tensor.

    ``bytes`` is the kernel's own peak workspace including the returned tensor, not the
    ``T + 1`` input tensors mergekit has already loaded; it does not depend on ``n_experts``
    (task vectors are formed a block of rows at a time). ``bytes_per_element`` is the compute
    dtype's size (4: float32), ``out_bytes`` the output dtype's (2: bfloat16); ``matmul`` the
    resolved product precision (``tf32x3`` holds a block's two halves). ``refine=False`` (or
    ``k_frac=0``) gives the homogeneous branch (no spectral step). Also returned: ``flops``
    (total), ``flops_grams`` / ``flops_solve`` / ``flops_spectral`` (its parts),
    ``flops_float64`` (the part done in float64 whatever the compute dtype: the refinement's
    Gram of ``F`` and its ``eigh``), ``phase`` (which phase sets the peak: ``"accumulate"``,
    ``"solve"``, ``"refine"`` or ``"finish"``) and the workspace ``plan`` it follows.
    """
    if len(shape) != 2:
        size = math.prod(shape)
        flops = 2 * n_experts * size
        return {
            "bytes": 2 * size * bytes_per_element,
            "flops": flops,
            "flops_float64": flops if bytes_per_element == 8 else 0,
        }
    k = math.floor(min(shape) * k_frac) if refine else 0
    plan = plan_workspace(tuple(shape), bytes_per_element, k, matmul=matmul)
    return {**workspace_cost(plan, n_experts, out_bytes), "plan": plan}


def workspace_cost(plan: WorkspacePlan, n_experts: int, out_bytes: int = 2) -> dict:
    """Peak workspace (bytes) and floating-point work of the closed form and refinement under
    ``plan``.

    Bytes are the kernel's own allocations on top of the ``T + 1`` inputs the caller holds
    (task vectors are formed a block at a time, so nothing grows with ``T``), the returned
    tensor included: ``out_bytes`` per element when the output dtype differs from the compute
    dtype (bfloat16: 2), none when it does not (the result is written in place). Flops count
    the matrix products, the Cholesky factorization, the triangular solves and the spectral
    step's ``eigh``; ``flops_float64`` is the part done in float64 whatever the compute dtype
    (the refinement's Gram of ``F`` and its ``eigh``; all of it when computing in float64),
    which consumer GPUs run at 1/32-1/64 of their float32 rate.
    """
    phases = phase_bytes(plan, out_bytes)
    peak = max(phases.values())
    # on a tie, the later phase
    phase = next(
        name for name in ("refine", "solve", "accumulate", "finish") if phases[name] == peak
    )
    grams, solve, spectral, float64 = phase_flops(plan, n_experts)
    flops = grams + solve + spectral
    return {
        "bytes": int(LIBRARY_BYTES + peak),
        "flops": float(flops),
        "flops_grams": float(grams),
        "flops_solve": float(solve),
        "flops_spectral": float(spectral),
        "flops_float64": float(flops if plan.element_bytes == 8 else float64),
        "phase": phase,
    }


def phase_bytes(plan: WorkspacePlan, out_bytes: int) -> Dict[str, int]:
    """Each phase's peak workspace in bytes, without the libraries' own buffers."""
    m, n, b = plan.m, plan.n, plan.element_bytes
    mn, nn = m * n, n * n
    blk = plan.block_rows * n
    # tf32x3: a block's TF32 head and remainder, and those of a block of the right factor's
    # columns (measured on an H200: within -10 %..+30 % with this count).
    split = 2 * blk + 2 * min(SPLIT_BLOCK_BYTES // 4, nn) if plan.matmul == "tf32x3" else 0
    if plan.row_gram:  # S, N, one task's C and its [m, m] Gram
        accumulate = (nn + 2 * mn + m * m + split) * b
    else:  # S, N, the task's Gram, one block of C
        accumulate = (2 * nn + mn + blk + split) * b
    return {
        "accumulate": accumulate,
        # the system and its factor, N, the two triangular solves' blocks
        "solve": (2 * nn + mn + 2 * blk) * b,
        "refine": _refine_bytes(plan, blk, split) if plan.k else 0,
        "finish": (mn + blk) * b + (mn * out_bytes if out_bytes != b else 0),
    }


def _refine_bytes(plan: WorkspacePlan, blk: int, split: int) -> int:
    m, n, b = plan.m, plan.n, plan.element_bytes
    mn, nn, r = m * n, n * n, min(m, n)
    if not plan.keep_f:
        # N, the system, its factor and the float64 Gram (then eigh's matrices), and one
        # re-formed block of F: the solve's two blocks, D's four, F's float64 copy.
        return (mn + 2 * nn + 6 * blk + split) * b + max(8 * blk + 8 * nn, EIGH * nn)
    # N, F, the system, D's block and its inputs (T_sum, C_eps, one task vector); then N, F,
    # the system and its factor, the solve's blocks; then N, F and the float64 Gram of F (a
    # block of F in float64, eigh's matrices and workspace).
    residual = (2 * mn + nn + 4 * blk + split) * b
    factor = (2 * mn + 2 * nn + 2 * blk) * b
    spectral = 2 * mn * b + max(min(256 * 2**20, 8 * mn) + 8 * r * r, EIGH * r * r)
    return max(residual, factor, spectral)


def phase_flops(plan: WorkspacePlan, n_experts: int) -> tuple:
    """``(Gram products, solve, spectral step, its float64 part)`` flops; the Grams are
    symmetric products (``linalg.add_symmetric_``), full ones under ``tf32x3``; the spectral
    step's float64 part is the Gram of ``F`` and its ``eigh``."""
    m, n, k, T = plan.m, plan.n, plan.k, n_experts

    def sym(rows: int, width: int) -> int:
        if plan.matmul == "tf32x3":
            return 2 * rows * width * width
        return symmetric_product_flops(rows, width)

    if plan.row_gram:  # C^T C, C C^T, (C C^T) C
        grams = T * (sym(m, n) + sym(n, m) + 2 * m * m * n)
    else:  # C^T C, C R
        grams = T * (sym(m, n) + 2 * m * n * n)
    solve = n**3 / 3 + 2 * m * n * n
    spectral = float64 = 0.0
    if k:
        r = min(m, n)
        # residual product, float64 Gram of F and its eigh, projector product (+ solve and
        # residual again when F is re-formed)
        float64 = symmetric_product_flops(max(m, n), r) + EIGH_FLOPS * r**3
        spectral = 2 * m * n * n + float64 + 2 * m * n * r + 2 * r * r * k
        if not plan.keep_f:
            spectral += 2 * m * n * n + 2 * m * n * n
    return grams, solve, spectral, float64
