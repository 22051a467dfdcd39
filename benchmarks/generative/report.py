"""Retention statistics, tables and the chart for a results JSON of
:mod:`benchmarks.generative.run`.

Retention of domain d in a merged model: ``R = (L_base - L_merged) / (L_base - L_expert)``,
with L the mean next-token loss over the domain's held-out documents and the expert of the same
training seed. Its standard error is the delta method's over documents, pairing the three
models' losses on each document.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from benchmarks.real_llama.report import DOC, IMG, RESULTS, replace_block

ALL = "all"
MARKERS = "os^Dv<>P*X"


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def retention(
    base: Sequence[float], expert: Sequence[float], merged: Sequence[float]
) -> Dict[str, float]:
    """``R`` and its standard error from per-document losses of the three models."""
    n = len(base)
    gain = [b - m for b, m in zip(base, merged)]
    target = [b - e for b, e in zip(base, expert)]
    den = _mean(target)
    r = _mean(gain) / den
    resid = [g - r * t for g, t in zip(gain, target)]
    mu = _mean(resid)
    var = sum((x - mu) ** 2 for x in resid) / max(1, n - 1)
    return {"r": r, "se": math.sqrt(var / n) / abs(den)}


def domains_of(results: Dict) -> List[str]:
    return list(results["data"]["domains"])


def seeds_of(results: Dict) -> List[int]:
    return sorted({r["seed"] for r in results["rows"].values() if r.get("kind") == "expert"})


def expert_row(results: Dict, seed: int, domain: str) -> Optional[Dict]:
    return results["rows"].get(f"seed {seed} | expert {domain}")


def summarize(results: Dict, row: Dict, seed: int) -> Optional[Dict]:
    """Per-domain retention of ``row`` (a merge, or an expert scored on its own domain)."""
    base = results["rows"]["base"]["scores"]
    per = {}
    for d, sc in row["scores"].items():
        ex = expert_row(results, seed, d)
        if ex is None:
            return None
        per[d] = retention(base[d]["loss"], ex["scores"][d]["loss"], sc["loss"])
        per[d]["loss"] = _mean(sc["loss"])
        per[d]["acc"] = _mean(sc["acc"])
    rs = [v["r"] for v in per.values()]
    worst = min(per, key=lambda d: per[d]["r"])
    return {
        "per": per,
        "avg": _mean(rs),
        "avg_se": math.sqrt(sum(v["se"] ** 2 for v in per.values())) / len(per),
        "worst": worst,
        "worst_r": per[worst]["r"],
        "acc": _mean([v["acc"] for v in per.values()]),
    }


def merges(results: Dict) -> List[Dict]:
    out = []
    for key, row in results["rows"].items():
        if row.get("kind") == "merge" and "scores" in row:
            s = summarize(results, row, row["seed"])
            if s:
                out.append(
                    {
                        **row,
                        "row_key": key,
                        "summary": s,
                        "size": len(row["subset"]),
                        "full": len(row["subset"]) == len(domains_of(results)),
                    }
                )
    return out


def method_order(ms: List[Dict]) -> List[str]:
    """Labels by decreasing average retention of their all-experts merges (mean over seeds),
    the methods without one last."""
    full: Dict[str, List[float]] = {}
    for m in ms:
        full.setdefault(m["label"], [])
        if m["full"]:
            full[m["label"]].append(m["summary"]["avg"])
    return sorted(
        full,
        key=lambda method_label: -_mean(full[method_label]) if full[method_label] else math.inf,
    )


def _p(x: float) -> str:
    return f"{100 * x:.1f}"


def _cross(results: Dict, seed: int) -> bool:
    e = expert_row(results, seed, domains_of(results)[0])
    return bool(e) and len(e["scores"]) > 1


def experts_table(results: Dict) -> str:
    rows = results["rows"]
    doms = domains_of(results)
    seeds = seeds_of(results)
    base = rows["base"]["scores"]
    out = [
        "| Domain | base loss | expert loss (own domain) | change | change on the other "
        "domains (mean, worst) | base top-1 % | expert top-1 % | train s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for d in doms:
        exps = [expert_row(results, s, d) for s in seeds]
        exps = [e for e in exps if e]
        if not exps:
            continue
        bl = _mean(base[d]["loss"])
        own = [_mean(e["scores"][d]["loss"]) for e in exps]
        others = [
            [
                _mean(e["scores"][o]["loss"]) - _mean(base[o]["loss"])
                for o in doms
                if o != d and o in e["scores"]
            ]
            for e in exps
        ]
        j = " / "
        out.append(
            f"| {d} | {bl:.3f} | {j.join(f'{x:.3f}' for x in own)} | "
            f"{j.join(f'{100 * (x - bl) / bl:+.1f}%' for x in own)} | "
            f"{j.join(f'{_mean(o):+.3f}, {max(o):+.3f}' for o in others if o)} | "
            f"{_p(_mean(base[d]['acc']))} | "
            f"{j.join(_p(_mean(e['scores'][d]['acc'])) for e in exps)} | "
            f"{j.join(str(round(e['train_seconds'])) for e in exps)} |"
        )
    out.append("")
    out.append(
        f"Loss: mean next-token loss (nats) over the held-out documents; values for "
        f"training seeds {', '.join(map(str, seeds))} separated by ' / '. The other "
        "domains' change is the expert's loss minus the base's there (positive: worse), "
        "measured for the experts of seed(s) "
        f"{', '.join(str(s) for s in seeds if _cross(results, s))}."
    )
    return "\n".join(out)


def full_table(results: Dict) -> str:
    doms = domains_of(results)
    seeds = seeds_of(results)
    full = [m for m in merges(results) if m["full"]]
    labels = method_order(full)
    head = (
        "| Method | "
        + " | ".join(doms)
        + " | "
        + " | ".join(f"avg, seed {s}" for s in seeds)
        + " | worst domain | top-1 % | merge s |"
    )
    out = [head, "|" + "---|" * (len(doms) + len(seeds) + 4)]
    for label in labels:
        by_seed = {m["seed"]: m for m in full if m["label"] == label}
        first = by_seed.get(seeds[0]) or next(iter(by_seed.values()))
        s0 = first["summary"]
        cells = [f"{_p(s0['per'][d]['r'])} ± {_p(s0['per'][d]['se'])}" for d in doms]
        avgs = [
            f"**{_p(by_seed[s]['summary']['avg'])}** ± {_p(by_seed[s]['summary']['avg_se'])}"
            if s in by_seed
            else "-"
            for s in seeds
        ]
        worst = " / ".join(
            f"{by_seed[s]['summary']['worst']} {_p(by_seed[s]['summary']['worst_r'])}"
            for s in seeds
            if s in by_seed
        )
        acc = " / ".join(_p(by_seed[s]["summary"]["acc"]) for s in seeds if s in by_seed)
        secs = " / ".join(f"{by_seed[s]['merge_seconds']:.0f}" for s in seeds if s in by_seed)
        out.append(
            f"| {label} | "
            + " | ".join(cells)
            + " | "
            + " | ".join(avgs)
            + f" | {worst} | {acc} | {secs} |"
        )
    out.append("")
    out.append(
        f"Retention, % (100: the merged model's loss on a domain is as low as that "
        f"domain's expert's; 0: no better than the base). Per-domain columns: training "
        f"seed {seeds[0]}, ± standard error over documents; averages: ± standard error "
        "over documents, per seed; worst domain, top-1 next-token accuracy (mean over "
        "domains) and merge time per seed, separated by ' / '."
    )
    pairs = []
    for label in labels:
        v = [m["summary"]["avg"] for m in full if m["label"] == label]
        if len(v) >= 2:
            pairs.append((label, max(v) - min(v)))
    if pairs:
        avgs = {
            label: _mean([m["summary"]["avg"] for m in full if m["label"] == label])
            for label in labels
        }
        out.append("")
        out.append(
            f"Spread between the two training seeds (|difference of average retention|): "
            f"median {_p(sorted(p for _, p in pairs)[len(pairs) // 2])}, largest "
            f"{_p(max(p for _, p in pairs))} points ({max(pairs, key=lambda x: x[1])[0]}); "
            f"spread between methods (mean over seeds): {_p(min(avgs.values()))} "
            f"({min(avgs, key=avgs.get)}) to {_p(max(avgs.values()))} "
            f"({max(avgs, key=avgs.get)})."
        )
    return "\n".join(out)


def sweep_points(results: Dict) -> Dict[str, Dict[int, List[Dict]]]:
    """label -> T -> summaries of every merge of T experts (all subsets and seeds)."""
    out: Dict[str, Dict[int, List[Dict]]] = {}
    for m in merges(results):
        out.setdefault(m["label"], {}).setdefault(m["size"], []).append(m)
    return out


def sweep_table(results: Dict) -> str:
    pts = sweep_points(results)
    swept = [
        method_label
        for method_label in method_order(merges(results))
        if any(not m["full"] for ms in pts[method_label].values() for m in ms)
    ]
    sizes = sorted({t for method_label in swept for t in pts[method_label]})
    out = [
        "| Method | " + " | ".join(f"T={t}" for t in sizes) + " |",
        "|---|" + "---|" * len(sizes),
    ]
    for method_label in swept:
        cells = []
        for t in sizes:
            ms = pts[method_label].get(t, [])
            if not ms:
                cells.append("-")
                continue
            a = [m["summary"]["avg"] for m in ms]
            w = [m["summary"]["worst_r"] for m in ms]
            cells.append(
                f"{_p(_mean(a))} [{_p(min(a))}, {_p(max(a))}] (worst {_p(_mean(w))}, n={len(ms)})"
            )
        out.append(f"| {method_label} | " + " | ".join(cells) + " |")
    out.append("")
    out.append(
        "Average retention over the merged domains, %, mean over the merges of T "
        "experts [lowest, highest]; worst: mean over those merges of the worst merged "
        "domain's retention; n: merges (random subsets x training seeds). The largest T "
        "is the all-experts merge."
    )
    subs = results.get("subsets", {})
    if subs:
        out.append("")
        out.append(
            "Subsets: "
            + "; ".join(f"T={t}: " + ", ".join("+".join(s) for s in v) for t, v in subs.items())
            + "."
        )
    return "\n".join(out)


def timing(results: Dict) -> str:
    rows = results["rows"].values()
    train = sum(r.get("train_seconds", 0) for r in rows)
    merge = sum(r.get("merge_seconds", 0) for r in rows)
    ev = sum(r.get("eval_seconds", 0) for r in rows)
    runs = results.get("runs", [])
    spans = sorted(
        (time.mktime(time.strptime(r["started"], "%Y-%m-%d %H:%M:%S")), r["seconds"]) for r in runs
    )
    wall, end = 0.0, -math.inf
    for start, secs in spans:  # union of the runs' intervals (some ran side by side)
        wall += max(0.0, start + secs - max(start, end))
        end = max(end, start + secs)
    n_merge = sum(1 for r in rows if r.get("kind") == "merge")
    m = results.get("machine", {})
    return (
        f"Time: {wall / 60:.0f} min of wall time ({len(runs)} invocation(s)) "
        f"on {m.get('cpu', '?')}, {m.get('cores', '?')} cores, torch "
        f"{m.get('torch', '?')} ({m.get('torch_threads', '?')} thread(s)): training "
        f"{train / 60:.0f} min, {n_merge} merges {merge / 60:.0f} min (`mergekit-yaml` "
        f"wall time), scoring {ev / 60:.0f} min."
    )


def markdown(results: Dict) -> str:
    parts = [
        "**Experts** (each trained on one domain):",
        "",
        experts_table(results),
        "",
        "**All experts merged:**",
        "",
        full_table(results),
        "",
    ]
    if any(not m["full"] for m in merges(results)):
        parts += ["**Retention as more experts are merged:**", "", sweep_table(results), ""]
    fails = [k for k, v in results["rows"].items() if "error" in v]
    if fails:
        parts += ["Failed merges: " + ", ".join(fails), ""]
    parts.append(timing(results))
    return "\n".join(parts)


def chart(results: Dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = sweep_points(results)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), sharex=True)
    cmap = plt.get_cmap("tab10")
    labels = [
        method_label for method_label in method_order(merges(results)) if len(pts[method_label]) > 1
    ]
    for i, method_label in enumerate(labels):
        sizes = sorted(pts[method_label])
        for ax, field in zip(axes, ("avg", "worst_r")):
            ys = [_mean([m["summary"][field] for m in pts[method_label][t]]) for t in sizes]
            ax.plot(
                sizes,
                [100 * y for y in ys],
                "-" + MARKERS[i % len(MARKERS)],
                color=cmap(i % 10),
                label=method_label,
                lw=2 if method_label.startswith("ace") else 1.2,
            )
            for t in sizes:
                ax.scatter(
                    [t] * len(pts[method_label][t]),
                    [100 * m["summary"][field] for m in pts[method_label][t]],
                    color=cmap(i % 10),
                    s=8,
                    alpha=0.35,
                )
    floor = -40.0  # methods that overshoot fall far below zero; the table has their values
    for ax, title in zip(
        axes, ("average retention over the merged domains", "worst merged domain")
    ):
        lo = min(y for line in ax.get_lines() for y in line.get_ydata())
        ax.set_ylim(max(floor, lo - 5), 105)
        if lo < floor:
            ax.text(
                0.98,
                0.02,
                f"axis cut at {floor:.0f} %; lower values in the table",
                transform=ax.transAxes,
                ha="right",
                va="bottom",
                fontsize=8,
            )
        ax.set_xticks(sorted({t for method_label in labels for t in pts[method_label]}))
        ax.axhline(100, color="black", lw=0.8, ls="--")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlabel("T, experts merged")
        ax.set_ylabel("retention, %")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower left")
    fig.suptitle(
        "SmolLM2-135M domain experts merged with mergekit-yaml: held-out next-token "
        "loss retained (line: mean; dots: each subset and seed)",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(
    results: Dict, doc: Optional[Path] = DOC, img_dir: Path = IMG, out_dir: Path = RESULTS
) -> Dict[str, Path]:
    """``<out_dir>/<set>.md``, the chart, and the generated block of ``doc`` (when given)."""
    name = results["data"]["set"]
    md = markdown(results)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out_dir / f"{name}.md"}
    paths["markdown"].write_text(md + "\n")
    try:
        paths["chart"] = chart(results, img_dir / f"benchmark_{name}.png")
    except ImportError:  # matplotlib is optional (the plots extra)
        pass
    if doc is not None and doc.exists():
        doc.write_text(replace_block(doc.read_text(), f"results-{name}", md))
    return paths
