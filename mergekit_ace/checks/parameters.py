"""The parameters of a merge configuration, checked as mergekit will resolve them.

mergekit resolves, for every tensor, the parameters its method declares
(``method.spec.parameters``) and never looks at any other name, so a misspelled ``k_frac`` or
a TIES recipe copied under another method merges with the defaults, without a word. Found,
each with where it was written (global, module, slice, model, tensor filter):

- a name the method does not declare (with the nearest declared name, or the methods that do
  declare it);
- a shared parameter written under one model (mergekit reads shared parameters only from the
  global, module and slice parameters), and a per-model parameter of the non-base models
  (``weight``) written under the base model;
- a filter entry that can never apply: one listed after an entry that matches every tensor
  it would (a catch-all ``- value:``, or a filter contained in its own);
- and, as errors (mergekit stops while planning), a value the parameter's own validation
  refuses (``gate: 'yes'``) and a required parameter set nowhere.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, List, Optional, Tuple

from mergekit_ace.checks.findings import Finding, nearest

# A place where parameters are written: (where, parameters, model or None, base model)
Place = Tuple[str, Optional[Dict[str, Any]], Any, Any]
YAML_BOOLEANS = ("yes", "no", "true", "false", "on", "off")


def model_label(model: Any) -> str:
    text = model.model.path
    if model.lora is not None:
        text += f"+{model.lora.path}"
    return text


def entries(setting: Any) -> List[Any]:
    """The filter entries (``ConditionalParameter``) of one setting, in order."""
    from mergekit.config import ConditionalParameter

    settings = setting if isinstance(setting, list) else [setting]
    return [s for s in settings if isinstance(s, ConditionalParameter)]


def filters(setting: Any) -> List[str]:
    return [e.filter for e in entries(setting) if e.filter not in (None, "*")]


def places(config: Any) -> Iterator[Place]:
    """Every place of ``config`` (a ``MergeConfiguration``) where parameters are written."""

    def slices(prefix: str, slice_list, base) -> Iterator[Place]:
        for j, out_slice in enumerate(slice_list or ()):
            slice_base = out_slice.base_model or base
            yield f"{prefix}slices[{j}] parameters", out_slice.parameters, None, slice_base
            for source in out_slice.sources:
                yield (
                    f"{prefix}slices[{j}], model `{model_label(source.model)}`",
                    source.parameters,
                    source.model,
                    slice_base,
                )

    def models(prefix: str, model_list, base) -> Iterator[Place]:
        for entry in model_list or ():
            where = f"{prefix}model `{model_label(entry.model)}`"
            yield where, entry.parameters, entry.model, base

    base = config.base_model
    yield "global parameters", config.parameters, None, base
    yield from models("", config.models, base)
    yield from slices("", config.slices, base)
    for name, module in (config.modules or {}).items():
        prefix = f"modules.{name}, "
        yield f"modules.{name} parameters", module.parameters, None, base
        yield from models(prefix, module.models, base)
        yield from slices(prefix, module.slices, base)


def _owners(name: str, exclude: str) -> List[str]:
    from mergekit.merge_methods import registry

    return [
        m.spec.name
        for m in registry.registered_methods()
        if m.spec.name != exclude and any(p.name == name for p in m.spec.parameters)
    ]


def _undeclared(name: str, place: str, spec: Any) -> str:
    declared = {p.name: p for p in spec.parameters}
    takes = ", ".join(declared) or "no parameters"
    message = f"`{name}` ({place}) is not a parameter of `{spec.name}` and has no effect"
    hint = nearest(name, list(declared))
    owners = _owners(name, spec.name)
    if owners:
        more = ", ..." if len(owners) > 4 else ""
        message += f" (it is a parameter of {', '.join(owners[:4])}{more})."
        if hint:  # a near name that means something else: say what it is
            meaning = declared[hint].description or "another quantity"
            message += (
                f" `{spec.name}` has no `{name}`; its `{hint}` is not the same thing: {meaning}."
            )
    elif hint:
        message += f"; did you mean `{hint}`?"
    else:
        message += "."
    return message + f" `{spec.name}` takes: {takes}."


def check_parameters(config: Any, method: Any = None) -> List[Finding]:
    """Every parameter of ``config`` (a ``MergeConfiguration``) that ``method`` (default: the
    registered ``config.merge_method``) would not read where it is written."""
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import ParameterScope

    method = method or registry.get(config.merge_method)
    spec = method.spec
    declared = {p.name: p for p in spec.parameters}
    findings = []
    for where, parameters, model, base in places(config):
        for name, setting in (parameters or {}).items():
            place = where + "".join(f", filter `{f}`" for f in filters(setting))
            parameter = declared.get(name)
            if parameter is None:
                message = _undeclared(name, place, spec)
            elif model is not None and parameter.scope == ParameterScope.SHARED:
                message = (
                    f"`{name}` ({place}) has no effect under a model: `{spec.name}` reads it "
                    "once for all models; set it in the global, module or slice parameters."
                )
            elif model is not None and model == base and parameter.scope == ParameterScope.NON_BASE:
                message = (
                    f"`{name}` ({place}) has no effect on the base model: `{spec.name}` "
                    "takes it for the other models only."
                )
            else:
                continue
            findings.append(Finding(place, name, message))
    return findings


def check_filter_order(config: Any) -> List[Finding]:
    """Filter entries that never apply: mergekit takes, per tensor, the first entry whose
    filter is contained in the tensor's name (no filter or ``*``: every tensor), so an entry
    after a catch-all, or after a filter contained in its own, is never reached."""
    findings = []
    for where, parameters, _model, _base in places(config):
        for name, setting in (parameters or {}).items():
            listed = entries(setting)
            for i, entry in enumerate(listed):
                earlier = next(
                    (
                        j
                        for j, e in enumerate(listed[:i])
                        if e.filter in (None, "*") or (entry.filter or "").find(e.filter) >= 0
                    ),
                    None,
                )
                if earlier is None:
                    continue
                shadow = listed[earlier].filter
                what = f"filter `{entry.filter}`" if entry.filter else "no filter"
                why = (
                    "has no filter and matches every tensor first"
                    if shadow in (None, "*")
                    else f"(filter `{shadow}`) matches every tensor this one would first"
                )
                findings.append(
                    Finding(
                        f"{where}, `{name}` entry {i + 1}",
                        name,
                        f"`{name}` ({where}): entry {i + 1} ({what}) never applies: entry "
                        f"{earlier + 1} {why}, and mergekit takes the first entry that "
                        "matches. Put the catch-all `- value:` entry last (and narrower "
                        "filters before wider ones).",
                    )
                )
    return findings


def _leaves(setting: Any) -> Iterator[Any]:
    from mergekit.config import ConditionalParameter

    if isinstance(setting, ConditionalParameter):
        yield from _leaves(setting.value)
    elif isinstance(setting, list):
        for item in setting:
            yield from _leaves(item)
    else:
        yield setting


def _refusal(spec_parameter: Any, value: Any) -> Optional[str]:
    from pydantic import ValidationError

    try:
        spec_parameter.validate(value)
    except ValidationError as error:
        message = error.errors()[0].get("msg", str(error))
        return message.replace("Value error, ", "", 1)
    except (ValueError, TypeError) as error:
        return str(error)
    return None


def check_values(config: Any, method: Any = None) -> List[Finding]:
    """Values that mergekit refuses while planning: each value (every end of a gradient,
    every filter entry) goes through the parameter's own validation, the one mergekit
    applies; and required parameters that are set nowhere."""
    from mergekit.merge_methods import registry

    method = method or registry.get(config.merge_method)
    declared = {p.name: p for p in method.spec.parameters}
    findings = []
    for where, parameters, _model, _base in places(config):
        for name, setting in (parameters or {}).items():
            if name not in declared:
                continue
            for value in _leaves(setting):
                refusal = _refusal(declared[name], value)
                if refusal is None:
                    continue
                message = f"`{name}: {value!r}` ({where}) is refused by mergekit: {refusal}."
                fixed = _unquoted(declared[name], value)
                if fixed is not None:
                    message += (
                        f" The quotes make it the string {value!r}, not YAML's {fixed}; "
                        f"write `{name}: {value}` without quotes."
                    )
                findings.append(Finding(where, name, message, error=True))
    return findings + _missing_required(config, method)


def _unquoted(parameter: Any, value: Any) -> Optional[str]:
    if not isinstance(value, str) or value.strip().lower() not in YAML_BOOLEANS:
        return None
    truth = value.strip().lower() in ("yes", "true", "on")
    return None if _refusal(parameter, truth) else str(truth).lower()


def _missing_required(config: Any, method: Any) -> List[Finding]:
    from mergekit.merge_methods.base import ParameterScope

    required = [p for p in method.spec.parameters if p.required]
    if not required:
        return []
    shared_places = [p for p in places(config) if p[2] is None]
    findings = []
    for parameter in required:
        shared = any(parameter.name in (p[1] or {}) for p in shared_places)
        if parameter.scope == ParameterScope.SHARED:
            missing = [] if shared else ["global parameters"]
        else:
            missing = [
                where
                for where, params, model, base in places(config)
                if model is not None
                and not (parameter.scope == ParameterScope.NON_BASE and model == base)
                and not shared
                and parameter.name not in (params or {})
            ]
        for where in missing:
            findings.append(
                Finding(
                    where,
                    parameter.name,
                    f"`{parameter.name}` is required by `{method.spec.name}` and is not set "
                    f"for {where}: mergekit stops while planning. Set it there"
                    + (" or in the global parameters." if where != "global parameters" else "."),
                    error=True,
                )
            )
    return findings
