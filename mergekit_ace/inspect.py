"""``mergekit-ace inspect``: what ACE will decide for every tensor of a merge, before running it.

The merge described by a ``mergekit-yaml`` config is planned with mergekit's own
:class:`~mergekit.plan.MergePlanner` (so per-tensor parameter filters, slices, tokenizer
alignment and dtype handling are exactly those of a real merge) and executed in memory with
mergekit's :class:`~mergekit.graph.Executor`, one tensor group at a time. The registered ``ace``
method is swapped, for the duration of the run, for an instance whose kernel also records the
singular spectra and its own run time; its ``on_diagnostics`` hook collects the diagnostics.
Each merged tensor is dropped as soon as it is produced and nothing but the report is written.

``estimate_only=True`` plans the same merge but reads only the checkpoints' safetensors headers
(shapes and dtypes): no tensor data, so an 8B config is costed in seconds.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from mergekit_ace.kernels.ace import (
    DEFAULT_GATE_STATISTIC,
    AceDiagnostics,
    ace_merge,
    estimate_ace_cost,
)

REPORT_NAME = "inspect"
METHOD_NAME = "ace"
UNDECIDED = "auto"  # estimate-only branch under gate: auto (needs the data)
_LAYER_RE = re.compile(r"^(?P<prefix>.*?)\.?layers\.(?P<layer>\d+)\.(?P<module>.+?)(?:\.(?P<kind>weight|bias))?$")


class InspectError(RuntimeError):
    """A config or environment that ``inspect`` cannot work with; the message says why."""


# ----------------------------------------------------------------------------- report rows


@dataclass
class TensorRow:
    """One line of the report: what ACE decides for one output tensor and what it costs."""

    name: str
    module: str
    layer: Optional[int]
    shape: Tuple[int, ...]
    dtype: str
    parameters: Dict[str, Any]
    branch: str
    energies: Optional[List[float]] = None
    noise: Optional[List[int]] = None  # experts (report columns) whose task vector is storage noise
    gamma: Optional[float] = None
    log_spread: Optional[float] = None
    k: Optional[int] = None
    sigma_iso: Optional[float] = None
    solver: Optional[str] = None
    spectral: Optional[str] = None
    kernel_device: Optional[str] = None
    rcond: Optional[float] = None
    condition: Optional[float] = None
    ridge: Optional[float] = None
    concentration_pre: Optional[float] = None
    concentration_post: Optional[float] = None
    flops: float = 0.0
    est_seconds: float = 0.0
    workspace_bytes: int = 0
    peak_bytes: int = 0
    kernel_seconds: Optional[float] = None
    spectrum_pre: Optional[List[float]] = field(default=None, repr=False)
    spectrum_post: Optional[List[float]] = field(default=None, repr=False)

    @property
    def gate_statistic(self) -> str:
        """The statistic that gates this tensor under ``gate: auto``."""
        return self.parameters.get("gate_statistic", DEFAULT_GATE_STATISTIC)

    @property
    def gate_value(self) -> Optional[float]:
        """That statistic's value (``gamma`` or ``log_spread``); None when not computed."""
        return self.gamma if self.gate_statistic == "gamma" else self.log_spread

    def as_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items()}
        out["shape"] = list(self.shape)
        return out


@dataclass
class InspectReport:
    config: str
    mode: str  # "full" or "estimate"
    device: str
    flop_rate: float
    experts: List[str]
    rows: List[TensorRow]
    files: Dict[str, str] = field(default_factory=dict)
    flop_rate_given: bool = False

    def branch_counts(self) -> Dict[str, int]:
        counts: Dict[str, int] = {}
        for row in self.rows:
            counts[row.branch] = counts.get(row.branch, 0) + 1
        return counts

    def heaviest(self) -> Optional[TensorRow]:
        return max(self.rows, key=lambda r: r.flops, default=None)

    def peak_bytes(self) -> int:
        return max((r.peak_bytes for r in self.rows), default=0)

    def as_dict(self) -> dict:
        return {
            "config": self.config,
            "mode": self.mode,
            "device": self.device,
            "flop_rate": self.flop_rate,
            "flop_rate_given": self.flop_rate_given,
            "experts": self.experts,
            "summary": {
                "tensors": len(self.rows),
                "branches": self.branch_counts(),
                "heaviest": self.heaviest().name if self.rows else None,
                "peak_bytes": self.peak_bytes(),
                "est_seconds": sum(r.est_seconds for r in self.rows),
            },
            "rows": [r.as_dict() for r in self.rows],
        }


