"""Linear-algebra helpers shared by the kernels: a right solve that never forms an inverse."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch


@dataclass
class SolveInfo:
    """How ``X A = B`` was solved: ``"cholesky"`` (symmetric positive-definite part plus a
    rank-one correction), ``"lu"`` or ``"lstsq"`` (singular system), and the reciprocal
    pivot-growth estimate: ``min|U_ii| / max|U_ii|`` of the LU factors, or its Cholesky
    analogue ``(min L_ii / max L_ii)^2``."""

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
    try:
        P, _, Qh = torch.linalg.svd(X, full_matrices=False)
        return P @ Qh
    except torch.linalg.LinAlgError:
        return polar_from_gram(X)


def polar_from_gram(X: torch.Tensor) -> torch.Tensor:
    """The polar factor ``X (X^T X)^{-1/2}`` from a float64 eigendecomposition of ``X^T X``.

    The fallback of :func:`nearest_orthonormal` when LAPACK's divide-and-conquer SVD fails to
    converge (it can on matrices with many repeated singular values). Directions where ``X``
    is numerically rank-deficient (eigenvalues below ``k * eps * max``) are left out, so the
    result is the nearest partial isometry on ``X``'s range.
    """
    X64 = X.double()
    evals, evecs = torch.linalg.eigh(X64.T @ X64)
    top = float(evals.max()) if evals.numel() else 0.0
    keep = evals > X.shape[1] * torch.finfo(torch.float64).eps * top
    V = evecs[:, keep]
    return ((X64 @ V) * evals[keep].rsqrt() @ V.T).to(X.dtype)


def psd_range(A: torch.Tensor, rtol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-pairs spanning the numerical range of a symmetric positive semi-definite ``A``
    (``eigh``): ``(lam_r, Q_r)`` with the eigenvalues above ``rtol * max(lam)``, so that
    ``A^+ = Q_r diag(1 / lam_r) Q_r^T`` without ever forming it. Eigenvalues at or below the
    cutoff count as zero (their directions are outside the range)."""
    evals, evecs = torch.linalg.eigh(A)
    top = float(evals.max()) if evals.numel() else 0.0
    keep = evals > rtol * top if top > 0.0 else torch.zeros_like(evals, dtype=torch.bool)
    return evals[keep], evecs[:, keep]


def solve_right_spd_rank_one(
    B: torch.Tensor, c: torch.Tensor, N: torch.Tensor
) -> Optional[Tuple[torch.Tensor, SolveInfo]]:
    """Solve ``X (B + 1 c^T) = N`` for symmetric positive-definite ``B`` without an LU.

    Cholesky of ``B`` (half the flops of an LU), then the Sherman-Morrison correction for the
    rank-one term: with ``Y = N B^{-1}`` and ``z = B^{-1} c``,
    ``X = Y - (Y 1) z^T / (1 + 1^T z)``. Only the lower triangle of ``B`` is read.
    Returns ``None`` when ``B`` is not positive definite at working precision (Cholesky
    fails, or ``(min L_ii / max L_ii)^2``, the analogue of :func:`solve_right`'s pivot ratio,
    is not above the dtype's machine epsilon) or when ``1 + 1^T z`` (the ratio
    ``det(B + 1 c^T) / det(B)``) is not safely away from zero; the caller then uses
    :func:`solve_right`.
    """
    L, info = torch.linalg.cholesky_ex(B)
    if int(info) != 0:
        return None
    d = L.diagonal()
    top = float(d.max()) if d.numel() else 0.0
    rcond = (float(d.min()) / top) ** 2 if top > 0 else 0.0
    eps = torch.finfo(B.dtype).eps
    if not rcond > eps:
        return None
    z = _right_cholesky_solve(L, c.reshape(1, -1)).reshape(-1)  # B symmetric: z = B^{-1} c
    denom = 1.0 + float(z.sum(dtype=torch.float64))
    if not abs(denom) > math.sqrt(eps):
        return None
    X = _right_cholesky_solve(L, N)
    del L
    X.addr_(X.sum(dim=1), z, alpha=-1.0 / denom)  # rank-one update in place
    if not bool(torch.isfinite(X).all()):
        return None
    return X, SolveInfo("cholesky", rcond)


def _right_cholesky_solve(L: torch.Tensor, N: torch.Tensor) -> torch.Tensor:
    """``X`` with ``X L L^T = N``: two triangular solves from the right (no transposed
    copies of ``N``; measured ~25 % faster than ``cholesky_solve(N^T, L)^T`` on CPU)."""
    Y = torch.linalg.solve_triangular(L.transpose(0, 1), N, upper=True, left=False)
    return torch.linalg.solve_triangular(L, Y, upper=False, left=False)


def top_k_isotropic_update(
    F: torch.Tensor, k: int, *, block_bytes: int = 256 * 2**20
) -> Optional[Tuple[torch.Tensor, float]]:
    """``(U_k V_k^T, mean(s[:k]))`` for the top ``k`` singular triplets of ``F`` (``[m, n]``).

    Avoids the full SVD: the Gram matrix on the short side (``F^T F`` when ``m >= n``, else
    ``F F^T``) is accumulated in float64 in blocks of at most ``block_bytes``, and its
    eigendecomposition (float64) gives ``s_i^2`` and one set of singular vectors; the other
    side never has to be formed because ``U_k V_k^T = F V_k diag(1/s_k) V_k^T`` (or
    ``U_k diag(1/s_k) U_k^T F``). Forming the Gram in float64 keeps the subspace at least as
    accurate as a float32 SVD of ``F``. Returns ``None`` (the caller then runs the SVD)
    when ``s_k < 1e-3 s_1``: dividing by such small singular values would amplify the
    float32 round-off of the final product beyond what an SVD gives.
    """
    m, n = F.shape
    tall = m >= n
    r = n if tall else m
    G = torch.zeros(r, r, dtype=torch.float64, device=F.device)
    long_side = m if tall else n
    step = max(1, block_bytes // (8 * r))
    for start in range(0, long_side, step):
        block = (F[start : start + step] if tall else F[:, start : start + step]).to(torch.float64)
        if tall:
            G.addmm_(block.transpose(0, 1), block)
        else:
            G.addmm_(block, block.transpose(0, 1))
        del block
    evals, vecs = torch.linalg.eigh(G)
    del G
    top = evals[-k:].flip(0).clamp_min(0.0)
    s = top.sqrt()
    if k == 0 or not float(s[-1]) >= 1e-3 * float(s[0]) or not float(s[0]) > 0:
        return None
    V = vecs[:, -k:].flip(1)
    del vecs
    P = ((V / s) @ V.transpose(0, 1)).to(F.dtype)  # [r, r]: V diag(1/s) V^T
    del V
    M = F @ P if tall else P @ F
    return M, float(s.mean())
