"""Keys of a merge configuration that mergekit drops without a word: misspelled
configuration keys (``paramters:``, ``merge_methods:``), misspelled keys of the ``tokenizer:``
section (``sorce:``, ``froce:``, ``pad_to_multiple:``) and of a filter entry (``fliter:``),
and ``residual_weight``, which mergekit accepts and nothing reads. All of them are read from
the YAML as written: pydantic has dropped them by the time a ``MergeConfiguration`` exists.

A top-level key whose value holds a YAML anchor (``x-common: &common {...}``) is a place to
write shared values once, not a mistake, and is not reported.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, List, Optional, Set

from mergekit_ace.checks.findings import Finding, did_you_mean, nearest

TOP = "top level"
FILTER_ENTRY_KEYS = ("filter", "value")
# Keys mergekit-yaml configs never have and mergekit-moe configs always do.
MOE_KEYS = ("experts", "gate_mode", "experts_per_token")


def _fields(model: Any) -> List[str]:
    return list(model.model_fields)


def unknown_keys(data: Any, model: Any, where: str) -> Iterator[Finding]:
    """Keys of ``data`` (a YAML mapping) that pydantic ``model`` would drop without a word,
    and the same below it (models, slices, sources, modules, tokenizer, parameters)."""
    from mergekit.config import (
        InputModelDefinition,
        InputSliceDefinition,
        OutputModuleDefinition,
        OutputSliceDefinition,
    )

    if not isinstance(data, dict):
        return
    fields = _fields(model)
    for key in data:
        if key not in fields:
            yield Finding(
                where,
                str(key),
                f"`{key}` ({where}) is not a configuration key and is ignored"
                + did_you_mean(str(key), fields),
            )
    prefix = "" if where == TOP else f"{where}."
    children = {
        "models": InputModelDefinition,
        "slices": OutputSliceDefinition,
        "sources": InputSliceDefinition,
    }
    for key, child in children.items():
        entries = data.get(key)
        for i, entry in enumerate(entries if isinstance(entries, list) else ()):
            yield from unknown_keys(entry, child, f"{prefix}{key}[{i}]")
    modules = data.get("modules")
    if isinstance(modules, dict):
        for name, module in modules.items():
            yield from unknown_keys(module, OutputModuleDefinition, f"modules.{name}")
    if "tokenizer" in fields:
        yield from tokenizer_keys(data.get("tokenizer"))
    yield from filter_entry_keys(data.get("parameters"), where)
    if "residual_weight" in fields and "residual_weight" in data:
        yield Finding(
            where,
            "residual_weight",
            f"`residual_weight` ({where}) is accepted by mergekit's configuration but read by "
            "nothing: it has no effect. Remove it (a model's share of the merge is set by "
            "the method's parameters, such as `weight`, where the method takes one).",
        )


def tokenizer_keys(section: Any) -> Iterator[Finding]:
    """Misspelled keys of the ``tokenizer:`` section, its ``tokens`` and their ``source``."""
    from mergekit.tokenizer.config import (
        ModelTokenEmbedding,
        TokenEmbeddingConfig,
        TokenizerConfig,
        ZeroEmbedding,
    )

    if not isinstance(section, dict):
        return
    yield from _flat_keys(section, TokenizerConfig, "tokenizer")
    tokens = section.get("tokens")
    for token, entry in (tokens if isinstance(tokens, dict) else {}).items():
        where = f"tokenizer.tokens[{token!r}]"
        yield from _flat_keys(entry, TokenEmbeddingConfig, where)
        source = entry.get("source") if isinstance(entry, dict) else None
        if isinstance(source, dict):
            kind = ZeroEmbedding if source.get("kind") == "zero" else ModelTokenEmbedding
            yield from _flat_keys(source, kind, f"{where}.source")


# What mergekit does instead, when a misspelled key of the tokenizer section is dropped.
DEFAULTS_USED = {
    "source": "mergekit uses `source: union` (the union of all the models' vocabularies)",
    "force": "mergekit uses `force: false`",
    "pad_to_multiple_of": "the vocabulary is not padded",
}


def _flat_keys(data: Any, model: Any, where: str) -> Iterator[Finding]:
    if not isinstance(data, dict):
        return
    fields = _fields(model)
    for key in data:
        if key in fields:
            continue
        hint = nearest(str(key), fields)
        message = f"`{key}` ({where}) is not a tokenizer key and is ignored"
        if hint:
            message += f"; did you mean `{hint}`?"
            if hint not in data and hint in DEFAULTS_USED:
                message += f" As written, {DEFAULTS_USED[hint]}."
        else:
            message += "."
        yield Finding(where, str(key), message + f" Keys there: {', '.join(fields)}.")


def filter_entry_keys(parameters: Any, where: str) -> Iterator[Finding]:
    """Misspelled keys of filter entries (``{fliter: lm_head, value: 0}``): mergekit drops the
    key, and an entry that lost its ``filter`` applies to every tensor."""
    place = "global parameters" if where == TOP else f"{where} parameters"
    for name, setting in (parameters if isinstance(parameters, dict) else {}).items():
        entries = setting if isinstance(setting, list) else [setting]
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict):
                continue
            for key in entry:
                if key in FILTER_ENTRY_KEYS:
                    continue
                scope = (
                    "so this entry applies to every tensor"
                    if "filter" not in entry
                    else "and does nothing"
                )
                yield Finding(
                    f"{place}, `{name}` entry {i + 1}",
                    str(key),
                    f"`{key}` ({place}, `{name}`, entry {i + 1}) is not a key of a filter "
                    f"entry and is ignored, {scope}"
                    + did_you_mean(str(key), FILTER_ENTRY_KEYS)
                    + " A filter entry takes: filter, value.",
                )


def anchor_holders(text: str) -> List[Set[str]]:
    """Per YAML document of ``text``, the top-level keys whose value carries an anchor
    (``x-common: &common``)."""
    import yaml

    holders: List[Set[str]] = []
    depth, is_key, key = 0, True, None
    nodes = (yaml.MappingStartEvent, yaml.SequenceStartEvent, yaml.ScalarEvent, yaml.AliasEvent)
    for event in yaml.parse(text):
        if isinstance(event, yaml.DocumentStartEvent):
            holders.append(set())
            depth, is_key, key = 0, True, None
        elif isinstance(event, nodes):
            if depth == 1:
                if is_key:
                    key = getattr(event, "value", None)
                elif getattr(event, "anchor", None) and key is not None:
                    holders[-1].add(key)
                is_key = not is_key
            if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                depth += 1
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1
    return holders


def document_keys(data: Dict[str, Any], anchors: Optional[Set[str]] = None) -> List[Finding]:
    """The key findings of one document (a mapping; ``name`` already removed)."""
    from mergekit.config import MergeConfiguration

    anchors = anchors or set()
    return [
        f
        for f in unknown_keys(data, MergeConfiguration, TOP)
        if not (f.where == TOP and f.name in anchors)
    ]


def moe_keys(data: Dict[str, Any]) -> List[str]:
    """The mergekit-moe keys of a document without a ``merge_method``."""
    if "merge_method" in data:
        return []
    return [key for key in MOE_KEYS if key in data]
