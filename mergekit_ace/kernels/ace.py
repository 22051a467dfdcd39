"""ACE-Merging kernel (Xu et al., CVPR 2026, arXiv 2603.02945), one output tensor at a time.

Follows the specification in ``docs/method.md`` ("the spec" below) step by step; equation
numbers are the paper's. Memory does not grow with the number of experts: the per-task
``[n, n]`` proxies are folded into running sums (spec, "Cost") instead of being kept.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import List, Optional, Sequence, Union

import torch

from mergekit_ace.kernels.ace_parameters import (
    ACE_DEFAULTS,
    DEFAULT_GATE_STATISTIC,
    predict_branch,
    validate_ace_parameters,
)
from mergekit_ace.kernels.ace_phases import (
    STREAM_BLOCK_BYTES,
    TaskVectorRows,
    accumulate,
    build_system,
    plan_workspace,
    refine as refine_phase,
    task_vector_rows,
    solve_rows_,
    workspace_cost,
)
from mergekit_ace.kernels.common import (
    OncePerKey,
    check_inputs,
    finish,
    finish_rows,
    frobenius,
    is_storage_noise,
    mean_one,
    prepare,
    task_vectors,
    weighted_mean_delta,
)
from mergekit_ace.kernels.linalg import (
    ACCURACY_WARN,
    RightSolver,
    resolve_matmul_precision,
    unit_roundoff,
)
from mergekit_ace.kernels.parameters import DROP_NOISE

TOP_FRACTION = 0.05
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
    indices of those that entered the merge (positive weight, non-zero task vector); ``noise``
    those whose task vector is storage noise (left out unless ``drop_noise=False``).
    ``gamma`` is the paper's statistic and ``log_spread`` the unit-free one, whichever gated.
    ``rcond`` is the solver's reciprocal pivot-growth estimate (small: ill-conditioned);
    ``condition`` the system's condition number (measured where it could cost float32 more than
    ``ACCURACY_WARN`` of relative accuracy, else a bound; :class:`~mergekit_ace.kernels.
    linalg.SolveInfo`). ``spread``: ``s_1 / s_k`` over the directions the refinement boosted,
    the factor by which it multiplies the solve's relative round-off.
    ``matmul``: the precision the large products ran in (``float32``, ``tf32x3``, ``tf32``).
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
    condition: Optional[float] = None
    spread: Optional[float] = None
    spectral: Optional[str] = None
    device: Optional[str] = None
    matmul: Optional[str] = None
    ridge: Optional[float] = None
    concentration_pre: Optional[float] = None
    concentration_post: Optional[float] = None
    singular_values_pre: Optional[List[float]] = field(default=None, repr=False)
    singular_values_post: Optional[List[float]] = field(default=None, repr=False)
    noise: List[int] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def ace_merge(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    *,
    weights: Optional[Sequence[float]] = None,
    eps: Union[float, str] = ACE_DEFAULTS["eps"],
    tau: float = ACE_DEFAULTS["tau"],
    gate: str = ACE_DEFAULTS["gate"],
    gate_statistic: str = ACE_DEFAULTS["gate_statistic"],
    refine: bool = ACE_DEFAULTS["refine"],
    k_frac: float = ACE_DEFAULTS["k_frac"],
    prior: bool = ACE_DEFAULTS["prior"],
    lam: float = 1.0,
    compute_dtype: Optional[torch.dtype] = None,
    out_dtype: Optional[torch.dtype] = None,
    tensor_name: Optional[str] = None,
    expert_names: Optional[Sequence[str]] = None,
    spectra: bool = False,
    oom_fallback: str = ACE_DEFAULTS["oom_fallback"],
    free_device_bytes: Optional[int] = None,
    matmul_precision: str = ACE_DEFAULTS["matmul_precision"],
    drop_noise: bool = DROP_NOISE.default,
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

    On CUDA, a 2-D tensor whose estimated workspace (:func:`estimate_ace_cost`) does not fit
    in the free device memory is handled by ``oom_fallback``: ``"cpu"`` computes it on the
    CPU (with a warning) and returns the result on the inputs' device, ``"error"`` raises
    :class:`AceOutOfMemoryError` before any work. ``free_device_bytes`` overrides the
    measured free memory (for tests and callers that budget memory themselves).

    ``matmul_precision`` (:func:`~mergekit_ace.kernels.linalg.resolve_matmul_precision`)
    picks how the large float32 products run on a GPU: ``auto`` uses tensor cores through
    three TF32 products per product (float32 accuracy), ``tf32`` one (faster, ~1e-3 relative
    error), ``float32`` none. CPUs and float64 always compute in plain float32/float64.

    ``drop_noise`` (default True) leaves out experts whose task vector is storage noise
    (:func:`~mergekit_ace.kernels.common.storage_noise`): under trace normalization such an
    expert would get the same vote as a real one.
    """
    call = dict(locals())  # this call's arguments, for the CPU fallback's re-call
    (eps, tau, gate, gate_statistic, refine, k_frac, prior, lam, oom_fallback, matmul_precision,
     drop_noise) = validate_ace_parameters(
        eps=eps, tau=tau, gate=gate, gate_statistic=gate_statistic, refine=refine, k_frac=k_frac,
        prior=prior, lam=lam, oom_fallback=oom_fallback, matmul_precision=matmul_precision,
        drop_noise=drop_noise,
    ).values()
    # 2-D tensors: the experts' scan sums every value, so the finite check waits for it.
    w_all, dtype, out_dtype = prepare(
        base, experts, weights, compute_dtype=compute_dtype, out_dtype=out_dtype,
        tensor_name=tensor_name, expert_names=expert_names, check_finite=base.dim() != 2,
    )
    if base.dim() == 2 and base.device.type == "cuda":
        free = free_device_bytes if free_device_bytes is not None else cuda_free_bytes(base.device)
        if needs_cpu_fallback(
            tuple(base.shape), len(experts), torch.finfo(dtype).bits // 8, free,
            policy=oom_fallback, tensor_name=tensor_name, k_frac=k_frac if refine else 0.0,
            matmul="float32" if matmul_precision in ("float32", "tf32") else "tf32x3",
        ):
            call.update(base=base.cpu(), experts=[e.cpu() for e in experts],
                        compute_dtype=dtype, out_dtype=out_dtype, free_device_bytes=None)
            out, diag = ace_merge(**call)
            diag.device = "cpu (fallback)"
            return _return_to(out, base.device), diag
    where = {"drop_noise": drop_noise, "tensor_name": tensor_name, "expert_names": expert_names}
    if base.dim() != 2:
        tv = task_vectors(base, experts, w_all, dtype, **where)
        scan = _Scan(tv.indices, tv.weights, tv.energies, tv.all_energies, [], tv.noise)
    else:
        scan = _scan_experts(base, experts, w_all, dtype, **where)
    diag = AceDiagnostics(
        tensor=tensor_name,
        shape=tuple(base.shape),
        branch="unchanged",
        energies=scan.all_energies,
        participants=scan.indices,
        weights=scan.weights,
        gate_statistic=gate_statistic,
        noise=scan.noise,
    )
    if not scan.indices:
        return base.to(out_dtype), diag
    if base.dim() != 2:
        diag.branch = "mean"
        return finish(tv.base, weighted_mean_delta(tv), lam, out_dtype, tensor_name), diag

    decision = predict_branch(2, scan.energies, tau=tau, gate=gate, gate_statistic=gate_statistic)
    diag.branch, diag.gamma, diag.log_spread = decision.branch, decision.gamma, decision.log_spread
    heterogeneous = decision.heterogeneous
    m, n = base.shape
    diag.k = math.floor(min(m, n) * k_frac) if heterogeneous and refine else 0
    plan = plan_workspace((m, n), torch.finfo(dtype).bits // 8, diag.k, spectra=spectra,
                          matmul=resolve_matmul_precision(matmul_precision, base.device, dtype))
    diag.matmul = plan.matmul
    src = TaskVectorRows(base, [experts[i] for i in scan.indices], dtype, scan.means)
    W = _merge_2d(src, scan, plan, heterogeneous=heterogeneous, eps=eps, prior=prior,
                  diag=diag, spectra=spectra, like=scan.means[0])
    report_conditioning(diag, dtype, eps)
    remedy = "raise `eps` for this tensor (it regularizes the system) or compute in float64 " \
        "(`dtype: float64`)"
    return finish_rows(base, W, lam, out_dtype, tensor_name, plan.blocks, remedy), diag


