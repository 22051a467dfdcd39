"""ACE-Merging kernel (Xu et al., CVPR 2026, arXiv 2603.02945), one output tensor at a time.

Follows ``shared/spec/ace.md`` step by step; equation numbers are the paper's. Memory does not
grow with the number of experts: the per-task ``[n, n]`` proxies are folded into running sums
(spec, "Cost") instead of being kept.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import torch

from mergekit_ace.kernels.common import (
    TaskVectors,
    finish,
    prepare,
    task_vectors,
    weighted_mean_delta,
)
from mergekit_ace.kernels.linalg import (
    solve_right,
    solve_right_spd_rank_one,
    top_k_isotropic_update,
)

GATES = ("auto", "on", "off")
GATE_STATISTICS = ("gamma", "log_spread")
# Defaults: the scale-free choices (docs/benchmarks.md, "Scale-free defaults"); the paper's
# method as published is eps=1e-5 (its value for LLMs), gate_statistic="gamma" (eq. 7).
DEFAULT_EPS = "auto"
DEFAULT_GATE_STATISTIC = "log_spread"
PAPER_SETTINGS = {"eps": 1e-5, "gate_statistic": "gamma"}
LOG_FLOOR = 1e-12
# ``eps: auto``: each task's ridge is AUTO_RIDGE * tr(Shat_t). Every regularized proxy then has
# condition number at most 1 + 1 / AUTO_RIDGE = 4097 whatever the units of the task vectors
# or the width n: the largest at which a float32 LU solve still keeps about half of float32's
# 24 significant bits (condition * unit round-off ~ 2.4e-4).
AUTO_RIDGE = 2.0**-12
TOP_FRACTION = 0.05
OOM_FALLBACKS = ("cpu", "error")
# Share of the free GPU memory the estimated workspace may take. Measured on CPU the estimate
# is within -14 %..+30 % of the true peak (docs/performance.md); it also ignores the
# allocator's fragmentation and cuBLAS/cuSOLVER workspaces.
CUDA_HEADROOM = 0.75

logger = logging.getLogger(__name__)  # the paper's Fig. 2 reads spectral concentration off the top 5 %


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
    gate_statistic: str = DEFAULT_GATE_STATISTIC
    k: int = 0
    sigma_iso: Optional[float] = None
    solver: Optional[str] = None
    rcond: Optional[float] = None
    spectral: Optional[str] = None
    device: Optional[str] = None
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
    *, eps, tau: float, gate: str, k_frac: float, lam: float,
    gate_statistic: str = DEFAULT_GATE_STATISTIC,
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
    eps: Union[float, str] = DEFAULT_EPS,
    tau: float = 0.3,
    gate: str = "auto",
    gate_statistic: str = DEFAULT_GATE_STATISTIC,
    refine: bool = True,
    k_frac: float = 0.3,
    prior: bool = True,
    lam: float = 1.0,
    compute_dtype: Optional[torch.dtype] = None,
    out_dtype: Optional[torch.dtype] = None,
    tensor_name: Optional[str] = None,
    expert_names: Optional[Sequence[str]] = None,
    spectra: bool = False,
    oom_fallback: str = "cpu",
    free_device_bytes: Optional[int] = None,
) -> tuple[torch.Tensor, AceDiagnostics]:
    """Merge one tensor with ACE; returns ``(W0 + lam * W, diagnostics)``.

    ``experts`` are the fine-tuned tensors (same shape as ``base``); ``weights`` the per-task
    objective weights (default all ones, which is the paper).

    The defaults are scale-free: ``eps="auto"`` sets each task's ridge to
    ``AUTO_RIDGE * tr(Shat_t)`` instead of a fixed number and measures the heterogeneous
    prior's energy normalization in units of each task's trace, and ``gate_statistic=
    "log_spread"`` gates on the spread of the log-energies, so that rescaling every task vector
    by ``a`` rescales the merged task vector by ``a`` exactly (docs/benchmarks.md has the
    evidence behind these defaults). ``eps=1e-5, gate_statistic="gamma"`` is the paper's
    method as published (its value of ``eps`` for LLMs and its eq. 7 statistic). Computation
    runs in ``compute_dtype`` (float32, or float64 if any input is) on the inputs' device;
    the result is cast to ``out_dtype`` (default: the base tensor's dtype). ``spectra=True``
    also records singular values before and after refinement (two extra SVDs).

    On CUDA, a 2-D tensor whose estimated workspace (:func:`estimate_ace_cost`) does not fit
    in the free device memory is handled by ``oom_fallback``: ``"cpu"`` computes it on the
    CPU (with a warning) and returns the result on the inputs' device, ``"error"`` raises
    :class:`AceOutOfMemoryError` before any work. ``free_device_bytes`` overrides the
    measured free memory (for tests and callers that budget memory themselves).
    """
    validate_ace_parameters(
        eps=eps, tau=tau, gate=gate, k_frac=k_frac, lam=lam, gate_statistic=gate_statistic
    )
    if oom_fallback not in OOM_FALLBACKS:
        raise ValueError(
            f"oom_fallback must be one of {', '.join(OOM_FALLBACKS)}, got {oom_fallback!r}"
        )
    w_all, dtype, out_dtype = prepare(
        base, experts, weights, compute_dtype=compute_dtype, out_dtype=out_dtype,
        tensor_name=tensor_name, expert_names=expert_names,
    )
    if base.dim() == 2 and base.device.type == "cuda":
        free = free_device_bytes if free_device_bytes is not None else cuda_free_bytes(base.device)
        if needs_cpu_fallback(
            tuple(base.shape), len(experts), torch.finfo(dtype).bits // 8, free,
            policy=oom_fallback, tensor_name=tensor_name,
        ):
            out, diag = ace_merge(
                base.cpu(), [e.cpu() for e in experts], weights=weights, eps=eps, tau=tau,
                gate=gate, gate_statistic=gate_statistic, refine=refine, k_frac=k_frac,
                prior=prior, lam=lam, compute_dtype=dtype, out_dtype=out_dtype,
                tensor_name=tensor_name, expert_names=expert_names, spectra=spectra,
            )
            diag.device = "cpu (fallback)"
            return _return_to(out, base.device), diag
    if base.dim() != 2:
        tv = task_vectors(base, experts, w_all, dtype)
    else:
        tv = _participants(base, experts, w_all, dtype)
    diag = AceDiagnostics(
        tensor=tensor_name,
        shape=tuple(base.shape),
        branch="unchanged",
        energies=tv.all_energies,
        participants=tv.indices,
        weights=tv.weights,
        gate_statistic=gate_statistic,
    )
    if not tv.indices:
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
        (experts[i].to(dtype) - tv.base for i in tv.indices),  # one task vector at a time
        tv.weights,
        tv.energies,
        shape=tuple(base.shape),
        like=tv.base,
        heterogeneous=heterogeneous,
        eps=eps,
        refine=refine,
        k_frac=k_frac,
        prior=prior,
        diag=diag,
        spectra=spectra,
    )
    return finish(tv.base, merged, lam, out_dtype, tensor_name), diag


def _participants(base, experts, weights, dtype) -> TaskVectors:
    """:func:`task_vectors` without keeping the task vectors: energies, participants and
    renormalized weights, computed one expert at a time (``deltas`` is left empty; the
    caller re-forms each ``tau_t`` when it needs it, so memory does not grow with ``T``)."""
    base_c = base.to(dtype)
    indices, energies, all_energies, kept = [], [], [], []
    for i, expert in enumerate(experts):
        one = task_vectors(base_c, [expert], [weights[i]], dtype)
        all_energies.extend(one.all_energies)
        if one.indices:
            indices.append(i)
            energies.extend(one.energies)
            kept.append(weights[i])
        del one
    total = sum(kept)
    kept = [len(kept) * w / total for w in kept] if kept else []
    return TaskVectors(base_c, [], indices, kept, energies, all_energies)


def _return_to(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move a CPU-fallback result back to the inputs' device."""
    return tensor.to(device)


class AceOutOfMemoryError(MemoryError):
    """A tensor's ACE workspace does not fit in free GPU memory and ``oom_fallback`` is
    ``error``; the message names the tensor, the sizes and what to change."""


def cuda_free_bytes(device: torch.device) -> int:
    """Free memory on ``device``: the driver's free bytes plus what PyTorch's caching
    allocator holds but does not use (it can hand that out again)."""
    free, _total = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def needs_cpu_fallback(
    shape: Sequence[int],
    n_experts: int,
    bytes_per_element: int,
    free_bytes: int,
    *,
    policy: str = "cpu",
    tensor_name: Optional[str] = None,
) -> bool:
    """Decide where a CUDA tensor is merged. True: on the CPU (``policy="cpu"``, logged);
    False: the estimated workspace fits in ``CUDA_HEADROOM`` of ``free_bytes``;
    ``policy="error"`` raises :class:`AceOutOfMemoryError` instead of falling back."""
    need = estimate_ace_cost(shape, n_experts, bytes_per_element)["bytes"]
    if need <= CUDA_HEADROOM * free_bytes:
        return False
    where = f"tensor {tensor_name!r}" if tensor_name else "a tensor"
    sizes = (
        f"{where} of shape {list(shape)} with {n_experts} expert(s) needs about "
        f"{need / 2**30:.2f} GiB of GPU workspace but only {free_bytes / 2**30:.2f} GiB is free"
    )
    if policy == "error":
        raise AceOutOfMemoryError(
            f"{sizes}. Set `oom_fallback: cpu` under `parameters:` to merge such tensors on the "
            "CPU, or free GPU memory (drop --read-to-gpu, merge fewer experts at once, or run "
            "without --cuda)."
        )
    logger.warning("ACE: %s; merging it on the CPU (oom_fallback: cpu).", sizes)
    return True


def concentration(singular_values: torch.Tensor, top_fraction: float = TOP_FRACTION) -> float:
    """Share of ``sum s_i^2`` held by the largest ``ceil(top_fraction * r)`` values."""
    energy = singular_values.double().square()
    total = float(energy.sum())
    if total == 0.0:
        return 0.0
    top = max(1, math.ceil(top_fraction * energy.numel()))
    return float(energy.sort(descending=True).values[:top].sum()) / total


def estimate_ace_cost(
    shape: Sequence[int], n_experts: int, bytes_per_element: int = 4, *, refine: bool = True
) -> dict:
    """Peak extra memory (bytes) and floating-point work of ``ace_merge`` on one tensor.

    ``bytes`` is the kernel's own peak workspace, not the ``T + 1`` input tensors mergekit
    has already loaded; it does not depend on ``n_experts`` (task vectors are formed one at
    a time). ``bytes_per_element`` is the compute dtype's size (4: float32). ``refine=False``
    gives the homogeneous branch (no spectral step). Also returned: ``flops`` (total),
    ``flops_grams`` / ``flops_solve`` / ``flops_spectral`` (its parts) and ``phase`` (which
    phase sets the peak: ``"accumulate"``, ``"solve"`` or ``"spectral"``).
    """
    if len(shape) != 2:
        size = math.prod(shape)
        return {"bytes": 2 * size * bytes_per_element, "flops": 2 * n_experts * size}
    m, n = shape
    r = min(m, n)
    k = math.floor(0.3 * r)
    b = bytes_per_element
    mn = m * n
    short_rows = 2 * m < n
    # Accumulation: S_sum [n, n]; base in compute dtype, Q (and C_eps, T_sum with
    # refinement) [m, n]; per task: the task vector, its centered copy and one temporary
    # ([m, n] for the trace, [m, m] C C^T or [n, n] C^T C).
    persistent = n * n + mn * (4 if refine else 2)
    per_task = max(2 * mn, mn + (m * m if short_rows else n * n))
    accumulate = (persistent + per_task) * b
    # Solve: base, D, N, the system and its Cholesky (or LU) factor, the intermediate and
    # final solutions of the two triangular solves.
    solve = ((3 if refine else 2) * mn + 2 * n * n + 2 * mn) * b
    spectral = 0
    if refine:
        # base, W_pre, F, the update; float64 Gram + eigenvectors (+ eigh workspace),
        # a float64 block of F (<= 256 MiB), the [r, r] projector.
        spectral = 4 * mn * b + 3 * 8 * r * r + min(256 * 2**20, 8 * mn) + r * r * b
    peak = max(accumulate, solve, spectral)
    phase = {accumulate: "accumulate", solve: "solve", spectral: "spectral"}[peak]
    grams = n_experts * (2 * m * n * n + (4 * m * m * n if short_rows else 2 * m * n * n))
    grams += 2 * m * n * n if refine else 0  # T_sum Rbar
    solve_flops = n**3 / 3 + 2 * m * n * n
    spectral_flops = (2 * m * n * r + 4 * r**3 + 2 * r * r * k + 2 * m * n * r) if refine else 0
    return {
        "bytes": int(peak),
        "flops": float(grams + solve_flops + spectral_flops),
        "flops_grams": float(grams),
        "flops_solve": float(solve_flops),
        "flops_spectral": float(spectral_flops),
        "phase": phase,
    }


def _solve_2d(
    deltas: Iterable[torch.Tensor],
    weights: List[float],
    energies: List[float],
    *,
    shape: Tuple[int, int],
    like: torch.Tensor,
    heterogeneous: bool,
    eps: Union[float, str],
    refine: bool,
    k_frac: float,
    prior: bool,
    diag: AceDiagnostics,
    spectra: bool,
) -> torch.Tensor:
    """Steps 2-6 of the spec for one ``[m, n]`` tensor; returns the merged task vector ``W``
    and fills ``diag`` (solver, ridge, k, sigma_iso, spectra).

    ``deltas`` is consumed once, one task vector at a time, so the workspace does not grow
    with the number of experts (see :func:`estimate_ace_cost`). ``like`` gives the compute
    dtype and device.
    """
    m, n = shape
    k = math.floor(min(m, n) * k_frac) if heterogeneous and refine else 0
    diag.k = k
    do_refine = k > 0  # k = 0 (small tensors, k_frac = 0): refinement vanishes
    # Reassociate C_t Shat_t = (C_t C_t^T) C_t / tr_t when it is cheaper (4 m^2 n flops
    # instead of 2 m n^2; also no [n, n] temporary): down_proj, k_proj, v_proj.
    short_rows = 2 * m < n
    # Running sums (spec, "Cost"): S_sum = sum w Shat_t (accumulated without a per-task
    # [n, n] temporary), ridge = sum w eps_t, Q = sum w C_t Shat_t, C_eps = sum w eps_t C_t
    # (without refinement Q and C_eps share one buffer: N = Q + C_eps is all that is needed);
    # for refinement also q = sum w mu_t^T Shat_t (sum w tau_t Shat_t = Q + 1 q^T) and
    # T_sum = sum w tau_t.
    S_sum = like.new_zeros(n, n)
    Q = like.new_zeros(m, n)
    C_eps = like.new_zeros(m, n) if do_refine else Q
    ridge = 0.0
    traces = []
    if do_refine:
        q = like.new_zeros(n)
        T_sum = like.new_zeros(m, n)
    for w, tau_t in zip(weights, deltas):
        mu = tau_t.mean(dim=0)
        C = tau_t - mu  # eq. 5: centered over rows
        if do_refine:
            T_sum.add_(tau_t, alpha=w)
        del tau_t
        # eq. 6: S_t = C^T C; its trace is also that of C C^T, whichever Gram is formed.
        gram = C @ C.T if short_rows else C.T @ C
        tr = float(gram.diagonal().sum(dtype=torch.float64)) + LOG_FLOOR
        traces.append(tr)
        scale = w / tr if heterogeneous else w  # eq. 8-10: trace normalization
        if eps == "auto":
            eps_t = AUTO_RIDGE * (1.0 if heterogeneous else tr)  # tr(Shat_t)
        else:
            eps_t = eps / tr if heterogeneous else eps
        if short_rows:
            S_sum.addmm_(C.T, C, alpha=scale)  # straight into the sum: no [n, n] temporary
            Q.addmm_(gram, C, alpha=scale)  # C S_t = (C C^T) C
            if do_refine:
                q.add_((mu @ C.T) @ C, alpha=scale)
        else:
            S_sum.add_(gram, alpha=scale)
            Q.addmm_(C, gram, alpha=scale)
            if do_refine:
                q.add_(mu @ gram, alpha=scale)
        del gram
        C_eps.add_(C, alpha=w * eps_t)
        ridge += w * eps_t
        del C, mu
    w_total = sum(weights)
    diag.ridge = ridge / w_total

    D = None
    if do_refine:
        # eq. 15-16: D = sum w tau_t (Shat_t - Rbar) = (Q + 1 q^T) - T_sum Rbar,
        # with Rbar = (S_sum + ridge I) / sum w, the regularized weighted mean proxy.
        D = Q.add(q)
        D.addmm_(T_sum, S_sum, alpha=-1.0 / w_total)
        D.add_(T_sum, alpha=-ridge / w_total)
        del T_sum, q
        N = Q.add_(C_eps)
        del C_eps
    else:
        N = Q
    del Q

    # eq. 14 with R_t = Shat_t + eps_t I: A = sum w R_t + 1 c^T, N = sum w C_t R_t.
    B = S_sum
    del S_sum
    c = None
    if prior:  # eq. 11-13: c = mean row of sum w Shat_t (unregularized), added to every row
        c = B.mean(dim=0)
        if heterogeneous:
            # The paper divides by the mean raw energy, which carries the task vectors' units.
            # Scale-free mode (eps="auto") measures each energy in its own proxy's trace.
            scale = energies if eps != "auto" else [e / t for e, t in zip(energies, traces)]
            c.div_(sum(scale) / len(scale) + LOG_FLOOR)
    B.diagonal().add_(ridge)
    solved = solve_right_spd_rank_one(B, c if c is not None else B.new_zeros(n), N)
    if solved is None:
        if c is not None:
            B.add_(c.unsqueeze(0))
        solved = solve_right(B, N)
    W_pre, info = solved
    diag.solver, diag.rcond = info.method, info.rcond
    del B, N, c, solved
    if spectra:
        s_pre = torch.linalg.svdvals(W_pre)
        diag.singular_values_pre = s_pre.tolist()
        diag.concentration_pre = concentration(s_pre)

    W = W_pre
    if D is not None:
        # eq. 17-19: isotropic boost of the top-k singular directions of F = W_pre + D.
        F = D.add_(W_pre)
        del D
        top = top_k_isotropic_update(F, k)
        if top is not None:
            M, diag.sigma_iso = top
            diag.spectral = "gram-eigh"
            del F
            W = W_pre.add_(M, alpha=diag.sigma_iso)
            del M
        else:
            U, s, Vh = torch.linalg.svd(F, full_matrices=False)
            diag.spectral = "svd"
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
