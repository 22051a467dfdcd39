"""``ace_merge``'s parameters, checked against :data:`~mergekit_ace.kernels.ace.parameters.
ACE_PARAMETERS` and resolved once per call into what the steps use: the ridge rule, the gate,
the precision the large products run in, the dtypes and the CPU-fallback policy."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import List, Optional, Sequence, Union

import torch

from mergekit_ace.kernels.ace.parameters import (
    ACE_PARAMETERS,
    AUTO_RIDGE,
    GateDecision,
    predict_branch,
)
from mergekit_ace.kernels.inputs import compute_dtype_for
from mergekit_ace.kernels.linalg import resolve_matmul_precision


@dataclass(frozen=True)
class Ridge:
    """The Tikhonov ridge of step 3 (eq. 8-10): ``eps`` a fixed number, as in the paper, or
    ``"auto"``, a fixed fraction (:data:`~mergekit_ace.kernels.ace.parameters.AUTO_RIDGE`) of
    each task's normalized trace (docs/method.md, "Scale-free defaults")."""

    eps: Union[float, str]

    @property
    def auto(self) -> bool:
        return self.eps == "auto"

    def of_task(self, trace: float, heterogeneous: bool) -> float:
        """``eps_t`` of a task whose proxy ``S_t`` has trace ``trace``: in the heterogeneous
        branch ``Shat_t = S_t / trace``, so a fixed ``eps`` is divided by it too."""
        if self.auto:
            return AUTO_RIDGE * (1.0 if heterogeneous else trace)  # AUTO_RIDGE * tr(Shat_t)
        return self.eps / trace if heterogeneous else self.eps

    def prior_energies(self, energies: Sequence[float], traces: Sequence[float]) -> List[float]:
        """The energies whose mean scales the heterogeneous prior (eq. 13): the paper's raw
        ``||tau_t||^2``, which carry the task vectors' units; with ``eps: auto`` each measured
        in its own proxy's trace, so the merge does not depend on the units."""
        if not self.auto:
            return list(energies)
        return [e / t for e, t in zip(energies, traces)]


@dataclass(frozen=True)
class AceSettings:
    """Everything ``ace_merge`` was asked, checked and resolved: ``matmul`` is the precision
    the large products run in on the inputs' device (``linalg.resolve_matmul_precision``),
    ``dtype`` the compute dtype, ``out_dtype`` the output's; ``spectra``: record singular
    values and measure every condition number (``inspect``)."""

    ridge: Ridge
    tau: float
    gate: str
    gate_statistic: str
    refine: bool
    k_frac: float
    prior: bool
    lam: float
    drop_noise: bool
    noise_floor: bool
    oom_fallback: str
    matmul_precision: str
    matmul: str
    dtype: torch.dtype
    out_dtype: torch.dtype
    spectra: bool = False

    @classmethod
    def resolve(
        cls,
        base: torch.Tensor,
        experts: Sequence[torch.Tensor],
        *,
        compute_dtype: Optional[torch.dtype],
        out_dtype: Optional[torch.dtype],
        spectra: bool,
        **parameters,
    ) -> "AceSettings":
        """Check ``parameters`` (kernel names: ``eps``, ..., ``lam``, ``drop_noise``) and
        resolve them for these inputs; ``ValueError`` names the first bad one."""
        checked = ACE_PARAMETERS.check(**parameters)
        dtype = compute_dtype or compute_dtype_for(base, *experts)
        precision = checked.pop("matmul_precision")
        return cls(
            ridge=Ridge(checked.pop("eps")),
            matmul_precision=precision,
            matmul=resolve_matmul_precision(precision, base.device, dtype),
            dtype=dtype,
            out_dtype=out_dtype or base.dtype,
            spectra=spectra,
            **checked,
        )

    def on_cpu(self) -> "AceSettings":
        """The same settings for the CPU (the out-of-memory fallback)."""
        matmul = resolve_matmul_precision(self.matmul_precision, torch.device("cpu"), self.dtype)
        return replace(self, matmul=matmul)

    @property
    def eps(self) -> Union[float, str]:
        return self.ridge.eps

    @property
    def element_bytes(self) -> int:
        return torch.finfo(self.dtype).bits // 8

    def branch(self, energies: Sequence[float]) -> GateDecision:
        """Step 1: the gate (eq. 7, 43) on the participants' energies."""
        return predict_branch(
            2, energies, tau=self.tau, gate=self.gate, gate_statistic=self.gate_statistic
        )

    def refined_directions(self, shape: Sequence[int], heterogeneous: bool) -> int:
        """Step 6's ``k = floor(k_frac * min(m, n))``; 0 where there is no refinement."""
        return math.floor(min(shape) * self.k_frac) if heterogeneous and self.refine else 0
