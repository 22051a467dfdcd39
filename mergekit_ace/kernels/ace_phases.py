"""ACE's closed form for one ``[m, n]`` tensor in three phases around one workspace plan.

1. **accumulate** (eq. 5-10): one expert at a time, the centered task vectors ``C_t``, their
   proxies ``Shat_t`` and regularized ``R_t = Shat_t + eps_t I`` are folded into two running
   sums, ``S_sum = sum w Shat_t`` (``[n, n]``) and ``N = sum w C_t R_t`` (``[m, n]``);
2. **solve** (eq. 11-14): ``W_pre A = N`` with ``A = S_sum + ridge I + 1 c^T`` (the prior),
   factored once and applied to ``N`` in place, a block of rows at a time;
3. **refine** (eq. 15-19, heterogeneous branch): ``F = W_pre + D`` with
   ``D = sum w tau_t (Shat_t - Rbar)``, and ``W = W_pre + sigma_iso U_k V_k^T``.

The plan (:func:`plan_workspace`) fixes how rows are blocked and which ``[m, n]`` buffers exist:
``N`` is the only one that always does (it becomes ``W_pre``, then ``W``, then the output).
Every other ``[m, n]`` quantity (``tau_t``, ``C_t``, ``sum w tau_t``, ``sum w eps_t C_t``) is
re-formed a block of rows at a time from the inputs, which the caller holds anyway. So the
workspace does not grow with the number of experts, and for tall tensors (embeddings, LM heads)
it is about one ``[m, n]`` buffer in the compute dtype plus ``[n, n]`` matrices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch

from mergekit_ace.kernels.linalg import (
    SPLIT_BLOCK_BYTES,
    RightSolver,
    SolveInfo,
    add_gram_,
    add_symmetric_,
    addmm_,
    gram as gram_of,
    isotropic_projector,
    short_side_gram,
    symmetric_product_flops,
    top_singular_triplets,
)

LOG_FLOOR = 1e-12
# ``eps: auto``: each task's ridge is AUTO_RIDGE * tr(Shat_t). Every regularized proxy then has
# condition number at most 1 + 1 / AUTO_RIDGE = 4097 whatever the units of the task vectors
# or the width n: the largest at which a float32 solve still keeps about half of float32's
# 24 significant bits (condition * unit round-off ~ 2.4e-4).
AUTO_RIDGE = 2.0**-12
# Rows per block: at most this many bytes of one task vector in the compute dtype.
BLOCK_BYTES = 256 * 2**20
# Refinement keeps F = W_pre + D in a second [m, n] buffer up to this size; larger tensors
# (Llama-3's embeddings: 2.1 GB in float32) re-form F block by block, in smaller blocks.
KEEP_F_BYTES = 2**30
STREAM_BLOCK_BYTES = 64 * 2**20
# For the estimate: float64 eigh of an [r, r] Gram holds the Gram, the eigenvectors, LAPACK's
# 2 r^2 workspace and the projector (measured on CPU); the linear-algebra libraries' own
# buffers add about 8 MiB whatever the size.
EIGH = 5 * 8
LIBRARY_BYTES = 8 * 2**20


@dataclass(frozen=True)
class WorkspacePlan:
    """How one ``[m, n]`` tensor is laid out in memory during the merge.

    ``row_gram``: ``2m < n``, the Grams are formed on the row side (``C C^T``, ``[m, m]``) and
    each task vector is formed whole. Otherwise ``C^T C`` (``[n, n]``) is accumulated over
    blocks of ``block_rows`` rows. ``k``: refined directions (0: no refinement). ``keep_f``:
    refinement holds ``F`` in a second ``[m, n]`` buffer; else it re-forms ``F`` block by
    block in two passes (one more solve and residual product per block). ``matmul``: the
    resolved precision of the large products (``linalg.resolve_matmul_precision``).
    """

    m: int
    n: int
    element_bytes: int
    row_gram: bool
    block_rows: int
    k: int
    keep_f: bool
    matmul: str = "float32"

    @property
    def blocks(self) -> List[Tuple[int, int]]:
        return [(s, min(s + self.block_rows, self.m)) for s in range(0, self.m, self.block_rows)]


def plan_workspace(
    shape: Sequence[int], element_bytes: int, k: int, *, spectra: bool = False,
    matmul: str = "float32",
) -> WorkspacePlan:
    m, n = shape
    row_gram = 2 * m < n
    keep_f = k == 0 or row_gram or spectra or m * n * element_bytes <= KEEP_F_BYTES
    block = BLOCK_BYTES if keep_f else STREAM_BLOCK_BYTES
    block_rows = m if row_gram else max(1, min(m, block // (n * element_bytes)))
    return WorkspacePlan(m, n, element_bytes, row_gram, block_rows, k, keep_f, matmul)


def workspace_cost(plan: WorkspacePlan, n_experts: int, out_bytes: int = 2) -> dict:
    """Peak workspace (bytes) and floating-point work of :func:`merge_2d` under ``plan``.

    Bytes are the kernel's own allocations on top of the ``T + 1`` inputs the caller holds
    (task vectors are formed a block at a time, so nothing grows with ``T``), the returned
    tensor included: ``out_bytes`` per element when the output dtype differs from the compute
    dtype (bfloat16: 2), none when it does not (the result is written in place). Flops count
    the matrix products, the Cholesky factorization and the triangular solves.
    """
    m, n, b, k, T = plan.m, plan.n, plan.element_bytes, plan.k, n_experts
    mn, nn = m * n, n * n
    blk = plan.block_rows * n
    # tf32x3: a block's TF32 head and remainder, and those of a block of the right factor's
    # columns (measured on an H200: within -10 %..+30 % with this count).
    split = 2 * blk + 2 * min(SPLIT_BLOCK_BYTES // 4, nn) if plan.matmul == "tf32x3" else 0
    if plan.row_gram:
        # S_sum, N, one task's C and its [m, m] Gram.
        accumulate = (nn + 2 * mn + m * m + split) * b
    else:
        # S_sum, N, the task's Gram, one block of C.
        accumulate = (2 * nn + mn + blk + split) * b
    # the system and its factor, N, the two triangular solves' blocks
    solve = (2 * nn + mn + 2 * blk) * b
    refine = 0
    if k:
        r = min(m, n)
        if plan.keep_f:
            # N, F, the system, D's block and its inputs (T_sum, C_eps, one task vector);
            # then N, F, the system and its factor, the solve's blocks; then N, F and the
            # float64 Gram of F (a block of F in float64, eigh's matrices and workspace).
            residual = (2 * mn + nn + 4 * blk + split) * b
            factor = (2 * mn + 2 * nn + 2 * blk) * b
            spectral = 2 * mn * b + max(min(256 * 2**20, 8 * mn) + 8 * r * r, EIGH * r * r)
            refine = max(residual, factor, spectral)
        else:
            # N, the system, its factor and the float64 Gram (then eigh's matrices), and one
            # re-formed block of F: the solve's two blocks, D's four, F's float64 copy.
            refine = (mn + 2 * nn + 6 * blk + split) * b + max(8 * blk + 8 * nn, EIGH * nn)
    finish = (mn + blk) * b + (mn * out_bytes if out_bytes != b else 0)
    peak = LIBRARY_BYTES + max(accumulate, solve, refine, finish)
    phase = {finish: "finish", accumulate: "accumulate", solve: "solve", refine: "refine"}[
        peak - LIBRARY_BYTES
    ]
    # Grams: symmetric products (linalg.add_symmetric_), full ones under tf32x3
    def sym(rows: int, width: int) -> int:
        if plan.matmul == "tf32x3":
            return 2 * rows * width * width
        return symmetric_product_flops(rows, width)

    if plan.row_gram:  # C^T C, C C^T, (C C^T) C
        grams = T * (sym(m, n) + sym(n, m) + 2 * m * m * n)
    else:  # C^T C, C R
        grams = T * (sym(m, n) + 2 * m * n * n)
    solve_flops = n**3 / 3 + 2 * m * n * n
    spectral = 0.0
    if k:
        r = min(m, n)
        # residual product, float64 Gram of F, projector product (+ solve and residual again
        # when F is re-formed)
        spectral = (2 * m * n * n + symmetric_product_flops(max(m, n), r) + 2 * m * n * r
                    + 2 * r * r * k)
        if not plan.keep_f:
            spectral += 2 * m * n * n + 2 * m * n * n
    return {
        "bytes": int(peak),
        "flops": float(grams + solve_flops + spectral),
        "flops_grams": float(grams),
        "flops_solve": float(solve_flops),
        "flops_spectral": float(spectral),
        "phase": phase,
    }


def task_vector_rows(base, expert, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
    """``(W_t - W0)[start:stop]`` in ``dtype`` with one temporary (the result)."""
    if expert.dtype == dtype:
        return torch.sub(expert[start:stop], base[start:stop].to(dtype))
    return expert[start:stop].to(dtype).sub_(base[start:stop])


class TaskVectorRows:
    """The participating experts' task vectors ``tau_t = W_t - W0`` in the compute dtype,
    formed on demand a block of rows at a time from the caller's tensors (any dtype)."""

    def __init__(self, base: torch.Tensor, experts: Sequence[torch.Tensor], dtype: torch.dtype,
                 means: Sequence[torch.Tensor]):
        self.base, self.experts, self.dtype, self.means = base, list(experts), dtype, list(means)

    def rows(self, t: int, start: int, stop: int) -> torch.Tensor:
        return task_vector_rows(self.base, self.experts[t], start, stop, self.dtype)

    def centered(self, t: int, start: int, stop: int) -> torch.Tensor:
        """``C_t`` (eq. 5) on rows ``start:stop``."""
        return self.rows(t, start, stop).sub_(self.means[t])


