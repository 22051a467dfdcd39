"""Who takes part in a tensor's merge, their task vectors ``W_t - W0``, and the record every
kernel's diagnostics start from.

An expert takes part in a tensor's merge unless its weight is 0, its task vector is zero (it
did not change the tensor: docs/method.md, "Decisions"), or, with ``drop_noise``, its task
vector is storage noise (:mod:`~mergekit_ace.kernels.storage_noise`). :func:`participation`
applies that rule once for every kernel; the caller says how an expert's energy is measured.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, List, Optional, Sequence

import torch

from mergekit_ace.kernels.storage_noise import NoiseCheck, RoundingNoise, rounding_noise


@dataclass
class Participation:
    """``indices`` point back into the caller's expert list; ``weights`` are renormalized to
    mean one over them (docs/method.md, "Per-model weight"), so equal weights are all ones;
    ``energies`` are their ``||tau_t||_F^2`` (eq. 7), ``all_energies`` every expert's;
    ``noise`` lists the experts whose task vector is storage noise, whether or not they were
    left out."""

    indices: List[int]
    weights: List[float]
    energies: List[float]
    all_energies: List[float]
    noise: List[int] = field(default_factory=list)


def participation(
    experts: Sequence[torch.Tensor],
    weights: Sequence[float],
    energy_of: Callable[[int], float],
    is_noise: NoiseCheck,
) -> Participation:
    """Apply the participation rule to every expert; ``energy_of(i)`` measures expert ``i``'s
    ``||tau_i||_F^2`` (and may keep what else the caller needs from that pass)."""
    indices, energies, all_energies, noise = [], [], [], []
    for i, expert in enumerate(experts):
        energy = energy_of(i)
        all_energies.append(energy)
        if energy == 0.0 or weights[i] == 0.0:
            continue
        if is_noise(i, expert, energy):
            noise.append(i)
            if is_noise.drop_noise:
                continue
        indices.append(i)
        energies.append(energy)
    kept = mean_one([weights[i] for i in indices])
    return Participation(indices, kept, energies, all_energies, noise)


def mean_one(weights: Sequence[float]) -> List[float]:
    """The participants' weights rescaled to mean one (docs/method.md, "Per-model weight"):
    only their ratios matter, and equal weights are all ones."""
    total = sum(weights)
    return [len(weights) * w / total for w in weights] if weights else []


@dataclass
class TaskVectors:
    """The participants' task vectors ``deltas`` in the compute dtype, beside the base tensor
    in that dtype; ``noise``: each participant's storage rounding noise
    (:func:`~mergekit_ace.kernels.storage_noise.rounding_noise`), where asked for."""

    base: torch.Tensor
    deltas: List[torch.Tensor]
    participation: Participation
    noise: Optional[List[RoundingNoise]] = None


def task_vectors(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    weights: Sequence[float],
    dtype: torch.dtype,
    *,
    drop_noise: bool = True,
    noise_floor: bool = False,
    tensor_name: Optional[str] = None,
    expert_names: Optional[Sequence[str]] = None,
) -> TaskVectors:
    """``tau_t = W_t - W0`` in ``dtype`` for the experts that take part (:func:`participation`);
    ``noise_floor``: with each 2-D participant's storage rounding noise."""
    base_c = base.to(dtype)
    deltas = {}

    def energy_of(i: int) -> float:
        deltas[i] = experts[i].to(dtype) - base_c
        return float(torch.linalg.vector_norm(deltas[i], dtype=torch.float64) ** 2)

    is_noise = NoiseCheck(
        base, dtype, drop_noise=drop_noise, tensor_name=tensor_name, expert_names=expert_names
    )
    who = participation(experts, weights, energy_of, is_noise)
    noise = [rounding_noise(experts[i]) for i in who.indices] if noise_floor else None
    return TaskVectors(base_c, [deltas[i] for i in who.indices], who, noise)


def weighted_mean_delta(tv: TaskVectors) -> torch.Tensor:
    """``sum_t w_t tau_t / sum_t w_t``: how every method merges tensors that are not 2-D."""
    total = torch.zeros_like(tv.base)
    for w, delta in zip(tv.participation.weights, tv.deltas):
        total.add_(delta, alpha=w)
    return total / sum(tv.participation.weights)


@dataclass
class MergeDiagnostics:
    """What every kernel reports for one tensor: ``branch`` (``"unchanged"`` when no expert
    changed it, ``"mean"`` when its task vectors were averaged, else the method's own
    computation), ``energies`` (``||tau_t||_F^2`` of every expert, in input order),
    ``participants`` and their ``weights`` (:class:`Participation`), ``noise`` (experts whose
    task vector is storage noise, left out unless ``drop_noise=False``)."""

    tensor: Optional[str]
    shape: tuple
    branch: str
    energies: List[float]
    participants: List[int]
    weights: List[float]
    noise: List[int] = field(default_factory=list)

    @classmethod
    def of(cls, tensor_name: Optional[str], shape: Sequence[int], who: Participation, **fields):
        """The record of a tensor whose participants are ``who``, before any merging."""
        return cls(
            tensor=tensor_name,
            shape=tuple(shape),
            branch="unchanged",
            energies=who.all_energies,
            participants=who.indices,
            weights=who.weights,
            noise=who.noise,
            **fields,
        )

    def as_dict(self) -> dict:
        return asdict(self)