def split_name(name: str) -> Tuple[Optional[int], str]:
    """``model.layers.3.self_attn.q_proj.weight`` -> ``(3, "self_attn.q_proj")``; tensors
    outside the layer stack keep their name without the ``.weight`` suffix."""
    match = _LAYER_RE.match(name)
    if match:
        module = match.group("module")
        if match.group("kind") == "bias":
            module += ".bias"
        return int(match.group("layer")), module
    if name.endswith(".weight"):
        name = name[: -len(".weight")]
    return None, name


def expert_labels(paths: Sequence[str]) -> List[str]:
    """Short, unique column labels for the experts: the last path component, without the
    part all of them share at the start or the end (``news_lr5e-05``, ``chat_lr5e-05`` ->
    ``news``, ``chat``), cut at a ``_``, ``-`` or ``.``; disambiguated if still equal."""
    labels = [os.path.basename(str(p).rstrip("/")) or str(p) for p in paths]
    if len(labels) > 1:
        labels = _strip_shared(labels)
    seen: Dict[str, int] = {}
    out = []
    for label in labels:
        if labels.count(label) > 1:
            seen[label] = seen.get(label, 0) + 1
            label = f"{label}#{seen[label]}"
        out.append(label)
    return out


def _strip_shared(labels: List[str]) -> List[str]:
    separators = "_-."
    prefix = os.path.commonprefix(labels)
    suffix = os.path.commonprefix([label[::-1] for label in labels])[::-1]
    # cut only at separators, so "chat7" and "code7" keep their names
    cut_front = max((i + 1 for i, ch in enumerate(prefix) if ch in separators), default=0)
    cut_back = max((len(suffix) - i for i, ch in enumerate(suffix) if ch in separators), default=0)
    stripped = [label[cut_front:len(label) - cut_back] for label in labels]
    if all(stripped) and len(set(stripped)) == len(stripped):
        return stripped
    return labels


# ----------------------------------------------------------------------------- costs


def calibrate_flop_rate(device: str = "cpu", size: int = 512, experts: int = 3,
                        repeats: int = 3) -> float:
    """Effective floating-point rate (flop/s) of the ACE kernel itself on ``device``: one
    merge of ``[size, size]`` tensors (Gram products, solve and spectral step in the
    proportions of a real tensor), after a small warm-up, timed best of ``repeats`` and divided
    into :func:`estimate_ace_cost`'s count. On a machine shared with other jobs the rate is
    only as good as the moment it is measured; ``--flop-rate`` overrides it."""
    gen = torch.Generator().manual_seed(0)
    kwargs = dict(tau=0.0, gate="on")  # heterogeneous: the branch with the spectral step
    best = math.inf
    for n, runs in ((64, 1), (size, repeats)):
        base = torch.randn(n, n, generator=gen)
        tensors = [base + s * torch.randn(n, n, generator=gen) for s in (0.01, 0.1, 1.0)[:experts]]
        base, tensors = base.to(device), [t.to(device) for t in tensors]
        for _ in range(runs):
            _sync(device)
            start = time.perf_counter()
            ace_merge(base, tensors, **kwargs)
            _sync(device)
            if n == size:
                best = min(best, time.perf_counter() - start)
    return estimate_ace_cost((size, size), experts)["flops"] / max(best, 1e-9)


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def tensor_cost(shape: Sequence[int], n_experts: int, load_bytes: int, compute_bytes: int,
                flop_rate: float, refine: bool = True) -> Dict[str, float]:
    """Flops, estimated seconds, kernel workspace and predicted peak memory of one tensor.

    ``refine``: whether the spectral step runs (heterogeneous branch with ``refine: true``).
    Peak = the ``T + 1`` loaded inputs + the kernel workspace of :func:`estimate_ace_cost`
    (which forms the task vectors one at a time) + the output.
    """
    cost = estimate_ace_cost(tuple(shape), n_experts, compute_bytes, refine=refine)
    numel = math.prod(shape)
    peak = (n_experts + 2) * numel * load_bytes + cost["bytes"]
    return {
        "flops": float(cost["flops"]),
        "est_seconds": float(cost["flops"]) / flop_rate if flop_rate > 0 else float("nan"),
        "workspace_bytes": int(cost["bytes"]),
        "peak_bytes": int(peak),
    }