@dataclass
class Accumulated:
    """Phase 1's running sums (spec "Cost"): ``S_sum = sum w Shat_t`` (unregularized),
    ``N = sum w C_t R_t``, ``ridge = sum w eps_t``; per task ``eps_t`` and ``tr_t``; with
    refinement ``q = sum w mu_t^T Shat_t`` (``sum w tau_t Shat_t = Q + 1 q^T``)."""

    S_sum: Optional[torch.Tensor]
    N: torch.Tensor
    ridge: float
    eps: List[float]
    traces: List[float]
    q: Optional[torch.Tensor]

    def take_sum(self) -> torch.Tensor:
        """Hand ``S_sum`` over (the system is built in its storage), keeping no reference."""
        S_sum, self.S_sum = self.S_sum, None
        return S_sum


def accumulate(
    src: TaskVectorRows,
    weights: Sequence[float],
    plan: WorkspacePlan,
    *,
    heterogeneous: bool,
    eps: Union[float, str],
    like: torch.Tensor,
) -> Accumulated:
    """Phase 1 (eq. 5-10). Memory: ``S_sum``, ``N``, one task's Gram and one block."""
    m, n = plan.m, plan.n
    S_sum = like.new_zeros(n, n)
    N = like.new_zeros(m, n)
    q = like.new_zeros(n) if plan.k else None
    ridge, eps_list, traces = 0.0, [], []
    blocks, mm = plan.blocks, plan.matmul
    for t, w in enumerate(weights):
        if plan.row_gram:
            # C_t S_t = (C C^T) C: 4 m^2 n flops instead of 2 m n^2, no [n, n] temporary.
            C = src.centered(t, 0, m)
            gram = gram_of(C, rows=True, precision=mm)
        else:
            C = src.centered(t, *blocks[0])
            gram = gram_of(C, precision=mm)
            for start, stop in blocks[1:]:
                C = src.centered(t, start, stop)
                gram.add_(gram_of(C, precision=mm))
            if len(blocks) > 1:
                C = None  # re-formed below, block by block
        # eq. 6: tr(C^T C) = tr(C C^T), whichever Gram was formed.
        tr = float(gram.diagonal().sum(dtype=torch.float64)) + LOG_FLOOR
        traces.append(tr)
        scale = w / tr if heterogeneous else w  # eq. 8-10: trace normalization
        if eps == "auto":
            eps_t = AUTO_RIDGE * (1.0 if heterogeneous else tr)  # tr(Shat_t)
        else:
            eps_t = eps / tr if heterogeneous else eps
        eps_list.append(eps_t)
        ridge += w * eps_t
        mu = src.means[t]
        if plan.row_gram:
            add_gram_(S_sum, C, alpha=scale, precision=mm)  # no [n, n] temporary
            addmm_(N, gram, C, alpha=scale, precision=mm)
            N.add_(C, alpha=w * eps_t)
            if q is not None:
                q.add_((mu @ C.T) @ C, alpha=scale)
        else:
            S_sum.add_(gram, alpha=scale)
            if q is not None:
                q.add_(mu @ gram, alpha=scale)
            gram.mul_(scale).diagonal().add_(w * eps_t)  # w R_t
            if C is not None:
                addmm_(N, C, gram, precision=mm)
            else:
                for start, stop in blocks:
                    addmm_(N[start:stop], src.centered(t, start, stop), gram, precision=mm)
        del gram, C
    return Accumulated(S_sum, N, ridge, eps_list, traces, q)


