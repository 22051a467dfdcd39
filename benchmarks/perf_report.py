"""Markdown tables from the JSON lines written by perf_kernel.py and perf_e2e.py.

python -m benchmarks.perf_report benchmarks/runs/kernel_scaled.jsonl benchmarks/runs/e2e_cpu.jsonl
python -m benchmarks.perf_report --best run1.jsonl run2.jsonl   # fastest of repeated runs
"""

from __future__ import annotations

import json
import sys

from mergekit_ace.kernels.ace import estimate_ace_cost

MB = 1e6


def kernel_table(rows):
    out = [
        "| tensor | shape | T | branch | naive s | ace s | speedup | ace vs naive | ace vs f64 "
        "| naive vs f64 | naive peak MB | ace peak MB | estimate MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    cases = {}
    for r in rows:
        cases.setdefault((r.get("name"), tuple(r["shape"]), r["experts"], r["device"]), {})[
            r["impl"]
        ] = r

    def fmt(x, spec):
        return format(x, spec) if isinstance(x, (int, float)) else "-"

    for (name, shape, T, device), impls in cases.items():
        a, nv = impls.get("ace", {}), impls.get("naive", {})
        out.append(
            "| {} | {}x{} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
                name,
                shape[0],
                shape[1],
                T,
                a.get("branch", "-"),
                fmt(nv.get("seconds"), ".1f") if "error" not in nv else nv["error"],
                fmt(a.get("seconds"), ".1f") if "error" not in a else a["error"],
                fmt(a.get("speedup"), ".2f"),
                fmt(a.get("rel_diff_vs_naive"), ".1e"),
                fmt(a.get("rel_diff_vs_float64"), ".1e"),
                fmt(nv.get("rel_diff_vs_float64"), ".1e"),
                fmt(nv.get("peak_bytes", 0) / MB if nv.get("peak_bytes") else None, ".0f"),
                fmt(a.get("peak_bytes", 0) / MB if a.get("peak_bytes") else None, ".0f"),
                fmt(estimate_ace_cost(shape, T)["bytes"] / MB, ".0f"),
            )
        )
    return "\n".join(out)


def e2e_table(rows):
    out = [
        "| flags | T | method | wall s | peak RSS MB | peak GPU MiB | rc |",
        "|---|---|---|---|---|---|---|",
    ]
    ratios = []
    for r in rows:
        if "ace_over_task_arithmetic" in r:
            ratios.append(
                f"- `{r['flags'] or '(defaults)'}`, T={r['experts']}: ace / task_arithmetic "
                f"wall time = {r['ace_over_task_arithmetic']:.2f}"
            )
            continue
        out.append(
            "| `{}` | {} | {} | {:.1f} | {} | {} | {} |".format(
                r["flags"] or "(defaults)",
                r["experts"],
                r["method"],
                r["seconds"],
                f"{r['peak_rss_bytes'] / MB:.0f}" if r.get("peak_rss_bytes") else "-",
                r.get("peak_gpu_mib", "-"),
                r["rc"],
            )
        )
    return "\n".join(out + [""] + ratios)


def best_of(paths):
    """Kernel rows of several runs of the same cases: per case and implementation the fastest
    run (its peak and differences kept), speedup recomputed from the fastest times."""
    best = {}
    for path in paths:
        for line in open(path):
            r = json.loads(line)
            if "error" in r:
                continue
            key = (r.get("name"), tuple(r["shape"]), r["experts"], r["device"], r["impl"])
            if key not in best or r["seconds"] < best[key]["seconds"]:
                keep = {
                    k: best[key][k]
                    for k in ("rel_diff_vs_naive", "rel_diff_vs_float64")
                    if key in best and k in best[key]
                }
                best[key] = {**r, **keep}
            best[key]["runs"] = best[key].get("runs", 0) + 1
    rows = list(best.values())
    for r in rows:
        if r["impl"] == "ace":
            naive = best.get((r.get("name"), tuple(r["shape"]), r["experts"], r["device"], "naive"))
            if naive:
                r["speedup"] = naive["seconds"] / r["seconds"]
    return rows


def main(paths):
    if paths and paths[0] == "--best":
        print(kernel_table(best_of(paths[1:])))
        return
    for path in paths:
        rows = [json.loads(line) for line in open(path) if line.strip()]
        print(f"### {path}\n")
        print(e2e_table(rows) if rows and "method" in rows[0] else kernel_table(rows))
        print()


if __name__ == "__main__":
    main(sys.argv[1:])
