"""How ``inspect`` plans and instruments a merge with mergekit.

Everything ``inspect`` needs from mergekit beyond a merge is in this module: the planning
half of ``MergePlanner`` and a method lent to the registry for one run (both through
:mod:`mergekit_ace.compat`, which holds every private name), and the task graph's fields
(``gather_tensors``, ``weight_info``, the loaders' index).
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

from mergekit_ace.inspect.costs import sync
from mergekit_ace.inspect.report import InspectError, expert_labels
from mergekit_ace.kernels.ace import ace_merge
from mergekit_ace.kernels.common import check_shapes as check_inputs_shapes
from mergekit_ace.methods.common import model_label

METHOD_NAME = "ace"


@dataclass
class Planned:
    tasks: list  # ExecuteMergeMethodTask, one per output tensor
    models: List[Any]  # expert ModelReferences (order of the first merge task)
    labels: List[str]


def load_config(config_path: str):
    import yaml
    from mergekit.config import MergeConfiguration

    with open(config_path, "r", encoding="utf-8") as fp:
        data = yaml.safe_load(fp)
    config = MergeConfiguration.model_validate(data)
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

    from mergekit_ace import compat

    config = load_config(config_path)
    arch_info = get_architecture_info(config, options)
    LoaderCache().setup(options=options)
    out_config = compat.model_out_config(config, arch_info, trust_remote_code=options.trust_remote_code)
    planner = MergePlanner(config, arch_info, options=options, out_model_config=out_config)
    with instrumented_method(None):
        # The planning half of MergePlanner.plan_in_memory (whose ReturnTensor wrapper does not
        # validate in mergekit 0.1.5): one merge task per output tensor, nothing to write.
        tasks = [task for _weight, task in compat.plan_tensors(planner)]
    models: List[Any] = []
    for merge_task in tasks:
        for model in merge_task.model_order:
            if model != merge_task.base_model and model not in models:
                models.append(model)
    return Planned(tasks, models, expert_labels([model_label(m) for m in models]))


@contextlib.contextmanager
def instrumented_method(collect) -> Iterator[Any]:
    """Register, for the duration of the block, an ``ace`` method whose kernel records its
    spectra and run time and hands its diagnostics to ``collect(diag, seconds)``; the
    previously registered method is restored afterwards."""
    from mergekit_ace import compat
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


def gather_of(merge_task):
    """The ``GatherTensors`` task under a merge task (through any vocabulary alignment)."""
    inner = merge_task.gather_tensors
    while not hasattr(inner, "weight_info") and hasattr(inner, "gather_tensors"):
        inner = inner.gather_tensors
    return inner


def base_header(merge_task) -> Optional[Tuple[Tuple[int, ...], str, Optional[str]]]:
    """Shape and safetensors dtype of a merge task's base tensor, from the file header alone,
    and the dtype the config asks mergekit to load it in (``None``: as stored)."""
    gather = gather_of(merge_task)
    entry = header_entry(merge_task.base_model, gather.weight_info[merge_task.base_model])
    return None if entry is None else (*entry, gather.dtype)


def header_entry(model, weight_info, *, required: bool = True) -> Optional[Tuple[Tuple[int, ...], str]]:
    """Shape and safetensors dtype of one input tensor, from the file header alone; ``None``
    if the model has no such tensor, or (``required=False``) if its file is not safetensors."""
    from mergekit.io.tasks import LoaderCache

    index = LoaderCache().get(model).index
    names = [weight_info.name] + list(weight_info.aliases or []) + list(weight_info.tied_names or [])
    for name in names:
        path = index.tensor_paths.get(name)
        if path is None:
            continue
        if not str(path).endswith(".safetensors"):
            if not required:
                return None
            raise InspectError(
                f"{model}: {os.path.basename(path)} is not a safetensors file, so its header "
                "cannot give shapes without loading it; run without --estimate-only."
            )
        return _header(os.path.join(index.base_path, path)).get(name)
    return None


@functools.lru_cache(maxsize=64)
def _header(path: str) -> Dict[str, Tuple[Tuple[int, ...], str]]:
    """``{tensor name: (shape, dtype)}`` of one safetensors file, read once."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        return {name: (tuple(handle.get_slice(name).get_shape()), handle.get_slice(name).get_dtype())
                for name in handle.keys()}


def check_shapes(merge_tasks: Iterable[Any]) -> None:
    """Refuse, from the checkpoints' headers and before any tensor is loaded, an expert tensor
    whose shape differs from the base's, naming the tensor and the model. Tensors whose rows
    mergekit aligns (a ``tokenizer:`` section) and checkpoints that are not safetensors are
    left to the kernel's own check."""
    for merge_task in merge_tasks:
        gather = merge_task.gather_tensors
        if not hasattr(gather, "weight_info"):  # vocabulary alignment sits in between
            continue
        base = merge_task.base_model
        entries = {model: header_entry(model, info, required=False)
                   for model, info in gather.weight_info.items()}
        if entries.get(base) is None:
            continue
        experts = [m for m in merge_task.model_order if m != base and entries.get(m) is not None]
        check_inputs_shapes(entries[base][0], [entries[m][0] for m in experts],
                            tensor_name=merge_task.output_weight.name,
                            expert_names=[model_label(m) for m in experts])
