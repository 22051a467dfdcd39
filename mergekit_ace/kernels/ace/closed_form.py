"""Steps 2-5 of the method (docs/method.md) for one ``[m, n]`` tensor: the covariance proxies
and their normalization folded into running sums (eq. 5-10), the system with the structural
prior (eq. 11-13), and its solution ``W_pre`` (eq. 14), all within a
:class:`~mergekit_ace.kernels.ace.workspace.WorkspacePlan`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from mergekit_ace.kernels.ace.parameters import PAPER_GUARD
from mergekit_ace.kernels.ace.scan import task_vector_rows
from mergekit_ace.kernels.ace.settings import Ridge
from mergekit_ace.kernels.ace.workspace import WorkspacePlan
from mergekit_ace.kernels.linalg import RightSolver, add_gram_, addmm_, gram


class TaskVectorRows:
    """The participating experts' task vectors ``tau_t = W_t - W0`` in the compute dtype,
    formed on demand a block of rows at a time from the caller's tensors (any dtype)."""

    def __init__(
        self,
        base: torch.Tensor,
        experts: Sequence[torch.Tensor],
        dtype: torch.dtype,
        means: Sequence[torch.Tensor],
    ):
        self.base, self.experts, self.dtype, self.means = base, list(experts), dtype, list(means)

    def rows(self, t: int, start: int, stop: int) -> torch.Tensor:
        return task_vector_rows(self.base, self.experts[t], start, stop, self.dtype)

    def centered(self, t: int, start: int, stop: int) -> torch.Tensor:
        """``C_t`` (eq. 5) on rows ``start:stop``."""
        return self.rows(t, start, stop).sub_(self.means[t])


@dataclass
class ProxySums:
    """The running sums of steps 2-3 (docs/method.md, "Cost"): ``S = sum w Shat_t``
    (unregularized), ``N = sum w C_t R_t``, ``total_ridge = sum w eps_t``; per task the ridge
    ``eps_t`` and the trace ``tr_t``; with refinement ``q = sum w mu_t^T Shat_t``
    (``sum w tau_t Shat_t = Q + 1 q^T``)."""

    S: Optional[torch.Tensor]
    N: torch.Tensor
    total_ridge: float
    ridges: List[float]
    traces: List[float]
    q: Optional[torch.Tensor]

    def take_sum(self) -> torch.Tensor:
        """Hand ``S`` over (the system is built in its storage), keeping no reference."""
        S, self.S = self.S, None
        return S


def accumulate(
    rows: TaskVectorRows,
    weights: Sequence[float],
    plan: WorkspacePlan,
    *,
    heterogeneous: bool,
    ridge: Ridge,
) -> ProxySums:
    """Steps 2-3 (eq. 5-10), one task at a time. Memory: ``S``, ``N``, one task's Gram and
    one block of rows."""
    like = rows.means[0]
    sums = ProxySums(
        S=like.new_zeros(plan.n, plan.n),
        N=like.new_zeros(plan.m, plan.n),
        total_ridge=0.0,
        ridges=[],
        traces=[],
        q=like.new_zeros(plan.n) if plan.k else None,
    )
    for t, w in enumerate(weights):
        C, proxy = _centered_proxy(rows, t, plan)
        # eq. 6: tr(C^T C) = tr(C C^T), whichever Gram was formed.
        trace = float(proxy.diagonal().sum(dtype=torch.float64)) + PAPER_GUARD
        scale = w / trace if heterogeneous else w  # eq. 8-10: trace normalization
        task_ridge = ridge.of_task(trace, heterogeneous)
        sums.traces.append(trace)
        sums.ridges.append(task_ridge)
        sums.total_ridge += w * task_ridge
        if plan.row_gram:
            _fold_row_proxy(sums, C, proxy, rows.means[t], scale, w * task_ridge, plan.matmul)
        else:
            _fold_column_proxy(sums, rows, t, C, proxy, scale, w * task_ridge, plan)
        del proxy, C
    return sums