# ----------------------------------------------------------------------------- planning


@dataclass
class _Planned:
    tasks: list  # ExecuteMergeMethodTask, one per output tensor
    models: List[Any]  # expert ModelReferences (order of the first merge task)
    labels: List[str]


def _load_config(config_path: str):
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


def _plan(config_path: str, device: str, quiet: bool) -> _Planned:
    import mergekit_ace  # noqa: F401  (registers the method)
    from mergekit.architecture import get_architecture_info
    from mergekit.io.tasks import LoaderCache
    from mergekit.merge import _model_out_config
    from mergekit.options import MergeOptions
    from mergekit.plan import MergePlanner
    from mergekit_ace.methods.common import model_label

    config = _load_config(config_path)
    options = MergeOptions(device=device, quiet=quiet)
    arch_info = get_architecture_info(config, options)
    LoaderCache().setup(options=options)
    out_config = _model_out_config(config, arch_info, trust_remote_code=options.trust_remote_code)
    planner = MergePlanner(config, arch_info, options=options, out_model_config=out_config)
    with _instrumented_method(None):
        # The planning half of MergePlanner.plan_in_memory (whose ReturnTensor wrapper does not
        # validate in mergekit 0.1.5): one merge task per output tensor, nothing to write.
        planner._plan()
    tasks = [task for _weight, task in planner._tensors]
    models: List[Any] = []
    for merge_task in tasks:
        for model in merge_task.model_order:
            if model != merge_task.base_model and model not in models:
                models.append(model)
    return _Planned(tasks, models, expert_labels([model_label(m) for m in models]))


@contextlib.contextmanager
def _instrumented_method(collect) -> Iterator[Any]:
    """Register, for the duration of the block, an ``ace`` method whose kernel records its
    spectra and run time and hands its diagnostics to ``collect(diag, seconds)``; the
    previously registered method is restored afterwards."""
    from mergekit.merge_methods import registry
    from mergekit_ace.methods.ace import ace_method

    method = ace_method()
    if collect is not None:
        timing: Dict[str, float] = {}

        def kernel(base, experts, **kwargs):
            _sync(str(base.device))
            start = time.perf_counter()
            out = ace_merge(base, experts, spectra=True, **kwargs)
            _sync(str(base.device))
            timing["seconds"] = time.perf_counter() - start
            return out

        method.kernel = kernel
        method.on_diagnostics = lambda diag: collect(diag, timing.get("seconds"))
    previous = registry._METHODS.get(METHOD_NAME)
    registry._METHODS[METHOD_NAME] = method
    try:
        yield method
    finally:
        if previous is None:
            registry._METHODS.pop(METHOD_NAME, None)
        else:
            registry._METHODS[METHOD_NAME] = previous


def _gather_of(merge_task):
    """The ``GatherTensors`` task under a merge task (through any vocabulary alignment)."""
    inner = merge_task.gather_tensors
    while not hasattr(inner, "weight_info") and hasattr(inner, "gather_tensors"):
        inner = inner.gather_tensors
    return inner


def _header_entry(model, weight_info) -> Optional[Tuple[Tuple[int, ...], str]]:
    """Shape and safetensors dtype of one input tensor, from the file header alone."""
    from mergekit.io.tasks import LoaderCache
    from safetensors import safe_open

    index = LoaderCache().get(model).index
    names = [weight_info.name] + list(weight_info.aliases or []) + list(weight_info.tied_names or [])
    for name in names:
        path = index.tensor_paths.get(name)
        if path is None:
            continue
        if not str(path).endswith(".safetensors"):
            raise InspectError(
                f"{model}: {os.path.basename(path)} is not a safetensors file, so its header "
                "cannot give shapes without loading it; run without --estimate-only."
            )
        with safe_open(os.path.join(index.base_path, path), framework="pt") as handle:
            piece = handle.get_slice(name)
            return tuple(piece.get_shape()), piece.get_dtype()
    return None


# ----------------------------------------------------------------------------- inspection


