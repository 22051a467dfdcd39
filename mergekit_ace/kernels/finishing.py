"""The last step of every kernel: ``W0 + lam * merged`` in the output dtype, never NaN or Inf."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from mergekit_ace.kernels.inputs import all_finite, tensor_label

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
    out = (
        merged_delta
        if in_place
        else torch.empty(merged_delta.shape, dtype=out_dtype, device=merged_delta.device)
    )
    for start, stop in blocks:
        rows = merged_delta[start:stop].mul_(lam).add_(base[start:stop].to(merged_delta.dtype))
        _refuse_non_finite(rows, tensor_name, remedy)
        if not in_place:
            out[start:stop] = rows
            _refuse_overflow(out[start:stop], rows, tensor_name)
    return out


def _refuse_non_finite(out: torch.Tensor, tensor_name: Optional[str], remedy: str) -> None:
    if not all_finite(out):
        raise FloatingPointError(
            f"{tensor_label(tensor_name)}: the merge produced non-finite values; refusing to "
            f"write them. To fix: {remedy}."
        )


def _refuse_overflow(cast: torch.Tensor, out: torch.Tensor, tensor_name: Optional[str]) -> None:
    """``out`` is finite; refuse its cast to a narrower dtype when that overflowed to Inf."""
    if not all_finite(cast):
        raise FloatingPointError(
            f"{tensor_label(tensor_name)}: the merged values exceed the range of "
            f"{str(cast.dtype).replace('torch.', '')} (largest |value| "
            f"{float(out.abs().max()):.3g}); refusing to write Inf. Write a wider `out_dtype` "
            "(e.g. bfloat16 or float32) or lower `lambda`."
        )
