"""Experts whose task vector is storage noise: the base tensor re-stored in a coarser format
(docs/method.md, "Experts at storage noise").

A task vector is storage noise when the expert's tensor equals the base tensor rounded to the
expert's own storage precision up to rounding, a handful of entries moved by a few ulps, or a
change that carries at most a third of the task vector (:func:`noise_finding`).
:class:`NoiseCheck` applies the test to one tensor's experts and reports what it finds;
:data:`noise_ledger` gathers the verdicts of a merge per model for its end.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence

import torch

from mergekit_ace.kernels.inputs import expert_label
from mergekit_ace.kernels.linalg import unit_roundoff
from mergekit_ace.kernels.reports import _REGISTRY, OncePerKey

# The residual ||W_t - fl_p(W0)||_F allowed, as a fraction of u_p ||W0||_F.
NOISE_FRACTION = 2.0**-8
# No entry of a storage-noise expert is further from the rounded base than this many units in
# the last place of its storage precision (at the base tensor's largest entry).
NOISE_ULPS = 4
# ... and it changes at most this share of the entries (at least NOISE_ENTRIES_MIN of them),
NOISE_ENTRIES_SHARE = 1e-3
NOISE_ENTRIES_MIN = 8
# ... or its own change carries at most this share of its task vector's energy.
NOISE_OWN_SHARE = 1.0 / 3.0
# Formats coarser than float32 that a checkpoint may have been saved in before being read
# back (or upcast by mergekit's ``dtype:``), coarsest first.
STORAGE_FORMATS = (torch.bfloat16, torch.float16)
# The first rows a format test reads before the whole tensor: a float32 checkpoint's values
# fail the bfloat16 and float16 tests within them.
SAMPLE_ENTRIES = 4096

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


def largest_magnitude(tensor: torch.Tensor) -> float:
    """``max |tensor|`` (0 for an empty tensor) in one pass with no temporary."""
    if not tensor.numel():
        return 0.0
    low, high = torch.aminmax(tensor)
    return max(-float(low), float(high))


def storage_precision(tensor: torch.Tensor, step: Optional[int] = None) -> torch.dtype:
    """The coarsest of bfloat16, float16 and ``tensor.dtype`` that holds every value of
    ``tensor`` exactly: the precision the checkpoint was really saved in, also after a
    bfloat16 file was read back as float32 (mergekit's ``dtype:`` upcasts every input).
    ``step``: rows per block (no full-size temporary)."""
    own = unit_roundoff(tensor.dtype)
    head = sample_head(tensor)
    for fmt in STORAGE_FORMATS:
        if unit_roundoff(fmt) > own and holds_exactly(head, fmt):  # a counter-example ends it
            if all(holds_exactly(b, fmt) for b in row_blocks(tensor, step)):
                return fmt
    return tensor.dtype


def sample_head(tensor: torch.Tensor) -> torch.Tensor:
    """The first rows of ``tensor`` holding about :data:`SAMPLE_ENTRIES` entries (the whole of
    a 0-D tensor), where a test that one entry can fail looks first."""
    if tensor.dim() == 0:
        return tensor
    if tensor.dim() == 1:
        return tensor[:SAMPLE_ENTRIES]
    return tensor[: max(1, SAMPLE_ENTRIES // max(1, tensor.shape[-1]))]


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


@dataclass(frozen=True)
class BaseScale:
    """``||W0||_F`` and ``max |W0|``, measured once per base tensor."""

    norm: float
    largest: float


@dataclass(frozen=True)
class NoiseFinding:
    """What :func:`noise_finding` measured on a storage-noise expert tensor: its storage
    precision ``precision`` and the base's ``base_precision``; how many of its ``entries``
    differ from the base rounded to ``precision`` (``changed``), by at most ``ulps`` units in
    the last place of ``precision`` at the base tensor's largest entry (``entry_ulps``: in
    units of each entry's own); and ``own_share``, the
    share of the task vector's energy those differences carry (the rest is the base's own
    rounding to ``precision``, zero when the base is stored that coarsely already)."""

    precision: torch.dtype
    base_precision: Optional[torch.dtype]
    entries: int
    changed: int
    ulps: float
    own_share: float
    entry_ulps: float = 0.0

    def describe(self) -> str:
        """The finding in entries and ulps, naming both dtypes."""
        fmt, base_fmt = dtype_name(self.precision), dtype_name(self.base_precision)
        if self.base_precision == self.precision:
            what = f"equals the base (stored as {fmt})"
        else:
            what = f"equals the base ({base_fmt}) rounded to {fmt}, the expert's storage precision"
        if self.changed:
            what += (
                f", except for {self.changed} of its {self.entries} entries, each moved by at "
                f"most {self.entry_ulps:.3g} ulp of {fmt}"
            )
        if self.changed and self.base_precision != self.precision:
            what += (
                f"; {1.0 - self.own_share:.1%} of its task vector is the base's rounding to {fmt}"
            )
        return what


def dtype_name(dtype: Optional[torch.dtype]) -> str:
    return str(dtype).replace("torch.", "") if dtype is not None else "unknown"


def ulp_at(value: float, fmt: torch.dtype) -> float:
    """The spacing of ``fmt``'s values at ``|value|`` (at its smallest normal for 0)."""
    info = torch.finfo(fmt)
    _, exponent = math.frexp(max(abs(value), info.tiny))
    return math.ldexp(info.eps, exponent - 1)