def _row_skeleton(merge_task, shape, dtype_name: str, n_experts: int, flop_rate: float,
                  compute_bytes: int, branch: str) -> TensorRow:
    name = merge_task.output_weight.name
    layer, module = split_name(name)
    params = {k: v for k, v in merge_task.parameters.items()}
    weights = {}
    for model, values in merge_task.input_parameters.items():
        if "weight" in values and model != merge_task.base_model:
            weights[str(model)] = values["weight"]
    if weights and len(set(weights.values())) > 1:
        params["weights"] = list(weights.values())
    load_bytes = _torch_dtype(dtype_name).itemsize
    refine = params.get("refine", True) and branch in ("heterogeneous", UNDECIDED)
    cost = tensor_cost(shape, n_experts, load_bytes, compute_bytes, flop_rate, refine=refine)
    return TensorRow(name=name, module=module, layer=layer, shape=tuple(shape), dtype=dtype_name,
                     parameters=params, branch=branch, **cost)


def _torch_dtype(name: str) -> torch.dtype:
    short = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
    name = short.get(name, name)
    dtype = getattr(torch, str(name).replace("torch.", ""), None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def _fill_from_diagnostics(row: TensorRow, diag: AceDiagnostics, seconds: Optional[float],
                           experts: list, all_experts: list) -> None:
    """Copy the kernel's diagnostics into ``row``; energies are aligned with ``all_experts``
    (the report's expert columns), ``None`` where an expert has no such tensor."""
    row.branch = diag.branch
    if len(diag.energies) == len(experts):
        row.energies = [None] * len(all_experts)
        for model, energy in zip(experts, diag.energies):
            row.energies[all_experts.index(model)] = energy
    row.noise = [all_experts.index(experts[i]) for i in diag.noise]
    row.gamma, row.log_spread = diag.gamma, diag.log_spread
    row.k, row.sigma_iso = diag.k, diag.sigma_iso
    row.solver, row.rcond, row.ridge = diag.solver, diag.rcond, diag.ridge
    row.spectral, row.kernel_device = diag.spectral, diag.device
    if diag.rcond is not None:
        row.condition = 1.0 / diag.rcond if diag.rcond > 0 else float("inf")
    row.concentration_pre, row.concentration_post = diag.concentration_pre, diag.concentration_post
    row.spectrum_pre = _energy_curve(diag.singular_values_pre)
    row.spectrum_post = _energy_curve(diag.singular_values_post)
    row.kernel_seconds = seconds


# Fractions of the singular directions at which the cumulative spectrum is kept (``spectrum_*``):
# dense at the top, where the paper's Fig. 2 looks.
CURVE_FRACTIONS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0)


def _energy_curve(singular_values: Optional[List[float]]) -> Optional[List[float]]:
    """Cumulative share of squared singular-value mass held by the top ``ceil(f * r)``
    directions, for each ``f`` of :data:`CURVE_FRACTIONS` (the paper's Fig. 2 curve, small
    enough to keep per tensor)."""
    if not singular_values:
        return None
    energy = torch.tensor(singular_values, dtype=torch.float64).square().sort(descending=True).values
    total = float(energy.sum())
    if total <= 0:
        return None
    cumulative = energy.cumsum(0) / total
    r = energy.numel()
    return [float(cumulative[max(1, math.ceil(f * r)) - 1]) for f in CURVE_FRACTIONS]


