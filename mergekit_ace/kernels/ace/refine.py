"""Step 6 of the method (docs/method.md), the heterogeneous branch's spectral refinement
(eq. 15-19), with the solve of step 5 it surrounds: ``F = W_pre + D`` with
``D = sum w tau_t (Shat_t - Rbar)``, and ``W = W_pre + sigma_iso U_k V_k^T``.

``D`` needs ``B``, which the factorization replaces, so it is formed before the solve. A tensor
small enough (:class:`~mergekit_ace.kernels.ace.workspace.WorkspacePlan` ``keep_f``) keeps
``F`` in a second ``[m, n]`` buffer; a larger one re-forms it a block of rows at a time, once
for its Gram and once for the update, solving each block where it is needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable, Optional, Sequence, Tuple

import torch

from mergekit_ace.kernels.ace.closed_form import (
    ProxySums,
    System,
    TaskVectorRows,
    factor,
    solve_rows_,
)
from mergekit_ace.kernels.ace.parameters import AUTO_CONDITION_BOUND
from mergekit_ace.kernels.ace.workspace import WorkspacePlan
from mergekit_ace.kernels.linalg import (
    RightSolver,
    SolveInfo,
    add_symmetric_,
    addmm_,
    IsotropicProjector,
    isotropic_projector,
    short_side_gram,
    top_singular_triplets,
    unit_roundoff,
)


@dataclass(frozen=True)
class Refinement:
    """What step 6 did: ``sigma_iso``; how the top directions were found (``"gram-eigh"`` or
    ``"svd"``); ``k``, how many were boosted (fewer than planned when ``F`` has lower
    numerical rank or fewer lie above the noise floor); ``boost_ratio = s_1 / s_k`` over them
    (``None`` when none were), the factor by which boosting the weakest multiplies the relative
    round-off ``F`` carries; ``floor``: the noise floor in force (:class:`NoiseFloor`);
    ``cut_gap = (s_k - s_{k+1}) / ||F||_F`` (``None`` where it is not known: every direction
    boosted, or the SVD path); ``amplification``: by how much step 6 can multiply the relative
    round-off of ``F`` in the merged update (:func:`roundoff_amplification`)."""

    sigma_iso: Optional[float]
    spectral: str
    k: int
    boost_ratio: Optional[float]
    floor: Optional[float] = None
    cut_gap: Optional[float] = None
    amplification: float = 1.0


def tie_amplification(cut_gap: Optional[float], k: int, shape: Tuple[int, int]) -> float:
    """By how much a near tie of ``s_k`` and ``s_{k+1}`` can multiply the relative round-off of
    ``F`` in the merged update while the turn it causes is small (:func:`tie_change` with
    ``||W||_F`` at its least, ``sigma_iso sqrt(k)``): ``1 / (sqrt(k m n) cut_gap)``."""
    if cut_gap is None or not k:
        return 1.0
    m, n = shape
    return 1.0 / (math.sqrt(k * m * n) * cut_gap) if cut_gap > 0 else math.inf


def tie_change(
    roundoff: float,
    cut_gap: Optional[float],
    shape: Tuple[int, int],
    sigma_iso: Optional[float],
    update_norm: Optional[float],
) -> float:
    """The relative change of the merged update ``W`` (of norm ``update_norm``) that round-off
    of relative size ``roundoff`` in ``F`` makes through a near tie of the last boosted
    direction and the next, ``cut_gap = (s_k - s_{k+1}) / ||F||_F``; 0 where nothing was left
    out of the boost. A typical size to first order, not a bound: round-off spread over the
    entries of ``F`` couples the two directions by about ``roundoff ||F||_F / sqrt(m n)``
    each way, which turns the boosted pair of singular vectors by ``theta = roundoff /
    (sqrt(2 m n) cut_gap)`` (at most a quarter turn, a swap); that moves ``sigma_iso U_k
    V_k^T`` by ``sqrt(2) sin(theta) sigma_iso`` (docs/method.md, "Round-off: bound and
    measurement", has it against the real change)."""
    if cut_gap is None or not sigma_iso or not update_norm:
        return 0.0
    m, n = shape
    theta = roundoff / (math.sqrt(2.0 * m * n) * cut_gap) if cut_gap > 0 else math.inf
    return math.sqrt(2.0) * math.sin(min(theta, math.pi / 2)) * sigma_iso / update_norm


def roundoff_amplification(
    boost_ratio: Optional[float], cut_gap: Optional[float], k: int, shape: Tuple[int, int]
) -> float:
    """By how much step 6 can multiply the relative round-off of ``F`` in the merged update:
    ``boost_ratio`` (boosting ``s_k`` to ``sigma_iso`` scales its error by ``sigma_iso / s_k
    <= s_1 / s_k``), or a near tie at the ``k``-th direction (:func:`tie_amplification`)."""
    return max(1.0, boost_ratio or 1.0, tie_amplification(cut_gap, k, shape))


@dataclass(frozen=True)
class NoiseFloor:
    """The singular value of ``F`` at or below which a direction is noise that the inputs'
    storage or a float32 solve explains, and is not boosted (docs/method.md, "Directions at the
    storage noise floor"). ``storage``: the noisiest participant's rounding noise floor
    (:meth:`~mergekit_ace.kernels.storage_noise.RoundingNoise.floor`), or, where ``exact`` is
    given, an upper bound of it that ``exact()`` replaces when the bound would decide
    something (:meth:`cut_below`); ``condition``: the solve's condition-number bound from the
    ridge (``SolveInfo.bound``, the same in every compute dtype). ``enabled=False``
    (``noise_floor: false``): no floor."""

    enabled: bool
    shape: Tuple[int, int]
    storage: float = 0.0
    condition: Optional[float] = None
    exact: Optional[Callable[[], float]] = field(default=None, compare=False)

    def with_condition(self, condition: Optional[float]) -> "NoiseFloor":
        return replace(self, condition=condition)

    def settled(self) -> "NoiseFloor":
        """This floor with its exact storage level (computed now where it was a bound)."""
        return self if self.exact is None else replace(self, storage=self.exact(), exact=None)

    def cut_below(self, frobenius: float) -> Callable[[float], float]:
        """The cut for ``F`` of norm ``frobenius`` as a function of the smallest singular value
        the refinement would boost: the bound where that value lies above it (the exact floor
        lies lower and cuts nothing either), else the exact floor."""

        def cut(smallest: float) -> float:
            bound = self.of(frobenius)
            return bound if smallest > bound else self.settled().of(frobenius)

        return cut

    def of(self, frobenius: float) -> float:
        """``sqrt(storage^2 + solve^2)`` for ``F`` of norm ``frobenius``, with ``solve`` the
        spectral norm of a random matrix of Frobenius norm ``kappa u32 ||F||_F``: the
        round-off of a float32 solve of condition number ``kappa`` (at most the bound
        ``eps: auto`` guarantees; a larger one is the accuracy warning's concern). Measured
        in float32's unit in every compute dtype, so float32 and float64 merges boost the same
        directions."""
        if not self.enabled:
            return 0.0
        m, n = self.shape
        kappa = min(self.condition or AUTO_CONDITION_BOUND, AUTO_CONDITION_BOUND)
        spread = (math.sqrt(m) + math.sqrt(n)) / math.sqrt(m * n)
        solve = spread * kappa * unit_roundoff(torch.float32) * frobenius
        return math.hypot(self.storage, solve)


class ResidualRows:
    """``D = sum w tau_t (Shat_t - Rbar) = Q + 1 q^T - T_sum Rbar`` (eq. 15-16), with
    ``Rbar = B / sum w`` and ``Q = N - C_eps``, re-formed a block of rows at a time;
    ``T_sum = sum w tau_t`` and ``C_eps = sum w eps_t C_t`` come from the inputs."""

    def __init__(
        self,
        rows: TaskVectorRows,
        weights: Sequence[float],
        sums: ProxySums,
        B: torch.Tensor,
        matmul: str,
    ):
        self.rows, self.weights, self.sums, self.B, self.matmul = rows, weights, sums, B, matmul
        self.weight_total = float(sum(weights))
        # sum w eps_t mu_t
        self.ridge_mean = sum((w * r) * mu for w, r, mu in zip(weights, sums.ridges, rows.means))

    def block(self, N_rows: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        T_sum = C_eps = None
        for t, (w, r) in enumerate(zip(self.weights, self.sums.ridges)):
            delta = self.rows.rows(t, start, stop)
            if T_sum is None:
                T_sum, C_eps = delta.mul(w), delta.mul_(w * r)
            else:
                T_sum.add_(delta, alpha=w)
                C_eps.add_(delta, alpha=w * r)
            del delta
        D = N_rows.sub(C_eps.sub_(self.ridge_mean)).add_(self.sums.q)  # Q + 1 q^T
        del C_eps
        return addmm_(D, T_sum, self.B, alpha=-1.0 / self.weight_total, precision=self.matmul)


def solve_and_refine(
    rows: TaskVectorRows,
    weights: Sequence[float],
    sums: ProxySums,
    system: System,
    plan: WorkspacePlan,
    *,
    measure: bool = False,
    record_pre: Optional[Callable[[torch.Tensor], None]] = None,
    floor: Optional[NoiseFloor] = None,
) -> Tuple[torch.Tensor, SolveInfo, Refinement]:
    """Steps 5-6 of the heterogeneous branch: ``(W, the solve's report, the refinement)``,
    ``W`` in ``sums.N``'s storage. ``record_pre(W_pre)`` is called on the preliminary
    solution (``plan.keep_f`` only); ``measure``: measure the system's condition number even
    where its bound is small. It is also measured where the refinement's ``boost_ratio``
    could carry the solve's round-off past ``linalg.ACCURACY_WARN``. ``floor``: directions
    at or below it are not boosted (default: none)."""
    floor = floor or NoiseFloor(False, (plan.m, plan.n))
    residual = ResidualRows(rows, weights, sums, system.B, plan.matmul)
    if not plan.keep_f:
        solver = factor(system, sums, measure=measure)
        floor = floor.with_condition(solver.info.bound)
        return _refine_streaming(residual, solver, sums.N, plan, floor)
    F = torch.empty_like(sums.N)
    for start, stop in plan.blocks:
        F[start:stop] = residual.block(sums.N[start:stop], start, stop)
    del residual  # it holds B, which the factorization replaces
    solver = factor(system, sums, measure=measure)
    W_pre = solve_rows_(solver, sums.N, plan)
    F.add_(W_pre)
    if record_pre is not None:
        record_pre(W_pre)
    return _refine_held(W_pre, F, plan, solver, floor.with_condition(solver.info.bound))


def _refine_held(
    W: torch.Tensor, F: torch.Tensor, plan: WorkspacePlan, solver: RightSolver, floor: NoiseFloor
) -> Tuple[torch.Tensor, SolveInfo, Refinement]:
    """The refinement of a preliminary solution ``W`` whose ``F`` is held whole."""
    refinement = isotropic_update_(W, F, plan, floor)
    solver.check_condition(refinement.amplification)
    return W, solver.info, refinement


def _refine_streaming(
    residual: ResidualRows,
    solver: RightSolver,
    N: torch.Tensor,
    plan: WorkspacePlan,
    floor: NoiseFloor,
) -> Tuple[torch.Tensor, SolveInfo, Refinement]:
    """``F`` re-formed block by block: for its float64 Gram, then again for the update."""

    def f_rows(start: int, stop: int) -> Tuple[torch.Tensor, torch.Tensor]:
        W_rows = solver.solve(N[start:stop])
        return W_rows, residual.block(N[start:stop], start, stop).add_(W_rows)

    gram = torch.zeros(plan.n, plan.n, dtype=torch.float64, device=N.device)
    for start, stop in plan.blocks:
        F64 = f_rows(start, stop)[1].to(torch.float64)
        add_symmetric_(gram, F64)
        del F64
    cut = floor.cut_below(math.sqrt(float(gram.diagonal().sum())))
    top = isotropic_projector(gram, plan.k, cut)
    del gram
    if top is None:  # rare: materialize F for the SVD
        F = torch.empty_like(N)
        for start, stop in plan.blocks:
            N[start:stop], F[start:stop] = f_rows(start, stop)
        return _refine_held(N, F, plan, solver, floor)
    if top.P is None:  # nothing above the noise floor: W = W_pre
        for start, stop in plan.blocks:
            N[start:stop] = solver.solve(N[start:stop])
        return N, solver.info, Refinement(None, "gram-eigh", 0, None, top.floor or None)
    refinement = _refinement(top, (plan.m, plan.n))
    solver.check_condition(refinement.amplification)
    P = top.P.to(N.dtype)
    for start, stop in plan.blocks:
        W_rows, F_rows = f_rows(start, stop)
        N[start:stop] = addmm_(W_rows, F_rows, P, alpha=top.sigma, precision=plan.matmul)
        del W_rows, F_rows
    return N, solver.info, refinement


def isotropic_update_(
    W: torch.Tensor, F: torch.Tensor, plan: WorkspacePlan, floor: Optional[NoiseFloor] = None
) -> Refinement:
    """``W += sigma_iso U_k V_k^T`` (eq. 17-19) in place: ``U_k V_k^T = F P`` (tall) or
    ``P F`` (wide) from the Gram's projector, or a thin SVD of ``F`` where that declines.

    Directions at or below ``floor`` (:class:`NoiseFloor`) are not boosted. In the SVD,
    numerically zero directions of ``F`` (low-rank experts) are not boosted either: their
    singular vectors are arbitrary and would write noise of size ``sigma_iso``. ``F`` comes out
    of a solve, whose float32 round-off sits above a single matrix's, so the cut-off is
    measured against ``||F||_F`` rather than its largest singular value."""
    G = short_side_gram(F)
    scale = math.sqrt(max(float(G.diagonal().sum()), 0.0))  # ||F||_F
    top = isotropic_projector(G, plan.k, floor.cut_below(scale) if floor is not None else 0.0)
    del G
    if top is None:
        cut = floor.settled().of(scale) if floor is not None else 0.0
        norm = float(torch.linalg.vector_norm(F, dtype=torch.float64))
        U, s, Vh = top_singular_triplets(F, plan.k, scale=norm, floor=cut)
        if not s.numel():
            return Refinement(None, "svd", 0, None, cut or None)
        sigma = float(s.mean())
        W.addmm_(U, Vh, alpha=sigma)
        boost_ratio = float(s[0] / s[-1])
        return Refinement(sigma, "svd", int(s.numel()), boost_ratio, cut or None, None, boost_ratio)
    if top.P is None:
        return Refinement(None, "gram-eigh", 0, None, top.floor or None)
    P = top.P.to(W.dtype)
    if plan.m >= plan.n:
        for start, stop in plan.blocks:
            addmm_(W[start:stop], F[start:stop], P, alpha=top.sigma, precision=plan.matmul)
    else:
        addmm_(W, P, F, alpha=top.sigma, precision=plan.matmul)
    return _refinement(top, (plan.m, plan.n))


def _refinement(top: IsotropicProjector, shape: Tuple[int, int]) -> Refinement:
    amplification = roundoff_amplification(top.boost_ratio, top.cut_gap, top.k, shape)
    floor = top.floor or None
    return Refinement(
        top.sigma, "gram-eigh", top.k, top.boost_ratio, floor, top.cut_gap, amplification
    )
