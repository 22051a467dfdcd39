"""Linear-algebra helpers shared by the kernels: a right solve that never forms an inverse and
reports its conditioning, truncated spectral decompositions, and the large products (symmetric
Grams, and on CUDA the TF32 tensor-core products)."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, List, NamedTuple, Optional, Tuple, Union

import torch

from mergekit_ace.kernels.cutoffs import GRAM_EIGH_MIN_RATIO, kept_eigenvalues, rank_tolerance


@dataclass
class SolveInfo:
    """How ``X A = B`` was solved: ``"cholesky"`` (symmetric positive-definite part plus a
    rank-one correction), ``"lu"`` or ``"lstsq"`` (singular system), and the reciprocal
    pivot-growth estimate: ``min|U_ii| / max|U_ii|`` of the LU factors, or its Cholesky
    analogue ``(min L_ii / max L_ii)^2``.

    ``condition``: the 2-norm condition number of the symmetric part ``B``, which bounds the
    relative accuracy a solve at unit round-off ``u`` can lose (``condition * u``). Measured
    (:func:`cholesky_condition`) where the bound from the ridge (``RightSolver.factor``'s
    ``floor``) allows a loss above ``ACCURACY_WARN`` or when asked; otherwise that bound,
    which is then small enough. Infinite for LU and least squares (the system was singular or
    indefinite at working precision; a Cholesky pivot ratio below the machine epsilon already
    means a condition number above its inverse, since the pivots lie between the extreme
    eigenvalues); ``None`` when no floor was given. ``rcond`` alone can be far more optimistic
    than ``condition`` (docs/performance.md, "Measurements behind smaller choices").
    """

    method: str
    rcond: float
    condition: Optional[float] = None
    measured: bool = False
    bound: Optional[float] = None  # the ridge's bound, kept where ``condition`` is measured


# Relative change of a result that round-off can cause (condition number * unit round-off *
# amplification by later steps) above which the kernels report it. A solve's condition number
# is measured, not just bounded, where the bound allows that much; float32 with ``eps: auto``
# stays far below it (4097 * 6e-8 = 2.4e-4).
ACCURACY_WARN = 1e-2


def unit_roundoff(dtype: torch.dtype) -> float:
    """Half the machine epsilon: the largest relative error of rounding to ``dtype``."""
    return torch.finfo(dtype).eps / 2


def cholesky_condition(L: torch.Tensor, *, iterations: int = 4, block: int = 4) -> float:
    """An estimate of ``cond_2(L L^T) = (s_max(L) / s_min(L))^2`` from the Cholesky factor
    ``L`` alone: block power iteration on ``L L^T`` for the largest eigenvalue and inverse
    iteration through the factor for the smallest (each step ``O(n^2 block)``; no new
    ``[n, n]`` matrix). Both are Rayleigh-quotient bounds from inside the spectrum, so in
    exact arithmetic the estimate is at most the true value; it converges fastest in the case
    that matters, a cluster of eigenvalues at the ridge (a rank-deficient sum of proxies).
    Where the condition number approaches ``1 / u`` the factor's own round-off dominates and
    the estimate can exceed the true value."""
    n = L.shape[0]
    if n == 0:
        return 1.0
    g = torch.Generator(device=L.device).manual_seed(0)
    start = torch.linalg.qr(
        torch.randn(n, min(block, n), generator=g, device=L.device, dtype=L.dtype)
    ).Q
    # X^T L (a wide row block times L) rather than L X with a skinny X, and two triangular
    # solves rather than cholesky_solve: the faster forms on CPU.
    X = start
    for _ in range(iterations):
        X = torch.linalg.qr(((X.mT @ L) @ L.mT).mT).Q
    largest = float(torch.linalg.matrix_norm(X.mT @ L, ord=2)) ** 2
    X = start
    for _ in range(iterations):
        Y = torch.linalg.solve_triangular(L, X, upper=False)
        X = torch.linalg.qr(torch.linalg.solve_triangular(L.mT, Y, upper=True)).Q
    inv_smallest = (
        float(torch.linalg.matrix_norm(torch.linalg.solve_triangular(L, X, upper=False), ord=2))
        ** 2
    )
    estimate = largest * inv_smallest
    return max(1.0, estimate) if math.isfinite(estimate) else math.inf  # 1: rounding at n = 1


def top_singular_triplets(
    X: torch.Tensor, k: int, scale: Optional[float] = None, floor: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``k`` leading singular triplets of ``X`` (``[m, n]``) from a thin SVD, with the
    numerically zero ones left out: ``(U [m, k'], s [k'], Vh [k', n])``, ``k' <= k``.

    Numerically zero: at or below ``rank_tolerance(scale)``, where ``scale`` is the size of
    the matrix whose round-off ``X`` carries (default: ``X``'s own largest singular value). A
    residual such as ``tau - U U^T tau`` must pass the size of ``tau`` (its Frobenius norm,
    an upper bound of its largest singular value): measured against its own largest singular
    value, a residual that is pure round-off would look like signal. Singular values at or
    below ``floor`` (the experts' storage noise, :mod:`~mergekit_ace.kernels.cutoffs`) are
    left out too.
    """
    U, s, Vh = torch.linalg.svd(X, full_matrices=False)
    top = float(s[0]) if s.numel() else 0.0
    scale = top if scale is None else float(scale)
    cut = max(rank_tolerance(scale, tuple(X.shape)), floor)
    keep = int((s[:k] > cut).sum()) if top > 0 else 0
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