def inspect_config(
    config_path: str,
    *,
    device: str = "cpu",
    estimate_only: bool = False,
    quiet: bool = False,
    flop_rate: Optional[float] = None,
) -> InspectReport:
    """Inspect the ACE merge described by ``config_path``; returns the report (not written)."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InspectError("--cuda was given but torch sees no CUDA device on this machine.")
    try:
        planned = _plan(config_path, device, quiet)
    except InspectError:
        raise
    except (ValueError, RuntimeError, OSError) as error:  # config errors, missing models
        raise InspectError(f"{config_path}: cannot plan this merge: {error}") from error
    given = flop_rate is not None
    if flop_rate is None:
        flop_rate = calibrate_flop_rate(device)
    rows = (_estimate_rows if estimate_only else _full_rows)(planned, device, flop_rate, quiet)
    return InspectReport(
        config=str(config_path), mode="estimate" if estimate_only else "full", device=device,
        flop_rate=flop_rate, experts=planned.labels, rows=rows, flop_rate_given=given,
    )


def _experts_of(merge_task) -> list:
    return [m for m in merge_task.model_order if m != merge_task.base_model]


def _estimate_rows(planned: _Planned, device: str, flop_rate: float, quiet: bool) -> List[TensorRow]:
    from tqdm import tqdm

    rows = []
    for merge_task in tqdm(planned.tasks, desc="Reading headers", disable=quiet):
        gather = _gather_of(merge_task)
        entry = _header_entry(merge_task.base_model, gather.weight_info[merge_task.base_model])
        if entry is None:
            continue
        shape, st_dtype = entry
        dtype = gather.dtype or _torch_dtype(st_dtype).__str__().replace("torch.", "")
        experts = _experts_of(merge_task)
        gate = merge_task.parameters.get("gate", "auto")
        if len(shape) != 2:
            branch = "mean"
        elif gate == "on":
            branch = "heterogeneous"
        elif gate == "off" or len(experts) < 2:
            branch = "homogeneous"
        else:
            branch = UNDECIDED  # decided from the data at merge time; costed as heterogeneous
        compute_bytes = 8 if str(dtype) == "float64" else 4
        rows.append(_row_skeleton(merge_task, shape, str(dtype), len(experts), flop_rate,
                                  compute_bytes, branch))
    return rows


def _full_rows(planned: _Planned, device: str, flop_rate: float, quiet: bool) -> List[TensorRow]:
    from mergekit.graph import Executor

    collected: Dict[str, Tuple[AceDiagnostics, Optional[float]]] = {}

    def collect(diag: AceDiagnostics, seconds: Optional[float]) -> None:
        collected[diag.tensor] = (diag, seconds)

    rows: List[TensorRow] = []
    with _instrumented_method(collect):
        executor = Executor(targets=planned.tasks, math_device=torch.device(device),
                            storage_device=torch.device("cpu"))
        for merge_task, tensor in executor.run(quiet=quiet, desc="Inspecting"):
            name = merge_task.output_weight.name
            shape = tuple(tensor.shape) if tensor is not None else ()
            dtype = str(tensor.dtype).replace("torch.", "") if tensor is not None else "?"
            del tensor  # the merged tensor itself is never kept
            experts = _experts_of(merge_task)
            compute_bytes = 8 if dtype == "float64" else 4
            found = collected.pop(name, None)
            # "copied": not merged by the kernel (a non-float buffer or a pass-through)
            branch = found[0].branch if found is not None else "copied"
            row = _row_skeleton(merge_task, shape, dtype, len(experts), flop_rate, compute_bytes,
                                branch)
            if found is not None:
                _fill_from_diagnostics(row, found[0], found[1], experts, planned.models)
            rows.append(row)
    order = {task.output_weight.name: i for i, task in enumerate(planned.tasks)}
    rows.sort(key=lambda r: order.get(r.name, len(order)))  # execution order is by name
    return rows


# ----------------------------------------------------------------------------- output


CSV_FIELDS = ["name", "layer", "module", "shape", "dtype", "branch", "noise", "gamma", "log_spread", "tau",
              "gate", "gate_statistic", "eps", "k_frac", "k", "sigma_iso", "solver", "spectral", "rcond",
              "condition", "ridge", "concentration_pre", "concentration_post", "flops",
              "est_seconds", "kernel_seconds", "kernel_device", "workspace_bytes", "peak_bytes"]
PARAMETER_COLUMNS = ("tau", "gate", "gate_statistic", "eps", "k_frac")


def csv_records(report: InspectReport) -> Tuple[List[str], List[dict]]:
    energy_cols = [f"energy[{label}]" for label in report.experts]
    records = []
    for row in report.rows:
        rec = {k: getattr(row, k) for k in CSV_FIELDS if hasattr(row, k)}
        rec["shape"] = "x".join(map(str, row.shape))
        rec["noise"] = ";".join(report.experts[i] for i in row.noise or [])
        for key in PARAMETER_COLUMNS:
            rec[key] = row.parameters.get(key)
        for col, value in zip(energy_cols, row.energies or [None] * len(energy_cols)):
            rec[col] = value
        records.append({k: ("" if v is None else v) for k, v in rec.items()})
    return CSV_FIELDS[:9] + energy_cols + CSV_FIELDS[9:], records


def write_report(report: InspectReport, out_dir: str, plots: bool = True) -> Dict[str, str]:
    """Write ``inspect.csv``, ``inspect.json`` and (unless ``plots=False``) the PNG plots."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    fields, records = csv_records(report)
    csv_path = out / f"{REPORT_NAME}.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as fp:
        writer = csv.DictWriter(fp, fieldnames=fields)
        writer.writeheader()
        writer.writerows(records)
    files["csv"] = str(csv_path)
    json_path = out / f"{REPORT_NAME}.json"
    json_path.write_text(json.dumps(_json_safe(report.as_dict()), indent=1), encoding="utf-8")
    files["json"] = str(json_path)
    if plots:
        from mergekit_ace.inspect_plots import write_plots

        files.update(write_plots(report, out))
    report.files = files
    return files


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def human_seconds(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    if s < 1:
        return f"{s * 1000:.1f} ms"
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    if s < 172800:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} days"