@dataclass
class _Scan:
    """Who takes part in a tensor's merge: ``indices`` into the experts, their weights
    (renormalized to mean one), energies ``||tau_t||_F^2`` (float64) and column means
    ``mu_t`` (eq. 5); ``all_energies`` for every expert; ``noise`` the experts whose task
    vector is storage noise."""

    indices: List[int]
    weights: List[float]
    energies: List[float]
    all_energies: List[float]
    means: List[torch.Tensor]
    noise: List[int] = field(default_factory=list)


def _scan_experts(base, experts, weights, dtype, *, drop_noise, tensor_name, expert_names) -> _Scan:
    """One pass over each expert, a block of rows at a time (no ``[m, n]`` temporary): its
    energy and column mean. Experts whose weight is 0 or that left the tensor unchanged do
    not take part (spec decision: a zero task vector must not join the system), nor, with
    ``drop_noise``, those whose task vector is storage noise (checked, also by blocks, only
    for task vectors small enough to be)."""
    m, n = base.shape
    step = max(1, min(m, STREAM_BLOCK_BYTES // (n * torch.finfo(dtype).bits // 8)))
    base_norm, rounding = None, {}
    indices, energies, all_energies, kept, means, noise = [], [], [], [], [], []
    for i, expert in enumerate(experts):
        energy = 0.0
        col = torch.zeros(n, dtype=torch.float64, device=base.device)
        for start in range(0, m, step):
            d = task_vector_rows(base, expert, start, start + step, dtype)
            # In the compute dtype (pairwise summation), accumulated in float64 across blocks:
            # a float64 copy of each block would cost more than the sums.
            energy += float(torch.linalg.vector_norm(d)) ** 2
            col.add_(d.sum(dim=0))
            del d
        if not math.isfinite(energy):  # a NaN or Inf in the expert or the base
            check_inputs(base, experts, tensor_name=tensor_name, expert_names=expert_names)
            energy = frobenius(task_vector_rows(base, expert, 0, m, torch.float64)) ** 2
        all_energies.append(energy)
        if energy == 0.0 or weights[i] == 0.0:
            continue
        base_norm = frobenius(base, step) if base_norm is None else base_norm
        if is_storage_noise(base, expert, energy, base_norm, dtype, index=i, step=step,
                            rounding=rounding,
                            drop_noise=drop_noise, tensor_name=tensor_name,
                            expert_names=expert_names):
            noise.append(i)
            if drop_noise:
                continue
        indices.append(i)
        energies.append(energy)
        kept.append(weights[i])
        means.append((col / m).to(dtype))
    return _Scan(indices, mean_one(kept), energies, all_energies, means, noise)


def _merge_2d(src, scan, plan, *, heterogeneous, eps, prior, diag, spectra, like) -> torch.Tensor:
    """Steps 2-6 of the method (docs/method.md) for one ``[m, n]`` tensor: the merged task
    vector ``W``; fills ``diag`` (solver, ridge, sigma_iso, spectra)."""
    acc = accumulate(src, scan.weights, plan, heterogeneous=heterogeneous, eps=eps, like=like)
    diag.ridge = acc.ridge / sum(scan.weights)
    system = dict(prior=prior, heterogeneous=heterogeneous, eps=eps, energies=scan.energies)

    def record_pre(W_pre):
        s_pre = torch.linalg.svdvals(W_pre)
        diag.singular_values_pre = s_pre.tolist()
        diag.concentration_pre = concentration(s_pre)

    record_pre = record_pre if spectra else None
    if plan.k:
        # The system's storage is handed over, so refinement can free it after factoring.
        W, info, diag.sigma_iso, diag.spectral, diag.k, diag.spread = refine_phase(
            src, scan.weights, acc, *build_system(acc, **system), plan, spectra_pre=record_pre,
            measure_condition=spectra,
        )
    else:
        solver = RightSolver.factor(*build_system(acc, **system), floor=acc.ridge,
                                    measure=spectra)
        solve_rows_(solver, acc.N, plan)
        W, info = acc.N, solver.info
        del solver
        if record_pre is not None:
            record_pre(W)
    diag.solver, diag.rcond, diag.condition = info.method, info.rcond, info.condition
    if spectra:
        if diag.sigma_iso is None:
            diag.singular_values_post = diag.singular_values_pre
            diag.concentration_post = diag.concentration_pre
        else:
            s_post = torch.linalg.svdvals(W)
            diag.singular_values_post = s_post.tolist()
            diag.concentration_post = concentration(s_post)
    return W


accuracy_reports = OncePerKey(" Further tensors with this eps are reported at debug level.")


def report_conditioning(diag: AceDiagnostics, dtype: torch.dtype, eps) -> None:
    """Warn when ``dtype``'s round-off, multiplied by ``diag``'s condition number and the
    refinement's spread, can change the merged update by more than ``ACCURACY_WARN`` (once
    per ``eps`` and dtype, :data:`accuracy_reports`; later tensors at debug level)."""
    if diag.condition is None:
        return
    u = unit_roundoff(dtype)
    spread = max(1.0, diag.spread or 1.0)
    loss = diag.condition * u * spread
    if not loss > ACCURACY_WARN:
        return
    rows, cols = diag.shape
    precision = str(dtype).replace("torch.", "")
    change = "more than its own size" if loss >= 1 else f"up to {loss:.0%} of its size"
    raise_eps = "use `eps: auto` (the default, which bounds the condition number by 4097) or " \
        "a larger `eps`"
    if diag.solver != "cholesky":
        what = (f"its system is singular or indefinite in {precision} (solved by "
                f"{'least squares' if diag.solver == 'lstsq' else 'LU'}), so round-off can "
                "change the merged update by more than its own size")
        remedy = raise_eps
    else:
        what = f"its system's condition number is about {diag.condition:.1e}"
        if spread > 1:
            what += (f" and the spectral refinement, boosting {diag.k} directions down to "
                     f"1/{spread:.0f} of the largest singular value, multiplies the solve's "
                     f"round-off by {spread:.0f}")
        what += f", so {precision} round-off can change the merged update by {change}"
        remedy = raise_eps if diag.condition * u > ACCURACY_WARN else "lower `k_frac`"
    remedy = f"For this tensor, {remedy}, or compute in float64 (`dtype: float64`)."
    name = repr(diag.tensor) if diag.tensor else "(unnamed)"
    message = (f"ACE: tensor {name} ([{rows}, {cols}], {len(diag.participants)} experts, "
               f"eps {eps}): {what}. {remedy}")
    accuracy_reports.log((str(eps), dtype), message)


def _return_to(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move a CPU-fallback result back to the inputs' device."""
    return tensor.to(device)


class AceOutOfMemoryError(MemoryError):
    """A tensor's ACE workspace does not fit in free GPU memory and ``oom_fallback`` is
    ``error``; the message names the tensor, the sizes and what to change."""


def cuda_free_bytes(device: torch.device) -> int:
    """Free memory on ``device``: the driver's free bytes plus what PyTorch's caching
    allocator holds but does not use (it can hand that out again), within the process's cap
    (``torch.cuda.set_per_process_memory_fraction``) where one is set."""
    free, total = torch.cuda.mem_get_info(device)
    allocated = torch.cuda.memory_allocated(device)
    available = free + torch.cuda.memory_reserved(device) - allocated
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda d: 1.0)(device)
    return int(max(0, min(available, fraction * total - allocated)))


def needs_cpu_fallback(
    shape: Sequence[int],
    n_experts: int,
    bytes_per_element: int,
    free_bytes: int,
    *,
    policy: str = "cpu",
    tensor_name: Optional[str] = None,
    k_frac: float = 0.3,
    matmul: str = "float32",
) -> bool:
    """Decide where a CUDA tensor is merged. True: on the CPU (``policy="cpu"``, logged);
    False: the estimated workspace fits in ``CUDA_HEADROOM`` of ``free_bytes``;
    ``policy="error"`` raises :class:`AceOutOfMemoryError` instead of falling back."""
    need = estimate_ace_cost(shape, n_experts, bytes_per_element, k_frac=k_frac,
                             matmul=matmul)["bytes"]
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
    shape: Sequence[int],
    n_experts: int,
    bytes_per_element: int = 4,
    *,
    refine: bool = True,
    k_frac: float = 0.3,
    out_bytes: int = 2,
    matmul: str = "float32",
) -> dict:
    """Peak extra memory (bytes) and floating-point work of ``ace_merge`` on one tensor.

    ``bytes`` is the kernel's own peak workspace including the returned tensor, not the
    ``T + 1`` input tensors mergekit has already loaded; it does not depend on ``n_experts``
    (task vectors are formed a block of rows at a time). ``bytes_per_element`` is the compute
    dtype's size (4: float32), ``out_bytes`` the output dtype's (2: bfloat16); ``matmul`` the
    resolved product precision (``tf32x3`` holds a block's two halves). ``refine=False`` (or ``k_frac=0``) gives the homogeneous branch
    (no spectral step). Also returned: ``flops`` (total), ``flops_grams`` / ``flops_solve`` /
    ``flops_spectral`` (its parts), ``phase`` (which phase sets the peak: ``"accumulate"``,
    ``"solve"`` or ``"refine"``) and the workspace ``plan`` it follows.
    """
    if len(shape) != 2:
        size = math.prod(shape)
        return {"bytes": 2 * size * bytes_per_element, "flops": 2 * n_experts * size}
    k = math.floor(min(shape) * k_frac) if refine else 0
    plan = plan_workspace(tuple(shape), bytes_per_element, k, matmul=matmul)
    return {**workspace_cost(plan, n_experts, out_bytes), "plan": plan}
