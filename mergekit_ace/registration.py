"""Registration of this package's methods in mergekit's registry, idempotent and safe.

Called by ``import mergekit_ace`` and by the start-up hook right after mergekit's registry
module has loaded. A name that mergekit (or anything else) already registered is left alone
with a warning, so a future mergekit that ships its own ``ace`` keeps working.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable, Dict, List

if TYPE_CHECKING:  # importing mergekit here would re-enter this module through the hook
    from mergekit.merge_methods.base import MergeMethod

LOG = logging.getLogger("mergekit_ace")


def _ace() -> "MergeMethod":
    from mergekit_ace.methods.ace import ace_method

    return ace_method()


METHOD_FACTORIES: Dict[str, Callable[[], "MergeMethod"]] = {
    "ace": _ace,
    # The data-free family; imported lazily, like ``_ace``, so mergekit is not re-entered.
    "actmat": lambda: __import__("mergekit_ace.methods.actmat", fromlist=["*"]).actmat_method(),
    "tsv": lambda: __import__("mergekit_ace.methods.tsv", fromlist=["*"]).tsv_method(),
    "iso_c": lambda: __import__("mergekit_ace.methods.iso_c", fromlist=["*"]).iso_c_method(),
    "iso_cts": lambda: __import__("mergekit_ace.methods.iso_cts", fromlist=["*"]).iso_cts_method(),
}

_OURS: Dict[str, "MergeMethod"] = {}


def register_all() -> List[str]:
    """Register every method of this package not yet in mergekit's registry; returns the
    names that are ours after the call."""
    from mergekit.merge_methods import registry

    for name, factory in METHOD_FACTORIES.items():
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
        method = _OURS.get(name) or factory()
        registry.register(method)
        _OURS[name] = method
    return [name for name, method in _OURS.items() if registry._METHODS.get(name) is method]


def our_method(name: str) -> "MergeMethod":
    """This package's instance of method ``name`` (registered or shadowed by mergekit's)."""
    register_all()
    if name not in _OURS:
        _OURS[name] = METHOD_FACTORIES[name]()
    return _OURS[name]
