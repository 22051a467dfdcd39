"""ACE-Merging (Xu et al., CVPR 2026, arXiv 2603.02945), one output tensor at a time.

:func:`ace_merge` follows the specification in ``docs/method.md`` step by step (equation
numbers are the paper's): the gate (step 1), the covariance proxies and their normalization
(2-3, :mod:`.closed_form`), the structural prior and the closed form (4-5), the spectral
refinement (6, :mod:`.refine`) and the output (7). Memory does not grow with the number of
experts: the per-task ``[n, n]`` proxies are folded into running sums instead of being kept
(:mod:`.workspace`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import List, Optional, Sequence, Union

import torch

from mergekit_ace.kernels.ace.closed_form import (
    TaskVectorRows,
    accumulate,
    build_system,
    factor,
    solve_rows_,
)
from mergekit_ace.kernels.ace.fallback import goes_to_cpu, merge_on_cpu
from mergekit_ace.kernels.ace.parameters import ACE_PARAMETERS, DEFAULT_GATE_STATISTIC
from mergekit_ace.kernels.ace.refine import NoiseFloor, Refinement, solve_and_refine
from mergekit_ace.kernels.ace.reports import Spectra, report_conditioning
from mergekit_ace.kernels.ace.roundoff import roundoff_change
from mergekit_ace.kernels.ace.scan import Scan, scan_experts
from mergekit_ace.kernels.ace.settings import AceSettings
from mergekit_ace.kernels.ace.workspace import WorkspacePlan, plan_workspace, scan_block_rows
from mergekit_ace.kernels.finishing import finish, finish_rows
from mergekit_ace.kernels.inputs import TensorNames, check_inputs, normalized_weights
from mergekit_ace.kernels.linalg import SolveInfo
from mergekit_ace.kernels.storage_noise import rounding_floor_bound, rounding_noise
from mergekit_ace.kernels.task_vectors import MergeDiagnostics, task_vectors, weighted_mean_delta

DEFAULTS = {p.kernel_name: p.default for p in ACE_PARAMETERS}
EPS_REMEDY = (
    "raise `eps` for this tensor (it regularizes the system) or compute in float64 "
    "(`dtype: float64`)"
)


@dataclass
class AceDiagnostics(MergeDiagnostics):
    """What the kernel decided for one tensor (:class:`~mergekit_ace.kernels.task_vectors.
    MergeDiagnostics`).

    ``branch`` is ``"heterogeneous"`` or ``"homogeneous"`` for 2-D tensors, ``"mean"`` for
    tensors merged by averaging (not 2-D), ``"unchanged"`` when no expert changed the tensor.
    ``gamma`` is the paper's statistic and ``log_spread`` the unit-free one, whichever gated.
    ``k``: directions the refinement boosted, ``sigma_iso`` their common singular value,
    ``spectral`` how they were found (``"gram-eigh"`` or ``"svd"``). ``solver``: ``cholesky``,
    ``lu`` or ``lstsq``; ``rcond`` its reciprocal pivot-growth estimate (small:
    ill-conditioned); ``condition`` the system's condition number (measured where it could cost
    float32 more than ``ACCURACY_WARN`` of relative accuracy, else a bound; :class:`~mergekit_ace.
    kernels.linalg.SolveInfo`). ``boost_ratio``: ``s_1 / s_k`` over the directions the
    refinement boosted, the factor by which it multiplies the solve's relative round-off;
    ``noise_floor`` the singular value of ``F`` at or below which it boosted nothing (``None``
    with ``noise_floor: false`` or no refinement; in a merge an upper bound of the storage
    floor where that bound already lay below every boosted direction, exact with
    ``spectra=True``); ``cut_gap``: ``(s_k - s_{k+1}) /
    ||F||_F`` at the last boosted direction (small at a near tie). ``roundoff_change``: where
    ``condition * u * boost_ratio`` exceeds ``ACCURACY_WARN``, the measured relative change
    round-off makes to the merged update (:mod:`.roundoff`).
    ``ridge``: the mean ridge ``sum w eps_t / sum w``. ``device``: ``"cpu (fallback)"`` when a
    CUDA tensor was merged on the CPU. ``matmul``: the precision the large products ran in
    (``float32``, ``tf32x3``, ``tf32``). ``concentration_pre`` / ``concentration_post`` (only
    with ``spectra=True``): the share of squared singular-value mass held by the top 5 % of
    directions of ``W_pre`` and of the final ``W`` (paper Fig. 2).
    """

    gamma: Optional[float] = None
    log_spread: Optional[float] = None
    gate_statistic: str = DEFAULT_GATE_STATISTIC
    k: int = 0
    sigma_iso: Optional[float] = None
    solver: Optional[str] = None
    rcond: Optional[float] = None
    condition: Optional[float] = None
    boost_ratio: Optional[float] = None
    noise_floor: Optional[float] = None
    cut_gap: Optional[float] = None
    roundoff_change: Optional[float] = None
    spectral: Optional[str] = None
    device: Optional[str] = None
    matmul: Optional[str] = None
    ridge: Optional[float] = None
    concentration_pre: Optional[float] = None
    concentration_post: Optional[float] = None
    singular_values_pre: Optional[List[float]] = field(default=None, repr=False)
    singular_values_post: Optional[List[float]] = field(default=None, repr=False)


def ace_merge(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    *,
    weights: Optional[Sequence[float]] = None,
    eps: Union[float, str] = DEFAULTS["eps"],
    tau: float = DEFAULTS["tau"],
    gate: str = DEFAULTS["gate"],
    gate_statistic: str = DEFAULTS["gate_statistic"],
    refine: bool = DEFAULTS["refine"],
    k_frac: float = DEFAULTS["k_frac"],
    prior: bool = DEFAULTS["prior"],
    lam: float = DEFAULTS["lam"],
    compute_dtype: Optional[torch.dtype] = None,
    out_dtype: Optional[torch.dtype] = None,
    tensor_name: Optional[str] = None,
    expert_names: Optional[Sequence[str]] = None,
    spectra: bool = False,
    oom_fallback: str = DEFAULTS["oom_fallback"],
    free_device_bytes: Optional[int] = None,
    matmul_precision: str = DEFAULTS["matmul_precision"],
    drop_noise: bool = DEFAULTS["drop_noise"],
    noise_floor: bool = DEFAULTS["noise_floor"],
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
    also records singular values before and after refinement (two extra SVDs) and measures
    every system's condition number (:class:`AceDiagnostics`).

    On CUDA, a 2-D tensor whose estimated workspace (:func:`~mergekit_ace.kernels.ace.cost.
    estimate_ace_cost`) does not fit in the free device memory is handled by ``oom_fallback``:
    ``"cpu"`` computes it on the CPU (with a warning) and returns the result on the inputs'
    device, ``"error"`` raises :class:`~mergekit_ace.kernels.ace.fallback.AceOutOfMemoryError`
    before any work. ``free_device_bytes`` overrides the measured free memory (for tests and
    callers that budget memory themselves).

    ``matmul_precision`` (:func:`~mergekit_ace.kernels.linalg.resolve_matmul_precision`)
    picks how the large float32 products run on a GPU: ``auto`` uses tensor cores through
    three TF32 products per product (float32 accuracy), ``tf32`` one (faster, ~1e-3 relative
    error), ``float32`` none. CPUs and float64 always compute in plain float32/float64.

    ``drop_noise`` (default True) leaves out experts whose task vector is storage noise
    (:mod:`~mergekit_ace.kernels.storage_noise`): under trace normalization such an expert
    would get the same vote as a real one. ``noise_floor`` (default True): the refinement
    boosts no direction of ``F`` whose singular value the experts' storage rounding or a float32
    solve explains (:func:`~mergekit_ace.kernels.ace.refine.refinement_floor`).
    """
    settings = AceSettings.resolve(
        base,
        experts,
        compute_dtype=compute_dtype,
        out_dtype=out_dtype,
        spectra=spectra,
        eps=eps,
        tau=tau,
        gate=gate,
        gate_statistic=gate_statistic,
        refine=refine,
        k_frac=k_frac,
        prior=prior,
        lam=lam,
        oom_fallback=oom_fallback,
        matmul_precision=matmul_precision,
        drop_noise=drop_noise,
        noise_floor=noise_floor,
    )
    names = TensorNames(tensor_name, expert_names)
    # 2-D tensors: the experts' scan sums every value, so the finite check waits for it.
    check_inputs(base, experts, **names.keywords, finite=base.dim() != 2)
    weights = normalized_weights(weights, len(experts), **names.keywords)
    if base.dim() != 2:
        return merge_mean(base, experts, weights, settings, names)
    if goes_to_cpu(base, len(experts), settings, free_device_bytes, tensor_name):
        merge = partial(merge_matrix, weights=weights, names=names)
        return merge_on_cpu(merge, base, experts, settings)
    return merge_matrix(base, experts, settings, weights=weights, names=names)