def noise_cap(entries: int) -> int:
    """How many entries a storage-noise expert may change: ``NOISE_ENTRIES_SHARE`` of them,
    at least ``NOISE_ENTRIES_MIN``."""
    return max(NOISE_ENTRIES_MIN, int(NOISE_ENTRIES_SHARE * entries))


def noise_finding(
    base: torch.Tensor,
    expert: torch.Tensor,
    energy: float,
    scale: BaseScale,
    dtype: torch.dtype,
    step: Optional[int] = None,
) -> Optional[NoiseFinding]:
    """A :class:`NoiseFinding` when ``expert``'s task vector (``energy = ||tau||_F^2``) is
    storage noise, else None (docs/method.md, "Experts at storage noise").

    With ``p`` the expert's storage precision and ``r = W_t - fl_p(W0)`` the expert's own
    change beyond re-storing the base: no entry of ``r`` exceeds ``NOISE_ULPS`` ulps of ``p``
    at ``max |W0|``, and either ``||r||_F <= NOISE_FRACTION u_p ||W0||_F`` (the base re-stored,
    up to rounding), or ``r`` changes at most :func:`noise_cap` entries (a copy of the base
    with a handful of entries moved), or ``||r||_F^2 <= NOISE_OWN_SHARE ||tau||_F^2`` (the task
    vector is the base's rounding to ``p``). ``tau = r + (fl_p(W0) - W0)`` bounds ``||tau||``
    for each alternative, so a larger task vector is not looked at further."""
    fmt = STORAGE_FORMATS[0]
    limit = max(
        (1.0 + NOISE_FRACTION) * unit_roundoff(fmt) * scale.norm,
        unit_roundoff(fmt) * scale.norm / (1.0 - math.sqrt(NOISE_OWN_SHARE)),
        unit_roundoff(fmt) * scale.norm
        + NOISE_ULPS * ulp_at(scale.largest, fmt) * math.sqrt(noise_cap(base.numel())),
    )
    if math.sqrt(energy) > 1.01 * limit:
        return None
    fmt = storage_precision(expert, step)
    ulp = ulp_at(scale.largest, fmt)
    _, head_change = _own_change(sample_head(base), sample_head(expert), fmt, dtype)
    if largest_magnitude(head_change) > NOISE_ULPS * ulp:
        return None  # the first block's test below fails on these entries too
    cap, changed, largest, own, entry_ulps = noise_cap(base.numel()), 0, 0.0, 0.0, 0.0
    close = (NOISE_FRACTION * unit_roundoff(fmt) * scale.norm) ** 2
    for b, e in zip(row_blocks(base, step), row_blocks(expert, step)):
        restored, r = _own_change(b, e, fmt, dtype)
        changed += int(torch.count_nonzero(r))
        largest = max(largest, largest_magnitude(r))
        own += float(torch.linalg.vector_norm(r, dtype=torch.float64)) ** 2
        if largest > NOISE_ULPS * ulp or (
            own > close and changed > cap and own > NOISE_OWN_SHARE * energy
        ):
            return None
        entry_ulps = max(entry_ulps, _entry_ulps(r, restored, fmt))
    own_share = own / energy if energy > 0 else 0.0
    base_fmt = storage_precision(base, step)
    return NoiseFinding(fmt, base_fmt, base.numel(), changed, largest / ulp, own_share, entry_ulps)


def _own_change(base: torch.Tensor, expert: torch.Tensor, fmt: torch.dtype, dtype):
    """``(fl_fmt(W0), W_t - fl_fmt(W0))`` in ``dtype`` over the entries given."""
    restored = base.to(fmt).to(dtype)
    return restored, expert.to(dtype) - restored


def _entry_ulps(r: torch.Tensor, restored: torch.Tensor, fmt: torch.dtype) -> float:
    """The largest ``|r|`` in units of ``fmt``'s spacing at each entry of ``restored``."""
    moved = r != 0
    if not bool(moved.any()):
        return 0.0
    values = restored[moved]
    info = torch.finfo(fmt)
    _, exponent = torch.frexp(values.abs().clamp_min(info.tiny))
    spacing = torch.ldexp(torch.full_like(values, info.eps), exponent - 1)
    return float((r[moved].abs() / spacing).max())


