"""Markdown tables from the JSON lines written by perf_kernel.py and perf_e2e.py.

python -m benchmarks.perf_report benchmarks/runs/kernel_scaled.jsonl benchmarks/runs/e2e_cpu.jsonl
python -m benchmarks.perf_report --best run1.jsonl run2.jsonl   # fastest of repeated runs
python -m benchmarks.perf_report --timeline e2e.jsonl [--png timeline.png] [--traces DIR]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

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
        if "over_task_arithmetic" in r or "ace_over_task_arithmetic" in r:
            ratio = r.get("over_task_arithmetic", r.get("ace_over_task_arithmetic"))
            ratios.append(
                f"- `{r['flags'] or '(defaults)'}`, T={r['experts']}: "
                f"{r.get('spec', 'ace')} / task_arithmetic wall time = {ratio:.2f}"
            )
            continue
        if "method" not in r:
            continue
        out.append(
            "| `{}` | {} | {} | {:.1f} | {} | {} | {} |".format(
                r["flags"] or "(defaults)",
                r["experts"],
                r.get("spec", r["method"]),
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


PHASES = ("read", "stage", "merge", "write", "finalize")
COLOURS = {
    "read": "tab:blue",
    "stage": "tab:blue",
    "merge": "tab:orange",
    "write": "tab:green",
    "finalize": "tab:green",
    "start": "lightgrey",
    "acquire": "#cfe2f3",
}


def timeline_table(rows):
    """Per traced run (perf_e2e.py --timeline): where the wall time went."""
    out = [
        "| run | cache | load | wall s | start-up s | merge loop s | merging s | main thread "
        "waits s | reads s (thread) | writes s (thread) | final shard s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t = r.get("timeline")
        if not t:
            continue
        spans = t["seconds_by_phase_and_thread"]

        def total(phase, thread=None):
            return sum(
                v
                for k, v in spans.items()
                if k.split("@")[0] == phase and (thread is None or k.split("@")[1] == thread)
            )

        # the reader's own time: its calls less their waits for the look-ahead's room
        reads = (total("stage") - total("acquire", "mergekit-ace-reader")) or total("read")
        read_thread = "reader" if total("stage") else "main"
        writes = total("write")
        write_thread = "writer" if any(k.startswith("write@mergekit") for k in spans) else "main"
        main_busy = sum(
            v
            for k, v in spans.items()
            if k.endswith("@MainThread")
            and k.split("@")[0] in ("read", "take", "merge", "hand_off", "write", "finalize")
        )
        out.append(
            "| {} | {} | {:.1f} | {:.1f} | {:.1f} | {:.1f} | {:.1f} | {:.1f} | {:.1f} ({}) "
            "| {:.1f} ({}) | {:.1f} |".format(
                r.get("spec", r["method"]),
                "cold" if r.get("cold") else "hot",
                r.get("load", float("nan")),
                r["seconds"],
                t["before_first_read"],
                t["merge_loop"],
                total("merge"),
                max(0.0, t["merge_loop"] - main_busy),
                reads,
                read_thread,
                writes,
                write_thread,
                total("finalize"),
            )
        )
    return "\n".join(out)


# Kernel phases under the names older traces gave them (before the kernel's steps were split
# into modules).
RENAMED = {"_scan_experts": "scan_experts", "refine_phase": "solve_and_refine"}


def kernel_phase_table(rows):
    """ACE's phases per branch, summed over the tensors of each traced run."""
    order = (
        "scan_experts",
        "accumulate",
        "build_system",
        "factor",
        "solve_rows_",
        "solve_and_refine",
        "eigh",
        "finish_rows",
    )
    out = [
        "| run | branch | tensors | merge s | merge CPU s | "
        + " | ".join(f"{p.strip('_')} s (CPU s)" for p in order)
        + " |",
        "|---|---|---|---|---|" + "---|" * len(order),
    ]
    for r in rows:
        for branch, phases in (r.get("timeline") or {}).get("kernel", {}).items():
            phases = {RENAMED.get(name, name): value for name, value in phases.items()}
            merge = phases["merge"]
            cells = [
                f"{phases[p]['seconds']:.1f} ({phases[p]['cpu']:.1f})" if p in phases else "-"
                for p in order
            ]
            out.append(
                f"| {r.get('spec', r['method'])} ({'cold' if r.get('cold') else 'hot'}) "
                f"| {branch} | {merge['tensors']} | {merge['seconds']:.1f} | "
                f"{merge['cpu']:.1f} | " + " | ".join(cells) + " |"
            )
    return "\n".join(out)


