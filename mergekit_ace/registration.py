"""Registration of this package's methods in mergekit's registry, idempotent and safe, and the
hooks that check configurations and plans, report the kernels' findings and extend the model
card.

Called by ``import mergekit_ace`` and by the start-up hook (``_autoload``, which calls
:func:`after_import`) right after mergekit's registry, planner and merge modules have loaded.
A name that mergekit (or anything else) already registered is left alone with a warning, so a
future mergekit that ships its own ``ace`` keeps working.
"""

from __future__ import annotations

import logging
from typing import Any, List

from mergekit_ace import card, compat, shapes
from mergekit_ace.checks import at_merge
from mergekit_ace.kernels.ace.reports import accuracy_reports
from mergekit_ace.kernels.reports import reset_reports
from mergekit_ace.kernels.storage_noise import noise_ledger
from mergekit_ace.methods import METHODS, our_method

LOG = logging.getLogger("mergekit_ace")


def register_all() -> List[str]:
    """Register every method of this package not yet in mergekit's registry; returns the
    names that are ours after the call."""
    ours = []
    for name in METHODS:
        current = compat.registered_method(name)
        if current is None:
            compat.register_method(our_method(name))
        elif current is not our_method(name):
            LOG.warning(
                "mergekit already provides a merge method named %r; keeping it, so "
                "mergekit-ace's %r is not available under that name.",
                name,
                name,
            )
            continue
        ours.append(name)
    return ours


def install_hooks() -> None:
    """Check every merge configuration before planning (keys, parameters, values, inputs; a
    mergekit-multi recipe as a whole) and after it (the experts' tensor shapes, filters that
    match no tensor, a dtype coarser than the checkpoints), report the kernels' findings per
    merge, run merges with this package's methods on the overlapped executor, and credit the
    methods on the model card; idempotent."""
    compat.on_config(at_merge.warn_ineffective_parameters)
    compat.on_source(at_merge.warn_source)
    compat.on_config(start_reports)
    compat.on_plan(shapes.check_planned_shapes)
    compat.on_plan(at_merge.warn_planned)
    compat.on_card(card.extend_card)
    compat.on_merge_end(summarize_reports)
    compat.on_executor(choose_executor)
    pending = [name for name in compat.PATCHED_MODULES if not compat.patch_loaded(name)]
    if pending:
        try:
            import _mergekit_ace_autoload  # installed beside the package
        except ImportError:  # a source tree on sys.path, not installed
            LOG.warning(
                "mergekit-ace is not installed; configuration checks and model-card "
                "credits need `pip install -e .`"
            )
            return
        _mergekit_ace_autoload.install(pending)


def choose_executor(config: Any, options: Any) -> Any:
    """The overlapped executor for merges with this package's methods
    (:mod:`mergekit_ace.overlap`, imported only when a merge runs)."""
    from mergekit_ace.overlap import choose_executor as choose

    return choose(config, options)


def start_reports(config: Any = None, source: Any = None) -> None:
    """Each merge reports its kernels' findings afresh (the first per model or per ``eps`` as
    a warning), even in a process that merged before."""
    reset_reports()


def summarize_reports(config: Any = None) -> None:
    """After a merge: each model that was storage noise in some tensors, with the tensors
    where it was not; how many tensors round-off can change by more than 1 %, where the log
    named only the first (the rest are at debug level, ``-vv``)."""
    for line in noise_ledger.summary():
        LOG.warning("%s", line)
    count = accuracy_reports.total()
    if count > 1:
        LOG.warning(
            "ACE: in this merge, round-off can change the merged update of %d tensors "
            "by more than 1 %% (the first is named above, all of them with -vv).",
            count,
        )


def after_import(module_name: str) -> None:
    """Called by the start-up hook once ``module_name`` (a mergekit module) has loaded."""
    if module_name == compat.REGISTRY_MODULE:
        register_all()
    else:
        install_hooks()