class NoiseCheck:
    """:func:`noise_finding` for the experts of one base tensor, with ``||W0||_F`` and
    ``max |W0|`` measured once, each finding reported (once per model as a warning, later
    tensors of that model at debug level) whether or not ``drop_noise`` leaves the expert out,
    and every verdict on a named tensor entered in :data:`noise_ledger` for the per-model
    summary at the end of the merge."""

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
        self.scale: Optional[BaseScale] = None

    def __call__(self, index: int, expert: torch.Tensor, energy: float) -> bool:
        """Whether expert ``index``'s task vector (of squared norm ``energy``) is noise."""
        if self.scale is None:
            self.scale = BaseScale(frobenius(self.base, self.step), largest_magnitude(self.base))
        finding = noise_finding(self.base, expert, energy, self.scale, self.dtype, self.step)
        label = expert_label(self.expert_names, index)
        noise_ledger.enter(label, self.tensor_name, finding, self.drop_noise)
        if finding is None:
            return False
        self._report(label, finding)
        return True

    def _report(self, label: str, finding: NoiseFinding) -> None:
        what = (
            "left out of the merge here (set `drop_noise: false` to keep it)"
            if self.drop_noise
            else "kept in the merge because `drop_noise` is false"
        )
        tensor = repr(self.tensor_name) if self.tensor_name else "(unnamed)"
        noise_reports.log(
            label,
            f"model {label}: its tensor {tensor} {finding.describe()}: the task vector is "
            f"storage noise, not a fine-tuning update; {what}. The end of the merge lists, "
            "per model, the tensors where it is storage noise and where it is not.",
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


def rounding_floor_bound(tensor: torch.Tensor, step: Optional[int] = None) -> float:
    """An upper bound of ``rounding_noise(tensor).floor()`` from two reductions: every entry
    of a tensor stored with ``p`` significand bits has ``ulp(x) <= 2^(1 - p) |x| <= 2^(1 - p)
    max |x|``, so a row of ``n`` entries carries a rounding variance of at most ``n (2^(1 - p)
    max |x|)^2 / 12``, and a column of ``m`` entries ``m`` times that."""
    if tensor.dim() != 2 or not tensor.numel():
        return 0.0
    fmt = storage_precision(tensor, step)
    bits = 1 - int(round(math.log2(torch.finfo(fmt).eps)))
    largest = max(largest_magnitude(block) for block in row_blocks(tensor, step))
    m, n = tensor.shape
    return (math.sqrt(m) + math.sqrt(n)) * math.ldexp(largest, 1 - bits) / math.sqrt(12.0)


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


class NoiseLedger:
    """Every storage-noise verdict of a merge on named tensors, per model, for the summary
    at its end (:meth:`summary`): a model that is storage noise in some tensors and a real
    fine-tune in others is then shown whole, and the user decides."""

    def __init__(self) -> None:
        self.noise: Dict[str, List[str]] = {}
        self.real: Dict[str, List[str]] = {}
        self.formats: Dict[str, NoiseFinding] = {}
        self.dropped = True
        _REGISTRY.append(self)

    def reset(self) -> None:
        self.noise, self.real, self.formats, self.dropped = {}, {}, {}, True

    def enter(self, label: str, tensor: Optional[str], finding, drop_noise: bool) -> None:
        if tensor is None:
            return
        found = self.noise if finding is not None else self.real
        tensors = found.setdefault(label, [])
        if tensor not in tensors:  # a tensor checked twice (a re-computation) counts once
            tensors.append(tensor)
        if finding is not None:
            self.formats.setdefault(label, finding)
            self.dropped = drop_noise

    def summary(self, listed: int = 10) -> List[str]:
        """One line per model that was storage noise in at least one tensor."""
        lines = []
        for label, noise in self.noise.items():
            real = self.real.get(label, [])
            lines.append(_model_line(label, noise, real, self.formats[label], self.dropped, listed))
        return lines


def _model_line(label, noise, real, finding: NoiseFinding, dropped: bool, listed: int) -> str:
    total = len(noise) + len(real)
    fmt, base_fmt = dtype_name(finding.precision), dtype_name(finding.base_precision)
    stored = f"stored as {fmt}" + ("" if fmt == base_fmt else f", the base as {base_fmt}")
    fate = "left out" if dropped else "kept (`drop_noise: false`)"
    line = (
        f"storage noise: model {label} ({stored}) is the base re-stored, not a fine-tune, in "
        f"{len(noise)} of the {total} tensors compared; {fate} there."
    )
    if not real:
        return line + " Remove it from `models:`: it changes nothing the merge should keep."
    shown = ", ".join(repr(t) for t in real[:listed])
    more = f" and {len(real) - listed} more" if len(real) > listed else ""
    return line + (
        f" It carries a real change in {len(real)}: {shown}{more}, merged there. To leave "
        "it out everywhere remove it from `models:`; to keep it everywhere set "
        "`drop_noise: false`."
    )


noise_ledger = NoiseLedger()
