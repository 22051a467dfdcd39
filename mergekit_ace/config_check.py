"""Find the parameters of a merge configuration that the merge method would silently ignore.

mergekit resolves, for every tensor, the parameters its method declares
(``method.spec.parameters``) and never looks at any other name, so a misspelled ``k_frac`` or
a TIES recipe copied under another method merges with the defaults, without a word. Three
cases are found, each with where it was written (global, module, slice, model, tensor
filter):

- a name the method does not declare (with the nearest declared name, if any);
- a shared parameter written under one model: mergekit reads shared parameters only from the
  global, module and slice parameters;
- a per-model parameter of the non-base models (``weight``) written under the base model.

:func:`warn_ineffective_parameters` runs at the start of every merge of this package's methods
(hooked into mergekit by :mod:`mergekit_ace.compat`); :func:`check_document` backs
``mergekit-ace check``, for any method and also for misspelled configuration keys.
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

LOG = logging.getLogger("mergekit_ace")


@dataclass(frozen=True)
class Finding:
    where: str  # "global parameters", "model `expert-a`", "slices[0], model `x`, filter `mlp`"
    name: str  # the parameter or key as written
    message: str

    def __str__(self) -> str:
        return self.message


def nearest(name: str, choices: Sequence[str]) -> Optional[str]:
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return match[0] if match else None


def _filters(setting: Any) -> List[str]:
    from mergekit.config import ConditionalParameter

    settings = setting if isinstance(setting, list) else [setting]
    return [
        s.filter
        for s in settings
        if isinstance(s, ConditionalParameter) and s.filter not in (None, "*")
    ]


def _model_label(model: Any) -> str:
    text = model.model.path
    if model.lora is not None:
        text += f"+{model.lora.path}"
    return text


# A place where parameters are written: (where, parameters, model or None, base model)
Place = Tuple[str, Optional[Dict[str, Any]], Any, Any]


def _places(config: Any) -> Iterator[Place]:
    def slices(prefix: str, slice_list, base) -> Iterator[Place]:
        for j, out_slice in enumerate(slice_list or ()):
            slice_base = out_slice.base_model or base
            yield f"{prefix}slices[{j}] parameters", out_slice.parameters, None, slice_base
            for source in out_slice.sources:
                yield (
                    f"{prefix}slices[{j}], model `{_model_label(source.model)}`",
                    source.parameters,
                    source.model,
                    slice_base,
                )

    def models(prefix: str, model_list, base) -> Iterator[Place]:
        for entry in model_list or ():
            yield (
                f"{prefix}model `{_model_label(entry.model)}`",
                entry.parameters,
                entry.model,
                base,
            )

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


def check_parameters(config: Any, method: Any = None) -> List[Finding]:
    """Every parameter of ``config`` (a ``MergeConfiguration``) that ``method`` (default: the
    registered ``config.merge_method``) would not read where it is written."""
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import ParameterScope

    method = method or registry.get(config.merge_method)
    spec = method.spec
    declared = {p.name: p for p in spec.parameters}
    takes = ", ".join(declared) or "no parameters"
    findings = []
    for where, parameters, model, base in _places(config):
        for name, setting in (parameters or {}).items():
            place = where + "".join(f", filter `{f}`" for f in _filters(setting))
            parameter = declared.get(name)
            if parameter is None:
                hint = nearest(name, list(declared))
                owners = _owners(name, spec.name)
                message = (
                    f"`{name}` ({place}) is not a parameter of `{spec.name}` and has no effect"
                )
                if hint:
                    message += f"; did you mean `{hint}`?"
                elif owners:
                    more = ", ..." if len(owners) > 4 else ""
                    message += f" (it is a parameter of {', '.join(owners[:4])}{more})."
                else:
                    message += "."
                message += f" `{spec.name}` takes: {takes}."
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


def warn_ineffective_parameters(config: Any, source: Optional[str] = None) -> List[Finding]:
    """Log a warning for each finding of :func:`check_parameters` when ``config`` merges with
    one of this package's methods (mergekit's own methods are left as they are); with the YAML
    ``source`` it was read from, also for each configuration key pydantic dropped
    (``paramters:``)."""
    from mergekit.config import MergeConfiguration

    from mergekit_ace.methods import is_ours

    if not is_ours(config.merge_method):
        return []
    findings = []
    if source is not None:
        import yaml

        try:
            data = yaml.safe_load(source)
        except yaml.YAMLError:
            data = None
        if isinstance(data, dict):
            findings += list(_unknown_keys(data, MergeConfiguration, TOP))
    findings += check_parameters(config)
    for finding in findings:
        LOG.warning("%s", finding.message)
    if findings:
        LOG.warning("`mergekit-ace check CONFIG` lists these without merging.")
    return findings


# --- the whole document, for `mergekit-ace check` --------------------------------------

TOP = "top level"


def _unknown_keys(data: Any, model: Any, where: str) -> Iterator[Finding]:
    """Keys of ``data`` (a YAML mapping) that pydantic ``model`` would drop without a word."""
    from mergekit.config import (
        InputModelDefinition,
        InputSliceDefinition,
        OutputModuleDefinition,
        OutputSliceDefinition,
    )

    if not isinstance(data, dict):
        return
    fields = list(model.model_fields)
    for key in data:
        if key not in fields:
            hint = nearest(str(key), fields)
            yield Finding(
                where,
                str(key),
                f"`{key}` ({where}) is not a configuration key and is ignored"
                + (f"; did you mean `{hint}`?" if hint else "."),
            )
    children = {
        "models": InputModelDefinition,
        "slices": OutputSliceDefinition,
        "sources": InputSliceDefinition,
    }
    for key, child in children.items():
        for i, entry in enumerate(data.get(key) or () if isinstance(data.get(key), list) else ()):
            prefix = "" if where == TOP else f"{where}."
            yield from _unknown_keys(entry, child, f"{prefix}{key}[{i}]")
    modules = data.get("modules")
    if isinstance(modules, dict):
        for name, module in modules.items():
            yield from _unknown_keys(module, OutputModuleDefinition, f"modules.{name}")


def check_document(data: Any, label: str = "") -> List[Finding]:
    """Findings for one YAML document of a ``mergekit-yaml`` (or ``mergekit-multi``) config:
    unknown keys, an unknown merge method, and ineffective parameters."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge_methods import registry

    where = TOP
    if not isinstance(data, dict):
        return [Finding(where, "", f"{label}not a mapping of configuration keys.")]
    data = dict(data)
    data.pop("name", None)  # mergekit-multi's stage name
    findings = [
        Finding(f.where, f.name, f"{label}{f.message}")
        for f in _unknown_keys(data, MergeConfiguration, TOP)
    ]
    config = MergeConfiguration.model_validate(data)
    names = [m.spec.name for m in registry.registered_methods()]
    if config.merge_method not in names:
        hint = nearest(config.merge_method, names)
        findings.append(
            Finding(
                where,
                config.merge_method,
                f"{label}merge_method `{config.merge_method}` is not known to "
                "mergekit" + (f"; did you mean `{hint}`?" if hint else "."),
            )
        )
        return findings
    return findings + [
        Finding(f.where, f.name, f"{label}{f.message}") for f in check_parameters(config)
    ]
