"""ACTMat kernel: data-free RegMean with covariances estimated from the task vectors.

Hameed, Tam, Tikeng Notsawo, Raffel, Rabusseau, "Model Merging via Data-Free Covariance
Estimation", 2026, arXiv 2604.01329 (https://arxiv.org/abs/2604.01329); restated in
``docs/family.md`` as the authors' released implementation computes it.

Per 2-D tensor ``[m, n]`` with task vectors ``D_t = W_t - W0`` and Gram matrices
``G_t = D_t^T D_t`` (RegMean's input covariance, estimated from the difference matrix):

    D* = (sum_t w_t D_t G_t) (sum_t w_t G_t)^+,        output  W0 + lam * D*.

With one task this is ``D_1 G_1 G_1^+ = D_1``, i.e. ``W_1``; input directions outside the
span of ``sum_t G_t`` get no update (``W0`` is kept there). Tensors that are not 2-D take the
weighted mean of the task vectors.

Two equivalent forms, the smaller one runs (``ActMatDiagnostics.form``):

* ``"inputs"`` (``n <= T m``): the ``[n, n]`` system above, from running sums whose memory
  does not grow with the number of experts.
* ``"tasks"`` (``T m < n``): stacking ``D~ = [sqrt(w_1) D_1; ...; sqrt(w_T) D_T]``
  (``[T m, n]``), ``sum_t w_t G_t = D~^T D~`` and ``D~ (D~^T D~)^+ = (D~ D~^T)^+ D~`` give
  ``D* = H (D~ D~^T)^+ D~`` with ``H = [sqrt(w_1) D_1 D_1^T, ..., sqrt(w_T) D_T D_T^T]``,
  a ``[T m, T m]`` pseudo-inverse (docs/family.md, "ACTMat", with weights).

The pseudo-inverse is never formed: the symmetric PSD Gram is diagonalized (``eigh``) and
eigenvalues at or below ``rtol`` times the largest are treated as zero (the same cut-off in
both forms, so they agree; :mod:`~mergekit_ace.kernels.cutoffs`). ``rtol`` is a parameter of
the method, not of the precision: the default ``"auto"`` is ``max(T m, n) * 2^-23``,
``torch.linalg.pinv``'s default tolerance for a float32 Gram, in float64 too, so
``dtype: float64`` computes the same merge as float32 (to rounding).
Since the Gram's eigenvalues are squared singular values of ``D~``, directions whose singular
value is below ``sqrt(rtol) * sigma_max`` (about ``2e-2 sigma_max`` for a 4096-wide layer)
count as outside the span, and so do eigenvalues at or below the square of the stack's storage
rounding noise (``noise_floor``, docs/method.md).

Accuracy: with ``A = sum_t w_t G_t``, ``sum_t w_t G_t A^+ = A A^+`` is the projector ``Pi``
onto the kept row space, so with ``mean`` the weighted mean task vector,
``D* = mean Pi + (sum_t w_t (D_t - mean) G_t) A^+`` exactly. The kernel computes it that way:
only the tasks' disagreement goes through the ill-conditioned ``A^+`` (whose rounding error
grows with the cube of the condition number), and one task gives ``D_1 Pi = D_1`` to rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch

from mergekit_ace.kernels.cutoffs import actmat_auto_rtol
from mergekit_ace.kernels.datafree import DataFreeDiagnostics, merge_tensor, storage_floor
from mergekit_ace.kernels.linalg import psd_range
from mergekit_ace.kernels.parameters import (
    DROP_NOISE,
    LAMBDA,
    NOISE_FLOOR,
    WEIGHT,
    Parameter,
    ParameterTable,
    number_or_word,
)
from mergekit_ace.kernels.storage_noise import stacked as stacked_noise
from mergekit_ace.kernels.task_vectors import TaskVectors, weighted_mean_delta

ACTMAT_PARAMETERS = ParameterTable(
    "actmat",
    (
        Parameter(
            "rtol",
            "auto",
            number_or_word("rtol", "auto", 0.0, "a number in [0, 1)", 1.0, below_high=True),
            "eigenvalues of the Gram at or below rtol * largest count as zero; auto: "
            "max(T m, n) * 2^-23, the float32 pinv tolerance, in every dtype",
        ),
        LAMBDA,
        WEIGHT,
        DROP_NOISE,
        NOISE_FLOOR,
    ),
)


@dataclass
class ActMatDiagnostics(DataFreeDiagnostics):
    """``form``: ``"inputs"`` (``[n, n]`` Gram) or ``"tasks"`` (``[T m, T m]`` Gram);
    ``rtol``: the relative eigenvalue cutoff in force; ``rank``: eigen-directions kept."""

    form: Optional[str] = None
    rtol: Optional[float] = None


def actmat_merge(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    *,
    weights: Optional[Sequence[float]] = None,
    rtol: Union[float, str] = ACTMAT_PARAMETERS.default("rtol"),
    **options: Any,
) -> tuple[torch.Tensor, ActMatDiagnostics]:
    """Merge one tensor with ACTMat; returns ``(W0 + lam * D*, diagnostics)``.

    ``weights`` are per-task objective weights (default all ones, the paper): only their
    ratios matter, 0 leaves a model out. ``rtol``: eigenvalues of the Gram at or below
    ``rtol * lambda_max`` count as zero; ``"auto"`` (default) is ``max(T m, n) * 2^-23`` in
    every compute dtype. ``options``: ``lam`` and the rest of
    :func:`~mergekit_ace.kernels.datafree.merge_tensor`'s.
    """
    rtol = ACTMAT_PARAMETERS.check(rtol=rtol)["rtol"]

    def solve(tv: TaskVectors, diag: ActMatDiagnostics) -> torch.Tensor:
        return _actmat_2d(tv, diag, rtol)

    return merge_tensor(
        ACTMAT_PARAMETERS,
        base,
        experts,
        solve,
        ActMatDiagnostics,
        weights=weights,
        remedy="raise `rtol` (more near-zero directions then count as outside the span) or "
        "compute in float64 (`dtype: float64`)",
        **options,
    )


def _actmat_2d(tv: TaskVectors, diag: ActMatDiagnostics, rtol: Union[float, str]) -> torch.Tensor:
    m, n = tv.base.shape
    T = len(tv.deltas)
    diag.rtol = actmat_auto_rtol(T * m, n) if rtol == "auto" else float(rtol)
    floor = storage_floor(tv, diag, _stack_noise(tv)) ** 2  # of the Gram's eigenvalues
    # Anchored at the weighted mean task vector: sum_t w_t G_t A^+ = Pi (the projector onto
    # the row space), so D* = mean Pi + (sum_t w_t (D_t - mean) G_t) A^+. Exact algebra; it
    # keeps the ill-conditioned solve off the part the tasks agree on (one task: D_1 Pi).
    # Solved in float64 whatever the compute dtype: the Gram squares the condition number,
    # so in float32 an eigenvalue near the cut-off (rtol * lambda_max) carries a relative
    # error of about 2^-23 / rtol = 1 / max(T m, n), and its direction's share of D* with it.
    work = torch.float64
    mean = weighted_mean_delta(tv).to(work)
    if T * m < n:
        diag.form = "tasks"
        roots = [math.sqrt(w) for w in tv.participation.weights]
        stacked = torch.cat([r * d.to(work) for r, d in zip(roots, tv.deltas)], dim=0)  # [T m, n]
        eigenvalues, P = psd_range(stacked @ stacked.T, diag.rtol, floor)
        H = torch.cat(
            [r * ((d.to(work) - mean) @ d.to(work).T) for r, d in zip(roots, tv.deltas)], dim=1
        )
        basis = (stacked.T @ P) / eigenvalues.sqrt()  # right singular vectors of the stack
        correction = ((H @ P) / eigenvalues) @ (P.T @ stacked)
    else:
        diag.form = "inputs"
        gram = mean.new_zeros(n, n)  # sum_t w_t G_t
        rhs = mean.new_zeros(m, n)  # sum_t w_t (D_t - mean) G_t
        for w, d in zip(tv.participation.weights, tv.deltas):
            d = d.to(work)
            G = d.T @ d
            gram.add_(G, alpha=w)
            rhs.addmm_(d - mean, G, alpha=w)
            del G, d
        eigenvalues, basis = psd_range(gram, diag.rtol, floor)
        correction = ((rhs @ basis) / eigenvalues) @ basis.T
    diag.rank = int(eigenvalues.numel())
    return correction.addmm_(mean @ basis, basis.T).to(tv.base.dtype)


def _stack_noise(tv: TaskVectors):
    """The storage rounding noise of the stack ``[sqrt(w_1) D_1; ...; sqrt(w_T) D_T]``, whose
    squared singular values are the Gram's eigenvalues (``None`` without ``tv.noise``)."""
    if not tv.noise:
        return None
    return stacked_noise([x.scaled(w) for x, w in zip(tv.noise, tv.participation.weights)])
