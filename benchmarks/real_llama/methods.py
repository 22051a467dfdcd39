"""The merge configurations the benchmark compares, as data, in the order they run.

Each :class:`MethodSpec` becomes one ``mergekit-yaml`` run. Entries marked ``optional`` are
included only when their merge method (and parameter values) are registered in the installed
mergekit, so methods that land later slot in without touching the runner.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

EPS_SWEEP = (1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
# The paper's settings of the two parameters whose defaults are the scale-free choices.
PAPER = {"eps": 1e-5, "gate_statistic": "gamma"}


@dataclass(frozen=True)
class MethodSpec:
    label: str  # row name in tables and charts
    method: str  # merge_method
    group: str  # "baseline", "ace", "ablation", "eps", "variant", "other"
    parameters: Dict = field(default_factory=dict)
    model_parameters: Dict = field(default_factory=dict)
    seeded: bool = False  # pass --random-seed
    optional: bool = False
    note: str = ""
    base: bool = True  # pass the base model as base_model (linear averages the experts only)

    def key(self) -> str:
        """Identity of the merge, for the score cache: the method and every parameter,
        with the method's declared defaults filled in (a changed default is a new merge)."""
        shared, per_model = declared_defaults(self.method)
        return repr(
            (
                self.method,
                sorted({**shared, **self.parameters}.items()),
                sorted({**per_model, **self.model_parameters}.items()),
                self.seeded,
            )
        )


def declared_defaults(method: str) -> Tuple[Dict, Dict]:
    """``(shared, per-model)`` default parameter values of a registered merge method
    (empty when it is not registered)."""
    try:
        import mergekit.merge_methods as registry
        from mergekit.merge_methods.base import ParameterScope

        spec = registry.get(method).spec
    except Exception:
        return {}, {}
    shared = {p.name: p.default for p in spec.parameters if p.scope == ParameterScope.SHARED}
    per_model = {p.name: p.default for p in spec.parameters if p.scope != ParameterScope.SHARED}
    return shared, per_model


def method_specs(n_tasks: int, *, eps_sweep=EPS_SWEEP) -> List[MethodSpec]:
    one = {"weight": 1.0}
    specs = [
        MethodSpec(
            "ace",
            "ace",
            "ace",
            note="defaults: eps auto, gate_statistic log_spread (the full method, E4)",
        ),
        MethodSpec(
            "ace (paper: eps=1e-5, gamma)",
            "ace",
            "ace",
            dict(PAPER),
            note="the paper's settings (E4)",
        ),
        MethodSpec(
            "task_arithmetic (lambda=1)",
            "task_arithmetic",
            "baseline",
            {"lambda": 1.0},
            one,
            note="sum of task vectors",
        ),
        MethodSpec(
            f"task_arithmetic (lambda=1/{n_tasks})",
            "task_arithmetic",
            "baseline",
            {"lambda": 1.0 / n_tasks},
            one,
            note="mean of task vectors",
        ),
        MethodSpec(
            "ties",
            "ties",
            "baseline",
            model_parameters={"weight": 1.0, "density": 0.5},
            note="density 0.5, mergekit defaults otherwise",
        ),
        MethodSpec(
            "dare_ties",
            "dare_ties",
            "baseline",
            model_parameters={"weight": 1.0, "density": 0.5},
            seeded=True,
            note="density 0.5, --random-seed",
        ),
        MethodSpec(
            "ace E1 (closed form)",
            "ace",
            "ablation",
            {**PAPER, "gate": "off", "prior": False, "refine": False},
        ),
        MethodSpec(
            "ace E2 (+ adaptive norm.)",
            "ace",
            "ablation",
            {**PAPER, "gate": "auto", "prior": False, "refine": False},
        ),
        MethodSpec(
            "ace E3 (+ prior)",
            "ace",
            "ablation",
            {**PAPER, "gate": "auto", "prior": True, "refine": False},
        ),
    ]
    specs += [
        MethodSpec("iso_c", "iso_c", "other", {"lambda": 1.0}, optional=True),
        MethodSpec("tsv", "tsv", "other", {"lambda": 1.0}, optional=True),
    ]
    # eps sweep under the paper's gate, widest values first so a partial run still brackets
    # the paper's 1e-5 (that point is the "ace (paper ...)" row)
    order = sorted(
        (e for e in eps_sweep if e != PAPER["eps"]),
        key=lambda e: -abs(math.log10(e) - math.log10(PAPER["eps"])),
    )
    for eps in order:
        specs.append(MethodSpec(f"ace eps={eps:g}", "ace", "eps", {**PAPER, "eps": eps}))
    specs += [
        MethodSpec(
            "linear",
            "linear",
            "baseline",
            model_parameters=one,
            base=False,
            note="uniform average of the experts: the same model as task_arithmetic "
            "at lambda=1/T, a check of the pipeline",
        ),
        MethodSpec("actmat", "actmat", "other", {"lambda": 1.0}, optional=True),
        MethodSpec("iso_cts", "iso_cts", "other", {"lambda": 1.0}, optional=True),
        MethodSpec(
            "ace eps=auto",
            "ace",
            "eps",
            {**PAPER, "eps": "auto"},
            note="scale-free eps, the paper's gate",
        ),
        MethodSpec(
            "ace gate_statistic=log_spread",
            "ace",
            "variant",
            {**PAPER, "gate_statistic": "log_spread"},
            note="the paper's eps, scale-free gate",
        ),
    ]
    return specs


def is_available(spec: MethodSpec) -> bool:
    """True when the merge method is registered and accepts the spec's parameters."""
    try:
        import mergekit.merge_methods as registry

        method = registry.get(spec.method)
    except Exception:
        return False
    try:
        from pydantic import TypeAdapter

        params = {p.name: p for p in method.spec.parameters}
        for name, value in {**spec.parameters, **spec.model_parameters}.items():
            if name not in params:
                return False
            TypeAdapter(params[name].value_type).validate_python(value)
    except Exception:
        return False
    return True


def select(specs: List[MethodSpec], only: Optional[List[str]] = None) -> List[MethodSpec]:
    """Specs whose label or group is in ``only`` (all when empty; in ``only``'s order),
    minus the unavailable ones."""
    if only:
        picked: List[MethodSpec] = []
        for key in only:
            picked += [s for s in specs if key in (s.label, s.group) and s not in picked]
        specs = picked
    return [s for s in specs if not s.optional or is_available(s)]
