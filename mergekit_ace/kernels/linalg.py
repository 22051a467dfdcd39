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


def rank_tolerance(largest: float, shape: tuple, dtype: torch.dtype) -> float:
    """Numerical-rank cutoff ``largest * max(shape) * eps(dtype)``: the convention of
    ``numpy.linalg.matrix_rank`` and of ``torch.linalg.pinv``'s default ``rtol``. Singular
    values at or below it are rounding noise; their singular vectors are arbitrary."""
    return float(largest) * max(shape) * torch.finfo(dtype).eps


def top_singular_triplets(
    X: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``k`` leading singular triplets of ``X`` (``[m, n]``) from a thin SVD, with the
    numerically zero ones (``rank_tolerance`` of ``X``'s largest singular value) left out:
    ``(U [m, k'], s [k'], Vh [k', n])``, ``k' <= k``."""
    U, s, Vh = torch.linalg.svd(X, full_matrices=False)
    top = float(s[0]) if s.numel() else 0.0
    keep = int((s[:k] > rank_tolerance(top, tuple(X.shape), X.dtype)).sum()) if top > 0 else 0
    return U[:, :keep], s[:keep], Vh[:keep]


def nearest_orthonormal(X: torch.Tensor) -> torch.Tensor:
    """The orthonormal-column matrix nearest ``X`` (``[m, k]``, ``k <= m``) in Frobenius norm:
    the polar factor ``P Q^T`` of the thin SVD ``X = P S Q^T``."""
    P, _, Qh = torch.linalg.svd(X, full_matrices=False)
    return P @ Qh


def psd_range(A: torch.Tensor, rtol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-pairs spanning the numerical range of a symmetric positive semi-definite ``A``
    (``eigh``): ``(lam_r, Q_r)`` with the eigenvalues above ``rtol * max(lam)``, so that
    ``A^+ = Q_r diag(1 / lam_r) Q_r^T`` without ever forming it. Eigenvalues at or below the
    cutoff count as zero (their directions are outside the range)."""
    evals, evecs = torch.linalg.eigh(A)
    top = float(evals.max()) if evals.numel() else 0.0
    keep = evals > rtol * top if top > 0.0 else torch.zeros_like(evals, dtype=torch.bool)
    return evals[keep], evecs[:, keep]
