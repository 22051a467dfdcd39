"""This package's merge methods: one thin mergekit adapter per method, each wrapping a kernel of
``mergekit_ace.kernels``, and which registered method is ours.

Adapter modules import mergekit, so they are imported only when a method is built: importing
this package (as the start-up hook does while mergekit's registry loads) must not re-enter
mergekit.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Dict, Tuple

from mergekit_ace import compat

if TYPE_CHECKING:
    from mergekit.merge_methods.base import MergeMethod

# name -> (adapter module, factory)
METHODS: Dict[str, Tuple[str, str]] = {
    "ace": ("mergekit_ace.methods.ace", "ace_method"),
    "actmat": ("mergekit_ace.methods.actmat", "actmat_method"),
    "tsv": ("mergekit_ace.methods.tsv", "tsv_method"),
    "iso_c": ("mergekit_ace.methods.iso_c", "iso_c_method"),
    "iso_cts": ("mergekit_ace.methods.iso_cts", "iso_cts_method"),
}

_OURS: Dict[str, "MergeMethod"] = {}


def our_method(name: str) -> "MergeMethod":
    """This package's instance of method ``name``, built once (the one registered, unless
    mergekit ships its own method of that name)."""
    if name not in _OURS:
        module, factory = METHODS[name]
        _OURS[name] = getattr(importlib.import_module(module), factory)()
    return _OURS[name]


def is_ours(name: str) -> bool:
    """Whether the method registered as ``name`` is one of this package's (the registered
    instance, or another one lent for a run, as ``mergekit-ace inspect`` does)."""
    method = compat.registered_method(name)
    return name in METHODS and type(method).__module__.startswith("mergekit_ace.")


def model_label(model_id: Any) -> str:
    """A readable name for a mergekit ``ModelReference`` (or any other input id)."""
    model = getattr(model_id, "model", None)
    path = getattr(model, "path", None)
    return str(path) if path is not None else str(model_id)
