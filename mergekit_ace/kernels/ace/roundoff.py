"""How far float round-off really moves a tensor's merged update, measured where the bound
``condition * u * boost_ratio`` (:func:`~mergekit_ace.kernels.ace.reports.report_conditioning`)
allows more than ``linalg.ACCURACY_WARN`` (docs/method.md, "Round-off: bound and measurement").

The bound is a worst case: on real experts it is 100x to 1000x above the distance between a
float32 and a float64 merge. The measurement computes the update a second time from the same
inputs with their rows and columns in another order. ACE commutes with such permutations
(centering, Grams, trace normalization, the prior's mean row, the solve and the spectral
refinement all do), so in exact arithmetic both results are equal; in floating point every
long sum runs in another order and the Cholesky factor pivots in another order, so the two
round-off errors are nearly independent and their difference is about ``sqrt(2)`` times either
one's distance from the exact result.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Callable, Optional, Sequence

import torch

from mergekit_ace.kernels.inputs import TensorNames

logger = logging.getLogger(__name__)

# The permutations are fixed: a merge is reproducible.
PERMUTATION_SEED = 0


def permutations(m: int, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed row and column permutation of an ``[m, n]`` tensor."""
    g = torch.Generator().manual_seed(PERMUTATION_SEED)
    return torch.randperm(m, generator=g).to(device), torch.randperm(n, generator=g).to(device)


def roundoff_change(
    update: Callable,
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    settings,
    weights: Sequence[float],
    names: TensorNames,
    W: torch.Tensor,
    diag,
) -> Optional[float]:
    """``||W - W'||_F / ||W||_F`` with ``W'`` the update ``update`` (steps 1-6,
    :func:`~mergekit_ace.kernels.ace.merge.merged_update`) computes from the participants of
    ``diag`` with rows and columns permuted, mapped back. ``None`` where it cannot be compared
    (the second computation took another branch or boosted another number of directions, or
    ran out of memory)."""
    rows, cols = permutations(*base.shape, base.device)
    who = diag.participants
    names = TensorNames(names.tensor, [_name(names.experts, i) for i in who])
    try:
        W2, again, _ = update(
            base[rows][:, cols],
            [experts[i][rows][:, cols] for i in who],
            replace(settings, spectra=False),
            weights=[weights[i] for i in who],
            names=names,
        )
    except torch.OutOfMemoryError:
        logger.debug("ACE: tensor %r: no memory to measure round-off", names.tensor)
        return None
    if W2 is None or (again.branch, again.k) != (diag.branch, diag.k):
        return None
    back = torch.empty_like(W2)
    back[rows.unsqueeze(1), cols.unsqueeze(0)] = W2
    del W2
    scale = float(torch.linalg.vector_norm(W, dtype=torch.float64))
    if scale == 0.0:
        return None
    return float(torch.linalg.vector_norm(back.sub_(W), dtype=torch.float64)) / scale


def _name(expert_names: Optional[Sequence[str]], index: int) -> Optional[str]:
    if expert_names is None or index >= len(expert_names):
        return f"expert #{index}"
    return expert_names[index]
