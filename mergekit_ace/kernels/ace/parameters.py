"""ACE's parameters and its heterogeneity gate, described once.

:data:`ACE_PARAMETERS` is the table of ACE's parameters (name, default, check, meaning):
:func:`~mergekit_ace.kernels.ace.ace_merge` takes its defaults and checks its arguments with
it, the mergekit adapter (``methods/ace.py``) builds its ``ParameterSpec``s from it, and
``inspect`` reads its defaults. :func:`predict_branch` is the gate (eq. 7, 43: energies ->
statistic -> branch); the kernel decides with it, and ``mergekit-ace inspect --estimate-only``
predicts with it when there are no energies yet. Pure Python.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

from mergekit_ace.kernels.parameters import (
    DROP_NOISE,
    LAMBDA,
    NOISE_FLOOR,
    WEIGHT,
    Parameter,
    ParameterTable,
    boolean,
    choice,
    number,
    number_or_word,
)

GATES = ("auto", "on", "off")
GATE_STATISTICS = ("gamma", "log_spread")
OOM_FALLBACKS = ("cpu", "error")
MATMUL_PRECISIONS = ("auto", "float32", "tf32x3", "tf32")
# Defaults: the scale-free choices (docs/method.md, "Scale-free defaults"); the paper's
# method as published is eps=1e-5 (its value for LLMs), gate_statistic="gamma" (eq. 7).
DEFAULT_EPS = "auto"
DEFAULT_GATE_STATISTIC = "log_spread"
# Branch of a 2-D tensor whose gate needs the energies, when they are not known yet.
UNDECIDED = "auto"
# The paper's guard against log(0) and division by zero (eq. 6, 7, 13).
PAPER_GUARD = 1e-12
# ``eps: auto``: each task's ridge is AUTO_RIDGE * tr(Shat_t). Every regularized proxy then has
# condition number at most 1 + 1 / AUTO_RIDGE = 4097 whatever the units of the task vectors
# or the width n: the largest at which a float32 solve still keeps about half of float32's
# 24 significant bits (condition * unit round-off ~ 2.4e-4).
AUTO_RIDGE = 2.0**-12
AUTO_CONDITION_BOUND = 1 + 1 / AUTO_RIDGE

ACE_PARAMETERS = ParameterTable(
    "ace",
    (
        Parameter(
            "eps",
            DEFAULT_EPS,
            number_or_word("eps", "auto", 0.0, "a finite number >= 0"),
            "Tikhonov strength of each task's covariance proxy (step 3); "
            "auto: a fixed fraction of each proxy's trace; the paper: 1e-5 for LLMs",
        ),
        Parameter(
            "tau",
            0.3,
            number("tau", 0.0, what="a finite number >= 0"),
            "heterogeneity threshold on the gate statistic",
        ),
        Parameter(
            "gate",
            "auto",
            choice("gate", GATES, {True: "on", False: "off"}),
            "auto: heterogeneous when the gate statistic > tau; on: always; off: never",
        ),
        Parameter(
            "gate_statistic",
            DEFAULT_GATE_STATISTIC,
            choice("gate_statistic", GATE_STATISTICS),
            "log_spread: std of log10 energies (unit-free); gamma: the paper's statistic",
        ),
        Parameter(
            "refine", True, boolean("refine"), "spectral refinement in the heterogeneous branch"
        ),
        Parameter(
            "k_frac",
            0.3,
            number("k_frac", 0.0, 1.0, "in [0, 1]"),
            "fraction of singular directions refined",
        ),
        Parameter("prior", True, boolean("prior"), "collective structural prior"),
        Parameter(
            "oom_fallback",
            "cpu",
            choice("oom_fallback", OOM_FALLBACKS),
            "with --cuda, a tensor whose estimated workspace exceeds free GPU memory: "
            "cpu: merge it on the CPU (logged); error: stop with a message",
        ),
        Parameter(
            "matmul_precision",
            "auto",
            choice("matmul_precision", MATMUL_PRECISIONS),
            "with --cuda, the large float32 products: auto: tensor cores at float32 "
            "accuracy (three TF32 products); tf32: one (faster, ~1e-3 error); "
            "float32: no tensor cores",
        ),
        LAMBDA,
        WEIGHT,
        DROP_NOISE,
        NOISE_FLOOR,
    ),
)


def heterogeneity(energies: Sequence[float]) -> Optional[float]:
    """``gamma = var(l) / (mean(l)^2 + 1e-12)``, ``l_t = log(e_t + 1e-12)`` (eq. 7, 43),
    unbiased variance; ``None`` for fewer than two tasks."""
    if len(energies) < 2:
        return None
    logs = [math.log(e + PAPER_GUARD) for e in energies]
    mean = sum(logs) / len(logs)
    var = sum((x - mean) ** 2 for x in logs) / (len(logs) - 1)
    return var / (mean * mean + PAPER_GUARD)


def log_spread(energies: Sequence[float]) -> Optional[float]:
    """Unit-free heterogeneity: the unbiased standard deviation of ``log10 e_t``.

    Rescaling every task vector shifts all logs equally, so the value does not change
    (the paper's ``gamma`` divides by ``mean(l)^2``, which does). 0.3 means the energies
    typically differ by a factor of two. ``None`` for fewer than two tasks.
    """
    if len(energies) < 2:
        return None
    logs = [math.log10(e) for e in energies]
    mean = sum(logs) / len(logs)
    return math.sqrt(sum((x - mean) ** 2 for x in logs) / (len(logs) - 1))


@dataclass(frozen=True)
class GateDecision:
    """The branch of one tensor and the two statistics (``None`` where not computed)."""

    branch: str  # "heterogeneous", "homogeneous", "mean" or UNDECIDED
    gamma: Optional[float] = None
    log_spread: Optional[float] = None

    @property
    def heterogeneous(self) -> bool:
        return self.branch == "heterogeneous"


def predict_branch(
    ndim: int,
    energies: Optional[Sequence[float]],
    *,
    tau: float = ACE_PARAMETERS.default("tau"),
    gate: str = ACE_PARAMETERS.default("gate"),
    gate_statistic: str = DEFAULT_GATE_STATISTIC,
    n_experts: Optional[int] = None,
) -> GateDecision:
    """ACE's gate for a tensor of ``ndim`` dimensions whose participating experts have task
    vector ``energies`` (``||tau_t||_F^2``): tensors that are not 2-D are averaged (``mean``);
    ``gate: on``/``off`` force a branch; under ``gate: auto`` the statistic chosen by
    ``gate_statistic`` above ``tau`` selects the heterogeneous branch, and one task is
    homogeneous. With ``energies=None`` (not read yet) ``n_experts`` stands in for their
    number, and a branch that needs them is :data:`UNDECIDED`."""
    if ndim != 2:
        return GateDecision("mean")
    if energies is None:
        if gate == "on":
            return GateDecision("heterogeneous")
        if gate == "off" or (n_experts is not None and n_experts < 2):
            return GateDecision("homogeneous")
        return GateDecision(UNDECIDED)
    gamma, unit_free = heterogeneity(energies), log_spread(energies)
    statistic = gamma if gate_statistic == "gamma" else unit_free
    if gate == "on":
        heterogeneous = True
    elif gate == "off" or statistic is None:
        heterogeneous = False
    else:
        heterogeneous = statistic > tau
    return GateDecision("heterogeneous" if heterogeneous else "homogeneous", gamma, unit_free)
