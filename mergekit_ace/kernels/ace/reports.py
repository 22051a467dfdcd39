"""What the ACE kernel tells beyond the merged tensor: the warning when float round-off can
move a tensor's merged update by more than ``linalg.ACCURACY_WARN``, and, for ``inspect``, the
singular spectra before and after the refinement (the paper's Fig. 2)."""

from __future__ import annotations

import logging
import math
from typing import List, Optional

import torch

from mergekit_ace.kernels.ace.parameters import AUTO_CONDITION_BOUND
from mergekit_ace.kernels.ace.refine import tie_change
from mergekit_ace.kernels.linalg import ACCURACY_WARN, unit_roundoff
from mergekit_ace.kernels.reports import OncePerKey

# The paper's Fig. 2 reads spectral concentration off the top 5 % of directions.
TOP_FRACTION = 0.05

logger = logging.getLogger(__name__)

accuracy_reports = OncePerKey(" Further tensors with this eps are reported at debug level.")


def report_conditioning(
    diag, dtype: torch.dtype, eps, measure=None, update_norm: Optional[float] = None
) -> None:
    """Warn when ``dtype``'s round-off can change the merged update by more than
    ``ACCURACY_WARN`` (once per ``eps`` and dtype, :data:`accuracy_reports`; later tensors at
    debug level).

    The bound is ``diag``'s condition number times ``dtype``'s unit round-off times the
    refinement's ``boost_ratio``. Where it exceeds ``ACCURACY_WARN`` and the system was solved
    by Cholesky, ``measure(diag)`` (:func:`~mergekit_ace.kernels.ace.roundoff.roundoff_change`)
    gives the measured change, stored as ``diag.roundoff_change``; the warning then fires
    only when that exceeds ``ACCURACY_WARN`` too. A singular or indefinite system always
    warns. A near tie of the ``k``-th and ``(k+1)``-th singular values of ``F`` warns on its
    estimate (:func:`~mergekit_ace.kernels.ace.refine.tie_change`, ``update_norm`` the merged
    update's norm): which of the two is boosted is a toss-up that a second computation
    samples only once. Where the system's own round-off passes ``ACCURACY_WARN``, the
    system is the cause reported."""
    if diag.condition is None:
        return
    u = unit_roundoff(dtype)
    amplification = max(1.0, diag.boost_ratio or 1.0)
    loss = diag.condition * u * amplification
    roundoff = diag.condition * u
    # A tie is the story only where the solve itself is accurate; else the system is.
    tie = (
        tie_change(roundoff, diag.cut_gap, diag.shape, diag.sigma_iso, update_norm)
        if not roundoff > ACCURACY_WARN
        else 0.0
    )
    if not (loss > ACCURACY_WARN or tie > ACCURACY_WARN):
        return
    if loss > ACCURACY_WARN and measure is not None and diag.solver == "cholesky":
        diag.roundoff_change = measure(diag)
    measured = diag.roundoff_change
    name = repr(diag.tensor) if diag.tensor else "(unnamed)"
    if not tie > ACCURACY_WARN and measured is not None and not measured > ACCURACY_WARN:
        logger.debug(
            "ACE: tensor %s: the round-off bound allows %.2g of the merged update, a second "
            "computation in another summation order differs by %.2g; no warning.",
            name,
            loss,
            measured,
        )
        return
    precision = str(dtype).replace("torch.", "")
    what, remedy = _cause_and_remedy(diag, precision, loss, amplification, u, tie)
    rows, cols = diag.shape
    message = (
        f"ACE: tensor {name} ([{rows}, {cols}], {len(diag.participants)} experts, "
        f"eps {eps}): {what}. For this tensor, {remedy}, or compute in float64 "
        "(`dtype: float64`)."
    )
    accuracy_reports.log((str(eps), dtype), message)


def _cause_and_remedy(
    diag, precision: str, loss: float, amplification: float, u: float, tie: float
):
    """What makes round-off large for this tensor, and what to change."""
    raise_eps = (
        f"use `eps: auto` (the default, which bounds the condition number by "
        f"{AUTO_CONDITION_BOUND:.0f}) or a larger `eps`"
    )
    if diag.solver != "cholesky":
        solved_by = "least squares" if diag.solver == "lstsq" else "LU"
        what = (
            f"its system is singular or indefinite in {precision} (solved by {solved_by}), so "
            "round-off can change the merged update by more than its own size"
        )
        return what, raise_eps
    if tie > ACCURACY_WARN:
        tied = f"direction {diag.k} of {min(diag.shape)}"
        return _tie(diag, precision, tie), f"a slightly different `k_frac` (the tie is at {tied})"
    what = f"its system's condition number is about {diag.condition:.1e}"
    if amplification > 1:
        what += (
            f" and the spectral refinement boosts {diag.k} directions down to "
            f"1/{amplification:.0f} of the largest singular value"
        )
    what += f", so {precision} round-off {_change(diag.roundoff_change, loss)}"
    return what, (raise_eps if diag.condition * u > ACCURACY_WARN else "lower `k_frac`")


def _tie(diag, precision: str, tie: float) -> str:
    return (
        f"the spectral refinement boosts the top {diag.k} directions, and singular values "
        f"{diag.k} and {diag.k + 1} of what it refines differ by only {diag.cut_gap:.1e} of its "
        f"norm, so {precision} round-off can decide which of the two directions is boosted and "
        f"change the merged update by up to about {tie:.1%} of its size (estimated)"
    )


def _change(measured: Optional[float], bound: float) -> str:
    """The measured change where there is one, else the bound."""
    if measured is None:
        size = "more than its own size" if bound >= 1 else f"up to {bound:.0%} of its size"
        return f"can change the merged update by {size}"
    size = "more than its own size" if measured >= 1 else f"{measured:.1%} of its size"
    return (
        f"changes the merged update by about {size} (measured: a second computation with "
        "rows and columns in another order differs by that much)"
    )


def concentration(singular_values: torch.Tensor, top_fraction: float = TOP_FRACTION) -> float:
    """Share of ``sum s_i^2`` held by the largest ``ceil(top_fraction * r)`` values."""
    energy = singular_values.double().square()
    total = float(energy.sum())
    if total == 0.0:
        return 0.0
    top = max(1, math.ceil(top_fraction * energy.numel()))
    return float(energy.sort(descending=True).values[:top].sum()) / total


class Spectra:
    """The singular values of ``W_pre`` and of the final ``W`` and their concentration, for
    ``inspect`` (two extra SVDs)."""

    def __init__(self) -> None:
        self.pre: Optional[List[float]] = None
        self.post: Optional[List[float]] = None
        self.concentration_pre: Optional[float] = None
        self.concentration_post: Optional[float] = None

    def before_refinement(self, W_pre: torch.Tensor) -> None:
        s = torch.linalg.svdvals(W_pre)
        self.pre, self.concentration_pre = s.tolist(), concentration(s)

    def after_refinement(self, W: Optional[torch.Tensor]) -> None:
        """``W=None``: nothing was boosted, the spectrum is ``W_pre``'s."""
        if W is None:
            self.post, self.concentration_post = self.pre, self.concentration_pre
            return
        s = torch.linalg.svdvals(W)
        self.post, self.concentration_post = s.tolist(), concentration(s)
