"""Registration of this package's methods in mergekit's registry, idempotent and safe, and
the hooks that check configurations and extend the model card.

Called by ``import mergekit_ace`` and by the start-up hook right after mergekit's registry,
planner and merge modules have loaded. A name that mergekit (or anything else) already
registered is left alone with a warning, so a future mergekit that ships its own ``ace`` keeps
working.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any, Dict, List, Tuple

if TYPE_CHECKING:  # importing mergekit here would re-enter this module through the hook
    from mergekit.merge_methods.base import MergeMethod

LOG = logging.getLogger("mergekit_ace")


# name -> (adapter module, factory). Modules are imported only when registering, so that
# importing this module never re-enters mergekit's registry through the start-up hook.
METHODS: Dict[str, Tuple[str, str]] = {
    "ace": ("mergekit_ace.methods.ace", "ace_method"),
    "actmat": ("mergekit_ace.methods.actmat", "actmat_method"),
    "tsv": ("mergekit_ace.methods.tsv", "tsv_method"),
    "iso_c": ("mergekit_ace.methods.iso_c", "iso_c_method"),
    "iso_cts": ("mergekit_ace.methods.iso_cts", "iso_cts_method"),
}


def _build(name: str) -> "MergeMethod":
    module, factory = METHODS[name]
    return getattr(importlib.import_module(module), factory)()


_OURS: Dict[str, "MergeMethod"] = {}


def register_all() -> List[str]:
    """Register every method of this package not yet in mergekit's registry; returns the
    names that are ours after the call."""
    from mergekit_ace import compat

    for name in METHODS:
        current = compat.registered_method(name)
        if current is not None:
            if current is not _OURS.get(name):
                LOG.warning(
                    "mergekit already provides a merge method named %r; keeping it, so "
                    "mergekit-ace's %r is not available under that name.",
                    name,
                    name,
                )
            continue
        method = _OURS.get(name) or _build(name)
        compat.register_method(method)
        _OURS[name] = method
    return [name for name, method in _OURS.items() if compat.registered_method(name) is method]


def is_ours(name: str) -> bool:
    """Whether the method registered as ``name`` is one of this package's (the registered
    instance, or another one lent for a run, as ``mergekit-ace inspect`` does)."""
    from mergekit_ace import compat

    method = compat.registered_method(name)
    return name in METHODS and type(method).__module__.startswith("mergekit_ace.")


def install_hooks() -> None:
    """Check every merge configuration before planning (unknown parameters) and after it (the
    experts' tensor shapes), report the kernels' findings per merge, and credit this package's
    methods on the model card; idempotent."""
    from mergekit_ace import card, compat, config_check

    compat.on_config(config_check.warn_ineffective_parameters)
    compat.on_config(start_reports)
    compat.on_plan(config_check.check_planned_shapes)
    compat.on_card(card.extend_card)
    compat.on_merge_end(summarize_reports)
    pending = [name for name in compat.PATCHED_MODULES if not compat.patch_loaded(name)]
    if pending:
        try:
            import _mergekit_ace_autoload  # installed beside the package
        except ImportError:  # a source tree on sys.path, not installed
            LOG.warning("mergekit-ace is not installed; configuration checks and model-card "
                        "credits need `pip install -e .`")
            return
        _mergekit_ace_autoload.install(pending)


def start_reports(config: Any = None, source: Any = None) -> None:
    """Each merge reports its kernels' findings afresh (the first per model or per ``eps`` as
    a warning), even in a process that merged before."""
    from mergekit_ace.kernels.common import reset_reports

    reset_reports()


def summarize_reports(config: Any = None) -> None:
    """After a merge: how many tensors round-off can change by more than 1 %, where the log
    named only the first (the rest are at debug level, ``-vv``)."""
    from mergekit_ace.kernels.ace import accuracy_reports

    count = accuracy_reports.total()
    if count > 1:
        LOG.warning("ACE: in this merge, round-off can change the merged update of %d tensors "
                    "by more than 1 %% (the first is named above, all of them with -vv).", count)


def after_import(module_name: str) -> None:
    """Called by the start-up hook once ``module_name`` (a mergekit module) has loaded."""
    from mergekit_ace import compat

    if module_name == compat.REGISTRY_MODULE:
        register_all()
    else:
        install_hooks()


def our_method(name: str) -> "MergeMethod":
    """This package's instance of method ``name`` (registered or shadowed by mergekit's)."""
    register_all()
    if name not in _OURS:
        _OURS[name] = _build(name)
    return _OURS[name]