def _centered_proxy(rows: TaskVectorRows, t: int, plan: WorkspacePlan):
    """``(C_t, its Gram)``: ``C C^T`` (``[m, m]``) when ``plan.row_gram``, else ``C^T C``
    (``S_t``, ``[n, n]``) summed over blocks of rows; ``C_t`` is ``None`` when it was formed
    in several blocks (it is re-formed block by block where needed)."""
    if plan.row_gram:
        C = rows.centered(t, 0, plan.m)
        return C, gram(C, rows=True, precision=plan.matmul)
    blocks = plan.blocks
    C = rows.centered(t, *blocks[0])
    proxy = gram(C, precision=plan.matmul)
    for start, stop in blocks[1:]:
        C = rows.centered(t, start, stop)
        proxy.add_(gram(C, precision=plan.matmul))
    return (C if len(blocks) == 1 else None), proxy


def _fold_row_proxy(
    sums: ProxySums, C, row_gram, mu, scale: float, weighted_ridge: float, matmul: str
) -> None:
    """``2m < n``: ``C_t S_t = (C C^T) C`` (``4 m^2 n`` flops instead of ``2 m n^2``, no
    ``[n, n]`` temporary)."""
    add_gram_(sums.S, C, alpha=scale, precision=matmul)
    addmm_(sums.N, row_gram, C, alpha=scale, precision=matmul)
    sums.N.add_(C, alpha=weighted_ridge)
    if sums.q is not None:
        sums.q.add_((mu @ C.T) @ C, alpha=scale)


def _fold_column_proxy(
    sums: ProxySums,
    rows: TaskVectorRows,
    t: int,
    C,
    proxy,
    scale: float,
    weighted_ridge: float,
    plan: WorkspacePlan,
) -> None:
    """``S += w Shat_t`` and ``N += C_t (w R_t)``, ``w R_t`` formed in the proxy's storage."""
    sums.S.add_(proxy, alpha=scale)
    if sums.q is not None:
        sums.q.add_(rows.means[t] @ proxy, alpha=scale)
    proxy.mul_(scale).diagonal().add_(weighted_ridge)  # w R_t
    if C is not None:
        addmm_(sums.N, C, proxy, precision=plan.matmul)
        return
    for start, stop in plan.blocks:
        addmm_(sums.N[start:stop], rows.centered(t, start, stop), proxy, precision=plan.matmul)


@dataclass
class System:
    """``A = B + 1 c^T`` of eq. 14: ``B = sum w R_t`` and the prior's row ``c`` (``None``
    without the prior)."""

    B: Optional[torch.Tensor]
    c: Optional[torch.Tensor]

    def release(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Hand ``(B, c)`` over, keeping no reference (factoring frees ``B``)."""
        B, c, self.B, self.c = self.B, self.c, None, None
        return B, c


def build_system(
    sums: ProxySums,
    energies: Sequence[float],
    *,
    heterogeneous: bool,
    prior: bool,
    ridge: Ridge,
) -> System:
    """Step 4 (eq. 11-13): ``B`` in place over ``S`` (which ``sums`` gives up) and ``c``, the
    mean row of the unregularized ``sum w Shat_t``, in the heterogeneous branch divided by
    the mean energy (:meth:`~mergekit_ace.kernels.ace.settings.Ridge.prior_energies`)."""
    B = sums.take_sum()
    c = None
    if prior:
        c = B.mean(dim=0)
        if heterogeneous:
            scale = ridge.prior_energies(energies, sums.traces)
            c.div_(sum(scale) / len(scale) + PAPER_GUARD)
    B.diagonal().add_(sums.total_ridge)
    return System(B, c)


def factor(system: System, sums: ProxySums, *, measure: bool) -> RightSolver:
    """Step 5 (eq. 14), factored once: Cholesky of ``B`` with the prior as a rank-one
    correction, LU or least squares where ``B`` or ``A`` is singular at working precision
    (:class:`~mergekit_ace.kernels.linalg.RightSolver`). ``B``'s eigenvalues are at least the
    ridge, which bounds its condition number; ``measure``: measure it anyway. ``system`` is
    consumed."""
    B, c = system.release()
    return RightSolver.factor(B, c, floor=sums.total_ridge, measure=measure)


def solve_rows_(solver: RightSolver, X: torch.Tensor, plan: WorkspacePlan) -> torch.Tensor:
    """``X <- X A^{-1}`` in place, a block of rows at a time; returns ``X``."""
    for start, stop in plan.blocks:
        X[start:stop] = solver.solve(X[start:stop])
    return X
