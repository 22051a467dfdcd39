"""Checks that need the merge as mergekit plans it (the output tensors' names, and the
inputs' stored dtypes from the safetensors headers; no tensor is read):

- a filter that matches no tensor of the merge (``filter: mpl`` for ``mlp``), named with the
  nearest part of a real tensor name;
- a ``dtype:`` coarser than the precision the checkpoints are stored in (``dtype: bfloat16``
  on float32 checkpoints): mergekit rounds base and experts to it before the task vectors
  (expert minus base) exist, and the rounding lands on task vectors often no larger than it.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Set

from mergekit_ace.checks.findings import Finding, nearest
from mergekit_ace.checks.parameters import entries, places

# Significant bits (mantissa bits) per dtype, by the names configs and headers use.
MANTISSA_BITS = {
    "float64": 52,
    "F64": 52,
    "float32": 23,
    "F32": 23,
    "float16": 10,
    "F16": 10,
    "bfloat16": 7,
    "BF16": 7,
}
CANONICAL = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
# Measured on float32 test checkpoints (docs/method.md, "A dtype coarser than the
# checkpoints"): dtype bfloat16 against dtype float32, change of the merged update.
MEASURED_EFFECT = (
    "on float32 checkpoints whose task vectors are 1 % of the weights' scale, as fine-tunes' "
    "often are, `dtype: bfloat16` changed ACE's merged update by 41-69 % per matrix and "
    "task arithmetic's by 9-11 % against `dtype: float32`"
)


def unmatched_filters(config: Any, tensor_names: Iterable[str]) -> List[Finding]:
    """Filters of ``config`` (the configuration as written) that no tensor name of the
    planned merge contains."""
    names = list(tensor_names)
    parts = _name_parts(names)
    findings, seen = [], set()
    for where, parameters, _model, _base in places(config):
        for name, setting in (parameters or {}).items():
            for entry in entries(setting):
                text = entry.filter
                if text in (None, "*") or any(text in n for n in names):
                    continue
                if (where, name, text) in seen:
                    continue
                seen.add((where, name, text))
                hint = nearest(text, parts, cutoff=0.5)
                message = (
                    f"`{name}` ({where}): filter `{text}` matches no tensor of this merge, "
                    "so its value is never used"
                    + (f"; did you mean `{hint}`?" if hint else ".")
                    + " A filter applies to every tensor whose name contains it"
                )
                example = next((n for n in names if hint and hint in n), None)
                if names:
                    message += f" (a tensor here: `{example or names[len(names) // 2]}`)"
                where_written = f"{where}, `{name}`, filter `{text}`"
                findings.append(Finding(where_written, text, message + "."))
    return findings


def _name_parts(names: List[str]) -> List[str]:
    """The parts of tensor names a filter is written as: ``mlp``, ``up_proj``,
    ``mlp.up_proj``, ``embed_tokens``, ..."""
    parts: Set[str] = set()
    for name in names:
        words = [w for w in name.split(".") if not w.isdigit() and w not in ("weight", "bias")]
        parts.update(words)
        parts.update(".".join(words[i : i + 2]) for i in range(len(words) - 1))
    return sorted(parts)


def coarse_dtype(config: Any, stored: Dict[str, Set[str]]) -> List[Finding]:
    """A ``dtype:`` with fewer significant bits than some model's stored tensors;
    ``stored``: ``{model label: {dtype names}}``."""
    wanted = config.dtype
    bits = MANTISSA_BITS.get(str(wanted)) if wanted else None
    if bits is None:
        return []
    finer: Dict[str, str] = {}
    for label, dtypes in stored.items():
        best = max(dtypes, key=lambda d: MANTISSA_BITS.get(d, 0), default=None)
        if best is not None and MANTISSA_BITS.get(best, 0) > bits:
            finer[label] = CANONICAL.get(best, best)
    if not finer:
        return []
    store = sorted(set(finer.values()), key=lambda d: -MANTISSA_BITS[d])[0]
    listed = ", ".join(f"`{m}`" for m in list(finer)[:4]) + (", ..." if len(finer) > 4 else "")
    return [
        Finding(
            "top level",
            "dtype",
            f"`dtype: {wanted}` (top level) is coarser than the {store} the checkpoints are "
            f"stored in ({listed}): mergekit rounds the base and the experts to {wanted} "
            f"({bits + 1} significant bits) before the task vectors (expert minus base) "
            f"exist, so the rounding lands on them; {MEASURED_EFFECT}. Write `dtype: {store}` "
            f"(and `out_dtype: {wanted}` for a {wanted} output).",
        )
    ]


def stored_dtypes(merge_tasks: Iterable[Any]) -> Dict[str, Set[str]]:
    """``{model label: {stored dtype}}`` over the inputs of ``merge_tasks``, from the
    safetensors headers (a checkpoint that is not safetensors: its config.json's
    ``torch_dtype``)."""
    from mergekit_ace import compat
    from mergekit_ace.methods import model_label
    from mergekit_ace.shapes import header_entry

    stored: Dict[str, Set[str]] = {}
    for task in merge_tasks:
        for model, info in compat.input_weights(task).items():
            label = model_label(model)
            try:
                entry = header_entry(model, info, required=False)
            except Exception:  # a header that cannot be read: the config's dtype then
                entry = None
            dtype = entry[1] if entry is not None else _config_dtype(model)
            if dtype is not None:
                stored.setdefault(label, set()).add(dtype)
    return stored


def _config_dtype(model: Any) -> Optional[str]:
    try:
        value = getattr(model.config(), "torch_dtype", None)
    except Exception:  # no config to read: no dtype to compare
        return None
    return str(value).replace("torch.", "") if value is not None else None


def planned_findings(config: Any, planner: Any) -> List[Finding]:
    """The findings of :mod:`this module <mergekit_ace.checks.planned>` for a planned merge;
    ``config``: the configuration as written (before mergekit normalized it)."""
    from mergekit_ace import compat

    planned = compat.planned_tensors(planner)
    names = [weight.name for weight, _task in planned]
    tasks = [task for _weight, task in planned]
    return unmatched_filters(config, names) + coarse_dtype(config, stored_dtypes(tasks))


def plannable(config: Any) -> bool:
    """Whether every model of ``config`` is a local directory with a config.json (planning
    then reads those files and the safetensors headers, and nothing from the network)."""
    import os

    return all(
        model.lora is None and os.path.isfile(os.path.join(model.model.path, "config.json"))
        for model in config.referenced_models()
    )


def check_planned(config: Any) -> List[Finding]:
    """Plan ``config`` with mergekit's planner (config.json files and safetensors headers
    only) and return the findings that need the plan; a merge of this package's methods
    also gets its experts' shapes checked. A merge mergekit cannot plan is one error."""
    from mergekit.architecture import get_architecture_info
    from mergekit.io.tasks import LoaderCache
    from mergekit.options import MergeOptions
    from mergekit.plan import MergePlanner

    from mergekit_ace import compat
    from mergekit_ace.kernels.inputs import MergeInputError
    from mergekit_ace.methods import is_ours
    from mergekit_ace.shapes import check_header_shapes

    options = MergeOptions()
    copy = config.model_copy(deep=True)  # the planner rewrites the configuration it plans
    try:
        arch_info = get_architecture_info(copy, options)
        LoaderCache().setup(options=options)
        out_config = compat.model_out_config(copy, arch_info)
        planner = MergePlanner(copy, arch_info, options=options, out_model_config=out_config)
        with compat.checks_suppressed():
            compat.plan_tensors(planner)
        findings = planned_findings(config, planner)
        if is_ours(config.merge_method):
            check_header_shapes([task for _weight, task in compat.planned_tensors(planner)])
    except MergeInputError as error:
        return [Finding("models", "", str(error), error=True)]
    except Exception as error:  # a model or file mergekit cannot read while planning
        return [Finding("top level", "", f"mergekit cannot plan this merge: {error}", True)]
    return findings
