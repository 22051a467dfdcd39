"""Run ``mergekit-ace inspect`` on a config: plan it with mergekit, then either execute it in
memory through the instrumented ``ace`` method (full mode: the kernel's own diagnostics) or
read only the safetensors headers (estimate-only mode: shapes, the gate as far as it can be
decided without data, and costs)."""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from mergekit_ace.inspect.costs import calibrate_flop_rate, tensor_cost
from mergekit_ace.inspect.planning import (
    Planned,
    base_header,
    instrumented_method,
    plan,
)
from mergekit_ace.inspect.report import (
    InspectError,
    InspectReport,
    TensorRow,
    energy_curve,
    split_name,
)
from mergekit_ace import compat
from mergekit_ace.kernels.ace import AceDiagnostics, AceOutOfMemoryError
from mergekit_ace.kernels.ace.parameters import ACE_PARAMETERS, UNDECIDED, predict_branch
from mergekit_ace.kernels.inputs import MergeInputError
from mergekit_ace.kernels.linalg import resolve_matmul_precision

# What a merge can fail with because of the checkpoints' contents (non-finite values,
# mismatched shapes, all weights 0, a non-finite result, no memory): reported as one line.
DATA_ERRORS = (MergeInputError, FloatingPointError, AceOutOfMemoryError, ValueError, RuntimeError)


def inspect_config(
    config_path: str,
    *,
    options=None,
    device: Optional[str] = None,
    estimate_only: bool = False,
    quiet: bool = False,
    flop_rate: Optional[float] = None,
) -> InspectReport:
    """Inspect the ACE merge described by ``config_path``; returns the report (not written).

    ``options`` is mergekit's ``MergeOptions`` (what ``mergekit-yaml``'s flags build: device,
    ``trust_remote_code``, ``lora_merge_cache``, ...); without it, one is made from ``device``
    (default ``cpu``) and ``quiet``. Errors in the config or the checkpoints raise
    :class:`InspectError` with a one-line message naming the tensor and the model.
    """
    from mergekit.options import MergeOptions

    if options is None:
        options = MergeOptions(device=device or "cpu", quiet=quiet)
    device, quiet = str(options.device), options.quiet
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InspectError("--cuda was given but torch sees no CUDA device on this machine.")
    try:
        planned = plan(config_path, options)
    except InspectError:
        raise
    except MergeInputError as error:  # the experts' shapes, which the planning hook checks
        raise InspectError(str(error)) from error
    except (ValueError, RuntimeError, OSError) as error:  # config errors, missing models
        raise InspectError(f"{config_path}: cannot plan this merge: {error}") from error
    try:
        given = flop_rate is not None
        if flop_rate is None:
            flop_rate = calibrate_flop_rate(device)
        if estimate_only:
            rows = _estimate_rows(planned, device, flop_rate, quiet)
        else:
            storage = device if options.low_cpu_memory else "cpu"
            rows = _full_rows(planned, device, storage, flop_rate, quiet)
    except InspectError:
        raise
    except DATA_ERRORS as error:
        raise InspectError(_one_line(error)) from error
    return InspectReport(
        config=str(config_path),
        mode="estimate" if estimate_only else "full",
        device=device,
        flop_rate=flop_rate,
        experts=planned.labels,
        rows=rows,
        flop_rate_given=given,
    )


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _row_skeleton(
    planned: compat.PlannedTensor,
    shape,
    dtype_name: str,
    flop_rate: float,
    compute_bytes: int,
    branch: str,
    device: str,
) -> TensorRow:
    layer, module = split_name(planned.name)
    params = dict(planned.parameters)
    weights = {}
    for model, values in planned.model_parameters.items():
        if "weight" in values and model != planned.base:
            weights[str(model)] = values["weight"]
    if weights and len(set(weights.values())) > 1:
        params["weights"] = list(weights.values())

    def parameter(name):
        return params.get(name, ACE_PARAMETERS.default(name))

    refine = parameter("refine") and branch in ("heterogeneous", UNDECIDED)
    compute_dtype = torch.float64 if compute_bytes == 8 else torch.float32
    matmul = resolve_matmul_precision(
        parameter("matmul_precision"), torch.device(device), compute_dtype
    )
    load_bytes = _torch_dtype(dtype_name).itemsize
    cost = tensor_cost(
        shape,
        len(planned.experts),
        load_bytes,
        compute_bytes,
        flop_rate,
        refine=refine,
        k_frac=parameter("k_frac"),
        matmul=matmul,
    )
    return TensorRow(
        name=planned.name,
        module=module,
        layer=layer,
        shape=tuple(shape),
        dtype=dtype_name,
        parameters=params,
        branch=branch,
        **cost,
    )


