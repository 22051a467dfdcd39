"""The table of ``mergekit-ace inspect`` on disk: ``inspect.csv``, ``inspect.json`` and,
through :mod:`mergekit_ace.inspect.plots`, the PNG plots."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Dict, List, Tuple

from mergekit_ace.inspect.report import InspectReport

REPORT_NAME = "inspect"


CSV_FIELDS = [
    "name",
    "layer",
    "module",
    "shape",
    "dtype",
    "branch",
    "noise",
    "gamma",
    "log_spread",
    "tau",
    "gate",
    "gate_statistic",
    "eps",
    "k_frac",
    "k",
    "noise_floor",
    "sigma_iso",
    "solver",
    "spectral",
    "rcond",
    "condition",
    "boost_ratio",
    "cut_gap",
    "roundoff_change",
    "ridge",
    "concentration_pre",
    "concentration_post",
    "flops",
    "flops_float64",
    "est_seconds",
    "kernel_seconds",
    "kernel_device",
    "matmul",
    "workspace_bytes",
    "peak_bytes",
]
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
    """Write ``inspect.csv``, ``inspect.json`` and (unless ``plots=False``) the PNG plots;
    the plots need matplotlib (:func:`~mergekit_ace.inspect.plots.plots_available`)."""
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
        from mergekit_ace.inspect.plots import write_plots

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
