"""Tables and charts of the LoRA benchmark: one results JSON per rank and storage form
(:mod:`benchmarks.lora.run`), each in the generative benchmark's format and statistics
(:mod:`benchmarks.generative.report`), plus the comparison of the forms side by side."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, Optional

from benchmarks.generative import report as gen
from benchmarks.lora.config import OURS, code_fingerprint
from benchmarks.real_llama.report import DOC, IMG, RESULTS, replace_block

SET_RE = re.compile(r"lora-(r\d+|quick)-(adapter|bf16)$")
FORM_NAMES = {"adapter": "adapters", "bf16": "bf16 folded"}


def load_results(results_dir: Path = RESULTS) -> Dict[str, Dict]:
    """Every ``lora-r<rank>-<form>.json`` of ``results_dir`` by set name, rank 8 first."""
    out = {}
    for f in sorted(results_dir.glob("lora-r*-*.json"), key=lambda p: _order(p.stem)):
        if SET_RE.match(f.stem):
            out[f.stem] = json.loads(f.read_text())
    return out


def _order(name: str):
    m = re.match(r"lora-r(\d+)-(\w+)", name)
    return (int(m.group(1)), m.group(2)) if m else (0, name)


def _column(name: str) -> str:
    m = SET_RE.match(name)
    return f"{m.group(1)} {FORM_NAMES[m.group(2)]}" if m else name


def _full(results: Dict) -> Dict[str, Dict]:
    return {m["label"]: m for m in gen.merges(results) if m["full"]}


def comparison_table(all_results: Dict[str, Dict]) -> str:
    """All-experts merges: average and worst-domain retention per method, one column pair per
    rank and storage form; methods by their mean average retention."""
    names = [n for n in all_results if gen.merges(all_results[n])]
    fulls = {n: _full(all_results[n]) for n in names}
    labels = sorted(
        {label for f in fulls.values() for label in f},
        key=lambda label: (
            -sum(f[label]["summary"]["avg"] for f in fulls.values() if label in f)
            / max(1, sum(label in f for f in fulls.values()))
        ),
    )
    out = [
        "| Method | " + " | ".join(f"{_column(n)}: avg | worst" for n in names) + " |",
        "|---|" + "---|---|" * len(names),
    ]
    for label in labels:
        cells = []
        for n in names:
            m = fulls[n].get(label)
            if m is None:
                cells += ["-", "-"]
                continue
            s = m["summary"]
            best = max(f["summary"]["avg"] for f in fulls[n].values())
            avg = f"{gen._p(s['avg'])} ± {gen._p(s['avg_se'])}"
            cells += [
                f"**{avg}**" if s["avg"] == best else avg,
                f"{s['worst']} {gen._p(s['worst_r'])}",
            ]
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    out.append("")
    out.append(
        "Retention, % (the generative benchmark's statistic; each form's reference is its "
        "own expert: the adapter folded in float32, or the bf16 checkpoint), all experts "
        "merged; avg ± standard error over documents; worst: the merged domain with the "
        "lowest retention. Bold: the best average of a column."
    )
    return "\n".join(out)


def experts_table(all_results: Dict[str, Dict]) -> str:
    """Per domain: the base's loss and each form's expert loss on its own domain."""
    names = [n for n in all_results if any(k.startswith("seed") for k in all_results[n]["rows"])]
    first = all_results[names[0]]
    doms = gen.domains_of(first)
    base = first["rows"]["base"]["scores"]
    out = [
        "| Domain | base loss | " + " | ".join(f"{_column(n)}" for n in names) + " | train s |",
        "|---|---|" + "---|" * len(names) + "---|",
    ]
    for d in doms:
        bl = gen._mean(base[d]["loss"])
        cells, secs = [], []
        for n in names:
            e = gen.expert_row(all_results[n], 0, d)
            if e is None:
                cells.append("-")
                continue
            el = gen._mean(e["scores"][d]["loss"])
            cells.append(f"{el:.3f} ({100 * (el - bl) / bl:+.1f}%)")
            secs.append(f"{e['train_seconds']:.0f}")
        uniq = list(dict.fromkeys(secs))
        out.append(f"| {d} | {bl:.3f} | " + " | ".join(cells) + f" | {' / '.join(uniq)} |")
    out.append("")
    out.append(
        "Mean next-token loss (nats) of each expert on its own domain's held-out documents "
        "(change against the bf16 base); train s: training time per rank (one training per "
        "rank gives both forms)."
    )
    return "\n".join(out)


def fingerprint_note(all_results: Dict[str, Dict]) -> str:
    """Which code fingerprint the rows of this package's methods were merged with, and which
    rows (by set) are stale against the current code."""
    now = code_fingerprint()
    seen: Dict[str, int] = {}
    stale: Dict[str, list] = {}
    for n, res in all_results.items():
        ours = 0
        for key, row in res["rows"].items():
            if row.get("kind") == "merge" and row.get("method") in OURS and "code " in row["key"]:
                fp = row["key"].rsplit("code ", 1)[1]
                seen[fp] = seen.get(fp, 0) + 1
                ours += 1
                if fp != now:
                    stale.setdefault(n, []).append(key.split(" | ", 1)[1])
        if len(stale.get(n, [])) == ours > 1:
            stale[n] = [f"all {ours} rows"]
    note = (
        f"Merge code fingerprint of the rows of {', '.join(OURS)}: "
        + ", ".join(f"`{fp}` ({count} rows)" for fp, count in seen.items())
        + "."
    )
    if not stale:
        return note
    return note + (
        f" Rows merged with an earlier code than the current `{now}`: "
        + "; ".join(f"`{n}`: {', '.join(keys)}" for n, keys in stale.items())
        + "."
    )


def chart(all_results: Dict[str, Dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in all_results if gen.merges(all_results[n])]
    fulls = {n: _full(all_results[n]) for n in names}
    labels = [label for label in gen.method_order(gen.merges(all_results[names[0]]))]
    labels += sorted({lb for f in fulls.values() for lb in f} - set(labels))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
    width = 0.8 / len(names)
    cmap = plt.get_cmap("tab20")
    floor = -60.0
    for ax, field, title in zip(
        axes, ("avg", "worst_r"), ("average retention, all 6 experts", "worst domain")
    ):
        for j, n in enumerate(names):
            ys = [
                100 * fulls[n][lb]["summary"][field] if lb in fulls[n] else float("nan")
                for lb in labels
            ]  # a method not merged in this form has no bar
            xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(labels))]
            ys = [y if y != y else max(y, floor) for y in ys]
            ax.bar(xs, ys, width, color=cmap(j), label=_column(n))
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=35, ha="right", fontsize=8)
        ax.axhline(100, color="black", lw=0.8, ls="--")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_ylim(floor - 2, 110)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel(f"retention, % (bars cut at {floor:.0f})")
    axes[0].legend(fontsize=8, loc="lower left")
    fig.suptitle(
        "SmolLM2-135M LoRA experts merged with mergekit-yaml: held-out next-token loss retained",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown(all_results: Dict[str, Dict]) -> str:
    parts = ["**Experts:**", "", experts_table(all_results), ""]
    parts += [
        "**All experts merged, by rank and storage form:**",
        "",
        comparison_table(all_results),
        "",
    ]
    for n, res in all_results.items():
        if not gen.merges(res):
            continue
        parts += [f"**{_column(n)}** (`{n}`), per domain:", "", gen.full_table(res), ""]
        if any(not m["full"] for m in gen.merges(res)):
            parts += [f"**{_column(n)}, retention as more experts are merged:**", ""]
            parts += [gen.sweep_table(res), ""]
        fails = [k for k, v in res["rows"].items() if "error" in v]
        if fails:
            parts += ["Failed merges: " + ", ".join(fails), ""]
        parts += [gen.timing(res), ""]
    parts.append(fingerprint_note(all_results))
    return "\n".join(parts)


def write_report(
    all_results: Dict[str, Dict],
    doc: Optional[Path] = DOC,
    img_dir: Path = IMG,
    out_dir: Path = RESULTS,
    name: str = "lora",
) -> Dict[str, Path]:
    """``<out_dir>/<name>.md``, the charts (T=6 bars; the T sweep per set that has one) and the
    ``results-lora`` block of ``doc`` (when given)."""
    md = markdown(all_results)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out_dir / f"{name}.md"}
    paths["markdown"].write_text(md + "\n")
    try:
        paths["chart"] = chart(all_results, img_dir / f"benchmark_{name}.png")
        for n, res in all_results.items():
            if any(not m["full"] for m in gen.merges(res)) and len(gen.sweep_points(res)) > 0:
                paths[f"sweep {n}"] = gen.chart(res, img_dir / f"benchmark_{n}_sweep.png")
    except ImportError:  # matplotlib is optional (the plots extra)
        pass
    if doc is not None and doc.exists():
        doc.write_text(replace_block(doc.read_text(), "results-lora", md))
    return paths
