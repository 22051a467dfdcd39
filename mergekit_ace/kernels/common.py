"""Pieces every data-free merge kernel shares: input checks, task vectors, task weights.

Pure torch; no mergekit import. Kernels take the base tensor and a sequence of expert tensors
(same shape), plus optional names used only to make error messages point at the culprit.
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch

logger = logging.getLogger(__name__)

# A task vector is storage noise when the expert's tensor differs from the base tensor, stored
# in the expert's own precision, by at most this fraction of that precision's unit round-off
# (relative to ||W0||_F): see ``storage_noise`` and docs/method.md, "Experts at storage noise".
NOISE_FRACTION = 2.0**-8
# Formats coarser than float32 that a checkpoint may have been saved in before being read
# back (or upcast by mergekit's ``dtype:``), coarsest first.
_STORAGE_FORMATS = (torch.bfloat16, torch.float16)


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
    finite: bool = True,
) -> None:
    """Refuse non-finite values and mismatched shapes before any arithmetic. ``finite=False``
    checks the shapes only: for a caller that reads every value anyway and calls again with
    ``finite=True`` when a sum comes out non-finite."""
    where = f"tensor {tensor_name!r}" if tensor_name else "this tensor"
    if not experts:
        raise MergeInputError(f"{where}: no expert models to merge; list at least one under `models:`.")
    check_shapes(base.shape, [t.shape for t in experts], tensor_name=tensor_name,
                 expert_names=expert_names)
    for label, tensor in [(base_name or "the base model", base)] + [
        (_label(expert_names, i, f"expert #{i}"), t) for i, t in enumerate(experts)
    ]:
        if finite and tensor.is_floating_point() and not all_finite(tensor):
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
    where = f"tensor {tensor_name!r}" if tensor_name else "this tensor"
    for i, shape in enumerate(expert_shapes):
        if tuple(shape) != tuple(base_shape):
            raise MergeInputError(
                f"{where}: model {_label(expert_names, i, f'expert #{i}')} has shape "
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
    check_finite: bool = True,
) -> tuple[List[float], torch.dtype, torch.dtype]:
    """Every kernel's preamble: refuse bad inputs and weights, then pick the compute dtype
    (float32 at least) and the output dtype (default: the base's). Returns
    ``(weights, compute_dtype, out_dtype)``. ``check_finite=False``: see
    :func:`check_inputs`'s ``finite``."""
    check_inputs(base, experts, tensor_name=tensor_name, expert_names=expert_names,
                 finite=check_finite)
    w_all = normalized_weights(
        weights, len(experts), expert_names=expert_names, tensor_name=tensor_name
    )
    return w_all, compute_dtype or compute_dtype_for(base, *experts), out_dtype or base.dtype


@dataclass
class TaskVectors:
    """Task vectors of the experts that take part in this tensor's merge.

    ``indices`` points back into the caller's expert list; ``weights`` are renormalized to
    mean one over the participants (docs/method.md, "Per-model weight"), so equal weights are
    all ones. ``energies`` are ``||tau_t||_F^2`` of the participants (eq. 7), in float64.
    ``noise`` lists the experts (input indices) whose task vector is storage noise
    (:func:`storage_noise`), whether or not they were left out.
    """

    base: torch.Tensor
    deltas: List[torch.Tensor]
    indices: List[int]
    weights: List[float]
    energies: List[float]
    all_energies: List[float]
    noise: List[int] = field(default_factory=list)


def unit_roundoff(dtype: torch.dtype) -> float:
    """Half the machine epsilon: the largest relative error of rounding to ``dtype``."""
    return torch.finfo(dtype).eps / 2


def _row_blocks(tensor: torch.Tensor, step: Optional[int]):
    """``tensor`` a block of ``step`` rows at a time (whole when ``step`` is None or 0-D)."""
    if step is None or tensor.dim() == 0:
        yield tensor
        return
    for start in range(0, tensor.shape[0], step):
        yield tensor[start : start + step]


def frobenius(tensor: torch.Tensor, step: Optional[int] = None) -> float:
    """``||tensor||_F`` in float64, a block of ``step`` rows at a time."""
    return math.sqrt(sum(
        float(torch.linalg.vector_norm(b, dtype=torch.float64)) ** 2
        for b in _row_blocks(tensor, step)
    ))


def storage_precision(tensor: torch.Tensor, step: Optional[int] = None) -> torch.dtype:
    """The coarsest of bfloat16, float16 and ``tensor.dtype`` that holds every value of
    ``tensor`` exactly: the precision the checkpoint was really saved in, also after a
    bfloat16 file was read back as float32 (mergekit's ``dtype:`` upcasts every input).
    ``step``: rows per block (no full-size temporary)."""
    own = unit_roundoff(tensor.dtype)
    for fmt in _STORAGE_FORMATS:
        if unit_roundoff(fmt) > own and all(
            _holds_exactly(b, fmt) for b in _row_blocks(tensor, step)
        ):
            return fmt
    return tensor.dtype


def _holds_exactly(block: torch.Tensor, fmt: torch.dtype) -> bool:
    """Every value of ``block`` is representable in ``fmt``. For float32 data and bfloat16
    this is a bit test (the low 16 bits of every value are zero), read in place."""
    if (block.dtype == torch.float32 and fmt == torch.bfloat16 and block.is_contiguous()
            and sys.byteorder == "little"):
        low_halves = block.view(torch.int16)[..., 0::2]  # little-endian: the low 16 bits
        return not bool(low_halves.any())
    if (block.dtype == torch.float32 and fmt == torch.float16 and block.is_contiguous()
            and sys.byteorder == "little"):
        # float16 keeps 10 of float32's 23 mantissa bits: the low 13 must be zero first.
        if bool(block.view(torch.int16)[..., 0::2].bitwise_and(0x1FFF).any()):
            return False
    return torch.equal(block.to(fmt).to(block.dtype), block)


def storage_noise(
    base: torch.Tensor,
    expert: torch.Tensor,
    energy: float,
    base_norm: float,
    dtype: torch.dtype,
    step: Optional[int] = None,
    rounding: Optional[dict] = None,
) -> Optional[torch.dtype]:
    """The storage precision ``p`` of ``expert`` if its task vector is storage noise, else None.

    Storage noise: the expert's tensor equals the base tensor rounded to ``p`` (what saving
    the base in the expert's format writes), up to
    ``||W_t - fl_p(W0)||_F <= NOISE_FRACTION * u_p * ||W0||_F`` with ``u_p`` the unit
    round-off of ``p``. Such a task vector is the rounding error of re-storing the base
    (``||fl_p(W0) - W0||_F <= u_p ||W0||_F``), not a fine-tuning update. ``energy`` is
    ``||tau_t||_F^2``, ``base_norm`` ``||W0||_F``, ``dtype`` the compute dtype, ``step`` the
    rows per block. ``rounding``: a dict the caller keeps for one base tensor, so that the
    base's own rounding errors ``||fl_p(W0) - W0||_F`` are measured once for all experts.

    A task vector larger than ``NOISE_FRACTION * u_p * ||W0|| + ||fl_p(W0) - W0||`` for every
    candidate ``p`` cannot be noise (triangle inequality) and is not looked at further: for a
    base stored in bfloat16 that bound is ``2^-16 ||W0||``, so real experts cost nothing here.
    """
    coarsest = unit_roundoff(_STORAGE_FORMATS[0])
    size = math.sqrt(energy)
    if size > (1.0 + NOISE_FRACTION) * coarsest * base_norm:
        return None  # larger than any rounding of the base: cheap exit for real experts
    if rounding is not None:
        candidates = [expert.dtype] + [
            f for f in _STORAGE_FORMATS if unit_roundoff(f) > unit_roundoff(expert.dtype)
        ]
        if all(size > 1.01 * NOISE_FRACTION * unit_roundoff(f) * base_norm
               + 1.01 * _rounding_error(base, f, rounding, step) for f in candidates):
            return None
    fmt = storage_precision(expert, step)
    squares = 0.0
    for b, e in zip(_row_blocks(base, step), _row_blocks(expert, step)):
        d = e.to(dtype) - b.to(fmt).to(dtype)
        squares += float(torch.linalg.vector_norm(d, dtype=torch.float64)) ** 2
    limit = NOISE_FRACTION * unit_roundoff(fmt) * base_norm
    return fmt if math.sqrt(squares) <= limit else None


def _rounding_error(base: torch.Tensor, fmt: torch.dtype, cache: dict,
                    step: Optional[int]) -> float:
    """``||fl_fmt(W0) - W0||_F`` (0 where ``fmt`` holds ``W0`` exactly), cached in ``cache``."""
    if fmt not in cache:
        cache[fmt] = 0.0 if unit_roundoff(fmt) <= unit_roundoff(base.dtype) else math.sqrt(sum(
            float(torch.linalg.vector_norm(b.to(fmt).to(b.dtype) - b, dtype=torch.float64)) ** 2
            for b in _row_blocks(base, step)
        ))
    return cache[fmt]


def is_storage_noise(
    base: torch.Tensor,
    expert: torch.Tensor,
    energy: float,
    base_norm: float,
    dtype: torch.dtype,
    *,
    index: int,
    drop_noise: bool,
    tensor_name: Optional[str],
    expert_names: Optional[Sequence[str]],
    step: Optional[int] = None,
    rounding: Optional[dict] = None,
) -> bool:
    """:func:`storage_noise` for expert ``index``, logged when it is (whether or not
    ``drop_noise`` leaves it out)."""
    fmt = storage_noise(base, expert, energy, base_norm, dtype, step, rounding)
    if fmt is None:
        return False
    _report_noise(_label(expert_names, index, f"expert #{index}"), tensor_name, fmt, drop_noise)
    return True


class OncePerKey:
    """A kernel report that goes to the log as a warning the first time for each key and at
    debug level after that (``later`` is appended to the warning to say so), counting every
    report; :func:`reset_reports` starts all of them afresh (``run_merge`` does, per merge)."""

    def __init__(self, later: str):
        self.later = later
        self.counts: dict = {}
        _REPORTS.append(self)

    def log(self, key, message: str) -> None:
        first = key not in self.counts
        self.counts[key] = self.counts.get(key, 0) + 1
        if first:
            logger.warning("%s%s", message, self.later)
        else:
            logger.debug("%s", message)

    def total(self) -> int:
        return sum(self.counts.values())


_REPORTS: List[OncePerKey] = []


def reset_reports() -> None:
    for report in _REPORTS:
        report.counts = {}


_noise_reports = OncePerKey(" Further tensors of this model are reported at debug level.")


def _report_noise(label: str, tensor_name: Optional[str], fmt: torch.dtype, dropped: bool) -> None:
    """Warn once per model (later tensors of the same model at debug level)."""
    what = (
        "left out of the merge (set `drop_noise: false` to keep it)" if dropped
        else "kept in the merge because `drop_noise` is false"
    )
    _noise_reports.log(label, (
        f"model {label}: its tensor {repr(tensor_name) if tensor_name else '(unnamed)'} equals "
        f"the base model's stored as {str(fmt).replace('torch.', '')}, up to rounding: the "
        f"task vector is storage noise, not a fine-tuning update; {what}."
    ))


def task_vectors(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    weights: Sequence[float],
    dtype: torch.dtype,
    *,
    drop_noise: bool = True,
    tensor_name: Optional[str] = None,
    expert_names: Optional[Sequence[str]] = None,
) -> TaskVectors:
    """``tau_t = W_t - W0`` in ``dtype``, dropping experts whose weight is 0 or that left
    this tensor unchanged (docs/method.md, "Decisions": a zero task vector must not join the
    system), and, with ``drop_noise``, those whose task vector is storage noise
    (:func:`storage_noise`; such experts are logged either way)."""
    base_c = base.to(dtype)
    base_norm: Optional[float] = None
    rounding: dict = {}
    deltas, indices, energies, all_energies, noise = [], [], [], [], []
    for i, expert in enumerate(experts):
        delta = expert.to(dtype) - base_c
        energy = float(torch.linalg.vector_norm(delta, dtype=torch.float64) ** 2)
        all_energies.append(energy)
        if energy == 0.0 or weights[i] == 0.0:
            continue
        if base_norm is None:
            base_norm = frobenius(base)
        if is_storage_noise(base, expert, energy, base_norm, dtype, index=i, drop_noise=drop_noise,
                            rounding=rounding,
                            tensor_name=tensor_name, expert_names=expert_names):
            noise.append(i)
            if drop_noise:
                continue
        deltas.append(delta)
        indices.append(i)
        energies.append(energy)
    kept = mean_one([weights[i] for i in indices])
    return TaskVectors(base_c, deltas, indices, kept, energies, all_energies, noise)


def mean_one(weights: Sequence[float]) -> List[float]:
    """The participants' weights rescaled to mean one (docs/method.md, "Per-model weight"):
    only their ratios matter, and equal weights are all ones."""
    total = sum(weights)
    return [len(weights) * w / total for w in weights] if weights else []


def weighted_mean_delta(tv: TaskVectors) -> torch.Tensor:
    """``sum_t w_t tau_t / sum_t w_t``: how every method merges tensors that are not 2-D."""
    acc = torch.zeros_like(tv.base)
    for w, delta in zip(tv.weights, tv.deltas):
        acc.add_(delta, alpha=w)
    return acc / sum(tv.weights)


FLOAT64_REMEDY = "compute in float64 (`dtype: float64`)"


def finish(
    base: torch.Tensor,
    merged_delta: torch.Tensor,
    lam: float,
    out_dtype: torch.dtype,
    tensor_name: Optional[str],
    remedy: str = FLOAT64_REMEDY,
) -> torch.Tensor:
    """``W0 + lam * delta`` cast to ``out_dtype``; never returns NaN or Inf.

    ``remedy`` completes the error message with what the user of this method can change
    (each method passes its own: only ACE has an ``eps``)."""
    out = base.add(merged_delta, alpha=lam)
    _refuse_non_finite(out, tensor_name, remedy)
    cast = out.to(out_dtype)
    _refuse_overflow(cast, out, tensor_name)
    return cast


def finish_rows(
    base: torch.Tensor,
    merged_delta: torch.Tensor,
    lam: float,
    out_dtype: torch.dtype,
    tensor_name: Optional[str],
    blocks: Sequence[tuple],
    remedy: str = FLOAT64_REMEDY,
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
        _refuse_non_finite(rows, tensor_name, remedy)
        if not in_place:
            out[start:stop] = rows
            _refuse_overflow(out[start:stop], rows, tensor_name)
    return out


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or Inf in ``tensor``: one summing pass (a NaN or Inf makes the sum non-finite),
    with the elementwise test only when the sum is not finite (which a sum that overflows
    from finite values also is)."""
    if bool(torch.isfinite(tensor.sum())):
        return True
    return bool(torch.isfinite(tensor).all())


def _refuse_non_finite(out: torch.Tensor, tensor_name: Optional[str], remedy: str) -> None:
    if not all_finite(out):
        raise FloatingPointError(
            f"{_where(tensor_name)}: the merge produced non-finite values; refusing to write "
            f"them. To fix: {remedy}."
        )


def _refuse_overflow(cast: torch.Tensor, out: torch.Tensor, tensor_name: Optional[str]) -> None:
    """``out`` is finite; refuse its cast to a narrower dtype when that overflowed to Inf."""
    if not all_finite(cast):
        raise FloatingPointError(
            f"{_where(tensor_name)}: the merged values exceed the range of "
            f"{str(cast.dtype).replace('torch.', '')} (largest |value| "
            f"{float(out.abs().max()):.3g}); refusing to write Inf. Write a wider `out_dtype` "
            "(e.g. bfloat16 or float32) or lower `lambda`."
        )


def _where(tensor_name: Optional[str]) -> str:
    return f"tensor {tensor_name!r}" if tensor_name else "this tensor"