def summary_text(report: InspectReport) -> str:
    """The short terminal summary: branch counts, gate-statistic range, the heaviest tensor, the
    predicted peak memory and total time, the worst-conditioned system, the files."""
    lines = []
    n = len(report.rows)
    mode = "estimate only (no tensor data read)" if report.mode == "estimate" else "full"
    lines.append(f"ACE inspect of {report.config}: {n} tensors, {len(report.experts)} experts "
                 f"({', '.join(report.experts)}), {mode}, device {report.device}")
    counts = report.branch_counts()
    order = ["heterogeneous", "homogeneous", UNDECIDED, "mean", "unchanged", "copied"]
    parts = [f"{counts[b]} {b if b != UNDECIDED else 'decided at merge time (gate: auto)'}"
             for b in order + sorted(set(counts) - set(order)) if b in counts]
    lines.append("  branches:  " + ", ".join(parts))
    noisy: Dict[str, int] = {}
    for row in report.rows:
        for i in row.noise or []:
            noisy[report.experts[i]] = noisy.get(report.experts[i], 0) + 1
    if noisy:
        lines.append("  storage-noise experts (left out unless drop_noise: false): "
                     + ", ".join(f"{label} in {count} tensors" for label, count in noisy.items()))
    by_module: Dict[str, List[TensorRow]] = {}
    for row in report.rows:
        if row.gate_value is not None:
            by_module.setdefault(row.module, []).append(row)
    if by_module:
        lines.append("  gate statistic by module type (min .. max):")
        for module, rows in by_module.items():
            values = [r.gate_value for r in rows]
            names = "/".join(sorted({r.gate_statistic for r in rows}))
            taus = sorted({r.parameters.get("tau") for r in rows})
            hetero = sum(1 for r in rows if r.branch == "heterogeneous")
            lines.append(f"    {module:<24} {names} {min(values):.3g} .. {max(values):.3g}   "
                         f"tau {', '.join(f'{t:g}' for t in taus)}   heterogeneous {hetero}/{len(rows)}")
    heavy = report.heaviest()
    if heavy is not None:
        lines.append(f"  heaviest tensor: {heavy.name} {list(heavy.shape)}: {heavy.flops / 1e9:.3g} GFLOP, "
                     f"~{human_seconds(heavy.est_seconds)}, peak {human_bytes(heavy.peak_bytes)}")
    total = sum(r.est_seconds for r in report.rows)
    lines.append(f"  predicted peak memory: {human_bytes(report.peak_bytes())} "
                 f"(loaded inputs + output + kernel workspace of the largest tensor)")
    source = "given" if report.flop_rate_given else f"measured on {report.device}"
    lines.append(f"  estimated kernel time: {human_seconds(total)} at "
                 f"{report.flop_rate / 1e9:.3g} GFLOP/s ({source})")
    measured = [r.kernel_seconds for r in report.rows if r.kernel_seconds is not None]
    if measured:
        lines.append(f"  measured kernel time (with diagnostic SVDs): {human_seconds(sum(measured))}")
    conditioned = [r for r in report.rows if r.rcond is not None]
    if conditioned:
        worst = min(conditioned, key=lambda r: r.rcond)
        lines.append(f"  worst-conditioned system: {worst.name} (rcond {worst.rcond:.2g}, "
                     f"solver {worst.solver})")
    if report.files:
        lines.append("  wrote: " + ", ".join(os.path.basename(p) for p in report.files.values())
                     + f" in {os.path.dirname(next(iter(report.files.values())))}")
    return "\n".join(lines)