def merge_matrix(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    settings: AceSettings,
    *,
    weights: Sequence[float],
    names: TensorNames,
) -> tuple[torch.Tensor, AceDiagnostics]:
    """Steps 1-7 of docs/method.md for a 2-D tensor, on checked inputs and resolved settings.
    Where the round-off bound exceeds ``ACCURACY_WARN``, the update is computed a second time
    with rows and columns in another order (:func:`~mergekit_ace.kernels.ace.roundoff.
    roundoff_change`) and the warning rests on the measured difference."""
    scan = scan_experts(base, experts, weights, settings, **names.keywords)
    W, diag, plan = merged_update(base, experts, settings, scan, names=names)
    if W is None:
        return base.to(settings.out_dtype), diag
    again = partial(roundoff_change, merged_update, base, experts, settings, scan, names, W)
    norm = (
        float(torch.linalg.vector_norm(W, dtype=torch.float64))
        if diag.cut_gap is not None
        else None
    )
    report_conditioning(diag, settings.dtype, settings.eps, measure=again, update_norm=norm)
    lam, out_dtype = settings.lam, settings.out_dtype
    out = finish_rows(base, W, lam, out_dtype, names.tensor, plan.blocks, EPS_REMEDY)  # step 7
    return out, diag


def merged_update(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    settings: AceSettings,
    scan: Scan,
    *,
    names: TensorNames,
) -> tuple[Optional[torch.Tensor], AceDiagnostics, Optional[WorkspacePlan]]:
    """Steps 1-6 for a 2-D tensor whose experts ``scan`` (:func:`~mergekit_ace.kernels.ace.
    scan.scan_experts`) describes: ``(W, diagnostics, plan)``, ``W`` the merged task vector in
    the compute dtype (``None`` when no expert takes part)."""
    who = scan.participation
    diag = AceDiagnostics.of(names.tensor, base.shape, who, gate_statistic=settings.gate_statistic)
    if not who.indices:
        return None, diag, None
    decision = settings.branch(who.energies)  # step 1
    heterogeneous = decision.heterogeneous
    k = settings.refined_directions(base.shape, heterogeneous)
    plan = plan_workspace(
        base.shape, settings.element_bytes, k, spectra=settings.spectra, matmul=settings.matmul
    )
    rows = TaskVectorRows(base, [experts[i] for i in who.indices], settings.dtype, scan.means)
    # steps 2-3
    sums = accumulate(rows, who.weights, plan, heterogeneous=heterogeneous, ridge=settings.ridge)
    # step 4
    system = build_system(
        sums, who.energies, heterogeneous=heterogeneous, prior=settings.prior, ridge=settings.ridge
    )
    spectra = Spectra() if settings.spectra else None
    if k:  # steps 5-6
        record_pre = spectra.before_refinement if spectra else None
        floor = noise_floor_of(base, [experts[i] for i in who.indices], settings)
        W, solved, refinement = solve_and_refine(
            rows,
            who.weights,
            sums,
            system,
            plan,
            measure=settings.spectra,
            record_pre=record_pre,
            floor=floor,
        )
    else:  # step 5
        solver = factor(system, sums, measure=settings.spectra)
        W, solved, refinement = solve_rows_(solver, sums.N, plan), solver.info, None
        del solver
        if spectra:
            spectra.before_refinement(W)
    if spectra:
        spectra.after_refinement(W if refinement and refinement.sigma_iso is not None else None)
    ridge = sums.total_ridge / sum(who.weights)
    _record(diag, decision, k, ridge, solved, refinement, spectra, plan.matmul)
    return W, diag, plan


