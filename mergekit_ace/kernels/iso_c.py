"""Iso-C kernel: isotropic merging in the common subspace, one output tensor at a time.

Marczak, Magistri, Cygert, Twardowski, Bagdanov, van de Weijer, "No Task Left Behind:
Isotropic Model Merging with Common and Task-Specific Subspaces", ICML 2025, arXiv 2502.04959
(https://arxiv.org/abs/2502.04959), Iso-C, following the authors' released code.

Per 2-D tensor: the task-arithmetic sum ``M = sum_t tau_t`` is decomposed, ``M = U diag(s)
V^T``, and its spectrum is flattened: every singular value becomes their mean,

    merged = s_bar U V^T,    s_bar = mean_i s_i,    output  W0 + lam * merged.

Decisions (``docs/family.md``): singular values that are numerically zero
(``kernels.cutoffs.rank_tolerance`` of ``s_max``) are left out, both from the mean and from the
directions: their singular vectors are arbitrary, so isotropic scaling would write noise of
size ``s_bar`` along them; so are those at or below the experts' summed storage rounding
noise (``noise_floor``, docs/method.md). For a full-rank sum (full fine-tunes) this is exactly
the reference computation; for a low-rank sum (e.g. LoRA experts) the merge stays inside the
experts' span.
Tensors that are not 2-D take the mean task vector, as the reference code does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from mergekit_ace.kernels.datafree import DataFreeDiagnostics, merge_tensor, storage_floor
from mergekit_ace.kernels.linalg import top_singular_triplets
from mergekit_ace.kernels.parameters import DROP_NOISE, LAMBDA, NOISE_FLOOR, ParameterTable
from mergekit_ace.kernels.storage_noise import total
from mergekit_ace.kernels.task_vectors import TaskVectors

ISO_C_PARAMETERS = ParameterTable("iso_c", (LAMBDA, DROP_NOISE, NOISE_FLOOR))


@dataclass
class IsoDiagnostics(DataFreeDiagnostics):
    """``sigma_iso``: the common singular value ``s_bar`` given to every kept direction."""

    sigma_iso: Optional[float] = None


def iso_c_merge(
    base: torch.Tensor, experts: Sequence[torch.Tensor], **options: Any
) -> tuple[torch.Tensor, IsoDiagnostics]:
    """Merge one tensor with Iso-C; returns ``(W0 + lam * merged, diagnostics)``.
    ``options``: ``lam`` and the rest of :func:`~mergekit_ace.kernels.datafree.merge_tensor`'s;
    Iso-C has no per-task weights."""
    return merge_tensor(ISO_C_PARAMETERS, base, experts, _iso_c_2d, IsoDiagnostics, **options)


def task_sum(tv: TaskVectors) -> torch.Tensor:
    """``sum_t tau_t``: task arithmetic's merged task vector."""
    total = torch.zeros_like(tv.base)
    for delta in tv.deltas:
        total.add_(delta)
    return total


def isotropic(U: torch.Tensor, s: torch.Tensor, Vh: torch.Tensor, diag: IsoDiagnostics):
    """``mean(s) U Vh`` (zero when no direction is left), recording rank and ``s_bar``."""
    diag.rank = int(s.numel())
    if diag.rank == 0:
        return U.new_zeros(U.shape[0], Vh.shape[1])
    diag.sigma_iso = float(s.mean())
    return (U @ Vh).mul_(diag.sigma_iso)


def sum_floor(tv: TaskVectors, diag: IsoDiagnostics) -> float:
    """The storage noise floor of ``sum_t tau_t`` (the experts' rounding errors add)."""
    return storage_floor(tv, diag, total(tv.noise) if tv.noise else None)


def _iso_c_2d(tv: TaskVectors, diag: IsoDiagnostics) -> torch.Tensor:
    U, s, Vh = top_singular_triplets(task_sum(tv), min(tv.base.shape), floor=sum_floor(tv, diag))
    return isotropic(U, s, Vh, diag)
