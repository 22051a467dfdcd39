"""TSV-M kernel: Task Singular Vectors merge, one output tensor at a time.

Gargiulo, Crisostomi, Bucarelli, Scardapane, Silvestri, Rodolà, "Task Singular Vectors:
Reducing Task Interference in Model Merging", CVPR 2025, arXiv 2412.00081
(https://arxiv.org/abs/2412.00081), TSV-Merge, following the authors' released
implementation.

Per 2-D tensor ``[m, n]`` with ``r = min(m, n)`` and ``T`` task vectors ``tau_t = W_t - W0``:

1. thin SVD ``tau_t = U_t diag(s_t) V_t^T``; keep each task's top ``k = floor(r / T)``
   singular triplets (low-rank compression, the paper's 1/T of the rank per task);
2. concatenate across tasks: ``U = [U_1,k ... U_T,k]`` (``[m, T k]``), ``s``, ``V`` likewise;
3. decorrelate the tasks' subspaces by replacing ``U`` and ``V`` with their nearest
   orthonormal matrices (polar factors: ``svd(U) = P S Q^T`` gives ``U_perp = P Q^T``);
4. merged task vector ``U_perp diag(s) V_perp^T``; output ``W0 + lam * merged``.

Decisions (``docs/family.md``): ``T`` counts the experts that changed the tensor; when
``floor(r / T) == 0`` (more tasks than the tensor's rank, e.g. ``[m, 1]`` matrices) there is
no rank to share and the tensor takes the mean task vector instead (the reference code would
write a zero update there); singular triplets whose value is numerically zero
(``kernels.cutoffs.rank_tolerance``) or at the task's storage rounding noise
(``noise_floor``, docs/method.md) are left out before the orthogonalization, since their
vectors are arbitrary; tensors that are not 2-D take the mean task vector (as the reference
code does). Orthogonalization is invariant to the order of the concatenation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Sequence

import torch

from mergekit_ace.kernels.datafree import (
    DataFreeDiagnostics,
    mean_delta,
    merge_tensor,
    storage_floor,
)
from mergekit_ace.kernels.linalg import nearest_orthonormal, top_singular_triplets
from mergekit_ace.kernels.parameters import DROP_NOISE, LAMBDA, NOISE_FLOOR, ParameterTable
from mergekit_ace.kernels.task_vectors import TaskVectors

TSV_PARAMETERS = ParameterTable("tsv", (LAMBDA, DROP_NOISE, NOISE_FLOOR))


@dataclass
class TsvDiagnostics(DataFreeDiagnostics):
    """``k``: singular triplets kept per task (``floor(r / T)``); ``kept``: how many of them
    each participant actually contributed (fewer when its task vector has lower rank)."""

    k: int = 0
    kept: List[int] = field(default_factory=list)


def tsv_merge(
    base: torch.Tensor, experts: Sequence[torch.Tensor], **options: Any
) -> tuple[torch.Tensor, TsvDiagnostics]:
    """Merge one tensor with TSV-M; returns ``(W0 + lam * merged, diagnostics)``.
    ``options``: ``lam`` and the rest of :func:`~mergekit_ace.kernels.datafree.merge_tensor`'s;
    TSV-M has no per-task weights."""
    return merge_tensor(TSV_PARAMETERS, base, experts, _tsv_2d, TsvDiagnostics, **options)


def _tsv_2d(tv: TaskVectors, diag: TsvDiagnostics) -> torch.Tensor:
    r = min(tv.base.shape)
    diag.k = r // len(tv.deltas)
    if diag.k == 0:
        return mean_delta(tv, diag, f"floor(r / T) = floor({r} / {len(tv.deltas)}) = 0")
    Us, ss, Vhs = [], [], []
    noises = tv.noise or [None] * len(tv.deltas)
    for delta, noise in zip(tv.deltas, noises):
        U, s, Vh = top_singular_triplets(delta, diag.k, floor=storage_floor(tv, diag, noise))
        Us.append(U), ss.append(s), Vhs.append(Vh)
        diag.kept.append(int(s.numel()))
    s = torch.cat(ss)
    diag.rank = int(s.numel())
    U_perp = nearest_orthonormal(torch.cat(Us, dim=1))
    V_perp = nearest_orthonormal(torch.cat(Vhs, dim=0).T)
    return (U_perp * s) @ V_perp.T
