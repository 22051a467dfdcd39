"""ACE-Merging kernel (Xu et al., CVPR 2026, arXiv 2603.02945), one output tensor at a time.

Follows ``shared/spec/ace.md`` step by step; equation numbers are the paper's. Memory does not
grow with the number of experts: the per-task ``[n, n]`` proxies are folded into running sums
(spec, "Cost") instead of being kept.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import List, Optional, Sequence, Union

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
GATE_STATISTICS = ("gamma", "log_spread")
LOG_FLOOR = 1e-12
# ``eps: auto``: each task's ridge is AUTO_RIDGE * tr(Shat_t). Every regularized proxy then has
# condition number at most 1 + 1 / AUTO_RIDGE = 4097 whatever the units of the task vectors
# or the width n: the largest at which a float32 LU solve still keeps about half of float32's
# 24 significant bits (condition * unit round-off ~ 2.4e-4).
AUTO_RIDGE = 2.0**-12
TOP_FRACTION = 0.05  # the paper's Fig. 2 reads spectral concentration off the top 5 %


@dataclass
class AceDiagnostics:
    """What the kernel decided for one tensor.

    ``branch`` is ``"heterogeneous"`` or ``"homogeneous"`` for 2-D tensors, ``"mean"`` for
    tensors merged by averaging (not 2-D), ``"unchanged"`` when no expert changed the tensor.
    ``energies`` lists ``||tau_t||_F^2`` for every expert in input order; ``participants`` the
    indices of those that entered the merge (positive weight, non-zero task vector).
    ``gamma`` is the paper's statistic and ``log_spread`` the unit-free one, whichever gated.
    ``rcond`` is the solver's reciprocal pivot-growth estimate (small: ill-conditioned).
    ``concentration_pre`` / ``concentration_post`` (only with ``spectra=True``): the share of
    squared singular-value mass held by the top 5 % of directions of ``W_pre`` and of the
    final ``W`` (paper Fig. 2).
    """

    tensor: Optional[str]
    shape: tuple
    branch: str
    energies: List[float]
    participants: List[int]
    weights: List[float]
    gamma: Optional[float] = None
    log_spread: Optional[float] = None
    gate_statistic: str = "gamma"
    k: int = 0
    sigma_iso: Optional[float] = None
    solver: Optional[str] = None
    rcond: Optional[float] = None
    ridge: Optional[float] = None
    concentration_pre: Optional[float] = None
    concentration_post: Optional[float] = None
    singular_values_pre: Optional[List[float]] = field(default=None, repr=False)
    singular_values_post: Optional[List[float]] = field(default=None, repr=False)

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


def log_spread(energies: Sequence[float]) -> Optional[float]:
    """Unit-free heterogeneity: the unbiased standard deviation of ``log10 e_t``.

    Rescaling every task vector shifts all logs equally, so the value does not change
    (the paper's ``gamma`` divides by ``mean(l)^2``, which does). 0.3 means the energies
    typically differ by a factor of two. ``None`` for fewer than two tasks.
    """
    if len(energies) < 2:
        return None
    logs = [math.log10(e) for e in energies]
    mean = sum(logs) / len(logs)
    return math.sqrt(sum((x - mean) ** 2 for x in logs) / (len(logs) - 1))


def choose_branch(statistic: Optional[float], tau: float, gate: str) -> bool:
    """True for the heterogeneous branch: ``statistic > tau`` under ``gate="auto"``."""
    if gate == "on":
        return True
    if gate == "off" or statistic is None:
        return False
    return statistic > tau


def validate_ace_parameters(
    *, eps, tau: float, gate: str, k_frac: float, lam: float, gate_statistic: str = "gamma"
) -> None:
    if eps != "auto" and (isinstance(eps, str) or not (eps >= 0.0) or math.isinf(eps)):
        raise ValueError(f"eps must be a finite number >= 0 or 'auto', got {eps!r}")
    if not (tau >= 0.0):
        raise ValueError(f"tau must be >= 0, got {tau}")
    if gate not in GATES:
        raise ValueError(f"gate must be one of {', '.join(GATES)}, got {gate!r}")
    if gate_statistic not in GATE_STATISTICS:
        raise ValueError(
            f"gate_statistic must be one of {', '.join(GATE_STATISTICS)}, got {gate_statistic!r}"
        )
    if not (0.0 <= k_frac <= 1.0):
        raise ValueError(f"k_frac must be in [0, 1], got {k_frac}")
    if not math.isfinite(lam):
        raise ValueError(f"lambda must be finite, got {lam}")


def ace_merge(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    *,
    weights: Optional[Sequence[float]] = None,
    eps: Union[float, str] = 1e-5,
    tau: float = 0.3,
    gate: str = "auto",
    gate_statistic: str = "gamma",
    refine: bool = True,
    k_frac: float = 0.3,
    prior: bool = True,
    lam: float = 1.0,
    compute_dtype: Optional[torch.dtype] = None,
    out_dtype: Optional[torch.dtype] = None,
    tensor_name: Optional[str] = None,
    expert_names: Optional[Sequence[str]] = None,
    spectra: bool = False,
) -> tuple[torch.Tensor, AceDiagnostics]:
    """Merge one tensor with ACE; returns ``(W0 + lam * W, diagnostics)``.

    ``experts`` are the fine-tuned tensors (same shape as ``base``); ``weights`` the per-task
    objective weights (default all ones, which is the paper). ``eps="auto"`` sets each task's
    ridge to ``AUTO_RIDGE * tr(Shat_t)`` instead of a fixed number, and measures the
    heterogeneous prior's energy normalization in units of each task's trace, so that
    rescaling every task vector by ``a`` rescales the merged task vector by ``a`` exactly. ``gate_statistic`` picks
    the paper's ``gamma`` or the unit-free ``log_spread`` for ``gate="auto"``. Computation
    runs in ``compute_dtype`` (float32, or float64 if any input is) on the inputs' device;
    the result is cast to ``out_dtype`` (default: the base tensor's dtype). ``spectra=True``
    also records singular values before and after refinement (two extra SVDs).
    """
    validate_ace_parameters(
        eps=eps, tau=tau, gate=gate, k_frac=k_frac, lam=lam, gate_statistic=gate_statistic
    )
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
        gate_statistic=gate_statistic,
    )
    if not tv.deltas:
        return base.to(out_dtype), diag
    if base.dim() != 2:
        diag.branch = "mean"
        return finish(tv.base, weighted_mean_delta(tv), lam, out_dtype, tensor_name), diag

    diag.gamma = heterogeneity(tv.energies)
    diag.log_spread = log_spread(tv.energies)
    statistic = diag.gamma if gate_statistic == "gamma" else diag.log_spread
    heterogeneous = choose_branch(statistic, tau, gate)
    diag.branch = "heterogeneous" if heterogeneous else "homogeneous"
    merged = _solve_2d(
        tv.deltas,
        tv.weights,
        tv.energies,
        heterogeneous=heterogeneous,
        eps=eps,
        refine=refine,
        k_frac=k_frac,
        prior=prior,
        diag=diag,
        spectra=spectra,
    )
    return finish(tv.base, merged, lam, out_dtype, tensor_name), diag


def concentration(singular_values: torch.Tensor, top_fraction: float = TOP_FRACTION) -> float:
    """Share of ``sum s_i^2`` held by the largest ``ceil(top_fraction * r)`` values."""
    energy = singular_values.double().square()
    total = float(energy.sum())
    if total == 0.0:
        return 0.0
    top = max(1, math.ceil(top_fraction * energy.numel()))
    return float(energy.sort(descending=True).values[:top].sum()) / total


def estimate_ace_cost(shape: Sequence[int], n_experts: int, bytes_per_element: int = 4) -> dict:
    """Peak extra memory (bytes) and floating-point work of ``ace_merge`` on one tensor.

    Counts the kernel's own workspace (two ``[n, n]`` and six ``[m, n]`` buffers at most),
    not the ``T + 1`` inputs mergekit has already loaded. Flops: ``T`` Gram products and
    ``T`` proxy products (``4 T m n^2``), the LU solve (``~2/3 n^3 + 2 m n^2``) and one thin
    SVD (``~4 m n r + 8 r^3`` with ``r = min(m, n)``).
    """
    if len(shape) != 2:
        size = math.prod(shape)
        return {"bytes": 2 * size * bytes_per_element, "flops": 2 * n_experts * size}
    m, n = shape
    r = min(m, n)
    workspace = (2 * n * n + 6 * m * n) * bytes_per_element
    flops = 4 * n_experts * m * n * n + (2 / 3) * n**3 + 2 * m * n * n + 4 * m * n * r + 8 * r**3
    return {"bytes": int(workspace), "flops": float(flops)}


def _solve_2d(
    deltas: List[torch.Tensor],
    weights: List[float],
    energies: List[float],
    *,
    heterogeneous: bool,
    eps: Union[float, str],
    refine: bool,
    k_frac: float,
    prior: bool,
    diag: AceDiagnostics,
    spectra: bool,
) -> torch.Tensor:
    """Steps 2-6 of the spec for one ``[m, n]`` tensor; returns the merged task vector ``W``
    and fills ``diag`` (solver, ridge, k, sigma_iso, spectra)."""
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
    traces = []
    if do_refine:
        q = like.new_zeros(n)
        T_sum = like.new_zeros(m, n)
    for w, tau_t in zip(weights, deltas):
        mu = tau_t.mean(dim=0)
        C = tau_t - mu  # eq. 5: centered over rows
        S = C.T @ C  # eq. 6
        tr = float(S.diagonal().sum(dtype=torch.float64)) + LOG_FLOOR
        traces.append(tr)
        if heterogeneous:  # eq. 8-10: trace normalization
            S.div_(tr)
        if eps == "auto":
            eps_t = AUTO_RIDGE * (1.0 if heterogeneous else tr)  # tr(Shat_t)
        else:
            eps_t = eps / tr if heterogeneous else eps
        S_sum.add_(S, alpha=w)
        Q.addmm_(C, S, alpha=w)
        C_eps.add_(C, alpha=w * eps_t)
        ridge += w * eps_t
        if do_refine:
            q.add_(mu @ S, alpha=w)
            T_sum.add_(tau_t, alpha=w)
        del C, S, mu
    w_total = sum(weights)
    diag.ridge = ridge / w_total

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
        c.sub_(ridge / n)
        if heterogeneous:
            # The paper divides by the mean raw energy, which carries the task vectors' units.
            # Scale-free mode (eps="auto") measures each energy in its own proxy's trace.
            scale = energies if eps != "auto" else [e / t for e, t in zip(energies, traces)]
            c.div_(sum(scale) / len(scale) + LOG_FLOOR)
        A.add_(c.unsqueeze(0))
    N = Q.add_(C_eps)
    del C_eps
    W_pre, info = solve_right(A, N)
    diag.solver, diag.rcond = info.method, info.rcond
    del A, N, S_sum
    if spectra:
        s_pre = torch.linalg.svdvals(W_pre)
        diag.singular_values_pre = s_pre.tolist()
        diag.concentration_pre = concentration(s_pre)

    k = math.floor(min(m, n) * k_frac) if do_refine else 0
    diag.k = k
    W = W_pre
    if D is not None and k > 0:
        # eq. 17-19: isotropic boost of the top-k singular directions of F = W_pre + D.
        F = D.add_(W_pre)
        U, s, Vh = torch.linalg.svd(F, full_matrices=False)
        del F
        diag.sigma_iso = float(s[:k].mean())
        W = W_pre.addmm_(U[:, :k], Vh[:k], alpha=diag.sigma_iso)
        del U, s, Vh
    if spectra:
        if W is W_pre and diag.sigma_iso is None:
            diag.singular_values_post = diag.singular_values_pre
            diag.concentration_post = diag.concentration_pre
        else:
            s_post = torch.linalg.svdvals(W)
            diag.singular_values_post = s_post.tolist()
            diag.concentration_post = concentration(s_post)
    return W
