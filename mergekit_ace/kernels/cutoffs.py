"""Every decision of the kernels that a direction is numerically zero, in one place.

The kernels keep or drop singular or eigen-directions by comparing them with a cut-off that is
a property of the method, not of the compute dtype, so a float64 merge drops the same
directions as a float32 one. The decisions, and who makes them:

- :func:`rank_tolerance` (singular values, through ``linalg.top_singular_triplets``): TSV-M's
  per-task triplets (scale: the task vector's largest singular value), Iso-C's sum (its
  largest), Iso-CTS's common subspace (the sum's largest) and task-specific residuals (the task
  vector's Frobenius norm), ACE's refinement when it runs the SVD (``||F||_F``).
- :func:`actmat_auto_rtol` and :func:`kept_eigenvalues` (eigenvalues of a PSD Gram, through
  ``linalg.psd_range``): ACTMat's pseudo-inverse.
- :data:`GRAM_EIGH_MIN_RATIO`: ACE's refinement takes its top ``k`` directions from the Gram's
  eigendecomposition only while ``s_k >= GRAM_EIGH_MIN_RATIO * s_1`` (``linalg.
  isotropic_projector``), else from the SVD, where :func:`rank_tolerance` applies.
- ``linalg.polar_from_gram`` (the fallback of an SVD that does not converge) keeps the
  eigenvalues above ``k`` float64 epsilons of the largest.

On top of these, with ``noise_floor`` (default on) every one of those decisions also leaves out
the directions at or below the experts' storage rounding noise
(:class:`~mergekit_ace.kernels.storage_noise.RoundingNoise`, its ``floor``; the ``floor``
arguments of ``top_singular_triplets``, ``psd_range`` and ``isotropic_projector``), and ACE's
refinement those at a float32 solve's round-off (``ace.refine.NoiseFloor``).
"""

from __future__ import annotations

import torch

# The unit of every numerical-rank cut-off: float32's machine epsilon (2^-23), whatever the
# compute dtype.
RANK_CUTOFF_UNIT = torch.finfo(torch.float32).eps
# Below this ratio s_k / s_1, dividing by s_k (the Gram's projector) would amplify float32
# round-off beyond what an SVD gives.
GRAM_EIGH_MIN_RATIO = 1e-3


def rank_tolerance(largest: float, shape: tuple) -> float:
    """Numerical-rank cut-off ``largest * max(shape) * 2^-23``: the convention of
    ``numpy.linalg.matrix_rank`` and of ``torch.linalg.pinv``'s default ``rtol`` for a float32
    matrix, in every compute dtype. Singular values at or below it are rounding noise in
    float32; their singular vectors are arbitrary."""
    return float(largest) * max(shape) * RANK_CUTOFF_UNIT


def actmat_auto_rtol(rows: int, cols: int) -> float:
    """ACTMat's default relative eigenvalue cut-off for a Gram of the stack ``[rows, cols]``
    (``[T m, n]``): ``torch.linalg.pinv``'s default tolerance for a float32 matrix."""
    return max(rows, cols) * RANK_CUTOFF_UNIT


def kept_eigenvalues(eigenvalues: torch.Tensor, rtol: float, floor: float = 0.0) -> torch.Tensor:
    """Which eigenvalues of a PSD matrix lie above ``rtol`` times the largest and above
    ``floor`` (none when the largest is not positive)."""
    top = float(eigenvalues.max()) if eigenvalues.numel() else 0.0
    if top > 0.0:
        return eigenvalues > max(rtol * top, floor)
    return torch.zeros_like(eigenvalues, dtype=torch.bool)
