"""Before the gate: one pass over each expert of a 2-D tensor, a block of rows at a time (no
``[m, n]`` temporary), for its energy ``||tau_t||_F^2`` (eq. 7) and its column mean ``mu_t``
(eq. 5), and who takes part (:func:`~mergekit_ace.kernels.task_vectors.participation`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from mergekit_ace.kernels.ace.settings import AceSettings
from mergekit_ace.kernels.ace.workspace import scan_block_rows
from mergekit_ace.kernels.inputs import check_inputs
from mergekit_ace.kernels.storage_noise import NoiseCheck, frobenius
from mergekit_ace.kernels.task_vectors import Participation, participation


@dataclass
class Scan:
    """Who takes part (:class:`~mergekit_ace.kernels.task_vectors.Participation`) and each
    participant's column mean ``mu_t`` in the compute dtype."""

    participation: Participation
    means: List[torch.Tensor]


def task_vector_rows(base, expert, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
    """``(W_t - W0)[start:stop]`` in ``dtype`` with one temporary (the result)."""
    if expert.dtype == dtype:
        return torch.sub(expert[start:stop], base[start:stop].to(dtype))
    return expert[start:stop].to(dtype).sub_(base[start:stop])


def scan_experts(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    weights: Sequence[float],
    settings: AceSettings,
    *,
    tensor_name: Optional[str],
    expert_names: Optional[Sequence[str]],
) -> Scan:
    """Energies, column means and participants of a 2-D tensor's experts. The finite check of
    the inputs reads the energies: a NaN or Inf makes a sum non-finite."""
    m, n = base.shape
    dtype = settings.dtype
    step = scan_block_rows(m, n, settings.element_bytes)
    sums: Dict[int, torch.Tensor] = {}

    def energy_of(i: int) -> float:
        energy = 0.0
        column_sum = torch.zeros(n, dtype=torch.float64, device=base.device)
        for start in range(0, m, step):
            d = task_vector_rows(base, experts[i], start, start + step, dtype)
            # In the compute dtype (pairwise summation), accumulated in float64 across blocks:
            # a float64 copy of each block would cost more than the sums.
            energy += float(torch.linalg.vector_norm(d)) ** 2
            column_sum.add_(d.sum(dim=0))
            del d
        sums[i] = column_sum
        if not math.isfinite(energy):  # a NaN or Inf in the expert or the base
            check_inputs(base, experts, tensor_name=tensor_name, expert_names=expert_names)
            energy = frobenius(task_vector_rows(base, experts[i], 0, m, torch.float64)) ** 2
        return energy

    is_noise = NoiseCheck(
        base,
        dtype,
        drop_noise=settings.drop_noise,
        tensor_name=tensor_name,
        expert_names=expert_names,
        step=step,
    )
    who = participation(experts, weights, energy_of, is_noise)
    return Scan(who, [(sums[i] / m).to(dtype) for i in who.indices])
