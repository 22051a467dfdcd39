"""The short terminal summary of an inspect report, and the units it prints."""

from __future__ import annotations

import math
import os
from typing import Dict, List

from mergekit_ace.inspect.report import InspectReport, TensorRow
from mergekit_ace.kernels.ace.parameters import UNDECIDED


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
    n = len(report.rows)
    mode = "estimate only (no tensor data read)" if report.mode == "estimate" else "full"
    lines = [
        f"ACE inspect of {report.config}: {n} tensors, {len(report.experts)} experts "
        f"({', '.join(report.experts)}), {mode}, device {report.device}"
    ]
    lines += _branch_lines(report) + _gate_lines(report) + _cost_lines(report)
    conditioned = [r for r in report.rows if r.condition is not None]
    if conditioned:
        worst = max(conditioned, key=lambda r: r.condition)
        lines.append(
            f"  worst-conditioned system: {worst.name} (condition {worst.condition:.2g}, "
            f"solver {worst.solver})"
        )
    if report.files:
        lines.append(
            "  wrote: "
            + ", ".join(os.path.basename(p) for p in report.files.values())
            + f" in {os.path.dirname(next(iter(report.files.values())))}"
        )
    return "\n".join(lines)


def _branch_lines(report: InspectReport) -> List[str]:
    """Tensors per branch, and the experts found to be storage noise."""
    counts = report.branch_counts()
    order = ["heterogeneous", "homogeneous", UNDECIDED, "mean", "unchanged", "copied"]
    parts = [
        f"{counts[b]} {b if b != UNDECIDED else 'decided at merge time (gate: auto)'}"
        for b in order + sorted(set(counts) - set(order))
        if b in counts
    ]
    lines = ["  branches:  " + ", ".join(parts)]
    noisy: Dict[str, int] = {}
    for row in report.rows:
        for i in row.noise or []:
            noisy[report.experts[i]] = noisy.get(report.experts[i], 0) + 1
    if noisy:
        lines.append(
            "  storage-noise experts (left out unless drop_noise: false): "
            + ", ".join(f"{label} in {count} tensors" for label, count in noisy.items())
        )
    return lines


def _gate_lines(report: InspectReport) -> List[str]:
    """The gate statistic's range per module type, with ``tau`` and the heterogeneous share."""
    by_module: Dict[str, List[TensorRow]] = {}
    for row in report.rows:
        if row.gate_value is not None:
            by_module.setdefault(row.module, []).append(row)
    if not by_module:
        return []
    lines = ["  gate statistic by module type (min .. max):"]
    for module, rows in by_module.items():
        values = [r.gate_value for r in rows]
        names = "/".join(sorted({r.gate_statistic for r in rows}))
        taus = ", ".join(f"{t:g}" for t in sorted({r.parameters.get("tau") for r in rows}))
        hetero = sum(1 for r in rows if r.branch == "heterogeneous")
        lines.append(
            f"    {module:<24} {names} {min(values):.3g} .. {max(values):.3g}   "
            f"tau {taus}   heterogeneous {hetero}/{len(rows)}"
        )
    return lines


def _cost_lines(report: InspectReport) -> List[str]:
    """The heaviest tensor, the predicted peak memory, the estimated time (and the float64 share
    of the work) and the measured time."""
    lines = []
    heavy = report.heaviest()
    if heavy is not None:
        lines.append(
            f"  heaviest tensor: {heavy.name} {list(heavy.shape)}: "
            f"{heavy.flops / 1e9:.3g} GFLOP, ~{human_seconds(heavy.est_seconds)}, "
            f"peak {human_bytes(heavy.peak_bytes)}"
        )
    total = sum(r.est_seconds for r in report.rows)
    lines.append(
        f"  predicted peak memory: {human_bytes(report.peak_bytes())} "
        f"(loaded inputs + output + kernel workspace of the largest tensor)"
    )
    source = "given" if report.flop_rate_given else f"measured on {report.device}"
    lines.append(
        f"  estimated kernel time: {human_seconds(total)} at "
        f"{report.flop_rate / 1e9:.3g} GFLOP/s ({source})"
    )
    flops = sum(r.flops for r in report.rows)
    float64 = sum(r.flops_float64 for r in report.rows)
    if float64:
        lines.append(
            f"  float64 work: {float64 / 1e12:.3g} of {flops / 1e12:.3g} TFLOP "
            f"({100 * float64 / flops:.1f} %), which consumer GPUs run at 1/32-1/64 of "
            "their float32 rate"
        )
    measured = [r.kernel_seconds for r in report.rows if r.kernel_seconds is not None]
    if measured:
        lines.append(
            f"  measured kernel time (with diagnostic SVDs): {human_seconds(sum(measured))}"
        )
        lines.extend(_roundoff_lines(report.rows))
    elif report.rows:
        lines.append(
            "  not in the estimate: a merge computes a tensor a second time where its float32 "
            "round-off bound passes 1 %, to measure the round-off (the run without "
            "--estimate-only counts them)"
        )
    return lines


def _roundoff_lines(rows) -> List[str]:
    """How many tensors a merge computes twice to measure their round-off, and the largest
    change measured."""
    twice = [r for r in rows if r.roundoff_change is not None]
    if not twice:
        return []
    largest = max(twice, key=lambda r: r.roundoff_change)
    seconds = sum(r.kernel_seconds or 0.0 for r in twice)
    return [
        f"  round-off measured on {len(twice)} of {len(rows)} tensors (each computed twice, "
        f"{human_seconds(seconds)} of the kernel time): at most {largest.roundoff_change:.2%} "
        f"of the merged update ({largest.name}; 1 % warns)"
    ]
