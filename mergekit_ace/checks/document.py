"""One configuration file, as ``mergekit-yaml`` or ``mergekit-multi`` will read it: each
YAML document's keys, validation, merge method, inputs and parameters, and, for a
multi-document recipe, the stage names. :func:`check_source` is what ``mergekit-ace check``
reports and what the merge itself logs before any checkpoint is read."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional, Set

from mergekit_ace.checks.findings import Finding
from mergekit_ace.checks.keys import TOP, anchor_holders, document_keys, moe_keys
from mergekit_ace.checks.parameters import check_filter_order, check_parameters, check_values
from mergekit_ace.checks.structure import check_inputs, check_method, validate


@dataclass
class Document:
    """One YAML document: its ``label`` in messages (``"[stage] "`` in a multi-document
    file), its stage ``name``, the ``config`` (``None`` when mergekit cannot build one) and
    the ``findings``, labelled."""

    label: str
    name: Optional[str]
    config: Any = None
    findings: List[Finding] = field(default_factory=list)

    @property
    def method(self) -> Optional[str]:
        return None if self.config is None else self.config.merge_method


def check_document(data: Any, anchors: Optional[Set[str]] = None) -> tuple:
    """``(MergeConfiguration or None, findings)`` of one document (a ``name:`` key, the
    stage name of a ``mergekit-multi`` recipe, is allowed)."""
    if data is None:
        return None, [Finding(TOP, "", "the document is empty.", error=True)]
    if not isinstance(data, dict):
        return None, [
            Finding(TOP, "", "not a mapping of configuration keys (`merge_method: ...`).", True)
        ]
    data = dict(data)
    data.pop("name", None)
    config, refused = validate(data)
    if moe_keys(data):  # its keys are mergekit-moe's: only say so
        return None, refused
    findings = document_keys(data, anchors)
    if config is None:
        return None, findings + refused
    refused = check_method(config)
    if refused:
        return config, findings + refused
    findings += check_parameters(config) + check_filter_order(config)
    return config, findings + check_values(config) + check_inputs(config)


def check_source(text: str) -> List[Document]:
    """Every document of a config file's ``text`` (``yaml.YAMLError`` if it is not YAML)."""
    import yaml

    documents = list(yaml.safe_load_all(text))
    if not documents:
        return [Document("", None, None, [Finding(TOP, "", "the file is empty.", error=True)])]
    anchors = anchor_holders(text)
    multi = len(documents) > 1
    checked = []
    for index, data in enumerate(documents):
        name = data.get("name") if isinstance(data, dict) else None
        label = f"[{name if name is not None else f'document {index + 1}'}] " if multi else ""
        config, findings = check_document(data, anchors[index] if index < len(anchors) else None)
        checked.append(Document(label, name, config, [f.labelled(label) for f in findings]))
    if multi:
        _stage_names(checked)
    return checked


def _stage_names(documents: List[Document]) -> None:
    """mergekit-multi's rules: stage names are unique, one document at most is unnamed."""
    seen: Set[Any] = set()
    for document in documents:
        if document.name in seen:
            if document.name is None:
                message = (
                    "a second document without `name:`: mergekit-multi takes one unnamed "
                    "document at most (the final merge, written to --out-path); give this "
                    "one a `name:` (another stage can then use it as a model)."
                )
            else:
                message = f"`name: {document.name}` is used twice; stage names must differ."
            document.findings.append(Finding(TOP, "name", document.label + message, error=True))
        seen.add(document.name)
