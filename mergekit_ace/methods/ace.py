"""``merge_method: ace`` — the mergekit adapter of :func:`mergekit_ace.kernels.ace.ace_merge`."""

from __future__ import annotations

from mergekit_ace.kernels.ace import (
    DEFAULT_EPS,
    DEFAULT_GATE_STATISTIC,
    GATE_STATISTICS,
    GATES,
    OOM_FALLBACKS,
    ace_merge,
)
from mergekit_ace.kernels.linalg import MATMUL_PRECISIONS
from mergekit_ace.methods.common import (
    KernelMergeMethod,
    _boolean,
    _choice,
    _number,
    _number_or_word,
    lambda_parameter,
    shared,
    weight_parameter,
)

PRETTY_NAME = "ACE-Merging"
REFERENCE_URL = "https://arxiv.org/abs/2603.02945"


def ace_method() -> KernelMergeMethod:
    return KernelMergeMethod(
        name="ace",
        pretty_name=PRETTY_NAME,
        reference_url=REFERENCE_URL,
        kernel=ace_merge,
        parameters=(
            shared("eps", _number_or_word("eps", "auto", 0.0, "a finite number >= 0"), DEFAULT_EPS,
                   "Tikhonov strength of each task's covariance proxy (step 3); "
                   "auto: a fixed fraction of each proxy's trace; the paper: 1e-5 for LLMs"),
            shared("tau", _number("tau", 0.0, what="a finite number >= 0"), 0.3,
                   "heterogeneity threshold on the gate statistic"),
            shared("gate", _choice("gate", GATES, {True: "on", False: "off"}), "auto",
                   "auto: heterogeneous when the gate statistic > tau; on: always; off: never"),
            shared("gate_statistic", _choice("gate_statistic", GATE_STATISTICS),
                   DEFAULT_GATE_STATISTIC,
                   "log_spread: std of log10 energies (unit-free); gamma: the paper's statistic"),
            shared("refine", _boolean("refine"), True,
                   "spectral refinement in the heterogeneous branch"),
            shared("k_frac", _number("k_frac", 0.0, 1.0, "in [0, 1]"), 0.3,
                   "fraction of singular directions refined"),
            shared("prior", _boolean("prior"), True, "collective structural prior"),
            shared("oom_fallback", _choice("oom_fallback", OOM_FALLBACKS), "cpu",
                   "with --cuda, a tensor whose estimated workspace exceeds free GPU memory: "
                   "cpu: merge it on the CPU (logged); error: stop with a message"),
            shared("matmul_precision", _choice("matmul_precision", MATMUL_PRECISIONS), "auto",
                   "with --cuda, the large float32 products: auto: tensor cores at float32 "
                   "accuracy (three TF32 products); tf32: one (faster, ~1e-3 error); "
                   "float32: no tensor cores"),
            lambda_parameter(),
            weight_parameter(),
        ),
    )
