"""What every kernel checks before any arithmetic: shapes, finite values, task weights, and the
dtypes it computes and writes in.

Kernels take the base tensor and a sequence of expert tensors (same shape), plus optional
names used only to make error messages point at the culprit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch


class MergeInputError(ValueError):
    """An input that no merge can use; the message names the tensor, the model and the fix."""


@dataclass(frozen=True)
class TensorNames:
    """The names a kernel's messages use: the output tensor's and the experts' (in input
    order); either may be ``None``."""

    tensor: Optional[str] = None
    experts: Optional[Sequence[str]] = None

    @property
    def keywords(self) -> dict:
        """As the ``tensor_name=`` and ``expert_names=`` keywords of the helpers here."""
        return {"tensor_name": self.tensor, "expert_names": self.experts}


def tensor_label(tensor_name: Optional[str]) -> str:
    return f"tensor {tensor_name!r}" if tensor_name else "this tensor"


def expert_label(expert_names: Optional[Sequence[str]], index: int) -> str:
    if expert_names is not None and index < len(expert_names) and expert_names[index] is not None:
        return str(expert_names[index])
    return f"expert #{index}"


def compute_dtype_for(*tensors: torch.Tensor, minimum: torch.dtype = torch.float32) -> torch.dtype:
    """float32 at least; float64 when any input (or ``minimum``) already is."""
    dtype = minimum
    for tensor in tensors:
        if tensor.dtype == torch.float64:
            dtype = torch.float64
    return dtype


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or Inf in ``tensor``: one summing pass (a NaN or Inf makes the sum non-finite),
    with the elementwise test only when the sum is not finite (which a sum that overflows
    from finite values also is)."""
    if bool(torch.isfinite(tensor.sum())):
        return True
    return bool(torch.isfinite(tensor).all())


def check_inputs(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    *,
    tensor_name: Optional[str] = None,
    expert_names: Optional[Sequence[str]] = None,
    finite: bool = True,
) -> None:
    """Refuse non-finite values and mismatched shapes before any arithmetic. ``finite=False``
    checks the shapes only: for a caller that reads every value anyway and calls again with
    ``finite=True`` when a sum comes out non-finite."""
    where = tensor_label(tensor_name)
    if not experts:
        raise MergeInputError(
            f"{where}: no expert models to merge; list at least one under `models:`."
        )
    check_shapes(
        base.shape, [t.shape for t in experts], tensor_name=tensor_name, expert_names=expert_names
    )
    if not finite:
        return
    labelled = [("the base model", base)]
    labelled += [(expert_label(expert_names, i), t) for i, t in enumerate(experts)]
    for label, tensor in labelled:
        if tensor.is_floating_point() and not all_finite(tensor):
            bad = int((~torch.isfinite(tensor)).sum())
            raise MergeInputError(
                f"{where}: model {label} contains {bad} non-finite value(s) (NaN or Inf); "
                "the checkpoint is corrupt or was saved after a diverged run. Re-export it, or "
                "drop it from the merge."
            )


def check_shapes(
    base_shape: Sequence[int],
    expert_shapes: Sequence[Sequence[int]],
    *,
    tensor_name: Optional[str] = None,
    expert_names: Optional[Sequence[str]] = None,
) -> None:
    """Refuse an expert tensor whose shape differs from the base's, naming the model (also
    usable on shapes read from checkpoint headers, before any tensor is loaded)."""
    for i, shape in enumerate(expert_shapes):
        if tuple(shape) != tuple(base_shape):
            raise MergeInputError(
                f"{tensor_label(tensor_name)}: model {expert_label(expert_names, i)} has shape "
                f"{tuple(shape)} but the base model has {tuple(base_shape)}; merge only "
                "fine-tunes of the same base (for differing vocabularies add a `tokenizer:` "
                "section so mergekit aligns embedding rows)."
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
                f"weight of model {expert_label(expert_names, i)} is {w}{where}; "
                "weights must be finite and >= 0 (use 0 to leave a model out)."
            )
    if sum(weights) <= 0.0:
        raise MergeInputError(
            f"every model's weight is 0{where}; give at least one model a positive weight."
        )
    return weights


@dataclass(frozen=True)
class Prepared:
    """What :func:`prepare` returns: every expert's weight (validated, not yet renormalized)
    and the dtypes the kernel computes and writes in."""

    weights: List[float]
    dtype: torch.dtype
    out_dtype: torch.dtype


def prepare(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    weights: Optional[Sequence[float]],
    *,
    compute_dtype: Optional[torch.dtype],
    out_dtype: Optional[torch.dtype],
    tensor_name: Optional[str],
    expert_names: Optional[Sequence[str]],
    check_finite: bool = True,
) -> Prepared:
    """Every kernel's preamble: refuse bad inputs and weights, then pick the compute dtype
    (float32 at least) and the output dtype (default: the base's). ``check_finite=False``: see
    :func:`check_inputs`'s ``finite``."""
    check_inputs(
        base, experts, tensor_name=tensor_name, expert_names=expert_names, finite=check_finite
    )
    all_weights = normalized_weights(
        weights, len(experts), expert_names=expert_names, tensor_name=tensor_name
    )
    dtype = compute_dtype or compute_dtype_for(base, *experts)
    return Prepared(all_weights, dtype, out_dtype or base.dtype)
