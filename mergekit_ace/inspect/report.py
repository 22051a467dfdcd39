"""The report of ``mergekit-ace inspect``: one :class:`TensorRow` per output tensor, the
:class:`InspectReport` around them, and how tensors and experts are labelled in it."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from mergekit_ace.kernels.ace.parameters import DEFAULT_GATE_STATISTIC

_LAYER_RE = re.compile(
    r"^(?P<prefix>.*?)\.?layers\.(?P<layer>\d+)\.(?P<module>.+?)(?:\.(?P<kind>weight|bias))?$"
)


class InspectError(RuntimeError):
    """A config, checkpoint or environment that ``inspect`` cannot work with; the message
    says why (the command prints it as one ``Error:`` line)."""


@dataclass
class TensorRow:
    """One line of the report: what ACE decides for one output tensor and what it costs."""

    name: str
    module: str
    layer: Optional[int]
    shape: Tuple[int, ...]
    dtype: str
    parameters: Dict[str, Any]
    branch: str
    energies: Optional[List[float]] = None
    noise: Optional[List[int]] = None  # experts (report columns) whose task vector is storage noise
    gamma: Optional[float] = None
    log_spread: Optional[float] = None
    k: Optional[int] = None
    noise_floor: Optional[float] = None  # singular value of F below which nothing was boosted
    sigma_iso: Optional[float] = None
    solver: Optional[str] = None
    spectral: Optional[str] = None
    kernel_device: Optional[str] = None
    matmul: Optional[str] = None
    rcond: Optional[float] = None
    condition: Optional[float] = None
    boost_ratio: Optional[float] = None  # s_1 / s_k over the refined directions
    cut_gap: Optional[float] = None  # (s_k - s_{k+1}) / ||F||_F at the last boosted direction
    roundoff_change: Optional[float] = None  # measured by a second computation (bound > 1 %)
    ridge: Optional[float] = None
    concentration_pre: Optional[float] = None
    concentration_post: Optional[float] = None
    flops: float = 0.0
    flops_float64: float = 0.0  # the part of flops done in float64 (refinement's Gram of F, eigh)
    est_seconds: float = 0.0
    workspace_bytes: int = 0
    peak_bytes: int = 0
    kernel_seconds: Optional[float] = None
    spectrum_pre: Optional[List[float]] = field(default=None, repr=False)
    spectrum_post: Optional[List[float]] = field(default=None, repr=False)

    @property
    def gate_statistic(self) -> str:
        """The statistic that gates this tensor under ``gate: auto``."""
        return self.parameters.get("gate_statistic", DEFAULT_GATE_STATISTIC)

    @property
    def gate_value(self) -> Optional[float]:
        """That statistic's value (``gamma`` or ``log_spread``); None when not computed."""
        return self.gamma if self.gate_statistic == "gamma" else self.log_spread

    def as_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items()}
        out["shape"] = list(self.shape)
        return out


@dataclass
class InspectReport:
    config: str
    mode: str  # "full" or "estimate"
    device: str
    flop_rate: float
    experts: List[str]
    rows: List[TensorRow]
    files: Dict[str, str] = field(default_factory=dict)
    flop_rate_given: bool = False

    def branch_counts(self) -> Dict[str, int]:
        counts: Dict[str, int] = {}
        for row in self.rows:
            counts[row.branch] = counts.get(row.branch, 0) + 1
        return counts

    def heaviest(self) -> Optional[TensorRow]:
        return max(self.rows, key=lambda r: r.flops, default=None)

    def peak_bytes(self) -> int:
        return max((r.peak_bytes for r in self.rows), default=0)

    def as_dict(self) -> dict:
        return {
            "config": self.config,
            "mode": self.mode,
            "device": self.device,
            "flop_rate": self.flop_rate,
            "flop_rate_given": self.flop_rate_given,
            "experts": self.experts,
            "summary": {
                "tensors": len(self.rows),
                "branches": self.branch_counts(),
                "heaviest": self.heaviest().name if self.rows else None,
                "peak_bytes": self.peak_bytes(),
                "est_seconds": sum(r.est_seconds for r in self.rows),
                "flops": sum(r.flops for r in self.rows),
                "flops_float64": sum(r.flops_float64 for r in self.rows),
            },
            "rows": [r.as_dict() for r in self.rows],
        }


def split_name(name: str) -> Tuple[Optional[int], str]:
    """``model.layers.3.self_attn.q_proj.weight`` -> ``(3, "self_attn.q_proj")``; tensors
    outside the layer stack keep their name without the ``.weight`` suffix."""
    match = _LAYER_RE.match(name)
    if match:
        module = match.group("module")
        if match.group("kind") == "bias":
            module += ".bias"
        return int(match.group("layer")), module
    if name.endswith(".weight"):
        name = name[: -len(".weight")]
    return None, name


def expert_labels(paths: Sequence[str]) -> List[str]:
    """Short, unique column labels for the experts: the last path component, without the
    part all of them share at the start or the end (``news_lr5e-05``, ``chat_lr5e-05`` ->
    ``news``, ``chat``), cut at a ``_``, ``-`` or ``.``; disambiguated if still equal."""
    labels = [os.path.basename(str(p).rstrip("/")) or str(p) for p in paths]
    if len(labels) > 1:
        labels = _strip_shared(labels)
    seen: Dict[str, int] = {}
    out = []
    for label in labels:
        if labels.count(label) > 1:
            seen[label] = seen.get(label, 0) + 1
            label = f"{label}#{seen[label]}"
        out.append(label)
    return out


def _strip_shared(labels: List[str]) -> List[str]:
    separators = "_-."
    prefix = os.path.commonprefix(labels)
    suffix = os.path.commonprefix([label[::-1] for label in labels])[::-1]
    # cut only at separators, so "chat7" and "code7" keep their names
    cut_front = max((i + 1 for i, ch in enumerate(prefix) if ch in separators), default=0)
    cut_back = max((len(suffix) - i for i, ch in enumerate(suffix) if ch in separators), default=0)
    stripped = [label[cut_front : len(label) - cut_back] for label in labels]
    if all(stripped) and len(set(stripped)) == len(stripped):
        return stripped
    return labels


# Fractions of the singular directions at which the cumulative spectrum is kept (``spectrum_*``):
# dense at the top, where the paper's Fig. 2 looks.
CURVE_FRACTIONS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0)


def energy_curve(singular_values: Optional[List[float]]) -> Optional[List[float]]:
    """Cumulative share of squared singular-value mass held by the top ``ceil(f * r)``
    directions, for each ``f`` of :data:`CURVE_FRACTIONS` (the paper's Fig. 2 curve, small
    enough to keep per tensor)."""
    if not singular_values:
        return None
    energy = (
        torch.tensor(singular_values, dtype=torch.float64).square().sort(descending=True).values
    )
    total = float(energy.sum())
    if total <= 0:
        return None
    cumulative = energy.cumsum(0) / total
    r = energy.numel()
    return [float(cumulative[max(1, math.ceil(f * r)) - 1]) for f in CURVE_FRACTIONS]
