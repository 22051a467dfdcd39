"""The frame the data-free family kernels (ACTMat, TSV-M, Iso-C, Iso-CTS) share.

Each of those methods differs from the others only in how it turns the task vectors of one
2-D tensor into a merged task vector. Everything around that is common and lives here, built
on ``kernels/common.py`` exactly as the ACE kernel uses it: input checks, task vectors
``tau_t = W_t - W0`` in float32 (float64 when an input is), experts that left the tensor
unchanged (or have weight 0) dropped, so are by default those whose task vector is storage
noise (``common.storage_noise``), the weighted mean of the task vectors for tensors that
are not 2-D, and ``finish`` (``W0 + lam * delta``, refusing non-finite output).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, List, Optional, Sequence, TypeVar

import torch

from mergekit_ace.kernels.common import (
    FLOAT64_REMEDY,
    MergeInputError,
    TaskVectors,
    finish,
    prepare,
    task_vectors,
    weighted_mean_delta,
)


@dataclass
class DataFreeDiagnostics:
    """What a data-free family kernel did with one tensor.

    ``branch`` is ``"unchanged"`` when no expert changed the tensor, ``"mean"`` when the
    tensor was merged by averaging task vectors (not 2-D, or a method's documented fallback;
    ``reason`` says which), and the method's name for its own 2-D computation. ``energies``
    lists ``||tau_t||_F^2`` for every expert in input order; ``participants`` the indices of
    those that entered the merge (non-zero task vector, positive weight); ``noise`` those
    whose task vector is storage noise (left out unless ``drop_noise=False``). ``rank`` is the
    number of directions the merged task vector was built from.
    """

    tensor: Optional[str]
    shape: tuple
    branch: str
    energies: List[float]
    participants: List[int]
    weights: List[float]
    rank: int = 0
    reason: Optional[str] = None
    noise: List[int] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


D = TypeVar("D", bound=DataFreeDiagnostics)


def merge_tensor(
    method: str,
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    solve_2d: Callable[[TaskVectors, D], torch.Tensor],
    diagnostics: Callable[..., D],
    *,
    weighted: bool = False,
    weights: Optional[Sequence[float]] = None,
    lam: float = 1.0,
    compute_dtype: Optional[torch.dtype] = None,
    out_dtype: Optional[torch.dtype] = None,
    tensor_name: Optional[str] = None,
    expert_names: Optional[Sequence[str]] = None,
    drop_noise: bool = True,
    remedy: str = FLOAT64_REMEDY,
) -> tuple[torch.Tensor, D]:
    """Run ``solve_2d(task_vectors, diagnostics) -> merged task vector`` on a 2-D tensor
    inside the shared frame; returns ``(W0 + lam * merged, diagnostics)``.

    The keywords after ``weighted`` are every family kernel's options: ``weights`` per-task
    objective weights (only for ``weighted`` methods; for the others passing any is an error
    rather than a silently ignored setting), ``lam`` the scale of the merged task vector,
    ``compute_dtype`` (default float32, float64 when an input is), ``out_dtype`` (default the
    base tensor's), ``tensor_name`` / ``expert_names`` for messages, and ``drop_noise``
    (default True: leave out experts whose task vector is storage noise). ``remedy`` is the
    method's advice when the merge overflows (:func:`~mergekit_ace.kernels.common.finish`).
    """
    if not math.isfinite(lam):
        raise ValueError(f"lambda must be finite, got {lam}")
    if weights is not None and not weighted:
        raise MergeInputError(
            f"{method} takes no per-task weights (its paper defines none); pass weights=None."
        )
    w_all, dtype, out_dtype = prepare(
        base, experts, weights, compute_dtype=compute_dtype, out_dtype=out_dtype,
        tensor_name=tensor_name, expert_names=expert_names,
    )
    tv = task_vectors(
        base, experts, w_all, dtype, drop_noise=drop_noise, tensor_name=tensor_name,
        expert_names=expert_names,
    )
    diag = diagnostics(
        tensor=tensor_name,
        shape=tuple(base.shape),
        branch="unchanged",
        energies=tv.all_energies,
        participants=tv.indices,
        weights=tv.weights,
        noise=tv.noise,
    )
    if not tv.deltas:
        return base.to(out_dtype), diag
    if base.dim() != 2:
        merged = mean_delta(tv, diag, "not a 2-D tensor")
    else:
        diag.branch = method
        merged = solve_2d(tv, diag)
    return finish(tv.base, merged, lam, out_dtype, tensor_name, remedy), diag


def mean_delta(tv: TaskVectors, diag: DataFreeDiagnostics, reason: str) -> torch.Tensor:
    """The (weighted) mean task vector, recorded as the ``"mean"`` branch with ``reason``."""
    diag.branch, diag.reason = "mean", reason
    return weighted_mean_delta(tv)
