"""What a merge logs before any checkpoint is read, through the hooks of
:mod:`mergekit_ace.compat`: the findings of :mod:`mergekit_ace.checks` for a configuration
that merges with one of this package's methods (mergekit's own methods are left as they
are), and, for any configuration mergekit is about to refuse, what to write instead."""

from __future__ import annotations

import logging
from typing import Any, List, Optional

from mergekit_ace.checks.document import check_source
from mergekit_ace.checks.findings import Finding
from mergekit_ace.checks.parameters import check_filter_order, check_parameters

LOG = logging.getLogger("mergekit_ace")
LISTED = "`mergekit-ace check CONFIG` lists these without merging."


def _ours(method: Optional[str]) -> bool:
    from mergekit_ace.methods import is_ours

    return method is not None and is_ours(method)


def log_findings(findings: List[Finding]) -> List[Finding]:
    for finding in findings:
        (LOG.error if finding.error else LOG.warning)("%s", finding.message)
    if findings:
        LOG.warning("%s", LISTED)
    return findings


def warn_source(source: str) -> List[Finding]:
    """Log the findings of a config file's text (every document): those of documents that
    merge with this package's methods, and the errors of every document (mergekit stops on
    them anyway; the message says what to write instead)."""
    import yaml

    try:
        documents = check_source(source)
    except yaml.YAMLError:
        return []  # mergekit's own YAML error says where
    findings = []
    for document in documents:
        ours = _ours(document.method)
        findings += [f for f in document.findings if f.error or ours]
    return log_findings(findings)


def warn_ineffective_parameters(config: Any, source: Optional[str] = None) -> List[Finding]:
    """Log the findings for a configuration about to merge with one of this package's
    methods: from the YAML ``source`` it was read from where the caller gave it (every check
    of ``mergekit-ace check`` but the planned ones), else from the configuration itself
    (parameters the method ignores, filter entries that never apply). For other methods,
    only what mergekit is about to refuse (an unknown merge method, an invalid value)."""
    from mergekit_ace import compat
    from mergekit_ace.checks.structure import check_method

    if source is not None:
        return warn_source(source)
    if not _ours(config.merge_method):
        return log_findings(check_method(config))  # mergekit stops on an unknown method
    if compat.source_checked(config):  # a mergekit-multi stage or inspect: already logged
        return []
    return log_findings(check_parameters(config) + check_filter_order(config))


def warn_planned(planner: Any) -> List[Finding]:
    """After mergekit planned a merge of this package's methods: filters that match no
    planned tensor, a ``dtype:`` coarser than the checkpoints."""
    from mergekit_ace import compat
    from mergekit_ace.checks.planned import planned_findings

    config = compat.config_as_written(planner)
    if not _ours(config.merge_method):
        return []
    try:
        findings = planned_findings(config, planner)
    except Exception as error:  # a check that fails must not stop a merge mergekit accepts
        LOG.debug("mergekit-ace: planned checks not run (%r)", error)
        return []
    for finding in findings:
        LOG.warning("%s", finding.message)
    return findings
