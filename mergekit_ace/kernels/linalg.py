"""Linear-algebra helpers shared by the kernels: a right solve that never forms an inverse."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SolveInfo:
    """How ``X A = B`` was solved: ``"lu"`` or ``"lstsq"`` (singular system), and the
    reciprocal pivot-growth estimate ``min|U_ii| / max|U_ii|`` of the LU factors."""

    method: str
    rcond: float


def solve_right(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, SolveInfo]:
    """Solve ``X A = B`` for ``X`` (``A``: ``[n, n]``, ``B``: ``[m, n]``).

    LU with partial pivoting on ``A^T``. When ``A`` is singular at working precision (a zero
    pivot, or ``min|U_ii| / max|U_ii|`` below the dtype's machine epsilon) the minimum-norm
    least-squares solution is returned instead.
    """
    At = A.transpose(0, 1)
    LU, pivots, info = torch.linalg.lu_factor_ex(At)
    diag = LU.diagonal().abs()
    top = float(diag.max()) if diag.numel() else 0.0
    rcond = float(diag.min()) / top if top > 0 else 0.0
    if int(info) == 0 and rcond > torch.finfo(A.dtype).eps:
        X = torch.linalg.lu_solve(LU, pivots, B.transpose(0, 1)).transpose(0, 1)
        if bool(torch.isfinite(X).all()):
            return X, SolveInfo("lu", rcond)
    del LU, pivots
    return lstsq_right(A, B), SolveInfo("lstsq", rcond)


def lstsq_right(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Minimum-norm least-squares ``X`` with ``X A ~= B`` (rank-revealing; CPU uses gelsd)."""
    if A.device.type == "cpu":
        sol = torch.linalg.lstsq(A.transpose(0, 1), B.transpose(0, 1), driver="gelsd").solution
        return sol.transpose(0, 1)
    # CUDA's lstsq only handles full-rank systems; the pseudo-inverse is rank-revealing.
    return B @ torch.linalg.pinv(A)
