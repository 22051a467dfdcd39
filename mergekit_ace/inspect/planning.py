"""How ``inspect`` plans and instruments a merge with mergekit.

Everything ``inspect`` needs from mergekit beyond a merge goes through this module: the
planning half of ``MergePlanner``, a method lent to the registry for one run and the fields of
the task graph, all three through :mod:`mergekit_ace.compat`, which holds every mergekit
internal, and the checkpoints' headers (:mod:`mergekit_ace.shapes`).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

from mergekit_ace import compat
from mergekit_ace.inspect.costs import sync
from mergekit_ace.inspect.report import InspectError, expert_labels
from mergekit_ace.kernels.ace import ace_merge
from mergekit_ace.methods import model_label
from mergekit_ace.shapes import NotSafetensors, header_entry

METHOD_NAME = "ace"


@dataclass
class Planned:
    tasks: list  # ExecuteMergeMethodTask, one per output tensor
    models: List[Any]  # expert ModelReferences (order of the first merge task)
    labels: List[str]


def load_config(config_path: str):
    import yaml
    from mergekit.config import MergeConfiguration

    from mergekit_ace import compat
    from mergekit_ace.checks.at_merge import warn_source

    with open(config_path, "r", encoding="utf-8") as fp:
        source = fp.read()
    warn_source(source)  # what a merge of this file logs before reading anything
    config = MergeConfiguration.model_validate(yaml.safe_load(source))
    compat.mark_source_checked(config)
    if config.merge_method != METHOD_NAME:
        raise InspectError(
            f"{config_path}: merge_method is {config.merge_method!r}; `mergekit-ace inspect` "
            f"explains ACE merges only (merge_method: {METHOD_NAME})."
        )
    return config


def plan(config_path: str, options) -> Planned:
    """Plan the merge of ``config_path`` with mergekit's own planner under ``options`` (a
    ``MergeOptions``): one merge task per output tensor, in order, and the experts."""
    import mergekit_ace  # noqa: F401  (registers the method)
    from mergekit.architecture import get_architecture_info
    from mergekit.io.tasks import LoaderCache
    from mergekit.plan import MergePlanner

    config = load_config(config_path)
    arch_info = get_architecture_info(config, options)
    LoaderCache().setup(options=options)
    out_config = compat.model_out_config(
        config, arch_info, trust_remote_code=options.trust_remote_code
    )
    planner = MergePlanner(config, arch_info, options=options, out_model_config=out_config)
    with instrumented_method(None):
        # The planning half of MergePlanner.plan_in_memory (whose ReturnTensor wrapper does not
        # validate in mergekit 0.1.5): one merge task per output tensor, nothing to write.
        tasks = [task for _weight, task in compat.plan_tensors(planner)]
    models: List[Any] = []
    for merge_task in tasks:
        for model in compat.planned_tensor(merge_task).experts:
            if model not in models:
                models.append(model)
    return Planned(tasks, models, expert_labels([model_label(m) for m in models]))


@contextlib.contextmanager
def instrumented_method(collect) -> Iterator[Any]:
    """Register, for the duration of the block, an ``ace`` method whose kernel records its
    spectra and run time and hands its diagnostics to ``collect(diag, seconds)``; the
    previously registered method is restored afterwards."""
    from mergekit_ace.methods.ace import ace_method

    method = ace_method()
    if collect is not None:
        timing: Dict[str, float] = {}

        def kernel(base, experts, **kwargs):
            sync(str(base.device))
            start = time.perf_counter()
            out = ace_merge(base, experts, spectra=True, **kwargs)
            sync(str(base.device))
            timing["seconds"] = time.perf_counter() - start
            return out

        method.kernel = kernel
        method.on_diagnostics = lambda diag: collect(diag, timing.get("seconds"))
    with compat.method_registered_as(method):
        yield method


def base_header(merge_task) -> Optional[Tuple[Tuple[int, ...], str, Optional[str]]]:
    """Shape and safetensors dtype of a merge task's base tensor, from the file header alone,
    and the dtype the config asks mergekit to load it in (``None``: as stored)."""
    base = compat.planned_tensor(merge_task).base
    try:
        entry = header_entry(base, compat.input_weights(merge_task)[base])
    except NotSafetensors as error:
        raise InspectError(str(error)) from error
    return None if entry is None else (*entry, compat.load_dtype(merge_task))
