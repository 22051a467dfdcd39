"""Tables (markdown) and the chart for a results JSON written by
:mod:`benchmarks.real_llama.run`."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "benchmarks.md"
IMG = ROOT / "docs" / "img"
RESULTS = ROOT / "benchmarks" / "results"
GROUP_ORDER = ("reference", "baseline", "other", "ace", "ablation", "variant", "eps")
GROUP_COLOURS = {
    "reference": "#9e9e9e",
    "baseline": "#4c72b0",
    "other": "#8172b2",
    "ace": "#c44e52",
    "ablation": "#dd8452",
    "variant": "#da8bc3",
    "eps": "#e5ae38",
}


def tasks_of(results: Dict) -> List[str]:
    return list(results["data"]["tasks"])


def expert_acc(results: Dict) -> Dict[str, float]:
    rows = results["rows"]
    return {
        t: rows[f"expert {t}"]["scores"][t]["acc"]
        for t in tasks_of(results)
        if f"expert {t}" in rows
    }


def summary(results: Dict, label: str) -> Optional[Dict]:
    """Average accuracy, its standard error, normalized accuracies for one merged row."""
    row = results["rows"].get(label)
    if not row or "scores" not in row:
        return None
    tasks = tasks_of(results)
    sc = row["scores"]
    if any(t not in sc for t in tasks):
        return None
    exp = expert_acc(results)
    avg = sum(sc[t]["acc"] for t in tasks) / len(tasks)
    se = math.sqrt(sum(sc[t]["se"] ** 2 for t in tasks)) / len(tasks)
    norm = {t: sc[t]["acc"] / exp[t] for t in tasks if exp.get(t)}
    navg = sum(norm.values()) / len(norm) if len(norm) == len(tasks) else None
    return {"avg": avg, "se": se, "norm": norm, "norm_avg": navg}


def merged_labels(results: Dict) -> List[str]:
    rows = results["rows"]
    labels = [k for k, v in rows.items() if v.get("group") not in ("expert",)]
    return sorted(
        labels,
        key=lambda k: (
            GROUP_ORDER.index(rows[k].get("group", "eps"))
            if rows[k].get("group") in GROUP_ORDER
            else 99
        ),
    )


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def markdown(results: Dict) -> str:
    tasks = tasks_of(results)
    rows = results["rows"]
    exp = expert_acc(results)
    n = {t: rows["base"]["scores"][t]["n"] for t in tasks} if "base" in rows else {}
    out = []
    head = "| Method | " + " | ".join(f"{t} (n={n.get(t, '?')})" for t in tasks)
    out.append(head + " | Avg | Norm. avg | Merge s |")
    out.append("|" + "---|" * (len(tasks) + 4))
    erow = ["**experts** (each on its own task)"]
    for t in tasks:
        r = rows.get(f"expert {t}")
        erow.append(f"{_pct(r['scores'][t]['acc'])} ± {_pct(r['scores'][t]['se'])}" if r else "-")
    if len(exp) == len(tasks):
        erow += [_pct(sum(exp.values()) / len(tasks)), "100.0", "-"]
    else:
        erow += ["-", "-", "-"]
    out.append("| " + " | ".join(erow) + " |")
    for label in merged_labels(results):
        row = rows[label]
        if "error" in row:
            out.append(f"| {label} | " + " | ".join("failed" for _ in tasks) + " | - | - | - |")
            continue
        s = summary(results, label)
        if s is None:
            continue
        cells = [f"{_pct(row['scores'][t]['acc'])} ± {_pct(row['scores'][t]['se'])}" for t in tasks]
        secs = row.get("merge_seconds")
        name = f"**{label}**" if label in ("ace", "base") else label
        if label == "base":
            name = "base (zero-shot)"
        out.append(
            f"| {name} | " + " | ".join(cells) + f" | {_pct(s['avg'])} ± {_pct(s['se'])}"
            f" | {_pct(s['norm_avg']) if s['norm_avg'] is not None else '-'}"
            f" | {f'{secs:.0f}' if secs else '-'} |"
        )
    out.append("")
    out.append("Normalized accuracy (merged / expert on the same task, %):")
    out.append("")
    out.append("| Method | " + " | ".join(tasks) + " | Avg |")
    out.append("|" + "---|" * (len(tasks) + 2))
    for label in merged_labels(results):
        s = summary(results, label)
        if s is None or s["norm_avg"] is None:
            continue
        name = "base (zero-shot)" if label == "base" else label
        out.append(
            f"| {name} | "
            + " | ".join(_pct(s["norm"][t]) for t in tasks)
            + f" | {_pct(s['norm_avg'])} |"
        )
    fails = [k for k, v in rows.items() if "error" in v]
    if fails:
        out.append("")
        out.append("Failed merges: " + ", ".join(fails))
    m = results.get("machine", {})
    out.append("")
    out.append(
        f"Machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores, torch "
        f"{m.get('torch', '?')} ({m.get('torch_threads', '?')} thread(s)), CPU only. "
        "Merge s = wall time of the `mergekit-yaml` subprocess (loading, merging and "
        "writing a float32 checkpoint)."
    )
    return "\n".join(out)


def chart(results: Dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = tasks_of(results)
    rows = results["rows"]
    labels = [
        method_label
        for method_label in merged_labels(results)
        if summary(results, method_label) and summary(results, method_label)["norm_avg"] is not None
    ]
    eps_rows = [
        method_label
        for method_label in labels
        if rows[method_label].get("method") == "ace"
        and rows[method_label]["group"] in ("eps", "ace")
        and isinstance(rows[method_label].get("parameters", {}).get("eps"), float)
    ]
    bars = [method_label for method_label in labels if rows[method_label]["group"] != "eps"]
    fig, (ax, ax2) = plt.subplots(
        1, 2, figsize=(13, 0.42 * len(bars) + 2.8), gridspec_kw={"width_ratios": [1.6, 1]}
    )
    y = list(range(len(bars)))[::-1]
    task_markers = ["o", "s", "^", "D", "v", "P"]
    for yi, method_label in zip(y, bars):
        s = summary(results, method_label)
        g = rows[method_label]["group"]
        ax.barh(yi, 100 * s["norm_avg"], color=GROUP_COLOURS.get(g, "#777"), alpha=0.85, height=0.7)
        ax.text(
            1.5,
            yi,
            f"{100 * s['norm_avg']:.1f}",
            va="center",
            ha="left",
            fontsize=9,
            color="white",
            fontweight="bold",
        )
        for k, t in enumerate(tasks):
            ax.plot(
                100 * s["norm"][t],
                yi,
                task_markers[k % 6],
                color="black",
                ms=4,
                alpha=0.6,
                label=t if yi == y[0] else None,
            )
    ax.set_yticks(y)
    ax.set_yticklabels(
        ["base (zero-shot)" if method_label == "base" else method_label for method_label in bars]
    )
    ax.axvline(100, color="black", lw=1, ls="--")
    ax.set_xlabel(
        "normalized accuracy, % of each expert on its own task (bar: average; markers: tasks)"
    )
    ax.set_xlim(
        0,
        max(
            115,
            5
            + max(
                100 * max(summary(results, method_label)["norm"].values()) for method_label in bars
            ),
        ),
    )
    ax.legend(
        loc="upper center",
        bbox_to_anchor=(0.5, -0.09),
        ncol=len(tasks),
        fontsize=8,
        title="task (markers)",
        title_fontsize=8,
        frameon=False,
    )
    ax.set_title("Which merge keeps the experts' skills?")
    ax.grid(axis="x", alpha=0.3)

    pts: List[Tuple[float, float, float]] = []
    for method_label in eps_rows:
        e = rows[method_label]["parameters"]["eps"]
        s = summary(results, method_label)
        pts.append((e, 100 * s["norm_avg"], 100 * s["se"] / max(1e-9, s["avg"]) * s["norm_avg"]))
    pts.sort()
    if pts:
        ax2.errorbar(
            [p[0] for p in pts],
            [p[1] for p in pts],
            yerr=[p[2] for p in pts],
            marker="o",
            color=GROUP_COLOURS["ace"],
            label="ace, paper's gate, eps swept",
            capsize=3,
        )
        ax2.set_xscale("log")
    refs = [
        ("task_arithmetic (lambda=1)", ":"),
        (f"task_arithmetic (lambda=1/{len(tasks)})", "--"),
        ("ties", "-."),
        ("base", "-"),
    ]
    for method_label, ls in refs:
        s = summary(results, method_label)
        if s and s["norm_avg"] is not None:
            ax2.axhline(
                100 * s["norm_avg"],
                ls=ls,
                color="#4c72b0" if method_label != "base" else "#9e9e9e",
                lw=1.2,
                label="base (zero-shot)" if method_label == "base" else method_label,
            )
    for method_label, colour in (
        ("ace eps=auto", GROUP_COLOURS["eps"]),
        ("ace", GROUP_COLOURS["ace"]),
    ):
        s = summary(results, method_label)
        if s and s["norm_avg"] is not None:
            ax2.axhline(
                100 * s["norm_avg"],
                color=colour,
                lw=1.5,
                label="ace (defaults: eps auto, log_spread)"
                if method_label == "ace"
                else "ace eps=auto, paper's gate",
            )
    ax2.axvline(1e-5, color="#c44e52", lw=0.8, alpha=0.4)
    ax2.set_xlabel("ace eps (the paper's 1e-5 marked)")
    ax2.set_ylabel("average normalized accuracy, %")
    ax2.set_title("ACE's ridge eps")
    ax2.legend(fontsize=8, loc="best")
    ax2.grid(alpha=0.3)
    fig.suptitle(
        f"SmolLM2-135M experts merged with mergekit-yaml (expert set '"
        f"{results['data']['set']}', {len(tasks)} tasks)",
        fontsize=11,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def replace_block(text: str, name: str, body: str) -> str:
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        return text
    return pattern.sub(lambda _: f"{start}\n{body}\n{end}", text)


def write_report(
    results: Dict, set_name: str, doc: Path = DOC, img_dir: Path = IMG, out_dir: Path = RESULTS
) -> Dict[str, Path]:
    """Write ``<out_dir>/<set>.md``, the chart, and refresh the generated block of ``doc``."""
    md = markdown(results)
    out_dir.mkdir(parents=True, exist_ok=True)
    md_path = out_dir / f"{set_name}.md"
    md_path.write_text(md + "\n")
    paths = {"markdown": md_path}
    try:
        paths["chart"] = chart(results, img_dir / f"benchmark_{set_name}.png")
    except ImportError:  # matplotlib is optional (the plots extra)
        pass
    if doc.exists():
        doc.write_text(replace_block(doc.read_text(), f"results-{set_name}", md))
    return paths
