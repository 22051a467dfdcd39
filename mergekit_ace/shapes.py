"""The experts' tensor shapes, checked from the checkpoints' safetensors headers before any
tensor is loaded: an expert whose tensor has another shape than the base's is refused, naming
the tensor and the model (mergekit's own check comes when the merge reaches that tensor and
lists the shapes only).

:func:`check_planned_shapes` runs right after mergekit has planned a merge of this package's
methods (hooked in by :mod:`mergekit_ace.registration`); ``mergekit-ace inspect`` plans through
the same hook and reads the headers with :func:`header_entry`.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any, Dict, Iterable, Optional, Tuple

from mergekit_ace import compat
from mergekit_ace.kernels.inputs import MergeInputError, check_shapes
from mergekit_ace.methods import is_ours, model_label

LOG = logging.getLogger("mergekit_ace")
Header = Tuple[Tuple[int, ...], str]  # shape, safetensors dtype


class NotSafetensors(ValueError):
    """A checkpoint file whose header cannot give shapes without loading it."""


def check_planned_shapes(planner: Any) -> None:
    """Refuse a merge of this package's methods whose experts' tensor shapes differ from the
    base's (:func:`check_header_shapes`), once ``planner`` has planned it. Only that refusal
    stops the merge: a header that cannot be read leaves the tensor to the kernel's own
    check."""
    tasks = [task for _weight, task in compat.planned_tensors(planner)]
    tasks = [task for task in tasks if is_ours(compat.planned_tensor(task).method)]
    try:
        check_header_shapes(tasks)
    except MergeInputError:
        raise
    except Exception as error:  # not safetensors, an unusual model reference, ...
        LOG.debug("mergekit-ace: shapes not checked from the headers (%r)", error)


def check_header_shapes(merge_tasks: Iterable[Any]) -> None:
    """Refuse, from the checkpoints' headers and before any tensor is loaded, an expert tensor
    whose shape differs from the base's, naming the tensor and the model. Tensors whose rows
    mergekit aligns (a ``tokenizer:`` section) and checkpoints that are not safetensors are
    left to the kernel's own check."""
    for merge_task in merge_tasks:
        if compat.rows_aligned(merge_task):
            continue
        planned = compat.planned_tensor(merge_task)
        entries = {
            model: header_entry(model, info, required=False)
            for model, info in compat.input_weights(merge_task).items()
        }
        if entries.get(planned.base) is None:
            continue
        experts = [m for m in planned.experts if entries.get(m) is not None]
        check_shapes(
            entries[planned.base][0],
            [entries[m][0] for m in experts],
            tensor_name=planned.name,
            expert_names=[model_label(m) for m in experts],
        )


def header_entry(model: Any, info: Any, *, required: bool = True) -> Optional[Header]:
    """Shape and safetensors dtype of one input tensor (``info``: its ``WeightInfo``, from
    :func:`~mergekit_ace.compat.input_weights`), from the file header alone; ``None`` if the
    model has no such tensor, or (``required=False``) if its file is not safetensors
    (``required=True``: :class:`NotSafetensors`)."""
    found = compat.tensor_file(model, info)
    if found is None:
        return None
    path, name = found
    if not path.endswith(".safetensors"):
        if not required:
            return None
        raise NotSafetensors(
            f"{model}: {os.path.basename(path)} is not a safetensors file, so its header "
            "cannot give shapes without loading it; run without --estimate-only."
        )
    return _header(path).get(name)


@functools.lru_cache(maxsize=64)
def _header(path: str) -> Dict[str, Header]:
    """``{tensor name: (shape, dtype)}`` of one safetensors file, read once."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        return {
            name: (tuple(handle.get_slice(name).get_shape()), handle.get_slice(name).get_dtype())
            for name in handle.keys()
        }
