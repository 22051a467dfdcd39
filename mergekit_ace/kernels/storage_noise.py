"""Experts whose task vector is storage noise: the base tensor re-stored in a coarser format
(docs/method.md, "Experts at storage noise").

A task vector is storage noise when the expert's tensor equals the base tensor rounded to the
expert's own storage precision, up to a small fraction of that precision's unit round-off.
:class:`NoiseCheck` applies the test to one tensor's experts and reports what it finds.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Dict, Iterator, Optional, Sequence

import torch

from mergekit_ace.kernels.inputs import expert_label
from mergekit_ace.kernels.linalg import unit_roundoff
from mergekit_ace.kernels.reports import OncePerKey

# The residual ||W_t - fl_p(W0)||_F allowed, as a fraction of u_p ||W0||_F.
NOISE_FRACTION = 2.0**-8
# Formats coarser than float32 that a checkpoint may have been saved in before being read
# back (or upcast by mergekit's ``dtype:``), coarsest first.
STORAGE_FORMATS = (torch.bfloat16, torch.float16)

noise_reports = OncePerKey(" Further tensors of this model are reported at debug level.")


def row_blocks(tensor: torch.Tensor, step: Optional[int]) -> Iterator[torch.Tensor]:
    """``tensor`` a block of ``step`` rows at a time (whole when ``step`` is None or 0-D)."""
    if step is None or tensor.dim() == 0:
        yield tensor
        return
    for start in range(0, tensor.shape[0], step):
        yield tensor[start : start + step]


def frobenius(tensor: torch.Tensor, step: Optional[int] = None) -> float:
    """``||tensor||_F`` in float64, a block of ``step`` rows at a time."""
    return math.sqrt(
        sum(
            float(torch.linalg.vector_norm(b, dtype=torch.float64)) ** 2
            for b in row_blocks(tensor, step)
        )
    )


def storage_precision(tensor: torch.Tensor, step: Optional[int] = None) -> torch.dtype:
    """The coarsest of bfloat16, float16 and ``tensor.dtype`` that holds every value of
    ``tensor`` exactly: the precision the checkpoint was really saved in, also after a
    bfloat16 file was read back as float32 (mergekit's ``dtype:`` upcasts every input).
    ``step``: rows per block (no full-size temporary)."""
    own = unit_roundoff(tensor.dtype)
    for fmt in STORAGE_FORMATS:
        if unit_roundoff(fmt) > own and all(
            holds_exactly(b, fmt) for b in row_blocks(tensor, step)
        ):
            return fmt
    return tensor.dtype


def holds_exactly(block: torch.Tensor, fmt: torch.dtype) -> bool:
    """Every value of ``block`` is representable in ``fmt``. For float32 data this is first a
    bit test read in place (bfloat16 keeps float32's top 16 bits, float16 10 of its 23
    mantissa bits)."""
    bit_test = block.dtype == torch.float32 and block.is_contiguous() and sys.byteorder == "little"
    if bit_test and fmt == torch.bfloat16:
        low_halves = block.view(torch.int16)[..., 0::2]  # little-endian: the low 16 bits
        return not bool(low_halves.any())
    if bit_test and fmt == torch.float16:
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

    Storage noise: ``||W_t - fl_p(W0)||_F <= NOISE_FRACTION * u_p * ||W0||_F`` with ``u_p``
    the unit round-off of ``p``: the task vector is the rounding error of re-storing the base
    (``||fl_p(W0) - W0||_F <= u_p ||W0||_F``), not a fine-tuning update. ``energy`` is
    ``||tau_t||_F^2``, ``base_norm`` ``||W0||_F``, ``dtype`` the compute dtype, ``step`` the
    rows per block. ``rounding``: a dict the caller keeps for one base tensor, so that the
    base's own rounding errors ``||fl_p(W0) - W0||_F`` are measured once for all experts.

    A task vector larger than ``NOISE_FRACTION * u_p * ||W0|| + ||fl_p(W0) - W0||`` for every
    candidate ``p`` cannot be noise (triangle inequality) and is not looked at further: for a
    base stored in bfloat16 that bound is ``2^-16 ||W0||``, so real experts cost nothing here.
    """
    size = math.sqrt(energy)
    if size > (1.0 + NOISE_FRACTION) * unit_roundoff(STORAGE_FORMATS[0]) * base_norm:
        return None  # larger than any rounding of the base
    if rounding is not None and _above_every_rounding(
        base, expert, size, base_norm, step, rounding
    ):
        return None
    fmt = storage_precision(expert, step)
    squares = 0.0
    for b, e in zip(row_blocks(base, step), row_blocks(expert, step)):
        d = e.to(dtype) - b.to(fmt).to(dtype)
        squares += float(torch.linalg.vector_norm(d, dtype=torch.float64)) ** 2
    limit = NOISE_FRACTION * unit_roundoff(fmt) * base_norm
    return fmt if math.sqrt(squares) <= limit else None


def _above_every_rounding(base, expert, size, base_norm, step, rounding) -> bool:
    """``size`` exceeds, for every format the expert could be stored in, the noise limit plus
    the base's own rounding error in that format (1 % margins)."""
    candidates = [expert.dtype] + [
        f for f in STORAGE_FORMATS if unit_roundoff(f) > unit_roundoff(expert.dtype)
    ]
    return all(
        size
        > 1.01 * NOISE_FRACTION * unit_roundoff(f) * base_norm
        + 1.01 * _rounding_error(base, f, rounding, step)
        for f in candidates
    )


def _rounding_error(
    base: torch.Tensor, fmt: torch.dtype, cache: dict, step: Optional[int]
) -> float:
    """``||fl_fmt(W0) - W0||_F`` (0 where ``fmt`` holds ``W0`` exactly), cached in ``cache``."""
    if fmt not in cache:
        if unit_roundoff(fmt) <= unit_roundoff(base.dtype):
            cache[fmt] = 0.0
        else:
            cache[fmt] = math.sqrt(
                sum(
                    float(torch.linalg.vector_norm(b.to(fmt).to(b.dtype) - b, dtype=torch.float64))
                    ** 2
                    for b in row_blocks(base, step)
                )
            )
    return cache[fmt]


class NoiseCheck:
    """:func:`storage_noise` for the experts of one base tensor, with ``||W0||_F`` and the
    base's rounding errors measured once, and each finding reported (once per model as a
    warning, later tensors of that model at debug level), whether or not ``drop_noise`` leaves
    the expert out."""

    def __init__(
        self,
        base: torch.Tensor,
        dtype: torch.dtype,
        *,
        drop_noise: bool,
        tensor_name: Optional[str],
        expert_names: Optional[Sequence[str]],
        step: Optional[int] = None,
    ):
        self.base, self.dtype, self.step = base, dtype, step
        self.drop_noise, self.tensor_name, self.expert_names = drop_noise, tensor_name, expert_names
        self.base_norm: Optional[float] = None
        self.rounding: Dict[torch.dtype, float] = {}

    def __call__(self, index: int, expert: torch.Tensor, energy: float) -> bool:
        """Whether expert ``index``'s task vector (of squared norm ``energy``) is noise."""
        if self.base_norm is None:
            self.base_norm = frobenius(self.base, self.step)
        fmt = storage_noise(
            self.base, expert, energy, self.base_norm, self.dtype, self.step, self.rounding
        )
        if fmt is None:
            return False
        self._report(expert_label(self.expert_names, index), fmt)
        return True

    def _report(self, label: str, fmt: torch.dtype) -> None:
        what = (
            "left out of the merge (set `drop_noise: false` to keep it)"
            if self.drop_noise
            else "kept in the merge because `drop_noise` is false"
        )
        tensor = repr(self.tensor_name) if self.tensor_name else "(unnamed)"
        noise_reports.log(
            label,
            f"model {label}: its tensor {tensor} equals the base model's stored as "
            f"{str(fmt).replace('torch.', '')}, up to rounding: the task vector is storage "
            f"noise, not a fine-tuning update; {what}.",
        )


# Rounding noise of a stored 2-D tensor, as the singular-value level it explains
# (docs/method.md, "Directions at the storage noise floor").


@dataclass(frozen=True)
class RoundingNoise:
    """The variance of a 2-D tensor's storage rounding error, ``ulp(x)^2 / 12`` per entry
    (rounding to nearest leaves an error uniform on ``[-ulp/2, ulp/2]``), summed along each
    row (``rows``, ``[m]``) and each column (``cols``, ``[n]``), in float64."""

    rows: torch.Tensor
    cols: torch.Tensor

    def __add__(self, other: "RoundingNoise") -> "RoundingNoise":
        """The noise of a sum of independently rounded tensors."""
        return RoundingNoise(self.rows + other.rows, self.cols + other.cols)

    def scaled(self, weight: float) -> "RoundingNoise":
        """The noise of ``sqrt(weight)`` times the tensor (variances scale by ``weight``)."""
        return RoundingNoise(self.rows * weight, self.cols * weight)

    def spectral_norm(self) -> float:
        """``sqrt(max row sum) + sqrt(max column sum)``: an upper estimate of the largest
        singular value of a random matrix with these variances. With equal variances the edge
        is ``(sqrt(m) + sqrt(n)) * rms`` (Bai-Yin); the maxima lie 7 % ([2048, 512]) to 47 %
        ([32, 32]) above it on bfloat16 rounding, and follow uneven channels, whose rows or
        columns carry more noise than the mean."""
        if not self.rows.numel() or not self.cols.numel():
            return 0.0
        return math.sqrt(float(self.rows.max())) + math.sqrt(float(self.cols.max()))

    def floor(self) -> float:
        """The singular value at or below which a direction is this noise
        (:meth:`spectral_norm`)."""
        return self.spectral_norm()

    @property
    def mean_variance(self) -> float:
        """The per-entry variance averaged over the tensor."""
        entries = self.rows.numel() * self.cols.numel()
        return float(self.rows.sum()) / entries if entries else 0.0


def stacked(noises: Sequence[RoundingNoise]) -> RoundingNoise:
    """The noise of the tensors stacked row-wise (``[T m, n]``)."""
    return RoundingNoise(
        torch.cat([x.rows for x in noises]), sum(x.cols for x in noises[1:]) + noises[0].cols
    )


def total(noises: Sequence[RoundingNoise]) -> RoundingNoise:
    """The noise of the sum of independently rounded tensors."""
    out = noises[0]
    for x in noises[1:]:
        out = out + x
    return out


def rounding_noise(tensor: torch.Tensor, step: Optional[int] = None) -> RoundingNoise:
    """The rounding noise of a 2-D ``tensor`` stored in :func:`storage_precision` (also read
    back as float32 after a bfloat16 file): ``ulp(x) = 2^(e - p)`` for ``x = f 2^e``,
    ``f`` in ``[0.5, 1)``, with ``p`` the format's significand bits; exact zeros carry none.
    ``step``: rows per block."""
    fmt = storage_precision(tensor, step)
    bits = 1 - int(round(math.log2(torch.finfo(fmt).eps)))  # significand bits, implicit one too
    rows, cols = [], torch.zeros(tensor.shape[1], dtype=torch.float64, device=tensor.device)
    for block in row_blocks(tensor, step):
        variance = _entry_variance(block, bits)
        rows.append(variance.sum(dim=1, dtype=torch.float64))
        cols.add_(variance.sum(dim=0, dtype=torch.float64))
        del variance
    return RoundingNoise(torch.cat(rows), cols)


def _entry_variance(block: torch.Tensor, bits: int) -> torch.Tensor:
    """``ulp(x)^2 / 12`` per entry for ``p = bits``. Values that float32 holds (all but float64
    data) take float32's exponent field: ``4^(e - p)`` is built as a float32 with exponent
    field ``2 (e - p) + 127`` (0, that is zero, where it would underflow, as for zeros and
    subnormals)."""
    if block.dtype == torch.float64:
        exponent = torch.frexp(block)[1]
        ones = torch.full_like(block, 1.0 / 12.0)
        return torch.ldexp(ones, 2 * (exponent - bits)).masked_fill_(block == 0, 0.0)
    biased = block.float().view(torch.int32).bitwise_right_shift(23).bitwise_and_(0xFF)
    field = biased.mul(2).sub_(2 * (126 + bits) - 127).clamp_(0, 254)  # 2 (e - p) + 127
    field.masked_fill_(biased == 0, 0)  # zeros and subnormals
    return field.bitwise_left_shift_(23).view(torch.float32).mul_(1.0 / 12.0)
