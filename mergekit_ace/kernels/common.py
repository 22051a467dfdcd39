"""Pieces every data-free merge kernel shares: input checks, task vectors, task weights.

Pure torch; no mergekit import. Kernels take the base tensor and a sequence of expert tensors
(same shape), plus optional names used only to make error messages point at the culprit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch


class MergeInputError(ValueError):
    """An input that no merge can use; the message names the tensor, the model and the fix."""


def compute_dtype_for(*tensors: torch.Tensor, minimum: torch.dtype = torch.float32) -> torch.dtype:
    """float32 at least; float64 when any input (or ``minimum``) already is."""
    dtype = minimum
    for tensor in tensors:
        if tensor.dtype == torch.float64:
            dtype = torch.float64
    return dtype


def _label(names: Optional[Sequence[str]], index: int, default: str) -> str:
    if names is not None and index < len(names) and names[index] is not None:
        return str(names[index])
    return default


def check_inputs(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    *,
    tensor_name: Optional[str] = None,
    expert_names: Optional[Sequence[str]] = None,
    base_name: Optional[str] = None,
) -> None:
    """Refuse non-finite values and mismatched shapes before any arithmetic."""
    where = f"tensor {tensor_name!r}" if tensor_name else "this tensor"
    if not experts:
        raise MergeInputError(f"{where}: no expert models to merge; list at least one under `models:`.")
    for label, tensor in [(base_name or "the base model", base)] + [
        (_label(expert_names, i, f"expert #{i}"), t) for i, t in enumerate(experts)
    ]:
        if tensor.shape != base.shape:
            raise MergeInputError(
                f"{where}: model {label} has shape {tuple(tensor.shape)} but the base model has "
                f"{tuple(base.shape)}; merge only fine-tunes of the same base (for differing "
                "vocabularies add a `tokenizer:` section so mergekit aligns embedding rows)."
            )
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise MergeInputError(
                f"{where}: model {label} contains {bad} non-finite value(s) (NaN or Inf); "
                "the checkpoint is corrupt or was saved after a diverged run. Re-export it, or "
                "drop it from the merge."
            )


def normalized_weights(
    weights: Optional[Sequence[float]],
    count: int,
    *,
    expert_names: Optional[Sequence[str]] = None,
    tensor_name: Optional[str] = None,
) -> List[float]:
    """Validate per-task weights (non-negative, not all zero); ``None`` means all ones."""
    if weights is None:
        return [1.0] * count
    weights = [float(w) for w in weights]
    if len(weights) != count:
        raise MergeInputError(f"got {len(weights)} weights for {count} experts")
    where = f" (tensor {tensor_name!r})" if tensor_name else ""
    for i, w in enumerate(weights):
        if not (w >= 0.0) or w != w or w == float("inf"):
            raise MergeInputError(
                f"weight of model {_label(expert_names, i, f'expert #{i}')} is {w}{where}; "
                "weights must be finite and >= 0 (use 0 to leave a model out)."
            )
    if sum(weights) <= 0.0:
        raise MergeInputError(
            f"every model's weight is 0{where}; give at least one model a positive weight."
        )
    return weights


def prepare(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    weights: Optional[Sequence[float]],
    *,
    compute_dtype: Optional[torch.dtype],
    out_dtype: Optional[torch.dtype],
    tensor_name: Optional[str],
    expert_names: Optional[Sequence[str]],
) -> tuple[List[float], torch.dtype, torch.dtype]:
    """Every kernel's preamble: refuse bad inputs and weights, then pick the compute dtype
    (float32 at least) and the output dtype (default: the base's). Returns
    ``(weights, compute_dtype, out_dtype)``."""
    check_inputs(base, experts, tensor_name=tensor_name, expert_names=expert_names)
    w_all = normalized_weights(
        weights, len(experts), expert_names=expert_names, tensor_name=tensor_name
    )
    return w_all, compute_dtype or compute_dtype_for(base, *experts), out_dtype or base.dtype


@dataclass
class TaskVectors:
    """Task vectors of the experts that take part in this tensor's merge.

    ``indices`` points back into the caller's expert list; ``weights`` are renormalized to
    mean one over the participants (spec: "Per-model weight"), so equal weights are all ones.
    ``energies`` are ``||tau_t||_F^2`` of the participants (eq. 7), in float64.
    """

    base: torch.Tensor
    deltas: List[torch.Tensor]
    indices: List[int]
    weights: List[float]
    energies: List[float]
    all_energies: List[float]


def task_vectors(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    weights: Sequence[float],
    dtype: torch.dtype,
) -> TaskVectors:
    """``tau_t = W_t - W0`` in ``dtype``, dropping experts whose weight is 0 or that left
    this tensor unchanged (spec, Decisions: a zero task vector must not join the system)."""
    base_c = base.to(dtype)
    deltas, indices, energies, all_energies = [], [], [], []
    for i, expert in enumerate(experts):
        delta = expert.to(dtype) - base_c
        energy = float(torch.linalg.vector_norm(delta, dtype=torch.float64) ** 2)
        all_energies.append(energy)
        if energy == 0.0 or weights[i] == 0.0:
            continue
        deltas.append(delta)
        indices.append(i)
        energies.append(energy)
    kept = [weights[i] for i in indices]
    total = sum(kept)
    kept = [len(kept) * w / total for w in kept] if kept else []
    return TaskVectors(base_c, deltas, indices, kept, energies, all_energies)


def weighted_mean_delta(tv: TaskVectors) -> torch.Tensor:
    """``sum_t w_t tau_t / sum_t w_t``: how every method merges tensors that are not 2-D."""
    acc = torch.zeros_like(tv.base)
    for w, delta in zip(tv.weights, tv.deltas):
        acc.add_(delta, alpha=w)
    return acc / sum(tv.weights)


def finish(
    base: torch.Tensor,
    merged_delta: torch.Tensor,
    lam: float,
    out_dtype: torch.dtype,
    tensor_name: Optional[str],
) -> torch.Tensor:
    """``W0 + lam * delta`` cast to ``out_dtype``; never returns NaN or Inf."""
    out = base.add(merged_delta, alpha=lam)
    _refuse_non_finite(out, tensor_name)
    return out.to(out_dtype)


def finish_rows(
    base: torch.Tensor,
    merged_delta: torch.Tensor,
    lam: float,
    out_dtype: torch.dtype,
    tensor_name: Optional[str],
    blocks: Sequence[tuple],
) -> torch.Tensor:
    """:func:`finish` a block of rows at a time, overwriting ``merged_delta`` (a 2-D tensor in
    the compute dtype): no full-size temporary besides the output when ``out_dtype`` differs
    from the compute dtype, none at all when it does not."""
    in_place = out_dtype == merged_delta.dtype
    out = merged_delta if in_place else torch.empty(
        merged_delta.shape, dtype=out_dtype, device=merged_delta.device
    )
    for start, stop in blocks:
        rows = merged_delta[start:stop].mul_(lam).add_(base[start:stop].to(merged_delta.dtype))
        _refuse_non_finite(rows, tensor_name)
        if not in_place:
            out[start:stop] = rows
    return out


def _refuse_non_finite(out: torch.Tensor, tensor_name: Optional[str]) -> None:
    if not bool(torch.isfinite(out).all()):
        where = f"tensor {tensor_name!r}" if tensor_name else "this tensor"
        raise FloatingPointError(
            f"{where}: the merge produced non-finite values; refusing to write them. Raise `eps` "
            "for this tensor (it regularizes the system) or compute in float64 (`dtype: float64`)."
        )