def plot_timelines(rows, path, traces=None):
    """One panel per traced run: a bar per phase call on each thread, from process start.
    ``traces``: a folder holding the traces by name (e.g. unpacked from another machine)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for r in rows:
        if r.get("trace") and traces and not Path(r["trace"]).exists():
            r["trace"] = str(Path(traces) / Path(r["trace"]).name)
    runs = [r for r in rows if r.get("trace") and Path(r["trace"]).exists()]
    fig, axes = plt.subplots(
        len(runs), 1, figsize=(11, 1.3 + 1.1 * len(runs)), sharex=True, squeeze=False
    )
    for ax, r in zip(axes[:, 0], runs):
        events = [json.loads(line) for line in open(r["trace"]) if line.strip()]
        threads = sorted(
            {e["thread"] for e in events if e["phase"] in PHASES + ("start",)},
            key=lambda name: (name != "MainThread", name),
        )
        staged = any(e["phase"] == "stage" for e in events)
        # the reader's calls, then on top its waits for the look-ahead's room
        shown = [
            e
            for e in events
            if e["phase"] in PHASES + ("start",) and not (staged and e["phase"] == "read")
        ]
        shown += [
            e
            for e in events
            if e["phase"] == "acquire" and e["thread"] in threads and e["thread"] != "MainThread"
        ]
        for e in shown:
            ax.barh(
                threads.index(e["thread"]),
                e["end"] - e["start"],
                left=e["start"],
                height=0.8,
                color=COLOURS[e["phase"]],
                linewidth=0,
            )
        ax.set_yticks(
            range(len(threads)),
            [t.replace("mergekit-ace-", "").replace("MainThread", "main") for t in threads],
        )
        ax.invert_yaxis()
        ax.set_title(
            f"{r.get('label', '')}{r.get('spec', r['method'])}, "
            f"{'cold' if r.get('cold') else 'hot'} page cache: {r['seconds']:.1f} s",
            fontsize=9,
            loc="left",
        )
    axes[-1, 0].set_xlabel("seconds since the process started (grey: imports, planning)")
    kinds = ("read", "merge", "write", "acquire")
    handles = [plt.Rectangle((0, 0), 1, 1, color=COLOURS[p]) for p in kinds]
    fig.legend(
        handles,
        ["read", "merge", "write", "reader waits for room"],
        loc="upper right",
        ncol=4,
        fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(paths):
    if not paths or paths[0] in ("-h", "--help"):
        print(__doc__)
        return
    if paths and paths[0] == "--best":
        print(kernel_table(best_of(paths[1:])))
        return
    if paths and paths[0] == "--timeline":
        options = {
            flag: paths[paths.index(flag) + 1] for flag in ("--png", "--traces") if flag in paths
        }
        files = [p for p in paths[1:] if p not in options and p not in options.values()]
        rows = [json.loads(line) for f in files for line in open(f) if line.strip()]
        print(timeline_table(rows) + "\n\n" + kernel_phase_table(rows))
        if "--png" in options:
            plot_timelines(rows, options["--png"], options.get("--traces"))
        return
    for path in paths:
        rows = [json.loads(line) for line in open(path) if line.strip()]
        print(f"### {path}\n")
        print(e2e_table(rows) if rows and "method" in rows[0] else kernel_table(rows))
        print()


if __name__ == "__main__":
    main(sys.argv[1:])
