"""Iso-CTS kernel: isotropic merging in common and task-specific subspaces.

Marczak, Magistri, Cygert, Twardowski, Bagdanov, van de Weijer, "No Task Left Behind:
Isotropic Model Merging with Common and Task-Specific Subspaces", ICML 2025, arXiv 2502.04959
(https://arxiv.org/abs/2502.04959), Iso-CTS, following the authors' released code.

Per 2-D tensor ``[m, n]``, ``r = min(m, n)``, ``T`` task vectors, ``M = sum_t tau_t``:

1. rank budget: ``k0 = int(r * common_space_fraction)``; each task gets
   ``p = round((r - k0) / T)`` task-specific directions and the common subspace the rest,
   ``k = r - T p`` (the reference code's adjustment that makes the task-specific budget
   divide evenly; ``p`` is capped at ``floor(r / T)`` so that ``k >= 0``);
2. common subspace: the top ``k`` singular triplets ``(U_c, s_c, V_c)`` of ``M``;
3. task-specific subspaces: the top ``p`` singular triplets of each
   ``(I - U_c U_c^T) tau_t``, the part of the task vector outside the common subspace;
4. concatenate common and task-specific ``U`` (``[m, r]``) and ``V`` and replace each by its
   nearest orthonormal matrix (polar factor, as in TSV-M);
5. isotropic scale: ``s_bar`` = mean of the concatenated singular values (``s_c`` and the
   task-specific ones), as the released code computes it (``docs/family.md`` discusses the
   other reading, Iso-C's mean of all the sum's singular values);
6. merged ``s_bar U_perp V_perp^T``, output ``W0 + lam * merged``.

``common_space_fraction = 1`` (or more tasks than rank, ``p = 0``) is exactly Iso-C. Numerically
zero singular triplets are left out as in Iso-C, those of step 3 measured against the task
vector's Frobenius norm (the residual of a low-rank task vector is pure round-off), and those at
the storage rounding noise (of the sum, of each task vector: ``noise_floor``); tensors that
are not 2-D take the mean task vector. Decisions: ``docs/family.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from mergekit_ace.kernels.datafree import merge_tensor, storage_floor
from mergekit_ace.kernels.iso_c import IsoDiagnostics, isotropic, sum_floor, task_sum
from mergekit_ace.kernels.linalg import nearest_orthonormal, top_singular_triplets
from mergekit_ace.kernels.parameters import (
    DROP_NOISE,
    LAMBDA,
    NOISE_FLOOR,
    Parameter,
    ParameterTable,
    number,
)
from mergekit_ace.kernels.task_vectors import TaskVectors

ISO_CTS_PARAMETERS = ParameterTable(
    "iso_cts",
    (
        Parameter(
            "common_space_fraction",
            0.8,
            number("common_space_fraction", 0.0, 1.0, "in [0, 1]"),
            "share of the rank given to the common subspace of the summed task vectors",
        ),
        LAMBDA,
        DROP_NOISE,
        NOISE_FLOOR,
    ),
)


@dataclass
class IsoCtsDiagnostics(IsoDiagnostics):
    """``k_common``: directions of the common subspace; ``per_task``: task-specific
    directions per task (``k_common + T * per_task = r``)."""

    k_common: int = 0
    per_task: int = 0


def rank_budget(r: int, tasks: int, common_space_fraction: float) -> tuple[int, int]:
    """``(k_common, per_task)`` with ``k_common + tasks * per_task == r`` (step 1)."""
    k0 = int(r * common_space_fraction)
    per_task = min(round((r - k0) / tasks), r // tasks)
    return r - tasks * per_task, per_task


def iso_cts_merge(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    *,
    common_space_fraction: float = ISO_CTS_PARAMETERS.default("common_space_fraction"),
    **options: Any,
) -> tuple[torch.Tensor, IsoCtsDiagnostics]:
    """Merge one tensor with Iso-CTS; returns ``(W0 + lam * merged, diagnostics)``.
    ``options``: ``lam`` and the rest of :func:`~mergekit_ace.kernels.datafree.merge_tensor`'s;
    Iso-CTS has no per-task weights."""
    fraction = ISO_CTS_PARAMETERS.check(common_space_fraction=common_space_fraction)[
        "common_space_fraction"
    ]

    def solve(tv: TaskVectors, diag: IsoCtsDiagnostics) -> torch.Tensor:
        return _iso_cts_2d(tv, diag, fraction)

    return merge_tensor(ISO_CTS_PARAMETERS, base, experts, solve, IsoCtsDiagnostics, **options)


def _iso_cts_2d(tv: TaskVectors, diag: IsoCtsDiagnostics, fraction: float) -> torch.Tensor:
    r = min(tv.base.shape)
    diag.k_common, diag.per_task = rank_budget(r, len(tv.deltas), fraction)
    U_c, s_c, Vh_c = top_singular_triplets(task_sum(tv), diag.k_common, floor=sum_floor(tv, diag))
    Us, ss, Vhs = [U_c], [s_c], [Vh_c]
    if diag.per_task > 0:
        noises = tv.noise or [None] * len(tv.deltas)
        for delta, energy, noise in zip(tv.deltas, tv.participation.energies, noises):
            outside = delta - U_c @ (U_c.T @ delta)
            # Numerically zero relative to the task vector, not to the residual: with low-rank
            # experts the residual is pure round-off, and its own scale would keep it.
            floor = storage_floor(tv, diag, noise)
            U, s, Vh = top_singular_triplets(outside, diag.per_task, scale=energy**0.5, floor=floor)
            Us.append(U), ss.append(s), Vhs.append(Vh)
    U, s, Vh = torch.cat(Us, dim=1), torch.cat(ss), torch.cat(Vhs, dim=0)
    if len(Us) > 1 and s.numel():
        U, Vh = nearest_orthonormal(U), nearest_orthonormal(Vh.T).T
    return isotropic(U, s, Vh, diag)
