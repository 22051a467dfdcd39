"""Registration of this package's methods in mergekit's registry, idempotent and safe.

Called by ``import mergekit_ace`` and by the start-up hook right after mergekit's registry
module has loaded. A name that mergekit (or anything else) already registered is left alone
with a warning, so a future mergekit that ships its own ``ace`` keeps working.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Dict, List, Tuple

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
    from mergekit.merge_methods import registry

    for name in METHODS:
        current = registry._METHODS.get(name)
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
        registry.register(method)
        _OURS[name] = method
    return [name for name, method in _OURS.items() if registry._METHODS.get(name) is method]


def our_method(name: str) -> "MergeMethod":
    """This package's instance of method ``name`` (registered or shadowed by mergekit's)."""
    register_all()
    if name not in _OURS:
        _OURS[name] = _build(name)
    return _OURS[name]
