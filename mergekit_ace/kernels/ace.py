"""ACE-Merging kernel (Xu et al., CVPR 2026, arXiv 2603.02945), one output tensor at a time.

Follows ``shared/spec/ace.md`` step by step; equation numbers are the paper's. Memory does not
grow with the number of experts: the per-task ``[n, n]`` proxies are folded into running sums
(spec, "Cost") instead of being kept.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import List, Optional, Sequence

import torch

from mergekit_ace.kernels.common import (
    check_inputs,
    compute_dtype_for,
    finish,
    normalized_weights,
    task_vectors,
    weighted_mean_delta,
)
from mergekit_ace.kernels.linalg import solve_right

GATES = ("auto", "on", "off")
LOG_FLOOR = 1e-12


@dataclass
class AceDiagnostics:
    """What the kernel decided for one tensor.

    ``branch`` is ``"heterogeneous"`` or ``"homogeneous"`` for 2-D tensors, ``"mean"`` for
    tensors merged by averaging (not 2-D), ``"unchanged"`` when no expert changed the tensor.
    ``energies`` lists ``||tau_t||_F^2`` for every expert in input order; ``participants`` the
    indices of those that entered the merge (positive weight, non-zero task vector).
    """

    tensor: Optional[str]
    shape: tuple
    branch: str
    energies: List[float]
    participants: List[int]
    weights: List[float]
    gamma: Optional[float] = None
    k: int = 0
    sigma_iso: Optional[float] = None
    solver: Optional[str] = None
    rcond: Optional[float] = None
    spectrum: Optional[List[float]] = field(default=None, repr=False)

    def as_dict(self) -> dict:
        return asdict(self)


def heterogeneity(energies: Sequence[float]) -> Optional[float]:
    """``gamma = var(l) / (mean(l)^2 + 1e-12)``, ``l_t = log(e_t + 1e-12)`` (eq. 7, 43),
    unbiased variance; ``None`` for fewer than two tasks."""
    if len(energies) < 2:
        return None
    logs = [math.log(e + LOG_FLOOR) for e in energies]
    mean = sum(logs) / len(logs)
    var = sum((x - mean) ** 2 for x in logs) / (len(logs) - 1)
    return var / (mean * mean + LOG_FLOOR)


def choose_branch(gamma: Optional[float], tau: float, gate: str) -> bool:
    """True for the heterogeneous branch: ``gamma > tau`` under ``gate="auto"``."""
    if gate == "on":
        return True
    if gate == "off" or gamma is None:
        return False
    return gamma > tau


def validate_ace_parameters(
    *, eps: float, tau: float, gate: str, k_frac: float, lam: float
) -> None:
    if not (eps >= 0.0) or math.isinf(eps):
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")
    if not (tau >= 0.0):
        raise ValueError(f"tau must be >= 0, got {tau}")
    if gate not in GATES:
        raise ValueError(f"gate must be one of {', '.join(GATES)}, got {gate!r}")
    if not (0.0 <= k_frac <= 1.0):
        raise ValueError(f"k_frac must be in [0, 1], got {k_frac}")
    if not math.isfinite(lam):
        raise ValueError(f"lambda must be finite, got {lam}")


def ace_merge(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    *,
    weights: Optional[Sequence[float]] = None,
    eps: float = 1e-5,
    tau: float = 0.3,
    gate: str = "auto",
    refine: bool = True,
    k_frac: float = 0.3,
    prior: bool = True,
    lam: float = 1.0,
    compute_dtype: Optional[torch.dtype] = None,
    out_dtype: Optional[torch.dtype] = None,
    tensor_name: Optional[str] = None,
    expert_names: Optional[Sequence[str]] = None,
    keep_spectrum: bool = False,
) -> tuple[torch.Tensor, AceDiagnostics]:
    """Merge one tensor with ACE; returns ``(W0 + lam * W, diagnostics)``.

    ``experts`` are the fine-tuned tensors (same shape as ``base``); ``weights`` the per-task
    objective weights (default all ones, which is the paper). Computation runs in
    ``compute_dtype`` (float32, or float64 if any input is) on the inputs' device; the result
    is cast to ``out_dtype`` (default: the base tensor's dtype).
    """
    validate_ace_parameters(eps=eps, tau=tau, gate=gate, k_frac=k_frac, lam=lam)
    check_inputs(base, experts, tensor_name=tensor_name, expert_names=expert_names)
    w_all = normalized_weights(
        weights, len(experts), expert_names=expert_names, tensor_name=tensor_name
    )
    dtype = compute_dtype or compute_dtype_for(base, *experts)
    out_dtype = out_dtype or base.dtype
    tv = task_vectors(base, experts, w_all, dtype)
    diag = AceDiagnostics(
        tensor=tensor_name,
        shape=tuple(base.shape),
        branch="unchanged",
        energies=tv.all_energies,
        participants=tv.indices,
        weights=tv.weights,
    )
    if not tv.deltas:
        return base.to(out_dtype), diag
    if base.dim() != 2:
        diag.branch = "mean"
        return finish(tv.base, weighted_mean_delta(tv), lam, out_dtype, tensor_name), diag

    diag.gamma = heterogeneity(tv.energies)
    heterogeneous = choose_branch(diag.gamma, tau, gate)
    diag.branch = "heterogeneous" if heterogeneous else "homogeneous"
    merged, solve_info, k, sigma_iso, spectrum = _solve_2d(
        tv.deltas,
        tv.weights,
        tv.energies,
        heterogeneous=heterogeneous,
        eps=eps,
        refine=refine,
        k_frac=k_frac,
        prior=prior,
        keep_spectrum=keep_spectrum,
    )
    diag.solver, diag.rcond = solve_info.method, solve_info.rcond
    diag.k, diag.sigma_iso, diag.spectrum = k, sigma_iso, spectrum
    return finish(tv.base, merged, lam, out_dtype, tensor_name), diag


def _solve_2d(
    deltas: List[torch.Tensor],
    weights: List[float],
    energies: List[float],
    *,
    heterogeneous: bool,
    eps: float,
    refine: bool,
    k_frac: float,
    prior: bool,
    keep_spectrum: bool,
):
    """Steps 2-6 of the spec for one ``[m, n]`` tensor; returns the merged task vector ``W``."""
    m, n = deltas[0].shape
    like = deltas[0]
    do_refine = heterogeneous and refine
    # Running sums (spec, "Cost"): S_sum = sum w Shat_t, ridge = sum w eps_t,
    # Q = sum w C_t Shat_t, C_eps = sum w eps_t C_t; for refinement also
    # q = sum w mu_t^T Shat_t (so sum w tau_t Shat_t = Q + 1 q^T) and T_sum = sum w tau_t.
    S_sum = like.new_zeros(n, n)
    Q = like.new_zeros(m, n)
    C_eps = like.new_zeros(m, n)
    ridge = 0.0
    if do_refine:
        q = like.new_zeros(n)
        T_sum = like.new_zeros(m, n)
    for w, tau_t in zip(weights, deltas):
        mu = tau_t.mean(dim=0)
        C = tau_t - mu  # eq. 5: centered over rows
        S = C.T @ C  # eq. 6
        tr = float(S.diagonal().sum(dtype=torch.float64)) + LOG_FLOOR
        if heterogeneous:  # eq. 8-10: trace normalization
            S.div_(tr)
            eps_t = eps / tr
        else:
            eps_t = eps
        S_sum.add_(S, alpha=w)
        Q.addmm_(C, S, alpha=w)
        C_eps.add_(C, alpha=w * eps_t)
        ridge += w * eps_t
        if do_refine:
            q.add_(mu @ S, alpha=w)
            T_sum.add_(tau_t, alpha=w)
        del C, S, mu
    w_total = sum(weights)

    D = None
    if do_refine:
        # eq. 15-16: D = sum w tau_t (Shat_t - Rbar) = (Q + 1 q^T) - T_sum Rbar,
        # with Rbar = (S_sum + ridge I) / sum w, the regularized weighted mean proxy.
        D = Q + q
        D.addmm_(T_sum, S_sum, alpha=-1.0 / w_total)
        D.add_(T_sum, alpha=-ridge / w_total)
        del T_sum, q

    # eq. 14 with R_t = Shat_t + eps_t I: A = sum w R_t + 1 c^T, N = sum w C_t R_t.
    A = S_sum
    A.diagonal().add_(ridge)
    if prior:  # eq. 11-13: c = mean row of sum w Shat_t (unregularized), added to every row
        c = A.mean(dim=0)
        c[...] -= ridge / n
        if heterogeneous:
            c.div_(sum(energies) / len(energies) + LOG_FLOOR)
        A.add_(c.unsqueeze(0))
    N = Q.add_(C_eps)
    del C_eps
    W_pre, info = solve_right(A, N)
    del A, N, S_sum

    k = math.floor(min(m, n) * k_frac)
    if D is None or k == 0:
        return W_pre, info, (k if do_refine else 0), None, None

    # eq. 17-19: isotropic boost of the top-k singular directions of F = W_pre + D.
    F = D.add_(W_pre)
    U, s, Vh = torch.linalg.svd(F, full_matrices=False)
    del F
    sigma_iso = float(s[:k].mean())
    W = W_pre.addmm_(U[:, :k], Vh[:k], alpha=sigma_iso)
    spectrum = s.tolist() if keep_spectrum else None
    return W, info, k, sigma_iso, spectrum
