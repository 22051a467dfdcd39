"""The frame the data-free family kernels (ACTMat, TSV-M, Iso-C, Iso-CTS) share.

Each of those methods differs from the others only in how it turns the task vectors of one
2-D tensor into a merged task vector. Everything around that is common and lives here, on the
same building blocks as the ACE kernel: input checks (:mod:`~mergekit_ace.kernels.inputs`),
the participants and their task vectors ``tau_t = W_t - W0`` in float32 (float64 when an input
is) (:mod:`~mergekit_ace.kernels.task_vectors`), the weighted mean of the task vectors for
tensors that are not 2-D, and ``W0 + lam * delta`` refusing non-finite output
(:mod:`~mergekit_ace.kernels.finishing`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, TypeVar

import torch

from mergekit_ace.kernels.finishing import FLOAT64_REMEDY, finish
from mergekit_ace.kernels.inputs import MergeInputError, prepare
from mergekit_ace.kernels.parameters import DROP_NOISE, LAMBDA, NOISE_FLOOR, ParameterTable
from mergekit_ace.kernels.task_vectors import (
    MergeDiagnostics,
    TaskVectors,
    task_vectors,
    weighted_mean_delta,
)


@dataclass
class DataFreeDiagnostics(MergeDiagnostics):
    """What a data-free family kernel did with one tensor (:class:`~mergekit_ace.kernels.
    task_vectors.MergeDiagnostics`; ``branch`` is the method's name for its 2-D computation).
    ``rank`` is the number of directions the merged task vector was built from; ``reason``
    says why a 2-D tensor was averaged instead (a method's documented fallback);
    ``noise_floor`` the largest singular value of the experts' storage rounding noise that a
    rank decision left out below (``None`` with ``noise_floor=False``)."""

    rank: int = 0
    reason: Optional[str] = None
    noise_floor: Optional[float] = None


D = TypeVar("D", bound=DataFreeDiagnostics)


def merge_tensor(
    table: ParameterTable,
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    solve_2d: Callable[[TaskVectors, D], torch.Tensor],
    diagnostics: Callable[..., D],
    *,
    weights: Optional[Sequence[float]] = None,
    lam: float = LAMBDA.default,
    compute_dtype: Optional[torch.dtype] = None,
    out_dtype: Optional[torch.dtype] = None,
    tensor_name: Optional[str] = None,
    expert_names: Optional[Sequence[str]] = None,
    drop_noise: bool = DROP_NOISE.default,
    noise_floor: bool = NOISE_FLOOR.default,
    remedy: str = FLOAT64_REMEDY,
) -> tuple[torch.Tensor, D]:
    """Run ``solve_2d(task_vectors, diagnostics) -> merged task vector`` on a 2-D tensor
    inside the shared frame of the method whose parameters are ``table``; returns
    ``(W0 + lam * merged, diagnostics)``.

    The keywords are every family kernel's options: ``weights`` per-task objective weights
    (only for methods whose table has ``weight``; for the others passing any is an error
    rather than a silently ignored setting), ``lam`` the scale of the merged task vector,
    ``compute_dtype`` (default float32, float64 when an input is), ``out_dtype`` (default the
    base tensor's), ``tensor_name`` / ``expert_names`` for messages, and ``drop_noise``
    (default True: leave out experts whose task vector is storage noise), ``noise_floor``
    (default True: directions at the experts' storage rounding noise count as zero in the
    method's rank decisions, :attr:`TaskVectors.noise`). ``remedy`` is the
    method's advice when the merge overflows (:func:`~mergekit_ace.kernels.finishing.finish`).
    """
    checked = table.check(lam=lam, drop_noise=drop_noise, noise_floor=noise_floor)
    if weights is not None and "weight" not in {p.name for p in table}:
        raise MergeInputError(
            f"{table.method} takes no per-task weights (its paper defines none); pass weights=None."
        )
    prepared = prepare(
        base,
        experts,
        weights,
        compute_dtype=compute_dtype,
        out_dtype=out_dtype,
        tensor_name=tensor_name,
        expert_names=expert_names,
    )
    tv = task_vectors(
        base,
        experts,
        prepared.weights,
        prepared.dtype,
        drop_noise=checked["drop_noise"],
        noise_floor=checked["noise_floor"] and base.dim() == 2,
        tensor_name=tensor_name,
        expert_names=expert_names,
    )
    diag = diagnostics.of(tensor_name, base.shape, tv.participation)
    if not tv.deltas:
        return base.to(prepared.out_dtype), diag
    if base.dim() != 2:
        merged = mean_delta(tv, diag, "not a 2-D tensor")
    else:
        diag.branch = table.method
        merged = solve_2d(tv, diag)
    out = finish(tv.base, merged, checked["lam"], prepared.out_dtype, tensor_name, remedy)
    return out, diag


def storage_floor(tv: TaskVectors, diag: DataFreeDiagnostics, noise=None) -> float:
    """The singular-value floor of ``noise`` (a :class:`~mergekit_ace.kernels.storage_noise.
    RoundingNoise`; 0 without ``tv.noise``), recorded in ``diag.noise_floor`` (the largest)."""
    if tv.noise is None or noise is None:
        return 0.0
    floor = noise.floor()
    diag.noise_floor = max(diag.noise_floor or 0.0, floor)
    return floor


def mean_delta(tv: TaskVectors, diag: DataFreeDiagnostics, reason: str) -> torch.Tensor:
    """The (weighted) mean task vector, recorded as the ``"mean"`` branch with ``reason``."""
    diag.branch, diag.reason = "mean", reason
    return weighted_mean_delta(tv)