def build_system(
    acc: Accumulated, *, prior: bool, heterogeneous: bool, eps: Union[float, str],
    energies: Sequence[float],
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """eq. 11-14: ``B = sum w R_t`` (in place over ``S_sum``, which ``acc`` gives up) and the
    prior's row ``c`` (``A = B + 1 c^T``), the mean row of the unregularized ``sum w Shat_t``."""
    B = acc.take_sum()
    c = None
    if prior:
        c = B.mean(dim=0)
        if heterogeneous:
            # The paper divides by the mean raw energy, which carries the task vectors' units.
            # Scale-free mode (eps="auto") measures each energy in its own proxy's trace.
            scale = energies if eps != "auto" else [e / t for e, t in zip(energies, acc.traces)]
            c.div_(sum(scale) / len(scale) + LOG_FLOOR)
    B.diagonal().add_(acc.ridge)
    return B, c


def solve_rows_(solver: RightSolver, X: torch.Tensor, plan: WorkspacePlan) -> None:
    """Phase 2 applied: ``X <- X A^{-1}`` in place, a block of rows at a time."""
    for start, stop in plan.blocks:
        X[start:stop] = solver.solve(X[start:stop])


class ResidualRows:
    """``D = sum w tau_t (Shat_t - Rbar) = Q + 1 q^T - T_sum Rbar`` (eq. 15-16), with
    ``Rbar = B / sum w`` and ``Q = N - C_eps``, re-formed a block of rows at a time;
    ``T_sum = sum w tau_t`` and ``C_eps = sum w eps_t C_t`` come from the inputs."""

    def __init__(self, src: TaskVectorRows, weights, acc: Accumulated, B: torch.Tensor,
                 matmul: str):
        self.src, self.weights, self.acc, self.B, self.matmul = src, list(weights), acc, B, matmul
        self.w_total = float(sum(self.weights))
        self.eps_mean = sum(
            (w * e) * mu for w, e, mu in zip(self.weights, acc.eps, src.means)
        )  # sum w eps_t mu_t

    def rows(self, N_rows: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        T_sum = C_eps = None
        for t, (w, e) in enumerate(zip(self.weights, self.acc.eps)):
            tau = self.src.rows(t, start, stop)
            if T_sum is None:
                T_sum, C_eps = tau.mul(w), tau.mul_(w * e)
            else:
                T_sum.add_(tau, alpha=w)
                C_eps.add_(tau, alpha=w * e)
            del tau
        D = N_rows.sub(C_eps.sub_(self.eps_mean)).add_(self.acc.q)  # Q + 1 q^T
        del C_eps
        return addmm_(D, T_sum, self.B, alpha=-1.0 / self.w_total, precision=self.matmul)


def refine(
    src: TaskVectorRows,
    weights: Sequence[float],
    acc: Accumulated,
    B: torch.Tensor,
    c: Optional[torch.Tensor],
    plan: WorkspacePlan,
    *,
    spectra_pre: Optional[Callable[[torch.Tensor], None]] = None,
    measure_condition: bool = False,
) -> "Refined":
    """Phases 2 and 3 of the heterogeneous branch (eq. 14-19), as a :class:`Refined`.
    ``spectra_pre(W_pre)`` is called on the preliminary solution when given (``plan.keep_f``
    only); ``measure_condition``: measure the system's condition number even where its bound
    is small (``RightSolver.factor``). It is also measured where the refinement's ``spread``
    could carry the solve's round-off past ``ACCURACY_WARN``."""
    N = acc.N
    residual = ResidualRows(src, weights, acc, B, plan.matmul)
    if plan.keep_f:
        F = torch.empty_like(N)
        for start, stop in plan.blocks:  # D first: it needs B, which the factor replaces
            F[start:stop] = residual.rows(N[start:stop], start, stop)
        del residual
        solver = RightSolver.factor(B, c, floor=acc.ridge, measure=measure_condition)
        del B
        solve_rows_(solver, N, plan)
        F.add_(N)
        if spectra_pre is not None:
            spectra_pre(N)
        sigma, spectral, k, spread = _isotropic_update_(N, F, plan)
        solver.check_condition(spread)
        return Refined(N, solver.info, sigma, spectral, k, spread)

    # Streaming: F re-formed block by block, for its Gram and again for the update.
    solver = RightSolver.factor(B, c, floor=acc.ridge, measure=measure_condition)

    def f_rows(start: int, stop: int) -> Tuple[torch.Tensor, torch.Tensor]:
        W_rows = solver.solve(N[start:stop])
        return W_rows, residual.rows(N[start:stop], start, stop).add_(W_rows)

    gram = torch.zeros(plan.n, plan.n, dtype=torch.float64, device=N.device)
    for start, stop in plan.blocks:
        F64 = f_rows(start, stop)[1].to(torch.float64)
        add_symmetric_(gram, F64)
        del F64
    top = isotropic_projector(gram, plan.k)
    del gram
    if top is None:  # rare: materialize F for the SVD
        F = torch.empty_like(N)
        for start, stop in plan.blocks:
            N[start:stop], F[start:stop] = f_rows(start, stop)
        sigma, spectral, k, spread = _isotropic_update_(N, F, plan)
        solver.check_condition(spread)
        return Refined(N, solver.info, sigma, spectral, k, spread)
    P, sigma, spread = top
    solver.check_condition(spread)
    P = P.to(N.dtype)
    for start, stop in plan.blocks:
        W_rows, F_rows = f_rows(start, stop)
        N[start:stop] = addmm_(W_rows, F_rows, P, alpha=sigma, precision=plan.matmul)
        del W_rows, F_rows
    return Refined(N, solver.info, sigma, "gram-eigh", plan.k, spread)


class Refined(NamedTuple):
    """What :func:`refine` returns: ``W`` (stored in ``acc.N``), the solver's report,
    ``sigma_iso``, how the top ``k`` directions were found (``"gram-eigh"`` or ``"svd"``),
    how many were boosted (fewer than ``plan.k`` when ``F`` has lower numerical rank) and
    ``spread = s_1 / s_k`` over them (``None`` when none were): the factor by which boosting
    the weakest of them multiplies the relative round-off of ``F``."""

    W: torch.Tensor
    info: SolveInfo
    sigma: Optional[float]
    spectral: str
    k: int
    spread: Optional[float]


def _isotropic_update_(
    W: torch.Tensor, F: torch.Tensor, plan: WorkspacePlan
) -> Tuple[Optional[float], str, int, Optional[float]]:
    """``W += sigma_iso U_k V_k^T`` (eq. 17-19) in place, with ``F`` consumed:
    ``U_k V_k^T = F P`` (tall) or ``P F`` (wide) from the Gram's projector, or a thin SVD of
    ``F`` where that declines. Returns ``(sigma_iso, how, directions boosted, s_1 / s_k)``.

    In the SVD, numerically zero directions of ``F`` (low-rank experts) are not boosted: their
    singular vectors are arbitrary and would write noise of size ``sigma_iso``. ``F`` comes out
    of a solve, whose float32 round-off sits above a single matrix's, so the cut-off is
    measured against ``||F||_F`` rather than its largest singular value."""
    top = isotropic_projector(short_side_gram(F), plan.k)
    if top is None:
        scale = float(torch.linalg.vector_norm(F, dtype=torch.float64))
        U, s, Vh = top_singular_triplets(F, plan.k, scale=scale)
        del F
        if not s.numel():
            return None, "svd", 0, None
        sigma = float(s.mean())
        W.addmm_(U, Vh, alpha=sigma)
        return sigma, "svd", int(s.numel()), float(s[0] / s[-1])
    P, sigma, spread = top
    P = P.to(W.dtype)
    if plan.m >= plan.n:
        for start, stop in plan.blocks:
            addmm_(W[start:stop], F[start:stop], P, alpha=sigma, precision=plan.matmul)
    else:
        addmm_(W, P, F, alpha=sigma, precision=plan.matmul)
    return sigma, "gram-eigh", plan.k, spread
