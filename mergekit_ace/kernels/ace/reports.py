"""What the ACE kernel tells beyond the merged tensor: the warning when float round-off can
move a tensor's merged update by more than ``linalg.ACCURACY_WARN``, and, for ``inspect``, the
singular spectra before and after the refinement (the paper's Fig. 2)."""

from __future__ import annotations

import math
from typing import List, Optional

import torch

from mergekit_ace.kernels.ace.parameters import AUTO_CONDITION_BOUND
from mergekit_ace.kernels.linalg import ACCURACY_WARN, unit_roundoff
from mergekit_ace.kernels.reports import OncePerKey

# The paper's Fig. 2 reads spectral concentration off the top 5 % of directions.
TOP_FRACTION = 0.05

accuracy_reports = OncePerKey(" Further tensors with this eps are reported at debug level.")


def report_conditioning(diag, dtype: torch.dtype, eps) -> None:
    """Warn when ``dtype``'s round-off, multiplied by ``diag``'s condition number and the
    refinement's ``boost_ratio``, can change the merged update by more than ``ACCURACY_WARN``
    (once per ``eps`` and dtype, :data:`accuracy_reports`; later tensors at debug level)."""
    if diag.condition is None:
        return
    u = unit_roundoff(dtype)
    amplification = max(1.0, diag.boost_ratio or 1.0)
    loss = diag.condition * u * amplification
    if not loss > ACCURACY_WARN:
        return
    precision = str(dtype).replace("torch.", "")
    what, remedy = _cause_and_remedy(diag, precision, loss, amplification, u)
    rows, cols = diag.shape
    name = repr(diag.tensor) if diag.tensor else "(unnamed)"
    message = (
        f"ACE: tensor {name} ([{rows}, {cols}], {len(diag.participants)} experts, "
        f"eps {eps}): {what}. For this tensor, {remedy}, or compute in float64 "
        "(`dtype: float64`)."
    )
    accuracy_reports.log((str(eps), dtype), message)


def _cause_and_remedy(diag, precision: str, loss: float, amplification: float, u: float):
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
    change = "more than its own size" if loss >= 1 else f"up to {loss:.0%} of its size"
    what = f"its system's condition number is about {diag.condition:.1e}"
    if amplification > 1:
        what += (
            f" and the spectral refinement, boosting {diag.k} directions down to "
            f"1/{amplification:.0f} of the largest singular value, multiplies the solve's "
            f"round-off by {amplification:.0f}"
        )
    what += f", so {precision} round-off can change the merged update by {change}"
    return what, (raise_eps if diag.condition * u > ACCURACY_WARN else "lower `k_frac`")


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
