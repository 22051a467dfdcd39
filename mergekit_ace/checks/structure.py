"""Whether mergekit can build and plan a configuration at all, with messages that say where
and what to write: pydantic's validation (``MergeConfiguration.model_validate``, the call
``mergekit-yaml`` makes) translated, the merge method's name, and the inputs each slice gives
the method (the same ``validate_inputs`` call mergekit's planner makes: a duplicate model, a
slice whose sources lack the base), and slices whose sources span different layer counts."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from mergekit_ace.checks.findings import Finding, did_you_mean
from mergekit_ace.checks.keys import TOP, moe_keys
from mergekit_ace.checks.parameters import model_label


def validate(data: Dict[str, Any]) -> Tuple[Optional[Any], List[Finding]]:
    """``(MergeConfiguration or None, error findings)`` of one document (``name`` removed)."""
    from mergekit.config import MergeConfiguration
    from pydantic import ValidationError

    moe = moe_keys(data)
    if moe:
        keys = ", ".join(f"`{k}:`" for k in moe)
        return None, [
            Finding(
                TOP,
                moe[0],
                f"this is a mergekit-moe config (it has {keys} and no `merge_method:`): build "
                "it with `mergekit-moe CONFIG OUT_PATH`; mergekit-yaml and mergekit-multi "
                "cannot read it.",
                error=True,
            )
        ]
    try:
        return MergeConfiguration.model_validate(data), []
    except ValidationError as error:
        return None, [_pydantic_error(e, data) for e in error.errors()]
    except (ValueError, RuntimeError, TypeError) as error:  # mergekit's own validators
        return None, [Finding(TOP, "", f"mergekit refuses this config: {error}.", error=True)]


def _location(loc: Tuple[Any, ...]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif str(part)[:1].isupper() or "[" in str(part):  # pydantic's union branch names
            continue
        else:
            text += ("." if text else "") + str(part)
    return text or TOP


def _pydantic_error(error: Dict[str, Any], data: Dict[str, Any]) -> Finding:
    loc = tuple(error.get("loc", ()))
    where = _location(loc)
    if error.get("type") == "missing" and loc == ("merge_method",):
        near = [k for k in data if did_you_mean(str(k), ["merge_method"]) != "."]
        hint = f" (`{near[0]}:` is written; did you mean `merge_method:`?)" if near else ""
        return Finding(
            TOP,
            "merge_method",
            f"no `merge_method:` is given{hint}; mergekit needs one (`merge_method: ace`, "
            "`task_arithmetic`, ...).",
            error=True,
        )
    message = error.get("msg", "invalid")
    value = error.get("input")
    shown = "" if isinstance(value, (dict, list)) else f" `{value!r}`"
    return Finding(
        where,
        str(loc[-1]) if loc else "",
        f"`{where}`{shown} is refused by mergekit: {message}.",
        error=True,
    )


def check_method(config: Any) -> List[Finding]:
    """An unknown ``merge_method`` (mergekit stops before merging)."""
    from mergekit.merge_methods import registry

    names = [m.spec.name for m in registry.registered_methods()]
    name = config.merge_method
    if name in names:
        return []
    same = [n for n in names if n.lower() == str(name).strip().lower()]
    if same:
        fix = f"names are case-sensitive: write `merge_method: {same[0]}`."
    else:
        fix = did_you_mean(name, names).lstrip("; .") or "the registered methods are: " + (
            ", ".join(names) + "."
        )
    return [
        Finding(
            TOP,
            name,
            f"merge_method `{name}` is not known to mergekit, which stops before merging; {fix}",
            error=True,
        )
    ]


def _groups(config: Any):
    """(where, input models, base) per group of inputs mergekit validates, as its planner
    forms them (a model list gets the base appended when it is not listed)."""
    base = config.base_model

    def of_models(where, models):
        inputs = [m.model for m in models]
        if base is not None and base not in inputs:
            inputs.append(base)
        return where, inputs, base

    def of_slices(prefix, slices):
        for j, out_slice in enumerate(slices):
            sources = [s.model for s in out_slice.sources]
            yield f"{prefix}slices[{j}]", sources, out_slice.base_model or base

    if config.models:
        yield of_models("models", config.models)
    yield from of_slices("", config.slices or ())
    for name, module in (config.modules or {}).items():
        if module.models:
            yield of_models(f"modules.{name}.models", module.models)
        yield from of_slices(f"modules.{name}.", module.slices or ())


def check_inputs(config: Any) -> List[Finding]:
    """The inputs of each slice (or model list), as the merge method will refuse them."""
    from mergekit.merge_methods import registry

    method = registry.get(config.merge_method)
    findings = []
    for where, inputs, base in _groups(config):
        labels = [model_label(m) for m in inputs]
        twice = sorted({label for label in labels if labels.count(label) > 1})
        if twice:
            findings.append(
                Finding(
                    where,
                    twice[0],
                    f"model `{twice[0]}` is listed twice in {where}: mergekit stops ('Duplicate "
                    "merge inputs'). List each model once (to give it more say, raise its "
                    "`weight` where the method takes one).",
                    error=True,
                )
            )
            continue
        takes_base = method.spec.contract.base.value != "ignored"
        if takes_base and base is not None and base not in inputs and where.endswith("]"):
            findings.append(
                Finding(
                    where,
                    model_label(base),
                    f"{where}: the base model `{model_label(base)}` is not among its sources, "
                    "and mergekit stops ('Base input is not present'). Add "
                    f"`- model: {model_label(base)}` with the same `layer_range` to its "
                    "`sources:`.",
                    error=True,
                )
            )
            continue
        try:
            method.validate_inputs(inputs, base, group_name=where)
        except ValueError as error:
            message = f"{error}; mergekit stops while planning."
            if base is not None and where.endswith("models") and "inputs" in str(error):
                message += (
                    f" The base model `{model_label(base)}` is one of the inputs: mergekit "
                    "adds it to a `models:` list that does not name it."
                )
            findings.append(Finding(where, "", message, error=True))
    return findings + _layer_counts(config)


def _layer_counts(config: Any) -> List[Finding]:
    findings = []
    slices = list(enumerate(config.slices or ()))
    for j, out_slice in slices:
        counts = {
            model_label(s.model): s.layer_range[1] - s.layer_range[0] for s in out_slice.sources
        }
        if len(set(counts.values())) > 1:
            spans = ", ".join(f"`{m}` {n}" for m, n in counts.items())
            findings.append(
                Finding(
                    f"slices[{j}]",
                    "layer_range",
                    f"slices[{j}]: the sources span different numbers of layers ({spans}), "
                    "and mergekit stops ('All inputs to a slice must contain the same number "
                    "of layers'). Give every source a `layer_range` of the same length.",
                    error=True,
                )
            )
    return findings