def noise_floor_of(
    base: torch.Tensor, participants: Sequence[torch.Tensor], settings: AceSettings
) -> NoiseFloor:
    """Step 6's noise floor (:class:`~mergekit_ace.kernels.ace.refine.NoiseFloor`) from the
    noisiest participant's storage rounding (``noise_floor: false``: none): in a merge first
    as a bound from each participant's largest entry, computed entry by entry only where the
    bound reaches a direction the refinement would boost."""
    shape = tuple(base.shape)
    if not settings.noise_floor:
        return NoiseFloor(False, shape)
    step = scan_block_rows(shape[0], shape[1], settings.element_bytes)

    def exact() -> float:
        return max(rounding_noise(expert, step).floor() for expert in participants)

    if settings.spectra:  # inspect reports the floor itself
        return NoiseFloor(True, shape, exact())
    bound = max(rounding_floor_bound(expert, step) for expert in participants)
    return NoiseFloor(True, shape, bound, exact=exact)


def merge_mean(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    weights: Sequence[float],
    settings: AceSettings,
    names: TensorNames,
) -> tuple[torch.Tensor, AceDiagnostics]:
    """Tensors that are not 2-D (norms, biases): ``W0 + lam * mean_t(tau_t)``, weighted."""
    tv = task_vectors(
        base, experts, weights, settings.dtype, drop_noise=settings.drop_noise, **names.keywords
    )
    diag = AceDiagnostics.of(
        names.tensor, base.shape, tv.participation, gate_statistic=settings.gate_statistic
    )
    if not tv.deltas:
        return base.to(settings.out_dtype), diag
    diag.branch = "mean"
    merged = weighted_mean_delta(tv)
    return finish(tv.base, merged, settings.lam, settings.out_dtype, names.tensor), diag


def _record(
    diag: AceDiagnostics,
    decision,
    k: int,
    ridge: float,
    solved: SolveInfo,
    refinement: Optional[Refinement],
    spectra: Optional[Spectra],
    matmul: str,
) -> None:
    """Fill ``diag`` with what the steps of a 2-D merge decided."""
    diag.branch, diag.gamma, diag.log_spread = decision.branch, decision.gamma, decision.log_spread
    diag.k, diag.ridge, diag.matmul = k, ridge, matmul
    diag.solver, diag.rcond, diag.condition = solved.method, solved.rcond, solved.condition
    if refinement is not None:
        diag.sigma_iso, diag.spectral = refinement.sigma_iso, refinement.spectral
        diag.k, diag.boost_ratio = refinement.k, refinement.boost_ratio
        diag.noise_floor, diag.cut_gap = refinement.floor, refinement.cut_gap
    if spectra is not None:
        diag.singular_values_pre, diag.singular_values_post = spectra.pre, spectra.post
        diag.concentration_pre = spectra.concentration_pre
        diag.concentration_post = spectra.concentration_post
