"""PNG plots of an :class:`~mergekit_ace.inspect.report.InspectReport` (matplotlib, Agg
backend).

matplotlib is optional (the ``plots`` extra): :func:`plots_available` says whether it is
installed, :data:`PLOTS_HINT` how to get it, and :func:`require_matplotlib` raises
:class:`MissingPlotDependency` with that hint.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from mergekit_ace.inspect.report import CURVE_FRACTIONS
from mergekit_ace.inspect.summary import human_seconds

PLOTS_HINT = 'the plots need matplotlib: pip install "mergekit-ace[plots]"'

BRANCH_COLOURS = {
    "heterogeneous": "#d95f02",
    "homogeneous": "#1b9e77",
    "auto": "#bbbbbb",
    "mean": "#7570b3",
    "unchanged": "#eeeeee",
    "copied": "#666666",
}
BRANCH_LABELS = {"auto": "decided at merge time"}
STATISTIC_LABELS = {
    "gamma": "gamma = var(log e) / mean(log e)^2",
    "log_spread": "log_spread = std(log10 e)",
}


class MissingPlotDependency(RuntimeError):
    pass


def plots_available() -> bool:
    """Whether matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def require_matplotlib():
    """Import matplotlib with the non-interactive Agg backend, or explain how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise MissingPlotDependency(f"{PLOTS_HINT} (it is not installed)") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


OUTSIDE = "outside layers"


def _grid(report) -> Tuple[List[str], List[str], Dict[Tuple[str, str], object]]:
    """Branch-map axes for the 2-D tensors (1-D ones are always averaged): columns are the
    layers, with tensors outside the layer stack (embeddings, head) in columns of their own
    before or after them; rows are the module types, plus one row for those outside tensors."""
    rows2d = [r for r in report.rows if len(r.shape) == 2]
    layers = sorted({r.layer for r in rows2d if r.layer is not None})
    first = min((i for i, r in enumerate(rows2d) if r.layer is not None), default=len(rows2d))
    pre, post, modules, cells = [], [], [], {}
    for i, row in enumerate(rows2d):
        if row.layer is None:
            column, module = row.module.split(".")[-1], OUTSIDE
            (pre if i < first else post).append(column)
        else:
            column, module = str(row.layer), row.module
        cells[(column, module)] = row
        if module not in modules:
            modules.append(module)
    if OUTSIDE in modules:
        modules.remove(OUTSIDE)
        modules.append(OUTSIDE)
    return pre + [str(layer) for layer in layers] + post, modules, cells


def _layer_modules(report, two_d_only: bool = True) -> List[str]:
    seen = []
    for row in report.rows:
        if (
            row.layer is not None
            and row.module not in seen
            and (len(row.shape) == 2 or not two_d_only)
        ):
            seen.append(row.module)
    return seen


def _series(report, module: str, value) -> Tuple[List[int], List[float]]:
    xs, ys = [], []
    for row in report.rows:
        if row.module == module and row.layer is not None:
            y = value(row)
            if y is not None and math.isfinite(y):
                xs.append(row.layer)
                ys.append(y)
    return xs, ys


def plot_gate(report, path: Path) -> Optional[str]:
    """The gate statistic in force (``gamma`` or ``log_spread``) per layer, one line per module
    type, against each module type's ``tau``."""
    plt = require_matplotlib()
    modules = [m for m in _layer_modules(report) if _series(report, m, lambda r: r.gate_value)[0]]
    if not modules:
        return None
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(11, 4.8))
    cmap = plt.get_cmap("tab10")
    taus: Dict[tuple, List[str]] = {}
    for i, module in enumerate(modules):
        xs, ys = _series(report, module, lambda r: r.gate_value)
        ax.plot(xs, ys, marker="o", ms=3.5, lw=1.2, color=cmap(i % 10), label=module)
        hetero = [
            (x, y)
            for x, y, r in zip(
                xs,
                ys,
                [
                    r
                    for r in report.rows
                    if r.module == module and r.layer is not None and r.gate_value is not None
                ],
            )
            if r.branch == "heterogeneous"
        ]
        if hetero:
            ax.scatter(*zip(*hetero), s=40, facecolors="none", edgecolors=cmap(i % 10), lw=1.2)
        tau = tuple(_series(report, module, lambda r: r.parameters.get("tau")))
        taus.setdefault((tuple(tau[0]), tuple(tau[1])), []).append(module)
    # one dashed threshold line per distinct tau profile (per-tensor filters give several)
    for n, ((tx, ty), group) in enumerate(taus.items()):
        label = "tau" if len(taus) == 1 else f"tau ({', '.join(group)})"
        ax.plot(
            tx,
            ty,
            ls=("--", ":", "-.")[n % 3],
            color="black",
            lw=1.2,
            label=label,
            drawstyle="steps-mid",
        )
    statistics = sorted({r.gate_statistic for r in report.rows if r.gate_value is not None})
    values = [r.gate_value for r in report.rows if r.gate_value is not None]
    if min(values) > 0:
        ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(" | ".join(STATISTIC_LABELS.get(s, s) for s in statistics))
    ax.set_title(
        f"Gate statistic {'/'.join(statistics)} by layer "
        "(circled: heterogeneous branch, statistic > tau)"
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def plot_energy(report, path: Path) -> Optional[str]:
    """Each expert's task-vector energy ``||W_t - W0||_F^2`` by layer, one panel per module type."""
    plt = require_matplotlib()
    modules = [
        m
        for m in _layer_modules(report, two_d_only=False)
        if any(r.energies for r in report.rows if r.module == m)
    ]
    if not modules or not report.experts:
        return None
    cols = min(4, len(modules))
    rows = math.ceil(len(modules) / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(3.4 * cols, 2.8 * rows), squeeze=False, sharex=True
    )
    cmap = plt.get_cmap("tab10")
    for ax, module in zip(axes.flat, modules):
        for j, label in enumerate(report.experts):
            xs, ys = _series(report, module, lambda r: (r.energies or [None] * (j + 1))[j])
            ys = [max(y, 1e-30) for y in ys]
            ax.plot(xs, ys, marker="o", ms=2.5, lw=1.0, color=cmap(j % 10), label=label)
        ax.set_yscale("log")
        ax.set_title(module, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(modules) :]:
        ax.axis("off")
    from matplotlib.ticker import MaxNLocator

    for ax in axes[-1]:
        ax.set_xlabel("layer", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", fontsize=8)
    fig.suptitle("Task-vector energy ||W_t - W_0||_F^2 per expert", fontsize=11)
    fig.tight_layout(rect=(0, 0, 0.88, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def plot_branches(report, path: Path) -> Optional[str]:
    """Branch map: module types x layers, each cell coloured by the branch ACE takes."""
    plt = require_matplotlib()
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    columns, modules, cells = _grid(report)
    if not columns:
        return None
    names = list(BRANCH_COLOURS)
    index = {b: i for i, b in enumerate(names)}
    grid = [[math.nan] * len(columns) for _ in modules]
    for (column, module), row in cells.items():
        grid[modules.index(module)][columns.index(column)] = index.get(row.branch, index["copied"])
    import numpy as np

    data = np.ma.masked_invalid(np.array(grid, dtype=float))
    cmap = ListedColormap([BRANCH_COLOURS[b] for b in names])
    cmap.set_bad("white")
    fig, ax = plt.subplots(
        figsize=(max(6, 0.32 * len(columns) + 3), max(2.5, 0.38 * len(modules) + 1.5))
    )
    ax.imshow(
        data, cmap=cmap, vmin=-0.5, vmax=len(names) - 0.5, aspect="auto", interpolation="nearest"
    )
    ax.set_yticks(range(len(modules)))
    ax.set_yticklabels(modules, fontsize=8)
    step = max(1, len(columns) // 40)
    ax.set_xticks(range(0, len(columns), step))
    ax.set_xticklabels(columns[::step], fontsize=7, rotation=90 if len(columns) > 12 else 0)
    ax.set_xlabel("layer (embeddings and head at the ends; 1-D tensors are averaged, not shown)")
    if len(columns) <= 16:
        for (column, module), row in cells.items():
            if row.gate_value is not None:
                ax.text(
                    columns.index(column),
                    modules.index(module),
                    f"{row.gate_value:.2g}",
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="black",
                )
    present = [b for b in names if any(r.branch == b for r in cells.values())]
    ax.legend(
        handles=[Patch(color=BRANCH_COLOURS[b], label=BRANCH_LABELS.get(b, b)) for b in present],
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        fontsize=8,
    )
    ax.set_title("ACE branch per tensor (numbers: the gate statistic)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def plot_concentration(report, path: Path) -> Optional[str]:
    """Spectral concentration (paper Fig. 2): cumulative share of squared singular-value mass
    against the fraction of singular directions (log scale), for W_pre (left) and the final W
    (right); per module type the median over its tensors, with the range shaded."""
    plt = require_matplotlib()
    rows = [r for r in report.rows if r.spectrum_pre]
    if not rows:
        return None
    modules = []
    for r in rows:
        if r.module not in modules:
            modules.append(r.module)
    cmap = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), sharey=True)
    for ax, attr, title in (
        (axes[0], "spectrum_pre", "preliminary W_pre"),
        (axes[1], "spectrum_post", "final W (after refinement)"),
    ):
        for i, module in enumerate(modules):
            curves = [getattr(r, attr) for r in rows if r.module == module and getattr(r, attr)]
            if not curves:
                continue
            columns = list(zip(*curves))
            median = [sorted(c)[len(c) // 2] for c in columns]
            colour = cmap(i % 10)
            ax.plot(
                CURVE_FRACTIONS,
                median,
                marker="o",
                ms=2.5,
                lw=1.2,
                color=colour,
                label=f"{module} ({len(curves)})",
            )
            if len(curves) > 1:
                ax.fill_between(
                    CURVE_FRACTIONS,
                    [min(c) for c in columns],
                    [max(c) for c in columns],
                    color=colour,
                    alpha=0.12,
                    lw=0,
                )
        ax.axvline(0.05, color="black", ls="--", lw=1.0)
        ax.set_xscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("fraction of singular directions (top ones first)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("share of squared singular-value mass")
    handles, labels = axes[0].get_legend_handles_labels()
    handles.append(plt.Line2D([], [], color="black", ls="--"))
    labels.append("top 5 %")
    axes[1].legend(handles, labels, fontsize=7, loc="lower right")
    fig.suptitle(
        "Spectral concentration of the merged task vector (median per module type, range shaded)",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def plot_cost(report, path: Path) -> Optional[str]:
    """Where the time and the memory go: estimated kernel time summed over the layers, and the
    largest predicted peak memory, per module type (tensors outside the layer stack by name)."""
    plt = require_matplotlib()
    totals: Dict[str, List[float]] = {}
    for row in report.rows:
        if len(row.shape) != 2:
            continue
        seconds, peak, count = totals.setdefault(row.module, [0.0, 0.0, 0])
        totals[row.module] = [seconds + row.est_seconds, max(peak, row.peak_bytes), count + 1]
    if not totals:
        return None
    order = sorted(totals, key=lambda m: totals[m][0])
    labels = [f"{m} (x{totals[m][2]})" if totals[m][2] > 1 else m for m in order]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.35 * len(order) + 1.8), sharey=True)
    axes[0].barh(labels, [totals[m][0] for m in order], color="#4c72b0")
    source = "given" if getattr(report, "flop_rate_given", False) else f"on {report.device}"
    axes[0].set_xlabel(
        f"estimated kernel seconds, all layers ({report.flop_rate / 1e9:.3g} GFLOP/s {source})"
    )
    axes[1].barh(labels, [totals[m][1] / 2**30 for m in order], color="#dd8452")
    axes[1].set_xlabel("predicted peak memory of one tensor (GiB)")
    from matplotlib.ticker import NullFormatter

    for ax in axes:
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(True, axis="x", which="both", alpha=0.3)
        ax.tick_params(axis="y", labelsize=8)
    total = sum(v[0] for v in totals.values())
    fig.suptitle(f"Cost by module type (total {human_seconds(total)} estimated)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def write_plots(report, out_dir: Path) -> Dict[str, str]:
    """All plots that the report has data for; returns ``{kind: path}``."""
    require_matplotlib()
    out_dir = Path(out_dir)
    files = {}
    for kind, plot in (
        ("gate", plot_gate),
        ("energy", plot_energy),
        ("branches", plot_branches),
        ("concentration", plot_concentration),
        ("cost", plot_cost),
    ):
        path = plot(report, out_dir / f"{kind}.png")
        if path:
            files[kind] = path
    return files