def psd_range(
    A: torch.Tensor, rtol: float, floor: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-pairs spanning the numerical range of a symmetric positive semi-definite ``A``
    (``eigh``): ``(eigenvalues, basis)`` with the eigenvalues above ``rtol`` times the largest
    and above ``floor`` (:func:`~mergekit_ace.kernels.cutoffs.kept_eigenvalues`), so that
    ``A^+ = basis diag(1 / eigenvalues) basis^T`` without ever forming it. Eigenvalues at or
    below the cut-off count as zero (their directions are outside the range)."""
    eigenvalues, vectors = torch.linalg.eigh(A)
    keep = kept_eigenvalues(eigenvalues, rtol, floor)
    return eigenvalues[keep], vectors[:, keep]


class RightSolver:
    """Solves ``X A = N`` for ``A = B + 1 c^T`` (``B`` symmetric ``[n, n]``, ``c`` a row or
    ``None``), factored once and applied to any number of row blocks of ``N``; never forms
    an inverse.

    Symmetric positive-definite ``B`` (the usual case): Cholesky of ``B`` (half the flops of
    an LU), then the Sherman-Morrison correction for the rank-one term: with ``Y = N B^{-1}``
    and ``z = B^{-1} c``, ``X = Y - (Y 1) z^T / (1 + 1^T z)``; only ``B``'s lower triangle is
    read. When ``B`` is not positive definite at working precision (Cholesky fails, or
    ``(min L_ii / max L_ii)^2`` is not above the dtype's machine epsilon) or ``1 + 1^T z``
    (``det(A) / det(B)``) is not safely away from zero: LU with partial pivoting of ``A^T``;
    when ``A`` is singular at working precision (a zero pivot, or ``min|U_ii| / max|U_ii|``
    below machine epsilon), the minimum-norm least-squares solution ``N A^+``.
    ``info`` reports the method, the reciprocal pivot-growth estimate ``rcond`` and, given
    ``floor`` (a lower bound of ``B``'s eigenvalues, e.g. its ridge), ``B``'s condition
    number (:class:`SolveInfo`; ``measure``: measured even where the bound is small).
    """

    def __init__(self, method: str, rcond: float, factors: tuple):
        self.info = SolveInfo(method, rcond)
        self._factors = factors

    @classmethod
    def factor(
        cls,
        B: torch.Tensor,
        c: Optional[torch.Tensor],
        *,
        floor: Optional[float] = None,
        measure: bool = False,
    ) -> "RightSolver":
        n = B.shape[0]
        # cond(B) <= (lambda_max + floor) / floor <= tr(B) / floor - n + 1
        bound = None
        if floor is not None:
            trace = float(B.diagonal().sum(dtype=torch.float64))
            bound = max(1.0, trace / floor - n + 1) if floor > 0 else math.inf
        solver = cls._cholesky(B, c) or cls._lu(B if c is None else B + c.unsqueeze(0))
        solver.info.bound = bound
        if bound is not None:
            # LU or least squares: B, or A with the prior, is singular at this precision
            solver.info.condition = bound if solver.info.method == "cholesky" else math.inf
            solver.check_condition(force=measure)
        return solver

    def check_condition(self, amplification: float = 1.0, *, force: bool = False) -> None:
        """Replace the bound in ``info.condition`` by a measurement (:func:`cholesky_condition`)
        when ``bound * u * amplification`` exceeds ``ACCURACY_WARN`` (``amplification``: by
        how much a later step multiplies the solve's relative error), or when ``force``."""
        info = self.info
        if info.condition is None or info.measured or info.method != "cholesky":
            return
        L = self._factors[0]
        if force or info.condition * unit_roundoff(L.dtype) * amplification > ACCURACY_WARN:
            info.condition = min(info.condition, cholesky_condition(L))
            info.measured = True

    @classmethod
    def _cholesky(cls, B: torch.Tensor, c: Optional[torch.Tensor]) -> Optional["RightSolver"]:
        machine_epsilon = torch.finfo(B.dtype).eps
        L, info = torch.linalg.cholesky_ex(B)
        if int(info) != 0:
            return None
        d = L.diagonal()
        top = float(d.max()) if d.numel() else 0.0
        rcond = (float(d.min()) / top) ** 2 if top > 0 else 0.0
        if not rcond > machine_epsilon:
            return None
        if c is None:
            return cls("cholesky", rcond, (L, None, 1.0))
        z = _right_cholesky_solve(L, c.reshape(1, -1)).reshape(-1)  # B^{-1} c
        denom = 1.0 + float(z.sum(dtype=torch.float64))
        if not abs(denom) > math.sqrt(machine_epsilon):
            return None
        return cls("cholesky", rcond, (L, z, denom))

    @classmethod
    def _lu(cls, A: torch.Tensor) -> "RightSolver":
        LU, pivots, info = torch.linalg.lu_factor_ex(A.transpose(0, 1))
        diag = LU.diagonal().abs()
        top = float(diag.max()) if diag.numel() else 0.0
        rcond = float(diag.min()) / top if top > 0 else 0.0
        if int(info) == 0 and rcond > torch.finfo(A.dtype).eps:
            return cls("lu", rcond, (LU, pivots))
        del LU, pivots
        return cls("lstsq", rcond, (torch.linalg.pinv(A),))

    def solve(self, N: torch.Tensor) -> torch.Tensor:
        """``N A^{-1}`` for a block of rows ``N`` (a new tensor)."""
        method = self.info.method
        if method == "cholesky":
            L, z, denom = self._factors
            X = _right_cholesky_solve(L, N)
            if z is not None:
                X.addr_(X.sum(dim=1), z, alpha=-1.0 / denom)  # rank-one update in place
            return X
        if method == "lu":
            LU, pivots = self._factors
            return torch.linalg.lu_solve(LU, pivots, N.transpose(0, 1)).transpose(0, 1)
        return N @ self._factors[0]


def _right_cholesky_solve(L: torch.Tensor, N: torch.Tensor) -> torch.Tensor:
    """``X`` with ``X L L^T = N``: two triangular solves from the right, with no transposed
    copies of ``N`` (faster on CPU than ``cholesky_solve(N^T, L)^T``)."""
    Y = torch.linalg.solve_triangular(L.transpose(0, 1), N, upper=True, left=False)
    return torch.linalg.solve_triangular(L, Y, upper=False, left=False)


# Symmetric products x^T x are formed block by block, the blocks above the diagonal once and
# mirrored: about four blocks of columns, none narrower than this (narrower blocks run below
# the GEMM's efficient size; docs/performance.md).
SYMMETRIC_BLOCK_MIN = 192


def _symmetric_blocks(r: int) -> List[Tuple[int, int]]:
    step = max(SYMMETRIC_BLOCK_MIN, -(-r // 4))
    return [(start, min(start + step, r)) for start in range(0, r, step)]


def symmetric_product_flops(k: int, r: int) -> int:
    """Flops of :func:`add_symmetric_` for ``x`` of shape ``[k, r]``: ``k (r^2 + sum b_i^2)``
    for blocks of widths ``b_i``, against ``2 k r^2`` for a full product."""
    return k * (r * r + sum((j - i) ** 2 for i, j in _symmetric_blocks(r)))


def add_symmetric_(out: torch.Tensor, x: torch.Tensor, *, alpha: float = 1.0) -> torch.Tensor:
    """``out += alpha * x^T x`` (``out`` ``[r, r]``, ``x`` ``[k, r]``, any strides) with the
    product formed only on and above the block diagonal and mirrored below it: about 5/8 of a
    full product's flops (:func:`symmetric_product_flops`). The caller sets the precision
    (``_Tf32``); a row Gram ``x x^T`` is ``add_symmetric_(out, x.T)``."""
    blocks = _symmetric_blocks(out.shape[0])
    for index, (i0, i1) in enumerate(blocks):
        xi = x[:, i0:i1]
        out[i0:i1, i0:i1].addmm_(xi.transpose(0, 1), xi, alpha=alpha)
        for j0, j1 in blocks[index + 1 :]:
            product = xi.transpose(0, 1) @ x[:, j0:j1]
            out[i0:i1, j0:j1].add_(product, alpha=alpha)
            out[j0:j1, i0:i1].add_(product.transpose(0, 1), alpha=alpha)
            del product
    return out


def short_side_gram(F: torch.Tensor, *, block_bytes: int = 256 * 2**20) -> torch.Tensor:
    """The float64 Gram matrix of ``F`` (``[m, n]``) on its short side: ``F^T F`` when
    ``m >= n``, else ``F F^T``, accumulated in blocks of at most ``block_bytes`` of float64."""
    m, n = F.shape
    tall = m >= n
    r = n if tall else m
    G = torch.zeros(r, r, dtype=torch.float64, device=F.device)
    step = max(1, block_bytes // (8 * r))
    for start in range(0, m if tall else n, step):
        block = (F[start : start + step] if tall else F[:, start : start + step]).to(torch.float64)
        add_symmetric_(G, block if tall else block.transpose(0, 1))
        del block
    return G


class IsotropicProjector(NamedTuple):
    """:func:`isotropic_projector`'s result: ``P`` (``None`` when no direction lies above the
    floor), ``sigma = mean(s[:k])``, ``boost_ratio = s_1 / s_k``, ``k``, and ``cut_gap =
    (s_k - s_{k+1}) / ||F||_F`` (``None`` when every direction is boosted): how near the last
    boosted direction is to a tie with the first one left alone."""

    P: Optional[torch.Tensor]
    sigma: float
    boost_ratio: float
    k: int
    cut_gap: Optional[float] = None
    floor: float = 0.0


def isotropic_projector(
    G: torch.Tensor, k: int, floor: Union[float, Callable[[float], float]] = 0.0
) -> Optional[IsotropicProjector]:
    """From the short-side Gram ``G`` of ``F`` (:func:`short_side_gram`), the projector
    ``P = V_k' diag(1/s_k') V_k'^T`` (``[r, r]``, float64) for the top ``k'`` singular triplets
    of ``F``, so that ``U_k' V_k'^T = F P`` (``F`` tall) or ``P F`` (wide) without the SVD;
    ``k'`` is ``k`` less the directions whose singular value is at or below ``floor``
    (``P=None, k=0`` when none is above it); a callable ``floor`` is given ``s_k`` and returns
    the floor (:class:`IsotropicProjector` records the floor applied). ``s_1 / s_k'`` is by how
    much boosting the ``k'``-th direction multiplies the relative round-off ``F`` carries.

    The eigendecomposition of ``G`` (float64) gives ``s_i^2`` and one set of singular vectors;
    a Gram formed in float64 keeps the subspace at least as accurate as a float32 SVD of ``F``.
    Returns ``None`` (the caller then runs the SVD) when ``s_k'`` is below
    :data:`~mergekit_ace.kernels.cutoffs.GRAM_EIGH_MIN_RATIO` times ``s_1``.
    """
    eigenvalues, vecs = torch.linalg.eigh(G)
    s = eigenvalues.flip(0).clamp_min(0.0).sqrt()
    if callable(floor):
        floor = floor(float(s[k - 1])) if k else 0.0
    if k and floor > 0.0:
        k = int((s[:k] > floor).sum())
        if k == 0:
            return IsotropicProjector(None, 0.0, 1.0, 0, floor=floor)
    if k == 0 or not float(s[k - 1]) >= GRAM_EIGH_MIN_RATIO * float(s[0]) or not float(s[0]) > 0:
        return None
    V = vecs[:, -k:].flip(1)
    del vecs
    top = s[:k]
    frobenius = float(s.square().sum().sqrt())
    cut_gap = float(s[k - 1] - s[k]) / frobenius if k < s.numel() else None
    return IsotropicProjector(
        (V / top) @ V.transpose(0, 1),
        float(top.mean()),
        float(s[0] / s[k - 1]),
        k,
        cut_gap,
        floor,
    )


def top_k_isotropic_update(F: torch.Tensor, k: int) -> Optional[Tuple[torch.Tensor, float]]:
    """``(U_k V_k^T, mean(s[:k]))`` for the top ``k`` singular triplets of ``F`` through
    :func:`short_side_gram` and :func:`isotropic_projector` (``None`` where that declines)."""
    top = isotropic_projector(short_side_gram(F), k)
    if top is None:
        return None
    P, sigma = top.P.to(F.dtype), top.sigma
    return (F @ P if F.shape[0] >= F.shape[1] else P @ F), sigma


_TF32_MASK = -8192  # 0xFFFFE000: sign, exponent and the 10 mantissa bits TF32 keeps
_TF32_HALF = 4096  # half of the 13 bits TF32 drops
SPLIT_BLOCK_BYTES = 128 * 2**20  # columns of a right factor split at once


def resolve_matmul_precision(precision: str, device: torch.device, dtype: torch.dtype) -> str:
    """The precision the large float32 products run in on ``device``.

    ``precision`` is the parameter's canonical value (``auto``, ``float32``, ``tf32x3`` or
    ``tf32``). ``float32``: plain float32 (the CPU's and the default-PyTorch GPU's).
    ``tf32x3``: each operand split into a TF32 head and a TF32 remainder (:func:`tf32_split`),
    three tensor-core products (head*head, head*rest, rest*head) summed in float32. ``tf32``:
    one tensor-core product (~1e-3 relative error, an explicit opt-in). ``auto``: ``tf32x3``
    on CUDA GPUs with tensor cores for TF32 (compute capability 8.0 and newer), ``float32``
    elsewhere. Float64 computation is never changed, and TF32 exists only on CUDA: everything
    else is ``float32``.
    """
    if dtype != torch.float32 or device.type != "cuda":
        return "float32"
    if precision == "auto":
        return "tf32x3" if torch.cuda.get_device_capability(device)[0] >= 8 else "float32"
    return precision


class _Tf32:
    """Sets cuBLAS's TF32 switch for float32 products for the duration of a block."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __enter__(self):
        self.saved = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = self.enabled

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32 = self.saved


def tf32_round(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to the nearest TF32 value (ties away from zero): the low 13 mantissa
    bits cleared after adding half of their range to the magnitude."""
    bits = x.view(torch.int32)
    return bits.add(_TF32_HALF).bitwise_and_(_TF32_MASK).view(torch.float32)


def tf32_split(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(head, rest)``, both exactly representable in TF32, with ``head = tf32_round(x)``
    (so ``|x - head| <= 2^-11 |x|``) and ``rest`` the TF32 rounding of ``x - head``:
    ``head + rest`` equals ``x`` to within ``2^-22 |x|``, and tensor cores, which read only
    TF32's bits, multiply both exactly."""
    head = tf32_round(x)
    return head, tf32_round(x - head)


def _one_product(x: torch.Tensor, precision: str):
    """The TF32 switch for one product of CUDA float32 ``x`` in ``precision`` ``float32``
    (off) or ``tf32`` (on); nothing to set for other dtypes and devices."""
    if x.is_cuda and x.dtype == torch.float32:
        return _Tf32(precision == "tf32")
    return contextlib.nullcontext()


def addmm_(
    out: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    alpha: float = 1.0,
    precision: str = "float32",
) -> torch.Tensor:
    """``out += alpha * a @ b`` in the resolved ``precision`` (see
    :func:`resolve_matmul_precision`)."""
    if precision != "tf32x3" or out.dtype != torch.float32:
        with _one_product(out, precision):
            return out.addmm_(a, b, alpha=alpha)
    with _Tf32(True):
        a_head, a_rest = tf32_split(a)
        # b's halves a block of columns at a time: a large right factor (an [n, n] system)
        # would otherwise need twice its size again in halves.
        step = max(1, SPLIT_BLOCK_BYTES // (4 * b.shape[0]))
        for start in range(0, b.shape[1], step):
            b_head, b_rest = tf32_split(b[:, start : start + step])
            _three_products(out[:, start : start + step], a_head, a_rest, b_head, b_rest, alpha)
        return out


def _three_products(out, a_head, a_rest, b_head, b_rest, alpha):
    out.addmm_(a_rest, b_head, alpha=alpha)  # the small terms first
    out.addmm_(a_head, b_rest, alpha=alpha)
    return out.addmm_(a_head, b_head, alpha=alpha)


def add_gram_(
    out: torch.Tensor, x: torch.Tensor, *, alpha: float = 1.0, precision: str = "float32"
) -> torch.Tensor:
    """``out += alpha * x^T x`` with no temporary of ``out``'s size (``x`` split only once
    for ``tf32x3``; otherwise :func:`add_symmetric_`)."""
    if precision != "tf32x3" or x.dtype != torch.float32:
        with _one_product(x, precision):
            return add_symmetric_(out, x, alpha=alpha)
    head, rest = tf32_split(x)
    with _Tf32(True):
        return _three_products(out, head.transpose(0, 1), rest.transpose(0, 1), head, rest, alpha)


def gram(x: torch.Tensor, *, rows: bool = False, precision: str = "float32") -> torch.Tensor:
    """``x^T x`` (``rows=False``) or ``x x^T`` in ``precision``; with ``tf32x3`` the two cross
    terms are one product and its transpose (two tensor-core products instead of three)."""
    a, b = (x, x.transpose(0, 1)) if rows else (x.transpose(0, 1), x)
    out = x.new_zeros(a.shape[0], a.shape[0])
    if precision != "tf32x3" or x.dtype != torch.float32:
        with _one_product(x, precision):
            return add_symmetric_(out, b)
    head, rest = tf32_split(x)
    ha, hb = (head, head.transpose(0, 1)) if rows else (head.transpose(0, 1), head)
    with _Tf32(True):
        cross = ha @ (rest.transpose(0, 1) if rows else rest)  # head^T rest (or head rest^T)
        out.add_(cross).add_(cross.transpose(0, 1))
        del cross, rest
        return out.addmm_(ha, hb)
