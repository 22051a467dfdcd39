"""The merge configurations the benchmark compares, as data, in the order they run.

Each :class:`MethodSpec` becomes one ``mergekit-yaml`` run. Entries marked ``optional`` are
included only when their merge method (and parameter values) are registered in the installed
mergekit, so methods that land later slot in without touching the runner.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional

EPS_SWEEP = (1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


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
        """Identity of the merge (method + parameters), for the score cache."""
        return repr((self.method, sorted(self.parameters.items()),
                     sorted(self.model_parameters.items()), self.seeded))


def method_specs(n_tasks: int, *, eps_sweep=EPS_SWEEP) -> List[MethodSpec]:
    one = {"weight": 1.0}
    specs = [
        MethodSpec("ace", "ace", "ace", note="defaults (E4: full method)"),
        MethodSpec("task_arithmetic (lambda=1)", "task_arithmetic", "baseline",
                   {"lambda": 1.0}, one, note="sum of task vectors"),
        MethodSpec(f"task_arithmetic (lambda=1/{n_tasks})", "task_arithmetic", "baseline",
                   {"lambda": 1.0 / n_tasks}, one, note="mean of task vectors"),
        MethodSpec("ties", "ties", "baseline", model_parameters={"weight": 1.0, "density": 0.5},
                   note="density 0.5, mergekit defaults otherwise"),
        MethodSpec("dare_ties", "dare_ties", "baseline",
                   model_parameters={"weight": 1.0, "density": 0.5}, seeded=True,
                   note="density 0.5, --random-seed"),
        MethodSpec("ace E1 (closed form)", "ace", "ablation",
                   {"gate": "off", "prior": False, "refine": False}),
        MethodSpec("ace E2 (+ adaptive norm.)", "ace", "ablation",
                   {"gate": "auto", "prior": False, "refine": False}),
        MethodSpec("ace E3 (+ prior)", "ace", "ablation",
                   {"gate": "auto", "prior": True, "refine": False}),
    ]
    specs += [
        MethodSpec("iso_c", "iso_c", "other", {"lambda": 1.0}, optional=True),
        MethodSpec("tsv", "tsv", "other", {"lambda": 1.0}, optional=True),
    ]
    # eps sweep, widest values first so a partial run still brackets the default
    order = sorted((e for e in eps_sweep if e != 1e-5),  # 1e-5 is the default: same as "ace"
                   key=lambda e: -abs(math.log10(e) + 5))
    for eps in order:
        specs.append(MethodSpec(f"ace eps={eps:g}", "ace", "eps", {"eps": eps}))
    specs += [
        MethodSpec("linear", "linear", "baseline", model_parameters=one, base=False,
                   note="uniform average of the experts: the same model as task_arithmetic "
                   "at lambda=1/T, a check of the pipeline"),
        MethodSpec("actmat", "actmat", "other", {"lambda": 1.0}, optional=True),
        MethodSpec("iso_cts", "iso_cts", "other", {"lambda": 1.0}, optional=True),
        MethodSpec("ace eps=auto", "ace", "eps", {"eps": "auto"}, optional=True),
        MethodSpec("ace gate_statistic=log_spread", "ace", "variant",
                   {"gate_statistic": "log_spread"}, optional=True),
    ]
    return specs


def eps_of(spec: MethodSpec) -> Optional[float]:
    """The numeric ``eps`` of an ace merge (default 1e-5), None otherwise."""
    if spec.method != "ace":
        return None
    value = spec.parameters.get("eps", 1e-5)
    return value if isinstance(value, float) else None


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
