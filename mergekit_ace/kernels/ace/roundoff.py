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

from mergekit_ace.kernels.ace.scan import Scan
from mergekit_ace.kernels.inputs import TensorNames
from mergekit_ace.kernels.task_vectors import Participation

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
    scan: Scan,
    names: TensorNames,
    W: torch.Tensor,
    diag,
) -> Optional[float]:
    """``||W - W'||_F / ||W||_F`` with ``W'`` the update ``update`` (steps 1-6,
    :func:`~mergekit_ace.kernels.ace.merge.merged_update`) computes from the participants of
    ``scan`` with rows and columns permuted, mapped back. ``None`` where it cannot be compared
    (the second computation took another branch or boosted another number of directions, or
    ran out of memory).

    The second computation takes the first one's scan (who takes part, their energies, their
    column means permuted) instead of a pass over every expert of its own: the scan decides
    who takes part and which branch, which two computations must share to be compared."""
    rows, cols = permutations(*base.shape, base.device)
    who = scan.participation.indices
    names = TensorNames(names.tensor, [_name(names.experts, i) for i in who])
    try:
        W2, again, _ = update(
            _permuted(base, rows, cols),
            [_permuted(experts[i], rows, cols) for i in who],
            replace(settings, spectra=False),
            permuted_scan(scan, cols),
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


def permuted_scan(scan: Scan, cols: torch.Tensor) -> Scan:
    """``scan`` for its participants alone (numbered from 0) with their columns permuted by
    ``cols``."""
    who = scan.participation
    position = {i: p for p, i in enumerate(who.indices)}
    participants = Participation(
        list(range(len(who.indices))),
        list(who.weights),
        list(who.energies),
        list(who.energies),
        [position[i] for i in who.noise if i in position],
    )
    return Scan(participants, [mean[cols] for mean in scan.means])


def _permuted(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    return x.index_select(0, rows).index_select(1, cols)


def _name(expert_names: Optional[Sequence[str]], index: int) -> Optional[str]:
    if expert_names is None or index >= len(expert_names):
        return f"expert #{index}"
    return expert_names[index]