def _torch_dtype(name: str) -> torch.dtype:
    short = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
    name = short.get(name, name)
    dtype = getattr(torch, str(name).replace("torch.", ""), None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def _fill_from_diagnostics(
    row: TensorRow, diag: AceDiagnostics, seconds: Optional[float], experts: list, all_experts: list
) -> None:
    """Copy the kernel's diagnostics into ``row``; energies are aligned with ``all_experts``
    (the report's expert columns), ``None`` where an expert has no such tensor."""
    row.branch = diag.branch
    if len(diag.energies) == len(experts):
        row.energies = [None] * len(all_experts)
        for model, energy in zip(experts, diag.energies):
            row.energies[all_experts.index(model)] = energy
    row.noise = [all_experts.index(experts[i]) for i in diag.noise]
    row.gamma, row.log_spread = diag.gamma, diag.log_spread
    row.k, row.sigma_iso, row.noise_floor = diag.k, diag.sigma_iso, diag.noise_floor
    row.solver, row.rcond, row.ridge = diag.solver, diag.rcond, diag.ridge
    row.spectral, row.kernel_device, row.matmul = diag.spectral, diag.device, diag.matmul
    row.condition, row.boost_ratio, row.cut_gap = diag.condition, diag.boost_ratio, diag.cut_gap
    row.roundoff_change = diag.roundoff_change
    row.concentration_pre, row.concentration_post = diag.concentration_pre, diag.concentration_post
    row.spectrum_pre = energy_curve(diag.singular_values_pre)
    row.spectrum_post = energy_curve(diag.singular_values_post)
    row.kernel_seconds = seconds


def _estimate_rows(planned: Planned, device: str, flop_rate: float, quiet: bool) -> List[TensorRow]:
    from tqdm import tqdm

    rows = []
    for merge_task in tqdm(planned.tasks, desc="Reading headers", disable=quiet):
        entry = base_header(merge_task)
        if entry is None:
            continue
        shape, st_dtype, dtype = entry
        dtype = dtype or _torch_dtype(st_dtype).__str__().replace("torch.", "")
        planned_tensor = compat.planned_tensor(merge_task)
        gate_parameters = {
            k: v
            for k, v in planned_tensor.parameters.items()
            if k in ("tau", "gate", "gate_statistic")
        }
        # without energies a gate: auto branch is UNDECIDED, costed as heterogeneous
        branch = predict_branch(
            len(shape), None, n_experts=len(planned_tensor.experts), **gate_parameters
        ).branch
        compute_bytes = 8 if str(dtype) == "float64" else 4
        rows.append(
            _row_skeleton(
                planned_tensor, shape, str(dtype), flop_rate, compute_bytes, branch, device
            )
        )
    return rows


def _full_rows(
    planned: Planned, device: str, storage: str, flop_rate: float, quiet: bool
) -> List[TensorRow]:
    collected: Dict[str, Tuple[AceDiagnostics, Optional[float]]] = {}

    def collect(diag: AceDiagnostics, seconds: Optional[float]) -> None:
        collected[diag.tensor] = (diag, seconds)

    rows: List[TensorRow] = []
    with instrumented_method(collect):
        results = compat.execute(
            planned.tasks,
            math_device=torch.device(device),
            storage_device=torch.device(storage),
            quiet=quiet,
            desc="Inspecting",
        )
        for merge_task, tensor in results:
            planned_tensor = compat.planned_tensor(merge_task)
            shape = tuple(tensor.shape) if tensor is not None else ()
            dtype = str(tensor.dtype).replace("torch.", "") if tensor is not None else "?"
            del tensor  # the merged tensor itself is never kept
            compute_bytes = 8 if dtype == "float64" else 4
            found = collected.pop(planned_tensor.name, None)
            # "copied": not merged by the kernel (a non-float buffer or a pass-through)
            branch = found[0].branch if found is not None else "copied"
            row = _row_skeleton(
                planned_tensor, shape, dtype, flop_rate, compute_bytes, branch, device
            )
            if found is not None:
                _fill_from_diagnostics(
                    row, found[0], found[1], planned_tensor.experts, planned.models
                )
            rows.append(row)
    order = {compat.planned_tensor(task).name: i for i, task in enumerate(planned.tasks)}
    rows.sort(key=lambda r: order.get(r.name, len(order)))  # execution order is by name
    return rows
